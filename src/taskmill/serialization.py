"""JSON in and out (msgspec). Never pickle: a payload is data, not code."""

from __future__ import annotations

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


def encode_payload(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> bytes:
    data = encode((args, kwargs), what=f"arguments of task {task!r}")
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"arguments of task {task!r} are {len(data):,} bytes as JSON; the limit is "
            f"{limit:,} (App(max_payload_bytes=...)). Store large data elsewhere and pass a "
            "reference."
        )
    return data


def decode(data: bytes | str) -> Any:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"stored value is not valid JSON: {exc}") from None


def decode_payload(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    value = decode(data)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], list)
        or not isinstance(value[1], dict)
    ):
        raise SerializationError("stored payload is not a JSON [args, kwargs] pair")
    return value[0], value[1]


def try_decode(data: bytes) -> Any:
    """Decode for display: a corrupt value is shown as text rather than raising."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")
