"""Shared by the property tests: a memory broker that counts its writes, and an exact
comparison of a value sent with the value received (same types, same bits)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from hypothesis import settings

from taskmill.brokers.base import EnqueueResult, OnConflict
from taskmill.brokers.memory import MemoryBroker
from taskmill.job import NewJob


def scaled(share: float) -> int:
    """``share`` of the loaded profile's example count (at least 1): for tests whose examples
    cost more than the default's."""
    loaded = settings.default
    assert loaded is not None
    return max(1, int(loaded.max_examples * share))


class CountingBroker(MemoryBroker):
    """The memory broker, counting the jobs each enqueue stores (every producer write goes
    through ``_enqueue``)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def _enqueue(self, jobs: Sequence[NewJob], on_conflict: OnConflict) -> EnqueueResult:
        self.writes += len(jobs)
        return super()._enqueue(jobs, on_conflict)


def same(sent: Any, got: Any) -> bool:
    """Whether ``got`` is ``sent`` again: equal, of the same type all the way down, floats and
    decimals bit for bit (``-0.0``, the exponent of ``Decimal("1.10")``). A datetime may come
    back with another ``tzinfo`` object (a fixed offset for a ``ZoneInfo``), but the same
    wall time and UTC offset."""
    if isinstance(sent, datetime) and isinstance(got, datetime):
        # the same wall time and UTC offset (so the same instant); not ``==``, which is
        # False across zones for a time in a fold or gap (PEP 495), whatever the offsets
        return (
            type(got) is datetime
            and sent.replace(tzinfo=None, fold=0) == got.replace(tzinfo=None, fold=0)
            and sent.utcoffset() == got.utcoffset()
            and (sent.tzinfo is None) == (got.tzinfo is None)
        )
    if type(sent) is not type(got):
        return False
    if isinstance(sent, float):
        return math.copysign(1.0, sent) == math.copysign(1.0, got) and (
            sent == got or (math.isnan(sent) and math.isnan(got))
        )
    if isinstance(sent, Decimal):
        return bool(sent.as_tuple() == got.as_tuple())
    if isinstance(sent, list | tuple):
        return len(sent) == len(got) and all(same(a, b) for a, b in zip(sent, got, strict=True))
    if isinstance(sent, dict):
        return sent.keys() == got.keys() and all(
            same(k, _key(got, k)) and same(v, got[k]) for k, v in sent.items()
        )
    if isinstance(sent, msgspec.Struct):
        return all(same(getattr(sent, f), getattr(got, f)) for f in sent.__struct_fields__)
    if dataclasses.is_dataclass(sent):
        return all(
            same(getattr(sent, f.name), getattr(got, f.name)) for f in dataclasses.fields(sent)
        )
    return bool(sent == got)


def difference(sent: Any, got: Any, path: str = "") -> str:
    """Where ``got`` first differs from ``sent`` (for a failure's message), or ``""``."""
    if isinstance(sent, list | tuple) and type(sent) is type(got) and len(sent) == len(got):
        for i, (a, b) in enumerate(zip(sent, got, strict=True)):
            found = difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return ""
    if isinstance(sent, dict) and isinstance(got, dict) and sent.keys() == got.keys():
        for k, v in sent.items():
            found = difference(v, got[k], f"{path}[{k!r}]")
            if found:
                return found
        return ""
    return "" if same(sent, got) else f"at {path or 'the top'}: {sent!r} became {got!r}"


def _key(mapping: dict[Any, Any], key: Any) -> Any:
    """The key object ``mapping`` holds that equals ``key`` (to compare its type)."""
    return next(k for k in mapping if k == key)
