"""Arguments and results round-trip through the broker as docs/payloads.md promises (S8 of the
reliability plan, at CI size).

For a task whose parameter and return value are annotated with a type docs/payloads.md lists
(``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``, nested ``list``/``tuple``/``set``/
``frozenset``/``dict``, aware ``datetime``, ``date``, ``Decimal``, ``UUID``, dataclasses,
msgspec ``Struct``s, ``Optional`` and unions), every generated argument either reaches the
function equal to what was sent and of the annotated type, and comes back so from
``handle.result()``; or it is refused at ``send`` with taskmill's own error naming the task,
and the broker stored nothing. Which of the two is decided up front, from the limits
docs/payloads.md lists (a lone surrogate, NaN or ±infinity, an int of more than 4,299
digits, a UTC offset with seconds, dict keys that become the same text, nesting past 100, a
payload over ``max_payload_bytes`` are refused; everything else goes through), so the test
cannot pass by refusing everything.

The job runs on the memory broker with ``app.run_until_idle()``: the worker's own decoding
of the stored bytes. (Eager mode, ``memory://?eager=1``, is the same path: ``send`` stores
the job in the broker and then runs ``run_until_idle`` itself.)
"""

from __future__ import annotations

import math
import random
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskmill import App, PayloadTooLargeError, SerializationError

from .support import CountingBroker, difference, same, scaled

LIMIT = 1024 * 1024  # max_payload_bytes' default


@dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: str
    when: datetime | None = None


class Item(msgspec.Struct, frozen=True):
    name: str
    tags: frozenset[str]
    price: Decimal
    where: Point | None = None
    ids: list[uuid.UUID] = []


# --- strategies: (annotation, values of it) ---------------------------------------------------

Typed = tuple[Any, st.SearchStrategy[Any]]

_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.one_of(
    st.text(),
    # a lone surrogate: not UTF-8, so not JSON: refused at send
    st.tuples(st.text(max_size=5), _SURROGATE, st.text(max_size=5)).map("".join),
)
MAX_INT = 10**4299
"""An int is stored if it has at most 4,299 digits, either sign (docs/payloads.md)."""

# far beyond 64 bits too, up to and past the 4,299 digits an int may have; around that edge:
# 4,299 digits (stored), 4,300 (refused: msgspec writes it, but reads back only 4,300
# characters with the sign), 4,301 (past Python's int-to-text limit)
_EDGE_INTS = {
    "4,299 digits": MAX_INT - 1,
    "-4,299 digits": -(MAX_INT - 1),
    "-4,299 digits, 9...": -9 * 10**4298,
    "4,300 digits": MAX_INT,
    "-4,300 digits": -MAX_INT,
    "4,300 digits, 9...": 9 * MAX_INT,
    "4,301 digits": 10**4300,
}
"""By name: repr() fails on ints this long, and Hypothesis shows the choices."""


def _edge_int(name: str) -> int:
    return _EDGE_INTS[name]


ints = st.one_of(
    st.integers(),
    st.integers(-(2**200), 2**200),
    st.sampled_from(sorted(_EDGE_INTS)).map(_edge_int),
)
floats = st.floats()  # NaN and ±inf too: refused (JSON has neither)
# UTC offsets of whole minutes, and with seconds (refused: RFC 3339 text has minutes only)
zones = st.one_of(
    st.just(UTC),
    st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m))),
    st.integers(-86_399, 86_399).map(lambda s: timezone(timedelta(seconds=s))),
    st.timezones(),  # (a zone's local mean time before 1900 or so has seconds too)
)
aware: st.SearchStrategy[datetime] = st.datetimes(timezones=zones)
decimals = st.decimals(allow_nan=True, allow_infinity=True)
points = st.builds(Point, ints, floats, texts, st.none() | aware)
items = st.builds(
    Item,
    texts,
    st.frozensets(st.text(max_size=8), max_size=4),
    decimals,
    st.none() | points,
    st.lists(st.uuids(), max_size=3),
)

LEAVES: list[Typed] = [
    (int, ints),
    (float, floats),
    (str, texts),
    (bytes, st.binary()),
    (bool, st.booleans()),
    (None, st.none()),
    (datetime, aware),
    (date, st.dates()),
    (Decimal, decimals),
    (uuid.UUID, st.uuids()),
    (Point, points),
    (Item, items),
    (int | str, st.one_of(ints, texts)),
    (float | None, st.none() | floats),
]
# hashable, and text-like or number-like in JSON: a set's members, a dict's keys
KEYS: list[Typed] = [
    (str, texts),
    (int, ints),
    (uuid.UUID, st.uuids()),
    (date, st.dates()),
    (float, floats),
]


def _of(origin: type, *args: Any) -> Any:
    """``origin[args]`` (``list[int]``), made at run time."""
    return types.GenericAlias(origin, args)


def _containers(inner: st.SearchStrategy[Typed]) -> st.SearchStrategy[Typed]:
    def lists(t: Typed) -> Typed:
        return _of(list, t[0]), st.lists(t[1], max_size=4)

    def tuples(t: Typed) -> Typed:
        return _of(tuple, t[0], ...), st.lists(t[1], max_size=4).map(tuple)

    def pairs(a: Typed, b: Typed) -> Typed:
        return _of(tuple, a[0], b[0]), st.tuples(a[1], b[1])

    def optional(t: Typed) -> Typed:
        return (t[0] | None if t[0] is not None else None), st.none() | t[1]

    def dicts(k: Typed, v: Typed) -> Typed:
        return _of(dict, k[0], v[0]), st.dictionaries(k[1], v[1], max_size=4)

    def sets(k: Typed) -> Typed:
        return _of(set, k[0]), st.sets(k[1], max_size=4)

    def frozensets(k: Typed) -> Typed:
        return _of(frozenset, k[0]), st.frozensets(k[1], max_size=4)

    keys = st.sampled_from(KEYS)
    return st.one_of(
        inner.map(lists),
        inner.map(tuples),
        st.tuples(inner, inner).map(lambda ab: pairs(*ab)),
        inner.map(optional),
        st.tuples(keys, inner).map(lambda kv: dicts(*kv)),
        keys.map(sets),
        keys.map(frozensets),
    )


typed: st.SearchStrategy[Typed] = st.recursive(st.sampled_from(LEAVES), _containers, max_leaves=6)


# --- the app ----------------------------------------------------------------------------------


class Harness:
    """One app, a task per annotation (made once), a fresh counting broker per example."""

    def __init__(self) -> None:
        self.app = App("memory://")
        self.received: list[Any] = []
        self.tasks: dict[str, Any] = {}

    def task(self, annotation: Any) -> Any:
        key = repr(annotation)
        task = self.tasks.get(key)
        if task is None:
            received = self.received

            def echo(value: Any) -> Any:
                received.append(value)
                return value

            echo.__annotations__ = {"value": annotation, "return": annotation}
            task = self.tasks[key] = self.app.task(name=f"props.echo{len(self.tasks)}")(echo)
        return task

    def fresh(self) -> CountingBroker:
        broker = CountingBroker()
        self.app.client.use_broker(broker, "memory://")
        self.received.clear()
        return broker


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.app.close()


def _unstorable(value: Any) -> bool:
    """Whether docs/payloads.md says ``value`` is refused at send: a str with a lone surrogate
    (not UTF-8), NaN or ±infinity, an int of more than 4,299 digits, a datetime whose UTC
    offset is not whole minutes, a dict with two keys that are the same text in JSON."""
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -MAX_INT < value < MAX_INT
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, datetime):
        offset = value.utcoffset()
        return offset is not None and offset % timedelta(minutes=1) != timedelta(0)
    if isinstance(value, dict):
        parts = any(_unstorable(k) or _unstorable(v) for k, v in value.items())
        return parts or _keys_collide(value)
    if isinstance(value, list | tuple | set | frozenset):
        return any(_unstorable(v) for v in value)
    if isinstance(value, Point):
        return any(_unstorable(v) for v in (value.x, value.y, value.label, value.when))
    if isinstance(value, Item):
        return any(_unstorable(v) for v in (value.name, value.tags, value.where))
    return False


def _keys_collide(mapping: dict[Any, Any]) -> bool:
    """Whether two keys are one key of the stored JSON object (read back, it has fewer)."""
    stored = msgspec.json.decode(msgspec.json.encode(mapping))
    assert isinstance(stored, dict)
    return len(stored) < len(mapping)


def check_round_trip(h: Harness, annotation: Any, value: Any, *, keyword: bool) -> None:
    """The property: refused before any write, or received and returned as sent."""
    broker = h.fresh()
    task = h.task(annotation)
    refuse = _unstorable(value)
    if not refuse:
        size = len(msgspec.json.encode(([], {"value": value}) if keyword else ([value], {})))
        refuse = size > LIMIT
    refused: Exception | None = None
    try:
        handle = task.send(value=value) if keyword else task.send(value)
    except (SerializationError, PayloadTooLargeError) as exc:
        refused = exc
    if refused is not None:
        assert refuse, f"refused a value that converts: {refused}"
        assert repr(task.name) in str(refused), f"the error does not name the task: {refused}"
        assert broker.writes == 0
        return
    assert not refuse, "accepted a value it cannot store"
    assert broker.writes == 1
    h.app.run_until_idle()
    assert len(h.received) == 1, "the function did not run exactly once"
    assert same(value, h.received[0]), f"the function got: {difference(value, h.received[0])}"
    result = handle.result(timeout=5)
    assert same(value, result), f"result() returned: {difference(value, result)}"


@settings(max_examples=scaled(1.0))
@given(typed.flatmap(lambda t: st.tuples(st.just(t[0]), t[1])), st.booleans())
@example((str, "\ud800"), False)  # a lone surrogate: was a bare UnicodeEncodeError at send
@example((list[str], ["a", "\udfff"]), True)
@example((int, 2**64), False)
@example((int, 10**4300), False)  # 4,301 digits: was a bare ValueError at send
@example((int, 10**4299), True)  # 4,300 digits: refused (a negative one was stored unreadable)
@example((int, -(10**4299)), False)
@example((Any, -(10**4299)), False)  # unannotated: was stored, and unreadable by the worker
@example((int, 10**4299 - 1), True)  # 4,299 digits: stored
@example((Any, -(10**4299 - 1)), False)
@example((int, -(2**200)), True)
@example((dict[int, str], {2**70: "big key", -1: ""}), False)
@example((Decimal, Decimal("sNaN")), False)
@example((Decimal, Decimal("-0.000")), False)
@example((float, -0.0), False)
@example((float, 5e-324), False)
@example((float, float("nan")), False)  # was stored as null
@example((float | None, float("-inf")), True)  # was received as None
@example((Any, [1.5, float("inf")]), False)
@example((dict[float, int], {float("nan"): 1}), False)  # was stored as the key "nan"
@example((dict[int, str], {1: "int", -1: "minus"}), False)
@example((datetime, datetime(1900, 1, 1, tzinfo=timezone(timedelta(seconds=561)))), False)
@example((datetime, datetime(1960, 1, 1, tzinfo=ZoneInfo("Africa/Monrovia"))), True)  # -0:44:30
@example((datetime, datetime(2000, 1, 1, tzinfo=timezone(timedelta(seconds=20)))), False)
def test_arguments_and_results_round_trip(
    harness: Harness, case: tuple[Any, Any], keyword: bool
) -> None:
    annotation, value = case
    check_round_trip(harness, annotation, value, keyword=keyword)


# --- payload size ---------------------------------------------------------------------------

# "[[" + quoted text + "],{}]": a str argument's payload is its JSON text plus 7 bytes
_OVERHEAD = len(msgspec.json.encode(([""], {})))


@settings(max_examples=scaled(0.02))
@given(st.integers(-64, 64), st.sampled_from(["a", "é", "€", "\x00", '"', "𝄞"]))
@example(0, "a")  # exactly the limit: stored
@example(1, "a")  # one byte over: refused
def test_payload_size_limit(harness: Harness, offset: int, char: str) -> None:
    """A payload up to ``max_payload_bytes`` (1 MiB) is stored, one byte over it is refused
    with ``PayloadTooLargeError``, whatever the characters cost as JSON (UTF-8, escapes)."""
    width = len(msgspec.json.encode(char)) - 2
    size = LIMIT + offset - _OVERHEAD  # of the argument's JSON text, quotes excluded
    value = char * (size // width) + "b" * (size % width)
    assert len(msgspec.json.encode(([value], {}))) == LIMIT + offset
    check_round_trip(harness, str, value, keyword=False)


# --- nesting depth ----------------------------------------------------------------------------


MAX_DEPTH = 100
"""Lists and objects may nest this deep in an argument or a result (docs/payloads.md)."""


def _nested(depth: int, seed: int = 0) -> Any:
    """A value nested ``depth`` deep: lists, or (with a seed) lists and dicts as it says."""
    shapes = random.Random(seed)
    value: Any = []
    for _ in range(depth - 1):
        value = {"k": value} if seed and shapes.random() < 0.5 else [value]
    return value


@settings(max_examples=scaled(0.1))
@given(st.integers(1, 1200), st.integers(0, 2**32))
@example(100, 0)  # the deepest stored
@example(101, 0)  # refused
@example(101, 7)
@example(1100, 0)  # beyond the interpreter's recursion limit: was a bare RecursionError at send
def test_nesting_past_the_limit_is_refused(harness: Harness, depth: int, seed: int) -> None:
    """A value nested ``depth`` deep (lists, or lists and dicts) round-trips if ``depth`` is at
    most 100, and is refused at send with ``SerializationError`` past it: taskmill's own limit,
    the same wherever the send is made from (msgspec's own was the interpreter's recursion
    limit less the stack in use)."""
    broker = harness.fresh()
    task = harness.task(Any)
    value = _nested(depth, seed)
    refused: SerializationError | None = None
    try:
        handle = task.send(value)
    except SerializationError as exc:
        refused = exc
    if refused is not None:
        assert depth > MAX_DEPTH, f"refused at depth {depth}: {refused}"
        assert repr(task.name) in str(refused) and "100 deep" in str(refused)
        assert broker.writes == 0
        return
    assert depth <= MAX_DEPTH, f"accepted at depth {depth}"
    harness.app.run_until_idle()
    assert harness.received == [value]
    assert handle.result(timeout=5) == value


def _in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread, whose stack is nearly empty: a send from shallow code."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(("ok", fn()))
        except BaseException as exc:
            box.append(("raised", exc))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    kind, value = box[0]
    if kind == "raised":
        raise value
    return value


def test_what_send_accepts_the_worker_decodes(harness: Harness) -> None:
    """The limit does not depend on the stack: a send from shallow code (a fresh thread)
    accepts 100 levels and refuses 101, and the worker (deeper) decodes what it accepted.
    (Before the limit, a send from shallow code accepted ~990 levels that the worker's decode,
    deeper in its own stack, failed with RecursionError.)"""
    task = harness.task(list[Any])
    broker = harness.fresh()
    handle = _in_fresh_thread(lambda: task.send(_nested(MAX_DEPTH)))
    assert broker.writes == 1
    harness.app.run_until_idle()
    assert handle.result(timeout=5) == _nested(MAX_DEPTH)
    for depth in (MAX_DEPTH + 1, 990):
        broker = harness.fresh()
        with pytest.raises(SerializationError, match="more than 100 deep"):
            _in_fresh_thread(lambda d=depth: task.send(_nested(d)))  # type: ignore[misc]
        assert broker.writes == 0


# --- what JSON would change: refused -------------------------------------------------------


@given(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_floats_are_refused(harness: Harness, value: float) -> None:
    """NaN and ±inf were stored as JSON null: a ``float | None`` (or unannotated) parameter
    received None, silently. Now refused at send, wherever they are."""
    check_round_trip(harness, float | None, value, keyword=False)
    check_round_trip(harness, Any, [value], keyword=True)
    check_round_trip(harness, dict[str, float], {"x": value}, keyword=False)


def test_datetime_offset_with_seconds(harness: Harness) -> None:
    """RFC 3339 offsets have whole minutes: msgspec wrote +00:09 for Paris' 1900 offset of
    0:09:21, and the datetime received was 21 s off the one sent. Now refused at send."""
    sent = datetime(1900, 1, 1, tzinfo=timezone(timedelta(minutes=9, seconds=21)))
    check_round_trip(harness, datetime, sent, keyword=False)
    check_round_trip(harness, datetime, sent.astimezone(UTC), keyword=False)  # what to send


def test_dict_keys_that_collide_as_text(harness: Harness) -> None:
    """Dict keys are stored as JSON text, so keys 1 and '1' were one key: the function
    received one entry, silently. Now refused at send."""
    check_round_trip(harness, dict[int, str], {1: "int", "1": "str"}, keyword=False)


@given(
    st.dictionaries(
        st.one_of(st.integers(-3, 3), st.integers(-3, 3).map(str), st.sampled_from([1.0, 0.5])),
        st.integers(0, 9),
        max_size=6,
    )
)
def test_keys_that_become_the_same_text_are_refused(
    harness: Harness, mapping: dict[Any, int]
) -> None:
    """An unannotated dict of int, str and float keys reaches the function with its keys as
    text, unless two keys are the same text (``1`` and ``"1"``, ``0.5`` and ``"0.5"``): then the
    send is refused and nothing is stored."""
    broker = harness.fresh()
    task = harness.task(Any)
    texts = [k if isinstance(k, str) else repr(k) for k in mapping]
    collide = len(set(texts)) < len(texts)
    refused: SerializationError | None = None
    try:
        handle = task.send(mapping)
    except SerializationError as exc:
        refused = exc
    if refused is not None:
        assert collide, f"refused keys that do not collide: {refused}"
        assert repr(task.name) in str(refused) and "JSON text" in str(refused)
        assert broker.writes == 0
        return
    assert not collide, "accepted keys that collide"
    harness.app.run_until_idle()
    as_text = dict(zip(texts, mapping.values(), strict=True))
    assert harness.received == [as_text]
    assert handle.result(timeout=5) == as_text


def test_ints_of_4300_digits_are_refused_either_sign(harness: Harness) -> None:
    """msgspec reads back an integer of at most 4,300 characters, the minus sign included, but
    wrote 4,300 digits and a sign: -10**4299 was stored, unannotated, and the worker could not
    read it. Now an int of 4,300 digits is refused either sign, and 4,299 round-trip."""
    for value in (-MAX_INT, MAX_INT, 9 * MAX_INT):
        for annotation in (Any, int):
            check_round_trip(harness, annotation, value, keyword=False)
    for value in (MAX_INT - 1, -(MAX_INT - 1)):
        for annotation in (Any, int, float | int):
            check_round_trip(harness, annotation, value, keyword=True)
