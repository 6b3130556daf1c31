"""JSON in and out (msgspec). Never pickle: a payload is data, not code.

What JSON would silently change, or what could not be read back, is refused when it is
encoded (``SerializationError`` naming the task and where in the value): NaN and ±infinity
(msgspec writes them as ``null``), a UTC offset with seconds (RFC 3339 text has whole minutes),
dict keys that become the same text (``{1: "a", "1": "b"}``), lists and objects nested more
than ``MAX_DEPTH`` deep, integers of more than ``MAX_INT_DIGITS`` digits. Decoding refuses
nesting past the same limit. docs/payloads.md ("Limits") says why each limit is what it is.

The checks read msgspec's output before the value (msgspec has no option for any of these,
and its ``enc_hook`` sees only types it does not know): one ``translate`` pass keeps the few
bytes they look at, which decide the common payload alone; a dict's keys are checked by
msgspec's ordered encoder, in C (it refuses keys other than ``str``); ``null``, a time offset,
a long run of digits or many brackets send the value to the walk, in Python, which finds what
and where (``_needs_walk``).

>>> encode([1.5, None], what="result of task 't'")
b'[1.5,null]'
>>> encode({"price": float("nan")}, what="result of task 't'")
Traceback (most recent call last):
taskmill.errors.SerializationError: result of task 't' cannot be stored as JSON: \
result['price'] is nan: JSON has no NaN or infinity (msgspec would store null)
"""

from __future__ import annotations

import dataclasses
import re
from array import array
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from itertools import accumulate
from typing import Any, NoReturn
from uuid import UUID

import msgspec

from taskmill.errors import PayloadTooLargeError, SerializationError

MAX_DEPTH = 100
"""How deep lists and objects may nest in one argument or one result: ``[]`` is 1 deep,
``[[1]]`` 2, a scalar 0. Refused past it when encoded and when decoded."""
MAX_INT_DIGITS = 4_299
"""The most decimal digits an integer may have, either sign: msgspec reads back at most 4,300
characters of a JSON number, the minus sign included."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_INT_BOUND = 10**MAX_INT_DIGITS
_MINUTE = timedelta(minutes=1)
_PAYLOAD_DEPTH = MAX_DEPTH + 2
"""A stored payload, ``[[args...], {kwargs...}]``, nests two more than its arguments."""
_OFFSET = re.compile(rb":[0-9][0-9]\"")
"""The end of an ISO 8601 time with a UTC offset (``...T09:00:00+02:00"``), and of others:
it starts with a literal, which ``re`` finds fast."""
_LONG_INT = re.compile(rb"(?<![0-9])[0-9]{%d}" % (MAX_INT_DIGITS + 1))
"""A run of more digits than an integer may have (starting at the run's first digit only, so
the search stays linear)."""
_STEP = (MAX_INT_DIGITS + 1) // 2
_DIGIT_FLAGS = bytes(49 if 48 <= c <= 57 else 48 for c in range(256))  # digits b"1", others b"0"
_NOT_MARKS = bytes(c for c in range(256) if c not in b"{[,:Zn")
_sorted_encoder = msgspec.json.Encoder(order="deterministic")
"""Refuses a dict with a key other than a str: in C, whether any dict of a value has one."""
_STRING = re.compile(rb'"[^"]*"')
_PLAIN = (str, bytes, bytearray, memoryview, date, timedelta, UUID, Decimal)
"""Stored as text, with nothing JSON would change (``datetime``, a ``date``, is checked
before)."""
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')
_DEPTH_STEPS = bytes.maketrans(b"[]", b"\x01\xff")
"""An opening bracket as +1 and a closing one as -1, read as signed bytes."""
_PEEL_UP_TO = 4096
"""Brackets up to which ``nesting_exceeds`` peels innermost pairs (a few passes over a short
string); past it, one running sum (its cost does not grow with the depth)."""


def encode(value: Any, *, what: str) -> bytes:
    """``value`` as JSON; ``SerializationError`` saying why and where if it cannot be stored,
    or JSON would change it (see the module's docstring). ``what`` starts the message
    (``"result of task 'x'"``)."""
    if value is None:  # what most tasks return: the checks below would walk its ``null``
        return b"null"
    try:
        data = _encoder.encode(value)
    except Exception as exc:
        _unencodable(exc, what, [(value, "result")])
    if _needs_walk(value, data, objects=0, depth=MAX_DEPTH):
        _walk(value, "result", what)
    return data


def encode_payload(
    task: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limit: int,
    options: dict[str, Any] | None = None,
) -> bytes:
    """``[args, kwargs]``, or ``[args, kwargs, options]`` when a send set job options that
    travel with the payload (a per-send ``soft_timeout_s``), so no broker stores a new field.
    ``SerializationError`` as ``encode`` says; ``PayloadTooLargeError`` past ``limit`` bytes."""
    envelope = (args, kwargs, options) if options else (args, kwargs)
    try:
        data = _encoder.encode(envelope)
    except Exception as exc:
        _unencodable(exc, f"arguments of task {task!r}", _places(args, kwargs))
    if _needs_walk(envelope, data, objects=2 if options else 1, depth=_PAYLOAD_DEPTH):
        what = f"arguments of task {task!r}"
        for value, place in _places(args, kwargs):
            _walk(value, place, what)
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"arguments of task {task!r} are {len(data):,} bytes as JSON; the limit is "
            f"{limit:,} (App(max_payload_bytes=...)). Store large data elsewhere and pass a "
            "reference."
        )
    return data


def _places(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Any, str]]:
    return [(a, f"args[{i}]") for i, a in enumerate(args)] + [
        (v, f"kwargs[{k!r}]") for k, v in kwargs.items()
    ]


def _unencodable(exc: Exception, what: str, places: list[tuple[Any, str]]) -> NoReturn:
    """The ``SerializationError`` for what msgspec could not encode. Where it failed on an int
    too long for Python to write, or nesting past the interpreter's recursion limit, the
    walk says where first."""
    if isinstance(exc, RecursionError | ValueError) and not isinstance(exc, UnicodeError):
        for value, place in places:
            _walk(value, place, what)
    if isinstance(exc, UnicodeEncodeError):  # a lone surrogate: not UTF-8, so not JSON text
        reason = (
            f"a str holds {exc.object[exc.start : exc.end]!r}, a lone surrogate, which is not "
            "text (UTF-8)"
        )
    elif isinstance(exc, RecursionError):
        reason = f"a value {_DEEP}"
    elif isinstance(exc, TypeError | msgspec.EncodeError | OverflowError | ValueError):
        reason = str(exc)  # ValueError: an int past sys.get_int_max_str_digits() digits
    else:
        raise exc
    raise SerializationError(f"{what} cannot be stored as JSON: {reason}") from None


def _needs_walk(value: Any, data: bytes, *, objects: int, depth: int) -> bool:
    """Whether ``value`` may hold something the walk refuses, judged from ``data`` (msgspec's
    JSON of it) in C: an object past the envelope's ``objects`` with a key other than a str
    (the ordered encoder refuses those), a ``null`` (a NaN became one), a time with a UTC
    offset (it may have had seconds), a run of digits longer than an integer may be, nesting
    past ``depth``. A value with few items for its size (long text) is walked: that costs less
    than scanning it."""
    size = len(data)
    marks = data.translate(None, _NOT_MARKS)  # one pass; each check below reads a few bytes
    if (
        len(marks) <= depth
        and not marks.strip(b"[{,")
        and marks.count(b"{") <= objects
        and size <= MAX_INT_DIGITS
    ):
        return False  # only the envelope's object, few brackets, short: the common case
    if size > 1024 and marks.count(b",") * 64 < size:
        return True
    if marks.count(b"{") > objects:
        try:
            _sorted_encoder.encode(value)
        except Exception:  # a key other than a str (or a set it cannot order): walk
            return True
    if b"n" in marks and b"null" in data:
        return True
    if (b"Z" in marks and b'Z"' in data) or (b":" in marks and _OFFSET.search(data)):
        return True
    if size > MAX_INT_DIGITS and _long_digits(data):
        return True
    return marks.count(b"[") + marks.count(b"{") > depth and nesting_exceeds(
        data, depth, counted=True
    )


def _long_digits(data: bytes) -> bool:
    """Whether ``data`` has a run of more digits than an integer may have. Every
    ``_STEP``-th byte is read first: such a run holds two of them in a row."""
    sample = data[::_STEP].translate(_DIGIT_FLAGS)
    at = sample.find(b"11")
    while at >= 0:
        window = data[
            max(0, at * _STEP - MAX_INT_DIGITS - 1) : (at + 1) * _STEP + MAX_INT_DIGITS + 1
        ]
        if _LONG_INT.search(window):
            return True
        at = sample.find(b"11", at + 1)
    return False


def nesting_exceeds(data: bytes, limit: int, *, counted: bool = False) -> bool:
    """Whether the JSON text ``data`` nests arrays and objects more than ``limit`` deep
    (``counted``: the caller knows it has more brackets than that).

    >>> nesting_exceeds(b'[[1, "]]]"], {"a": [2]}]', 3), nesting_exceeds(b"[[[]]]", 2)
    (False, True)
    """
    if not counted and data.count(b"[") + data.count(b"{") <= limit:
        return False  # fewer brackets than the limit: none can be deeper
    if b"\\" in data:  # escaped backslashes and quotes out of the way: strings end at a quote
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # the brackets and quotes alone, objects as arrays; strings without a bracket vanish
    marks = data.translate(_BRACKETS, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in marks:  # a string holds a bracket: take the strings out first
        marks = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_STRUCTURE)
    if limit >= 0 and b"[" * (limit + 1) in marks:
        return True  # a run of opening brackets deeper than the limit: the usual attack
    if len(marks) > _PEEL_UP_TO:
        # the deepest point of a running sum: linear, where peeling below costs a pass per
        # level over the whole string (60 ms for a 200 KB payload nested 100,000 deep)
        return max(accumulate(array("b", marks.translate(_DEPTH_STEPS)))) > limit
    # each pass takes out the innermost arrays (each "[]"): as many passes as levels
    for _ in range(limit):
        if not marks:
            return False
        marks = marks.replace(b"[]", b"")
    return bool(marks)


# --- finding what JSON would change, and where -------------------------------------------------

_DEEP = f"nests lists and objects more than {MAX_DEPTH} deep (taskmill's limit)"


class _Refused(Exception):
    """What is wrong with a value, and where: the path is added to from the innermost
    container outwards, as the exception leaves each one."""

    def __init__(self, reason: str, *, deep: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.deep = deep
        self.path: list[str] = []


def _walk(value: Any, root: str, what: str) -> None:
    """``SerializationError`` naming ``what``, the place in ``value`` (``root`` for the value
    itself) and the reason, if the value holds something JSON would change."""
    try:
        _check(value, 0)
    except _Refused as bad:
        if bad.deep:  # the path down would be a hundred indexes long
            place, reason = root, bad.reason
        else:
            place, reason = root + "".join(reversed(bad.path)), bad.reason
        raise SerializationError(f"{what} cannot be stored as JSON: {place} {reason}") from None


def _check(value: Any, depth: int) -> None:
    """``_Refused`` if ``value``, at nesting ``depth``, holds what JSON would change."""
    cls = type(value)
    if cls is str or cls is bool or value is None:
        return
    if cls is int:
        if -_INT_BOUND < value < _INT_BOUND:
            return
        raise _Refused(_too_long(value))
    if cls is float:
        if value - value == 0.0:  # finite (NaN and ±inf give NaN)
            return
        raise _Refused(f"is {value!r}: JSON has no NaN or infinity (msgspec would store null)")
    if cls is list or cls is tuple:
        _sequence(value, depth + 1)
    elif cls is dict:
        _mapping(value, depth + 1)
    else:
        _other(value, depth)


def _sequence(items: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Refused(_DEEP, deep=True)
    item = None
    try:
        for item in items:
            cls = type(item)  # the common scalars inline, without a call
            if cls is str or cls is bool or item is None:
                continue
            if cls is int and -_INT_BOUND < item < _INT_BOUND:
                continue
            if cls is float and item - item == 0.0:
                continue
            _check(item, depth)
    except _Refused as bad:
        if isinstance(items, list | tuple):
            index = next(i for i, x in enumerate(items) if x is item)
            bad.path.append(f"[{index}]")
        else:
            bad.path.append(" (a member of a set)")
        raise


def _mapping(mapping: dict[Any, Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Refused(_DEEP, deep=True)
    try:
        "".join(mapping)  # every key is a str (in C): no key to check
    except TypeError:
        _keys(mapping, depth)
    key = None
    try:
        for key, item in mapping.items():  # noqa: B007 (the except clause reads the key)
            cls = type(item)
            if cls is str or cls is bool or item is None:
                continue
            if cls is int and -_INT_BOUND < item < _INT_BOUND:
                continue
            if cls is float and item - item == 0.0:
                continue
            _check(item, depth)
    except _Refused as bad:
        bad.path.append(f"[{_shown(key)}]")
        raise


def _keys(mapping: dict[Any, Any], depth: int) -> None:
    """Keys other than str: each storable, and no two the same text once stored."""
    seen: dict[bytes, Any] = {}
    for key in mapping:
        try:
            _check(key, depth)
        except _Refused as bad:
            raise _Refused(f"has a key that {bad.reason}") from None
        text = _encoder.encode({key: None})[1:-6]  # b'{"1":null}' -> b'"1"'
        first = seen.setdefault(text, key)
        if first is not key:
            raise _Refused(
                f"has the keys {_shown(first)} and {_shown(key)}, both {text.decode()} as JSON "
                "text (object keys are text): one would overwrite the other"
            )


def _other(value: Any, depth: int) -> None:
    """The less common types, by ``isinstance`` (subclasses, and what msgspec encodes as
    objects: structs, dataclasses, attrs classes)."""
    if isinstance(value, datetime | time):
        _check_offset(value)
    elif isinstance(value, Enum):
        _check(value.value, depth)  # stored as its value
    elif isinstance(value, _PLAIN):
        return
    elif isinstance(value, int | float):  # a subclass: checked as the number it is
        _check(float(value) if isinstance(value, float) else int(value), depth)
    elif isinstance(value, dict):
        _mapping(value, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        _sequence(value, depth + 1)
    elif isinstance(value, msgspec.Raw):
        _raw(value, depth)
    else:
        _fields(value, depth + 1)


def _check_offset(value: datetime | time) -> None:
    offset = value.utcoffset()
    if offset is not None and offset % _MINUTE:
        raise _Refused(
            f"is a {type(value).__name__} whose UTC offset, {_signed(offset)}, is not whole "
            "minutes: "
            "its JSON text (RFC 3339) has hours and minutes only, so it would change; convert "
            "it first (to UTC, or to an offset of whole minutes)"
        )


def _fields(value: Any, depth: int) -> None:
    """A msgspec ``Struct``, a dataclass or an attrs class: its fields (other objects msgspec
    encodes have nothing to check)."""
    if isinstance(value, msgspec.Struct):
        names: Any = value.__struct_fields__
    elif dataclasses.is_dataclass(value):
        names = [f.name for f in dataclasses.fields(value)]
    elif hasattr(type(value), "__attrs_attrs__"):
        names = [a.name for a in type(value).__attrs_attrs__]
    else:
        return
    if depth > MAX_DEPTH:
        raise _Refused(_DEEP, deep=True)
    name = None
    try:
        for name in names:
            item = getattr(value, name, msgspec.UNSET)
            if item is not msgspec.UNSET:
                _check(item, depth)
    except _Refused as bad:
        bad.path.append(f".{name}")
        raise


def _raw(value: msgspec.Raw, depth: int) -> None:
    """JSON text embedded as it is: what it holds, read back."""
    try:
        _check(_decoder.decode(value), depth)
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = _DEEP if isinstance(exc, RecursionError) else f"is not JSON taskmill reads: {exc}"
        raise _Refused(f"is msgspec.Raw that {reason}") from None


def _signed(offset: timedelta) -> str:
    """A UTC offset as ``+00:09:21`` or ``-00:44:30`` (not ``-1 day, 23:15:30``)."""
    sign = "-" if offset < timedelta(0) else "+"
    seconds = abs(offset)
    minutes, second = divmod(seconds.seconds, 60)
    text = f"{sign}{minutes // 60:02}:{minutes % 60:02}:{second:02}"
    return text + (f".{seconds.microseconds:06}" if seconds.microseconds else "")


def _too_long(value: int) -> str:
    return (
        f"is an integer of {_digits(value):,} digits: taskmill stores integers of at most "
        f"{MAX_INT_DIGITS:,} digits, either sign (what msgspec reads back)"
    )


def _digits(value: int) -> int:
    """How many decimal digits ``value`` has (without ``str()``, which refuses past 4,300)."""
    n = abs(value)
    digits = max(1, int(n.bit_length() * 0.30102999566398))  # log10(2): close, never above
    while n >= 10**digits:
        digits += 1
    return digits


def _shown(key: Any) -> str:
    """A dict key for a message: its repr, cut short."""
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def decode(data: bytes | str, *, depth: int = MAX_DEPTH) -> Any:
    """Stored JSON (a result) as Python values. ``SerializationError`` if it is not JSON, or
    nests lists and objects more than ``depth`` deep (a value taskmill stored never does)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        value = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"stored value is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep("stored value") from None
    if nesting_exceeds(raw, depth):
        raise too_deep("stored value")
    return value


def decode_payload(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    """A stored ``[args, kwargs]`` payload, as JSON values. ``SerializationError`` if it is
    not one, or an argument nests more than ``MAX_DEPTH`` deep."""
    value = decode(data, depth=_PAYLOAD_DEPTH)
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


def check_depth(data: bytes, *, payload: bool = False) -> None:
    """``SerializationError`` if the stored value ``data`` (a result, or an argument of the
    stored ``payload``) nests more than ``MAX_DEPTH`` deep. ``decode`` and ``decode_payload``
    check it; decoders to other types call this."""
    if nesting_exceeds(data, _PAYLOAD_DEPTH if payload else MAX_DEPTH):
        raise too_deep("stored payload: an argument" if payload else "stored value")


def too_deep(what: str) -> SerializationError:
    """The error for ``what`` nested past ``MAX_DEPTH``."""
    return SerializationError(f"{what} {_DEEP}")


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
    options = decode(bytes(items[2]))
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
    """Decode for display: a corrupt value (not JSON, or nested past the limit) is shown as
    text rather than raising."""
    try:
        return decode(data, depth=_PAYLOAD_DEPTH)
    except SerializationError:
        return data.decode("utf-8", "replace")
