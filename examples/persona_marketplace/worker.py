"""What ``taskmill worker examples.persona_marketplace.worker:app`` imports: the app built from
the ``PERSONA_*`` environment variables (``Config.from_env``), which the example's starter and
the tests set. Its process-pool children import it the same way, with the same environment."""

from __future__ import annotations

from examples.persona_marketplace.config import Config
from examples.persona_marketplace.tasks import build

app = build(Config.from_env()).app
