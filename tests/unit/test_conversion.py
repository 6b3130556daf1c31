"""``TaskTypes``: what each parameter receives, decided once from the annotations, and the
messages of what does not convert."""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple, Optional, TypedDict, TypeVar
from uuid import UUID

import msgspec
import pytest

from taskmill import App
from taskmill.conversion import TaskTypes, decoder_for, json_type, type_name
from taskmill.errors import SerializationError
from taskmill.serialization import encode_payload

ID = UUID("0b5c7a2e-6f1d-4a9e-8c3b-2d4e6f8a0b1c")
WHEN = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
T = TypeVar("T")


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Box:
    corner: Point
    size: Decimal


class Address(TypedDict):
    city: str
    zip: int


class Pair(NamedTuple):
    left: int
    right: date


class Opaque:
    """A class msgspec cannot decode JSON into."""


class Node(msgspec.Struct):
    value: int
    children: list[Node] = []


def stored(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    """What a worker hands ``fn`` after the producer stored this call."""
    return TaskTypes("t", fn).arguments(encode_payload("t", args, kwargs, 1 << 20))


def test_string_annotations_resolve_in_the_function_module() -> None:
    # this module uses `from __future__ import annotations`: every annotation is a string
    def f(when: datetime, ids: dict[str, UUID], on: "date") -> None: ...  # noqa: UP037

    assert isinstance(f.__annotations__["when"], str)
    args, _ = stored(f, WHEN, {"a": ID}, date(2024, 1, 2))
    assert args == [WHEN, {"a": ID}, date(2024, 1, 2)]
    assert type(args[1]["a"]) is UUID


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (int, 3),
        (float, 2.5),
        (bool, True),
        (str, "s"),
        (bytes, b"\x00\xff"),
        (bytearray, bytearray(b"ab")),
        (datetime, WHEN),
        (date, date(2024, 5, 1)),
        (timedelta, timedelta(seconds=90)),
        (Decimal, Decimal("0.10")),
        (UUID, ID),
        (set[int], {1, 2}),
        (frozenset[str], frozenset({"a"})),
        (tuple[int, str], (1, "a")),
        (tuple[datetime, ...], (WHEN, WHEN)),
        (list[datetime], [WHEN]),
        (dict[str, UUID], {"k": ID}),
        (Optional[UUID], ID),  # noqa: UP045
        (UUID | None, None),
        (int | str, "either"),
        (Literal["a", "b"], "b"),
        (Colour, Colour.BLUE),
        (Point, Point(1, 2)),
        (Box, Box(Point(0, 0), Decimal("1.5"))),
        (Address, {"city": "Lyon", "zip": 69001}),
        (Pair, Pair(1, date(2024, 1, 1))),
        (Node, Node(1, [Node(2)])),
        (Annotated[int, msgspec.Meta(ge=0)], 5),
    ],
    ids=lambda v: type_name(v) if not isinstance(v, (int, str)) else None,
)
def test_a_supported_annotation_receives_its_type(annotation: Any, value: Any) -> None:
    types = TaskTypes("t", _with(annotation))
    assert not types.plain
    args, _ = types.arguments(encode_payload("t", (value,), {}, 1 << 20))
    assert args == [value]
    assert type(args[0]) is type(value)


@pytest.mark.parametrize(
    "annotation",
    [Any, object, T, Opaque, list[Opaque], dict[str, Opaque], Callable[[], int], "str | datetime"],
    ids=[
        "Any",
        "object",
        "TypeVar",
        "class",
        "list-of-class",
        "dict-of-class",
        "Callable",
        "union",
    ],
)
def test_an_unsupported_annotation_gets_json_values_and_breaks_nothing(annotation: Any) -> None:
    def f(value: Any, when: datetime) -> None: ...

    f.__annotations__["value"] = annotation
    types = TaskTypes("t", f)
    assert types._by_name["value"].decoder is None
    assert types._by_name["when"].decoder is not None, "the other parameters are still decoded"
    args, _ = types.arguments(encode_payload("t", ({"at": WHEN, "s": (1,)}, WHEN), {}, 1 << 20))
    assert args == [{"at": "2024-05-01T09:30:00Z", "s": [1]}, WHEN]


def test_a_name_that_does_not_resolve_gets_json_values_and_the_others_still_resolve() -> None:
    def f(a: NotDefinedAnywhere, b: datetime) -> Missing:  # type: ignore[name-defined]  # noqa: F821
        ...

    types = TaskTypes("t", f)
    assert types._by_name["a"].decoder is None and types._by_name["b"].decoder is not None
    assert types.result_decoder is None
    assert types.arguments(b'[[["x"], "2024-05-01T09:30:00Z"], {}]') == ([["x"], WHEN], {})


def test_a_local_class_does_not_resolve_under_postponed_annotations() -> None:
    class Local(msgspec.Struct):  # the annotation "Local" names nothing in the module
        n: int

    def f(item: Local) -> None: ...

    assert TaskTypes("t", f).arguments(b'[[{"n": 1}], {}]') == ([{"n": 1}], {})


def test_unannotated_tasks_are_plain_and_keep_json_types() -> None:
    def f(a, b=None, *rest, **extra): ...

    types = TaskTypes("t", f)
    assert types.plain and types.result_decoder is None
    args, kwargs = types.arguments(encode_payload("t", ((1, 2), WHEN, {3}), {"k": ID}, 1 << 20))
    assert args == [[1, 2], "2024-05-01T09:30:00Z", [3]]
    assert kwargs == {"k": str(ID)}


def test_varargs_and_varkwargs_annotations_apply_to_each_extra_argument() -> None:
    def f(first: int, *when: datetime, flag: bool = False, **ids: UUID) -> None: ...

    args, kwargs = stored(f, 1, WHEN, WHEN, flag=True, a=ID, b=ID)
    assert args == [1, WHEN, WHEN]
    assert kwargs == {"flag": True, "a": ID, "b": ID}
    with pytest.raises(SerializationError) as info:
        TaskTypes("t", f).arguments(b'[[1, "2024-05-01T09:30:00Z", 7], {}]')
    assert str(info.value) == (
        "task 't': argument 2 (in *when) (a JSON number) does not convert to its annotation "
        "datetime: Expected `datetime`, got `int`"
    )
    with pytest.raises(SerializationError) as info:
        TaskTypes("t", f).arguments(b'[[1], {"order": "nope"}]')
    assert str(info.value) == (
        "task 't': argument 'order' (in **ids) (a JSON string) does not convert to its "
        "annotation UUID: Invalid UUID"
    )


def test_keywords_that_are_not_identifiers_decode_in_one_pass() -> None:
    def f(**extra: datetime) -> None: ...

    types = TaskTypes("t", f)
    payload = b'[[], {"a-b": "2024-05-01T09:30:00Z", "class": "2024-05-01T09:30:00Z"}]'
    assert types.arguments(payload) == ([], {"a-b": WHEN, "class": WHEN})
    (shape,) = types._shapes.values()
    assert shape.decoder is not None, "the whole payload decodes in one msgspec pass"


def test_positional_or_keyword_parameters_decode_either_way() -> None:
    def f(when: datetime, /, day: date, *, at: datetime | None = None) -> None: ...

    assert stored(f, WHEN, day=date(2024, 1, 1)) == ([WHEN], {"day": date(2024, 1, 1)})
    assert stored(f, WHEN, date(2024, 1, 1), at=WHEN) == ([WHEN, date(2024, 1, 1)], {"at": WHEN})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            b'[["soon"], {}]',
            "task 't': argument 'when' (a JSON string) does not convert to its annotation "
            "datetime: Invalid RFC3339 encoded datetime",
        ),
        (
            b'[["2024-05-01T09:30:00Z", [["2024-05-01T09:30:00Z", 1]]], {}]',
            "task 't': argument 'later' (a JSON array) does not convert to its annotation "
            "list[list[datetime.datetime]] | None: Expected `datetime`, got `int` - at `$[0][1]`",
        ),
        (
            b'[["2024-05-01T09:30:00Z", [], -1], {}]',
            "task 't': argument 'count' (a JSON number) does not convert to its annotation "
            "Annotated[int, msgspec.Meta(ge=0)]: Expected `int` >= 0",
        ),
        (
            b'[["2024-05-01T09:30:00Z"], {"count": null}]',
            "task 't': argument 'count' (JSON null) does not convert to its annotation "
            "Annotated[int, msgspec.Meta(ge=0)]: Expected `int`, got `null`",
        ),
    ],
    ids=["top-level", "nested", "constraint", "null"],
)
def test_a_value_that_does_not_convert_names_task_parameter_type_and_json_type(
    payload: bytes, message: str
) -> None:
    def f(
        when: datetime,
        later: list[list[datetime]] | None = None,
        count: Annotated[int, msgspec.Meta(ge=0)] = 0,
    ) -> None: ...

    with pytest.raises(SerializationError) as info:
        TaskTypes("t", f).arguments(payload)
    assert str(info.value) == message


def test_stored_arguments_that_no_longer_bind_are_a_type_error() -> None:
    def f(a: int, b: datetime) -> None: ...

    for types in (TaskTypes("t", f), TaskTypes("t", lambda a, b: None)):
        with pytest.raises(TypeError) as info:
            types.arguments(b"[[1], {}]")
        assert not isinstance(info.value, SerializationError)
        assert str(info.value) == (
            "stored arguments no longer fit task 't' (did its signature change since the job "
            "was sent?): missing a required argument: 'b'"
        )


@pytest.mark.parametrize("data", [b"{not json", b"[[], {}, {}, {}]", b'{"args": []}', b"[{}, []]"])
def test_a_payload_that_is_not_an_args_kwargs_pair(data: bytes) -> None:
    def f(a: int = 0) -> None: ...

    with pytest.raises(SerializationError, match=r"^stored (value is not valid JSON|payload is)"):
        TaskTypes("t", f).arguments(data)


def test_each_call_shape_is_bound_once() -> None:
    def f(a: int, b: int = 0) -> int: ...

    types = TaskTypes("t", f)
    binds: list[int] = []
    real = types.signature

    class Counting(inspect.Signature):
        def bind(self, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
            binds.append(1)
            return real.bind(*args, **kwargs)

    types.signature = Counting(list(real.parameters.values()))
    for _ in range(3):
        types.arguments(b"[[1, 2], {}]")
        types.arguments(b'[[1], {"b": 2}]')
    assert len(binds) == 2


def test_results_decode_to_the_return_annotation() -> None:
    def when() -> datetime: ...

    def nothing() -> None: ...

    def untyped(): ...

    assert TaskTypes("t", when).result(b'"2024-05-01T09:30:00Z"') == WHEN
    with pytest.raises(SerializationError) as info:
        TaskTypes("t", when).result(b'{"at": 1}')
    assert str(info.value) == (
        "task 't': its result (a JSON object) does not convert to its return annotation "
        "datetime: Expected `datetime`, got `object`"
    )
    # `-> None` and no annotation are not checked: the JSON value as stored
    assert TaskTypes("t", nothing).result_decoder is None
    assert TaskTypes("t", nothing).result(b"[1]") == [1]
    assert TaskTypes("t", untyped).result(b'"2024-05-01T09:30:00Z"') == "2024-05-01T09:30:00Z"


def test_json_type_never_shows_the_value() -> None:
    assert [json_type(v) for v in (b'"secret"', b"1", b"1.5", b"true", b"null", b"[]", b"{}")] == [
        "a JSON string",
        "a JSON number",
        "a JSON number",
        "a JSON boolean",
        "JSON null",
        "a JSON array",
        "a JSON object",
    ]


def test_decoder_for_declines_what_it_cannot_decode() -> None:
    assert decoder_for(int) is not None
    for annotation in (Any, object, T, Opaque, list[Opaque], "not a type", 42):
        assert decoder_for(annotation) is None


def test_a_task_reads_its_annotations_at_first_use_not_at_decoration() -> None:
    app = App("memory://")

    @app.task()
    def later(item: DefinedAfterTheTask) -> None: ...

    assert later._types is None
    assert later.types.arguments(b'[[{"n": 2}], {}]') == ([DefinedAfterTheTask(2)], {})
    assert later.types is later.types


class DefinedAfterTheTask(msgspec.Struct):
    n: int


def _with(annotation: Any) -> Callable[..., Any]:
    def f(value: Any) -> None: ...

    f.__annotations__["value"] = annotation
    return f


# --- arguments by name ----------------------------------------------------------------------------


def f_plain(a: int, b: int = 2) -> None: ...
def f_every_kind(a, /, b, c=3, *rest, d, e=5, **more) -> None: ...
def f_keywords_only(*, key: str, full: bool = False) -> None: ...
def f_extras(a, /, **more) -> None: ...


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (f_plain, [1], {}),
        (f_plain, [1, 5], {}),
        (f_plain, [], {"a": 1}),
        (f_plain, [], {"b": 7, "a": 1}),
        (f_every_kind, [1, 2], {"d": 4}),
        (f_every_kind, [1, 2, 30, 40, 50], {"d": 4, "z": 9}),
        (f_every_kind, [1], {"b": 2, "c": 30, "e": 50, "d": 4}),
        (f_keywords_only, [], {"key": "k"}),
        (f_keywords_only, [], {"full": True, "key": "k"}),
        (f_extras, [1], {"a": "a positional-only name, as an extra keyword"}),
    ],
)
def test_named_arguments_are_what_binding_gives(
    fn: Callable[..., None], args: list[Any], kwargs: dict[str, Any]
) -> None:
    """What a concurrency limit's key function is called with (as keywords): the call's
    arguments by name, defaults applied, without binding each job again."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    types = TaskTypes(fn.__name__, fn)
    for _ in range(2):  # the first call makes the shape's plan, the second reuses it
        named = types.named(args, kwargs)
        assert named == bound.arguments
        assert list(named) == list(bound.arguments)


def test_named_arguments_of_a_call_that_does_not_bind_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="no longer fit task 'f_plain'"):
        TaskTypes("f_plain", f_plain).named([1, 2, 3], {})
