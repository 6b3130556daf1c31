"""Stored JSON back to the types a task's function declares.

JSON has no ``datetime``, ``bytes``, ``set``, ``Decimal`` or ``UUID``: the producer stores them
as msgspec encodes them (ISO 8601 text, base64 text, an array, decimal text, hyphenated text).
``TaskTypes`` reads a task's annotations once, the first time they are needed, and decodes
each stored argument, and the result, back to the type it declares (with msgspec):

>>> from datetime import datetime
>>> def remind(when: datetime, tags: set[str], note) -> None: ...
>>> args, kwargs = TaskTypes("remind", remind).arguments(
...     b'[["2024-05-01T09:00:00Z", ["a"]], {"note": ["as", "stored"]}]'
... )
>>> args
[datetime.datetime(2024, 5, 1, 9, 0, tzinfo=datetime.timezone.utc), {'a'}]
>>> kwargs
{'note': ['as', 'stored']}

What a parameter receives is decided once per task, from its annotation (resolved with
``typing.get_type_hints``, so string annotations and ``from __future__ import annotations``
work; ``*args: T`` and ``**kwargs: T`` apply ``T`` to each extra argument):

- a type msgspec can decode (``int``, ``float``, ``str``, ``bool``, ``datetime``, ``date``,
  ``time``, ``timedelta``, ``UUID``, ``Decimal``, ``bytes``, ``list``/``tuple``/``set``/
  ``frozenset``/``dict`` of those, ``Optional`` and the unions msgspec accepts, ``Literal``,
  enums, msgspec ``Struct``, dataclasses, ``TypedDict``, ``NamedTuple``, ``Annotated`` with
  ``msgspec.Meta`` constraints): that type;
- no annotation, ``Any``, ``object``, a type variable, or an annotation msgspec cannot decode
  (an arbitrary class, a union of two text-like types such as ``str | datetime``, a name that
  does not resolve, such as a class defined inside a function): the JSON values as stored
  (``list``, ``dict``, ``str``, ``int``, ``float``, ``bool``, ``None``). Such an annotation
  never breaks the task.

Decoding is strict, as msgspec's JSON decoding is: a JSON string is not an ``int`` and a
boolean is not a number, but an integer is a valid ``float`` or ``Decimal``. A stored value
that does not decode to its annotation is a ``SerializationError`` naming the task, the
parameter, the annotation and the value's JSON type: the producer raises it at ``send`` and
stores nothing; a worker fails the job at once (no retry can change stored data).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import msgspec.inspect as mi

from taskmill.errors import SerializationError
from taskmill.serialization import check_depth, decode, decode_payload, too_deep

_json = msgspec.json.Decoder()


def _envelope(args: Any, kwargs: Any) -> Any:
    """The stored payload's shape: ``[args, kwargs]``, or ``[args, kwargs, options]`` when a
    send stored job options with it (a per-send ``soft_timeout``; read by the worker's
    ``payload_options``, skipped here)."""
    return msgspec.defstruct(
        "Payload",
        [("args", args), ("kwargs", kwargs), ("options", msgspec.Raw, msgspec.Raw(b"{}"))],
        array_like=True,
        forbid_unknown_fields=True,
    )


_pair = msgspec.json.Decoder(_envelope(list[msgspec.Raw], dict[str, msgspec.Raw]))
_MAX_SHAPES = 64
_typed_dict: Any = typing.TypedDict  # called with fields known only at run time
_JSON_TYPES: dict[type, str] = {
    str: "a JSON string",
    bool: "a JSON boolean",
    int: "a JSON number",
    float: "a JSON number",
    list: "a JSON array",
    dict: "a JSON object",
    type(None): "JSON null",
}


class _Param:
    """How one parameter's stored value is decoded: to its annotation, or as plain JSON."""

    __slots__ = ("annotation", "decoder", "label")

    def __init__(self, label: str, annotation: Any, decoder: msgspec.json.Decoder[Any] | None):
        self.label = label
        self.annotation = annotation
        self.decoder = decoder

    def decode(self, raw: msgspec.Raw, task: str) -> Any:
        if self.decoder is None:
            return _json.decode(raw)
        try:
            return self.decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise SerializationError(
                f"task {task!r}: argument {self.label} ({json_type(raw)}) does not convert "
                f"to its annotation {type_name(self.annotation)}: {exc}"
            ) from None

    def named(self, label: str) -> _Param:
        return _Param(label, self.annotation, self.decoder)


class _Shape:
    """The parameter each stored argument goes to, for one shape of call (how many positional
    arguments, which keywords), checked to bind once; and a decoder of the whole payload of
    that shape to the declared types, in one pass."""

    __slots__ = ("decoder", "keywords", "names", "positional")

    def __init__(
        self, positional: list[_Param], keywords: dict[str, _Param], *, typed: bool
    ) -> None:
        self.positional = positional
        self.keywords = keywords
        self.decoder = _payload_decoder(positional, keywords) if typed else None
        self.names: list[tuple[str, int, Any]] | None = None
        """Where each parameter's value comes from (``TaskTypes.named``), made on first use."""


# where a parameter's value comes from, in a call of a given shape (see TaskTypes.named)
_POSITIONAL, _KEYWORD, _DEFAULT, _REST, _MORE = range(5)


def _payload_decoder(
    positional: list[_Param], keywords: dict[str, _Param]
) -> msgspec.json.Decoder[Any] | None:
    if all(p.decoder is None for p in [*positional, *keywords.values()]):
        return None
    args = types.GenericAlias(tuple, tuple(p.annotation if p.decoder else Any for p in positional))
    kwargs: Any = dict[str, Any]
    if keywords:  # each key is there: the shape says so (a TypedDict would drop others)
        fields = {k: p.annotation if p.decoder else Any for k, p in keywords.items()}
        kwargs = _typed_dict("kwargs", fields)
    try:
        return msgspec.json.Decoder(_envelope(args, kwargs))
    except Exception:  # each argument decodes alone, so only the combination could fail
        return None


class TaskTypes:
    """The types a task's function declares for its parameters and its result, and the
    decoding of stored JSON to them (see the module's docstring)."""

    def __init__(
        self, name: str, fn: Callable[..., Any], signature: inspect.Signature | None = None
    ) -> None:
        self.name = name
        self.signature = signature if signature is not None else inspect.signature(fn)
        hints = _hints(fn)
        self._by_name: dict[str, _Param] = {}
        self._positional: list[_Param] = []
        self._var_positional: _Param | None = None
        self._var_keyword: _Param | None = None
        kinds = inspect.Parameter
        for p in self.signature.parameters.values():
            annotation = hints.get(p.name, Any)
            param = _Param(repr(p.name), annotation, decoder_for(annotation))
            if p.kind is kinds.VAR_POSITIONAL:
                self._var_positional = param.named(f"*{p.name}")
            elif p.kind is kinds.VAR_KEYWORD:
                self._var_keyword = param.named(f"**{p.name}")
            else:
                if p.kind is not kinds.KEYWORD_ONLY:
                    self._positional.append(param)
                if p.kind is not kinds.POSITIONAL_ONLY:
                    self._by_name[p.name] = param
        every = [
            *self._positional,
            *self._by_name.values(),
            self._var_positional,
            self._var_keyword,
        ]
        self.plain = all(p is None or p.decoder is None for p in every)
        """No parameter needs decoding: arguments are the JSON values as stored."""
        self.returns: Any = hints.get("return", Any)
        self.result_decoder = (
            None if self.returns in (None, type(None)) else decoder_for(self.returns)
        )
        """Decodes a stored result to the return annotation (None: JSON values, unchecked;
        so are a missing annotation and ``-> None``)."""
        self._shapes: dict[object, _Shape] = {}

    def __repr__(self) -> str:
        return f"<TaskTypes {self.name} plain={self.plain}>"

    # --- arguments --------------------------------------------------------------------------

    def arguments(self, payload: bytes) -> tuple[list[Any], dict[str, Any]]:
        """Decode a stored ``[args, kwargs]`` payload to the values the function declares.

        ``SerializationError``: not JSON (also: text that is not UTF-8, or nested past
        ``MAX_DEPTH``), not an ``[args, kwargs]`` pair, or a value that does not convert to
        its annotation. ``TypeError``: the arguments do not bind to the function's signature
        (it changed since the job was sent).
        """
        try:
            return self._arguments(payload)
        except msgspec.ValidationError:  # pragma: no cover - each path turns it into ours
            raise
        except msgspec.DecodeError as exc:  # a typed decoder met what is not JSON text
            raise SerializationError(f"stored value is not valid JSON: {exc}") from None
        except RecursionError:
            raise too_deep("stored value") from None

    def _arguments(self, payload: bytes) -> tuple[list[Any], dict[str, Any]]:
        if self.plain:
            args, kwargs = decode_payload(payload)
            self._shape(len(args), kwargs)
            return args, kwargs
        check_depth(payload, payload=True)
        raw_args, raw_kwargs = _split(payload)
        shape = self._shape(len(raw_args), raw_kwargs)
        if shape.decoder is not None:
            try:
                decoded = shape.decoder.decode(payload)
                return list(decoded.args), decoded.kwargs
            except msgspec.ValidationError:
                pass  # decoding each argument alone says which one does not convert, and why
        return self._each(shape, raw_args, raw_kwargs)

    def check(self, payload: bytes, count: int, keywords: Mapping[str, Any]) -> None:
        """At send: a ``SerializationError`` if ``arguments`` would raise one for ``payload``,
        the JSON of a call with ``count`` positional arguments and ``keywords`` that binds."""
        shape = self._shape(count, keywords)
        if shape.decoder is None:
            return
        try:
            shape.decoder.decode(payload)
        except msgspec.ValidationError:
            self._each(shape, *_split(payload))

    def _each(
        self, shape: _Shape, raw_args: list[msgspec.Raw], raw_kwargs: dict[str, msgspec.Raw]
    ) -> tuple[list[Any], dict[str, Any]]:
        name = self.name
        args = [p.decode(raw, name) for p, raw in zip(shape.positional, raw_args, strict=True)]
        return args, {k: shape.keywords[k].decode(raw, name) for k, raw in raw_kwargs.items()}

    def _shape(self, count: int, keywords: Mapping[str, Any]) -> _Shape:
        # Binding depends only on how many positional arguments there are and which keywords:
        # each shape is bound (and mapped to its parameters) once.
        key = (count, frozenset(keywords)) if keywords else count
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._map(count, keywords)
            if len(self._shapes) < _MAX_SHAPES:
                self._shapes[key] = shape
        return shape

    def _map(self, count: int, keywords: Mapping[str, Any]) -> _Shape:
        try:
            self.signature.bind(*range(count), **dict.fromkeys(keywords))
        except TypeError as exc:
            raise TypeError(
                f"stored arguments no longer fit task {self.name!r} (did its signature change "
                f"since the job was sent?): {exc}"
            ) from None
        named = len(self._positional)
        positional = self._positional[:count]
        if count > named:  # binding succeeded, so there is a *args to take the rest
            extra = self._var_positional
            assert extra is not None
            positional += [extra.named(f"{i} (in {extra.label})") for i in range(named, count)]
        mapped: dict[str, _Param] = {}
        for key in keywords:
            param = self._by_name.get(key)
            if param is None:  # bound, so **kwargs takes it
                assert self._var_keyword is not None
                param = self._var_keyword.named(f"{key!r} (in {self._var_keyword.label})")
            mapped[key] = param
        return _Shape(positional, mapped, typed=not self.plain)

    def named(self, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments by parameter name, defaults applied: what
        ``inspect.BoundArguments.arguments`` holds after ``apply_defaults()``, without binding
        again (the call's shape was bound once). A ``TypeError`` if it does not bind.

        >>> def f(a, b=2, *rest, c, **more): ...
        >>> TaskTypes("f", f).named([1], {"c": 3, "d": 4})
        {'a': 1, 'b': 2, 'rest': (), 'c': 3, 'more': {'d': 4}}
        """
        shape = self._shape(len(args), kwargs)
        names = shape.names
        if names is None:
            names = shape.names = self._names(len(args), kwargs)
        named: dict[str, Any] = {}
        for name, source, value in names:
            if source == _POSITIONAL:
                named[name] = args[value]
            elif source == _KEYWORD:
                named[name] = kwargs[name]
            elif source == _DEFAULT:
                named[name] = value
            elif source == _REST:
                named[name] = tuple(args[value:])
            else:
                named[name] = {key: kwargs[key] for key in value}
        return named

    def _names(self, count: int, keywords: Mapping[str, Any]) -> list[tuple[str, int, Any]]:
        kinds = inspect.Parameter
        names: list[tuple[str, int, Any]] = []
        index = 0  # of the next positional parameter
        for p in self.signature.parameters.values():
            if p.kind is kinds.VAR_POSITIONAL:
                names.append((p.name, _REST, index))
            elif p.kind is kinds.VAR_KEYWORD:
                more = tuple(key for key in keywords if key not in self._by_name)
                names.append((p.name, _MORE, more))
            elif p.kind is not kinds.KEYWORD_ONLY and index < count:
                names.append((p.name, _POSITIONAL, index))
            elif p.kind is not kinds.POSITIONAL_ONLY and p.name in keywords:
                names.append((p.name, _KEYWORD, None))
            else:
                names.append((p.name, _DEFAULT, p.default))
            if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
                index += 1
        return names

    # --- result -----------------------------------------------------------------------------

    def result(self, data: bytes) -> Any:
        """Decode a stored result: to the return annotation if msgspec can, else plain JSON.

        ``SerializationError`` if it is not JSON, nests deeper than taskmill stores, or does
        not convert to the annotation.
        """
        decoder = self.result_decoder
        if decoder is None:
            return decode(data)
        try:
            value = decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise SerializationError(
                f"task {self.name!r}: its result ({json_type(data)}) does not convert to its "
                f"return annotation {type_name(self.returns)}: {exc}"
            ) from None
        except msgspec.DecodeError as exc:
            raise SerializationError(f"stored value is not valid JSON: {exc}") from None
        except RecursionError:  # far past the limit
            raise too_deep("stored value") from None
        check_depth(data)
        return value


def _split(payload: bytes) -> tuple[list[msgspec.Raw], dict[str, msgspec.Raw]]:
    try:
        pair = _pair.decode(payload)
        return pair.args, pair.kwargs
    except msgspec.ValidationError:
        raise SerializationError("stored payload is not a JSON [args, kwargs] pair") from None
    except msgspec.DecodeError as exc:
        raise SerializationError(f"stored value is not valid JSON: {exc}") from None


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations, evaluated; one that does not resolve is left out."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # one bad name (or an object typing cannot read): resolve one by one
        pass
    annotations = getattr(fn, "__annotations__", None)
    if not isinstance(annotations, dict):
        return {}
    globalns = getattr(inspect.unwrap(fn), "__globals__", {})
    hints: dict[str, Any] = {}
    for name, annotation in annotations.items():
        holder = types.SimpleNamespace(__annotations__={name: annotation})
        try:
            hints.update(typing.get_type_hints(holder, globalns=globalns, include_extras=True))
        except Exception:
            continue  # unresolvable: the parameter gets JSON values
    return hints


def decoder_for(annotation: Any) -> msgspec.json.Decoder[Any] | None:
    """A decoder of JSON to ``annotation``, or None where values stay plain JSON: no type to
    convert to (``Any``, ``object``, a type variable), or one msgspec cannot decode."""
    if annotation is Any or annotation is object:
        return None
    try:
        info = mi.type_info(annotation)
    except Exception:  # msgspec refuses the type (TypeError), or the annotation is not one
        return None
    if isinstance(info, mi.AnyType) or _has_custom_type(info, set()):
        return None
    try:
        return msgspec.json.Decoder(annotation)
    except Exception:
        return None


def _has_custom_type(info: mi.Type, seen: set[int]) -> bool:
    """Whether a class msgspec cannot decode appears anywhere in the type (it would accept
    only instances of it, which JSON never holds)."""
    if id(info) in seen:  # recursive types
        return False
    seen.add(id(info))
    if isinstance(info, mi.CustomType):
        return info.cls is not object
    for name in info.__struct_fields__:
        value = getattr(info, name)
        for item in value if isinstance(value, tuple) else (value,):
            inner = item.type if isinstance(item, mi.Field) else item
            if isinstance(inner, mi.Type) and _has_custom_type(inner, seen):
                return True
    return False


def json_type(raw: bytes | msgspec.Raw) -> str:
    """What a JSON value is, for messages ("a JSON string"): never the value itself, which
    may be private."""
    try:
        value = _json.decode(raw)
    except msgspec.DecodeError:
        return "not valid JSON"
    return _JSON_TYPES.get(type(value), "a JSON value")


def type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")
