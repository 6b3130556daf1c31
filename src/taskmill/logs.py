"""Log set-up for taskmill's processes: human lines, or one JSON object a line for shippers.

Every log line about a job carries structured fields (``job_id``, ``task``, ``queue``,
``attempt``, and where they apply ``duration_s``, ``delay_s``, ``error``, ``traceback``) as
attributes of the record, so a JSON line has them as keys; the text line says the same in
words. Per-job lines go to the ``taskmill.job`` logger, so they can be tuned on their own:

>>> import logging
>>> logging.getLogger("taskmill.job").setLevel(logging.WARNING)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import msgspec

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # 3.12+
}
_encoder = msgspec.json.Encoder()


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines; a record's ``traceback`` field (a job's stored traceback) is
    printed under it as an exception's would be."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tb = getattr(record, "traceback", None)
        return f"{line}\n{tb.rstrip()}" if tb else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``pid``,
    ``message``, the record's structured fields, and ``exception`` when one was logged."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def _iso(created: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def configure(level: str = "info", log_format: LogFormat = "text") -> None:
    """Send taskmill's logs (and the root logger's) to stderr at ``level``, as text lines or
    JSON objects. What ``taskmill worker --log-level L --log-format F`` calls."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


__all__ = ["TEXT_FORMAT", "JsonFormatter", "LogFormat", "TextFormatter", "configure"]
