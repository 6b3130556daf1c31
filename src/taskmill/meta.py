"""Job metadata: a small JSON object set at send, stored with the job, filterable.

``task.options(meta={"user_id": 42}).send(...)`` stores ``{"user_id": 42}`` on ``Job.meta``;
``app.list_jobs(meta={"user_id": 42})`` finds the jobs whose metadata holds that pair.

>>> check_meta({"user_id": 42, "created_by": "cron"})
{'user_id': 42, 'created_by': 'cron'}
>>> meta_matches({"user_id": 42, "plan": "pro"}, {"user_id": 42.0})
True
>>> meta_matches({"flag": True}, {"flag": 1})
False
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from taskmill.errors import ConfigurationError
from taskmill.job import Meta, MetaValue

MAX_META_BYTES = 4096
"""The most a job's metadata may take as JSON: it travels with every claim and listing."""
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
_INT_RANGE = 2**63
_encoder = msgspec.json.Encoder()


def check_meta(meta: Mapping[str, Any], *, what: str = "meta") -> Meta:
    """The metadata as a plain dict, or ``ConfigurationError`` saying what is wrong with it.

    Keys are 1 to 64 letters, digits and ``_ . : -`` (not starting with a punctuation mark);
    values are strings, whole numbers (64-bit), finite floats, booleans or None; the whole is
    at most ``MAX_META_BYTES`` bytes of JSON.
    """
    if not isinstance(meta, Mapping):
        raise ConfigurationError(f"{what} must be a mapping of str keys, not {meta!r}")
    checked: Meta = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigurationError(
                f"{what} key {key!r} is not 1 to 64 letters, digits or _ . : - "
                "(starting with a letter, digit or _)"
            )
        checked[key] = _check_value(key, value, what)
    size = len(_encoder.encode(checked))
    if size > MAX_META_BYTES:
        raise ConfigurationError(
            f"{what} is {size:,} bytes as JSON; the limit is {MAX_META_BYTES:,}: keep ids "
            "and labels there, not data"
        )
    return checked


def _check_value(key: str, value: Any, what: str) -> MetaValue:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        if not -_INT_RANGE <= value < _INT_RANGE:
            raise ConfigurationError(f"{what}[{key!r}] = {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigurationError(f"{what}[{key!r}] must be a finite number, not {value}")
        return value
    raise ConfigurationError(
        f"{what}[{key!r}] must be a str, int, float, bool or None, not {type(value).__name__}"
    )


def same_value(have: MetaValue, want: MetaValue) -> bool:
    """JSON equality: numbers by value (1 == 1.0), booleans and null only equal themselves."""
    if isinstance(have, bool) or isinstance(want, bool) or have is None or want is None:
        return have is want
    if isinstance(have, int | float) and isinstance(want, int | float):
        return have == want
    return type(have) is type(want) and have == want


def meta_matches(meta: Mapping[str, MetaValue], wanted: Mapping[str, MetaValue]) -> bool:
    """True if ``meta`` holds every pair of ``wanted`` (a key given None must hold null)."""
    return all(key in meta and same_value(meta[key], value) for key, value in wanted.items())


def encode_meta(meta: Meta) -> bytes | None:
    """Stored form: JSON, or None for no metadata (nothing stored)."""
    return _encoder.encode(meta) if meta else None


def decode_meta(data: bytes | str | None) -> Meta:
    """Read stored metadata; what is not a JSON object reads as no metadata."""
    if not data:
        return {}
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def parse_pair(text: str) -> tuple[str, MetaValue]:
    """``key=value`` from a command line: the value is JSON if it reads as a JSON scalar
    (``42``, ``true``, ``null``, ``"42"``), else the text itself.

    >>> parse_pair("user_id=42"), parse_pair("agent=gpt-4"), parse_pair('code="007"')
    (('user_id', 42), ('agent', 'gpt-4'), ('code', '007'))
    """
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigurationError(f"expected KEY=VALUE, not {text!r}")
    value: Any
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        value = raw
    if isinstance(value, list | dict):
        value = raw
    return key, check_meta({key: value})[key]
