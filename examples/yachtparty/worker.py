"""The app the workers load: ``taskmill worker examples.yachtparty.worker:app``, with the
settings of ``config.Config.from_env`` (``DATABASE_URL``, ...) in the environment."""

from __future__ import annotations

from examples.yachtparty.config import Config
from examples.yachtparty.tasks import build

processor = build(Config.from_env())
app = processor.app
