"""The names of tasks, queues and periodic schedules: what a valid one looks like.

A name is 1 to ``MAX_NAME`` characters: letters and digits (of any script, as in Python
identifiers), ``_``, ``.``, ``:`` and ``-``, not starting with ``.``, ``:`` or ``-``. Every
name a function's module and qualified name make (a task's default name) is one, except a
lambda's (``mod.<lambda>``: give it a ``name=``); so are ``"emails"``, ``"billing:invoices"``,
``"reports.nightly-eu"``.

What is left out breaks somewhere: a space or a control character (log lines, the CLI), ``,``
(``taskmill worker -q a,b``), ``/`` (the HTTP API's ``/queues/{queue}/pause``), quotes and
brackets (shells, the dashboard's URLs), the empty name. Names are checked where they are
declared (``@app.task``, ``app.periodic``, ``app.configure_queue``, ``App(default_queue=)``)
and where a send names them (``options(queue=)``, ``send_task``): ``ConfigurationError``.
Jobs already stored under another name still run and can be listed, paused or retried: a
worker takes the queue names it is given as they are.

>>> check_name("task", "reports.nightly-eu")
'reports.nightly-eu'
>>> check_name("queue", "a,b")
Traceback (most recent call last):
taskmill.errors.ConfigurationError: queue name 'a,b' is not valid: use 1 to 200 letters, \
digits, '_', '.', ':' or '-', not starting with '.', ':' or '-'
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from taskmill.errors import ConfigurationError

MAX_NAME = 200
"""The longest name, in characters: a task's default name is its module's dotted path and the
function's qualified name, which can be long."""

NameKind = Literal["task", "queue", "schedule"]

_PUNCTUATION = frozenset("_.:-")


def check_name(kind: NameKind, name: str) -> str:
    """``name`` if it is a valid name of a ``kind`` (see the module's docstring), else
    ``ConfigurationError`` saying what is allowed."""
    if isinstance(name, str) and _valid(name):
        return name
    hint = "; give it a name=" if kind == "task" and "<" in str(name) else ""
    raise ConfigurationError(
        f"{kind} name {name!r} is not valid: use 1 to {MAX_NAME} letters, digits, '_', '.', "
        f"':' or '-', not starting with '.', ':' or '-'{hint}"
    )


@lru_cache(maxsize=4096)
def _valid(name: str) -> bool:
    if not 0 < len(name) <= MAX_NAME or name[0] in ".:-":
        return False
    # a letter or digit: what str.isalnum says, or what may continue a Python identifier
    # (combining marks, which isalnum does not count)
    return all(c in _PUNCTUATION or c.isalnum() or ("a" + c).isidentifier() for c in name)
