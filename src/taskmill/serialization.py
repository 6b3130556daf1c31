"""JSON in and out (msgspec). Never pickle: a payload is data, not code."""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from taskmill.errors import PayloadTooLargeError, SerializationError

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: Any, *, what: str) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from None
    except UnicodeEncodeError as exc:  # a lone surrogate: not UTF-8, so not JSON text
        raise SerializationError(
            f"{what} cannot be stored as JSON: a str holds {exc.object[exc.start : exc.end]!r}, "
            f"a lone surrogate, which is not text (UTF-8)"
        ) from None
    except ValueError as exc:  # an int of more than sys.get_int_max_str_digits() digits
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from None
    except RecursionError:  # msgspec stops at the interpreter's recursion limit
        raise SerializationError(
            f"{what} cannot be stored as JSON: nested too deeply (about "
            f"{sys.getrecursionlimit():,} levels at most)"
        ) from None


def encode_payload(
    task: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limit: int,
    options: dict[str, Any] | None = None,
) -> bytes:
    """``[args, kwargs]``, or ``[args, kwargs, options]`` when a send set job options that
    travel with the payload (a per-send ``soft_timeout_s``), so no broker stores a new field."""
    envelope = (args, kwargs, options) if options else (args, kwargs)
    data = encode(envelope, what=f"arguments of task {task!r}")
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"arguments of task {task!r} are {len(data):,} bytes as JSON; the limit is "
            f"{limit:,} (App(max_payload_bytes=...)). Store large data elsewhere and pass a "
            "reference."
        )
    return data


TOO_DEEP = (
    "stored value is nested too deeply to decode (more levels than the interpreter's "
    f"recursion limit, {sys.getrecursionlimit():,}, allows)"
)


def decode(data: bytes | str) -> Any:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"stored value is not valid JSON: {exc}") from None
    except RecursionError:
        raise SerializationError(TOO_DEEP) from None


def decode_payload(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    value = decode(data)
    if (
        not isinstance(value, list)
        or len(value) not in (2, 3)
        or not isinstance(value[0], list)
        or not isinstance(value[1], dict)
    ):
        raise SerializationError("stored payload is not a JSON [args, kwargs] pair")
    if len(value) == 3:
        _check_options(value[2])
    return value[0], value[1]


_raw_items = msgspec.json.Decoder(list[msgspec.Raw])


def payload_options(data: bytes) -> dict[str, Any]:
    """The job options a send stored with the payload (``{}`` if none). The arguments are
    skipped, not decoded; ``SerializationError`` if the options are malformed."""
    try:
        items = _raw_items.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return {}  # not a list: decode_payload says what is wrong with it
    if len(items) != 3:
        return {}
    options = _decoder.decode(items[2])
    _check_options(options)
    return options  # type: ignore[no-any-return]


def _check_options(options: Any) -> None:
    if not isinstance(options, dict):
        raise SerializationError(
            f"stored payload's third item must be a JSON object of job options, not {options!r}"
        )
    soft = options.get("soft_timeout_s")
    if soft is not None and (
        isinstance(soft, bool) or not isinstance(soft, int | float) or not soft > 0
    ):
        raise SerializationError(
            f"stored soft_timeout_s must be a number of seconds above 0, not {soft!r}"
        )


def try_decode(data: bytes) -> Any:
    """Decode for display: a corrupt value is shown as text rather than raising."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return data.decode("utf-8", "replace")
