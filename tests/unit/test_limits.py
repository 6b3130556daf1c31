"""The limits at the edges (docs/payloads.md, "Limits"): what is refused when a payload or a
result is encoded, and why; nesting refused when decoded; the syntax of names."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest

from taskmill import App, ConfigurationError, SerializationError
from taskmill.conversion import TaskTypes
from taskmill.names import MAX_NAME, check_name
from taskmill.serialization import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    decode,
    decode_payload,
    encode,
    encode_payload,
    nesting_exceeds,
    try_decode,
)
from taskmill.settings import Settings

LIMIT = 1 << 20


def refusal(*args: Any, **kwargs: Any) -> str:
    """The message of the ``SerializationError`` sending these arguments raises."""
    with pytest.raises(SerializationError) as info:
        encode_payload("t.x", args, kwargs, LIMIT)
    message = str(info.value)
    assert message.startswith("arguments of task 't.x' cannot be stored as JSON: ")
    return message.removeprefix("arguments of task 't.x' cannot be stored as JSON: ")


def nested(depth: int, leaf: Any = None) -> Any:
    value: Any = [] if leaf is None else leaf
    for _ in range(depth - (leaf is None)):
        value = [value]
    return value


class Color(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 10**30


@dataclasses.dataclass
class Line:
    price: float
    tags: set[str] = dataclasses.field(default_factory=set)


class Order(msgspec.Struct):
    lines: list[Line]
    note: str | msgspec.UnsetType = msgspec.UNSET


# --- NaN and infinity -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_where_they_are(value: float) -> None:
    assert refusal(value) == (
        f"args[0] is {value!r}: JSON has no NaN or infinity (msgspec would store null)"
    )
    assert refusal(1, [2, value]).startswith(f"args[1][1] is {value!r}")
    assert refusal(when={"a": (1, value)}).startswith(f"kwargs['when']['a'][1] is {value!r}")
    assert refusal(Order([Line(1.0), Line(value)])).startswith("args[0].lines[1].price is")
    assert refusal({value}).startswith("args[0] (a member of a set) is")
    assert refusal({value: 1}) == f"args[0] has a key that is {value!r}: " + (
        "JSON has no NaN or infinity (msgspec would store null)"
    )


def test_a_non_finite_result_is_refused() -> None:
    with pytest.raises(SerializationError, match=r"^result of task 'r' cannot be stored as JSON: "):
        encode({"total": float("nan")}, what="result of task 'r'")
    with pytest.raises(SerializationError, match=r"result\['total'\] is nan"):
        encode({"total": float("nan")}, what="result of task 'r'")


def test_finite_floats_and_decimals_that_are_not_numbers_are_stored() -> None:
    """``Decimal`` is stored as text: its NaN and infinity round-trip (docs/payloads.md)."""
    values = (-0.0, 5e-324, 1.7976931348623157e308, Decimal("NaN"), Decimal("-Infinity"), None)
    data = encode_payload("t", values, {}, LIMIT)
    assert data == b'[[-0.0,5e-324,1.7976931348623157e308,"NaN","-Infinity",null],{}]'


# --- keys that become the same text ---------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other", "text"),
    [
        (1, "1", '"1"'),
        (-2, "-2", '"-2"'),
        (1.5, "1.5", '"1.5"'),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001", '"00000000-0000-'),
        (date(2024, 5, 1), "2024-05-01", '"2024-05-01"'),
        (Color.RED, "red", '"red"'),
        (b"ab", "YWI=", '"YWI="'),
        (Decimal("1.50"), "1.50", '"1.50"'),
    ],
)
def test_keys_that_become_the_same_text_are_refused(one: Any, other: Any, text: str) -> None:
    message = refusal({"fine": 0, "nested": {one: "a", other: "b"}})
    assert message.startswith(f"args[0]['nested'] has the keys {repr(one)[:37]}")
    assert message.endswith("as JSON text (object keys are text): one would overwrite the other")
    assert f"both {text}" in message


def test_keys_of_several_types_that_do_not_collide_are_stored() -> None:
    data = encode_payload("t", ({1: "a", "2": "b", 3.5: "c", date(2024, 1, 1): "d"},), {}, LIMIT)
    assert decode_payload(data) == ([{"1": "a", "2": "b", "3.5": "c", "2024-01-01": "d"}], {})


# --- integers -------------------------------------------------------------------------------


def test_integers_of_at_most_4299_digits_either_sign_are_stored() -> None:
    assert MAX_INT_DIGITS == 4_299
    largest = 10**MAX_INT_DIGITS - 1
    data = encode_payload("t", (largest, -largest), {"k": {-largest: Size.BIG}}, LIMIT)
    assert decode_payload(data) == ([largest, -largest], {"k": {str(-largest): 10**30}})


@pytest.mark.parametrize("sign", [1, -1])
def test_integers_of_4300_digits_or_more_are_refused_either_sign(sign: int) -> None:
    """-10**4299 was written (4,301 characters) and msgspec could not read it back."""
    assert refusal(sign * 10**4299).startswith("args[0] is an integer of 4,300 digits: ")
    assert refusal(sign * 10**4299).endswith(
        "taskmill stores integers of at most 4,299 digits, either sign (what msgspec reads back)"
    )
    assert refusal([1, {"n": sign * 10**5000}]).startswith(
        "args[0][1]['n'] is an integer of 5,001 digits"
    )
    assert refusal({sign * 10**4299: 1}).startswith("args[0] has a key that is an integer of")


# --- UTC offsets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "offset"),
    [
        (datetime(1900, 1, 1, tzinfo=timezone(timedelta(minutes=9, seconds=21))), "+00:09:21"),
        (datetime(1960, 1, 1, tzinfo=ZoneInfo("Africa/Monrovia")), "-00:44:30"),
        (datetime(2000, 1, 1, tzinfo=timezone(timedelta(seconds=20))), "+00:00:20"),
        (datetime(2000, 1, 1, tzinfo=timezone(timedelta(microseconds=5))), "+00:00:00.000005"),
        (time(9, tzinfo=timezone(-timedelta(hours=1, seconds=1))), "-01:00:01"),
    ],
    ids=["fixed", "zoneinfo", "rounds-to-Z", "microseconds", "time"],
)
def test_an_offset_that_is_not_whole_minutes_is_refused(value: Any, offset: str) -> None:
    """msgspec wrote it rounded to minutes (``+00:09``, or ``Z``): a silent change."""
    kind = type(value).__name__
    assert refusal(value) == (
        f"args[0] is a {kind} whose UTC offset, {offset}, is not whole minutes: its JSON text "
        "(RFC 3339) has hours and minutes only, so it would change; convert it first (to UTC, "
        "or to an offset of whole minutes)"
    )
    assert refusal({value: 1}).startswith(f"args[0] has a key that is a {kind} whose UTC offset")


def test_naive_utc_and_whole_minute_offsets_are_stored() -> None:
    values = (
        datetime(2024, 5, 1, 9, 30),
        datetime(2024, 5, 1, 9, 30, tzinfo=UTC),
        datetime(2024, 5, 1, 9, 30, tzinfo=timezone(timedelta(hours=5, minutes=45))),
        datetime(2024, 5, 1, 9, 30, tzinfo=ZoneInfo("Europe/Paris")),
        datetime(1900, 1, 1, tzinfo=ZoneInfo("Europe/Paris")).astimezone(UTC),
        time(9, 30, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    )
    assert decode_payload(encode_payload("t", values, {}, LIMIT))[0] == [
        "2024-05-01T09:30:00",
        "2024-05-01T09:30:00Z",
        "2024-05-01T09:30:00+05:45",
        "2024-05-01T09:30:00+02:00",
        "1899-12-31T23:50:39Z",
        "09:30:00-03:30",
    ]


# --- nesting --------------------------------------------------------------------------------


def test_an_argument_nested_100_deep_is_stored_and_101_is_refused() -> None:
    assert MAX_DEPTH == 100
    for value in (nested(100), nested(98, {"k": []}), nested(98, Order([])), nested(100, 1)):
        data = encode_payload("t", (value,), {"also": value}, LIMIT)
        assert not nesting_exceeds(data, MAX_DEPTH + 2)
        assert decode_payload(data)[0] == [msgspec.to_builtins(value)]
    for value in (nested(101), nested(99, {"k": []}), nested(99, Order([])), nested(100, {1})):
        assert (
            refusal(value)
            == "args[0] nests lists and objects more than 100 deep (taskmill's limit)"
        )
    assert refusal(also=nested(101)).startswith("kwargs['also'] nests")
    assert refusal(msgspec.Raw(b"[" * 101 + b"]" * 101)) == (
        "args[0] nests lists and objects more than 100 deep (taskmill's limit)"
    )


def test_nesting_past_the_interpreters_recursion_limit_is_refused_too() -> None:
    assert refusal(nested(100_000)) == (
        "args[0] nests lists and objects more than 100 deep (taskmill's limit)"
    )
    with pytest.raises(SerializationError, match="more than 100 deep"):
        encode(nested(101), what="result of task 'r'")


@pytest.mark.parametrize(
    ("data", "depth"),
    [
        (b"1", 0),
        (b"[]", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'["[[[[", "]]]]"]', 1),
        (b'["\\"[[[", [["\\\\"]]]', 3),
        (b'[{"[": "{"}, ["\\\\\\"]"]]', 2),
        (b'["\\u005b\\u005b", [[]]]', 3),
        (b"[" * 500 + b"]" * 500, 500),
    ],
)
def test_nesting_is_measured_on_the_json_text(data: bytes, depth: int) -> None:
    """Brackets inside strings (escaped quotes and backslashes too) do not count."""
    assert msgspec.json.decode(data) is not None or data == b"null"
    assert not nesting_exceeds(data, depth)
    assert nesting_exceeds(data, depth - 1) == (depth > 0)


def test_decoding_refuses_what_nests_past_the_limit() -> None:
    deep = b"[[" + b"[" * 101 + b"]" * 101 + b"],{}]"
    with pytest.raises(SerializationError, match=r"^stored value nests .* more than 100 deep"):
        decode_payload(deep)
    with pytest.raises(SerializationError, match="more than 100 deep"):
        decode_payload(b"[[" + b"[" * 50_000 + b"]" * 50_000 + b"],{}]")
    with pytest.raises(SerializationError, match="more than 100 deep"):
        decode(b"[" * 101 + b"]" * 101)
    assert decode(b"[" * 100 + b"]" * 100) == nested(100)
    assert try_decode(deep) == deep.decode()  # shown as text, as a corrupt value is

    def typed(value: list[Any]) -> list[Any]:
        return value

    types = TaskTypes("t.typed", typed)
    with pytest.raises(SerializationError, match="an argument nests"):
        types.arguments(deep)
    with pytest.raises(SerializationError, match="more than 100 deep"):
        types.result(b"[" * 101 + b"]" * 101)
    with pytest.raises(SerializationError, match="more than 100 deep"):
        types.result(b"[" * 50_000 + b"]" * 50_000)


# --- the cost: plain payloads are not walked ------------------------------------------------


def test_payloads_that_cannot_hide_anything_are_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks look at msgspec's output first: a payload with no ``null``, no dict with a key
    other than a str, no time offset, no long run of digits and few brackets is not walked."""
    walked: list[Any] = []
    monkeypatch.setattr("taskmill.serialization._check", lambda value, depth: walked.append(value))
    for args in [(), (1, 2), ("text", 3.5, True), ([1, 2, [3]],), (uuid.UUID(int=3), b"x")]:
        encode_payload("t", args, {"n": 1}, LIMIT)
    encode_payload("t", (nested(100),), {}, LIMIT)
    assert walked == []
    encode_payload("t", ([{"id": n, "name": "x" * 20} for n in range(200)],), {}, LIMIT)
    assert walked == []  # dicts whose keys are all str: the ordered encoder says so, in C
    for args in [({1: "a"},), (None,), (datetime(2024, 1, 1, tzinfo=UTC),), ("1" * 4300,)]:
        encode_payload("t", args, {}, LIMIT)
    assert len(walked) == 4


# --- names ----------------------------------------------------------------------------------


VALID = [
    "default",
    "emails",
    "billing:invoices",
    "reports.nightly-eu",
    "__main__.add",
    "myapp.tasks.SendEmail.run",
    "Q1",
    "_private",
    "2fa.send",
    "tâches.envoyer",
    "計算",
    "x" * MAX_NAME,
]
INVALID = [
    "",
    " ",
    "two words",
    "a,b",
    "a/b",
    "tab\tname",
    "new\nline",
    "quote'd",
    "mod.<lambda>",
    "-q",
    ".hidden",
    ":x",
    "x" * (MAX_NAME + 1),
    "a\x00b",
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name: str) -> None:
    assert check_name("queue", name) == name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^queue name .* is not valid: use 1 to 200"):
        check_name("queue", name)


def test_names_are_checked_where_they_are_declared() -> None:
    app = App("memory://")

    def ok() -> None: ...

    with pytest.raises(ConfigurationError, match="task name 'a b'"):
        app.task(name="a b")(ok)
    with pytest.raises(ConfigurationError, match=r"task name '.*<lambda>' .*; give it a name="):
        app.task(lambda: None)
    with pytest.raises(ConfigurationError, match="queue name 'a,b'"):
        app.task(name="fine", queue="a,b")(ok)
    with pytest.raises(ConfigurationError, match="queue name 'x/y'"):
        app.configure_queue("x/y", max_depth=3)
    with pytest.raises(ConfigurationError, match="schedule name 'every day'"):
        app.periodic(cron="0 0 * * *", name="every day")(ok)
    with pytest.raises(ConfigurationError, match="queue name ''"):
        Settings(default_queue="")
    assert app.tasks == {} and app.schedules == {}

    def 計算() -> int:
        return 1

    assert app.task(計算).name.endswith(".test_names_are_checked_where_they_are_declared.計算")
    app.close()


def test_periodic_arguments_are_checked_when_declared() -> None:
    app = App("memory://")

    @app.task(name="sync")
    def sync(value: Any) -> None: ...

    with pytest.raises(SerializationError, match=r"arguments of task 'sync' .* args\[0\] is nan"):
        app.periodic(every=60, args=(float("nan"),), name="sync-nan")(sync)
    assert app.schedules == {}
    app.close()


@pytest.mark.parametrize(
    ("data", "deep"),
    [
        (b"[" * 100_000 + b"]" * 100_000, True),  # T9's poison: one run of opening brackets
        (b"[" + b"[[]]," * 2_000 + b"[" * 99 + b"]" * 99 + b"]", False),  # many brackets, 100
        (b"[" + b"[[]]," * 2_000 + b"[" * 100 + b"]" * 100 + b"]", True),  # and 101 deep
        (b"[" + b"[]," * 5_000 + (b"[[]," * 101) + b"]" * 101 + b"]", True),  # no long run
    ],
)
def test_nesting_past_many_brackets_is_measured_in_one_pass(data: bytes, deep: bool) -> None:
    """Past a few thousand brackets the depth is a running sum, not a pass per level."""
    assert len(data.translate(None, b",")) > 4096
    assert nesting_exceeds(data, 100) is deep
