"""Generated nested chain/group/chord shapes run on the memory broker as docs/workflows.md says.

Every step runs exactly once; each starts after every step whose result it takes has finished;
each receives, as its first argument, the previous result in a chain, the list of a group's
results (nested groups, nested lists); a step first in the workflow receives nothing; and the
workflow's ``result()`` is its last step's result, or for a group the list of its members'
results, in order. A reference evaluator of this file's own computes what each step must
receive and what the workflow returns.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskmill import App, chain, chord, group
from taskmill.workflows import Canvas

from .support import CountingBroker, scaled

# --- shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    label: int


@dataclass(frozen=True)
class Chain:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Group:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Chord:
    header: Group
    callback: Leaf


Node = Leaf | Chain | Group | Chord

_leaf = st.builds(Leaf, st.just(0))


def _nodes(inner: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    parts = st.lists(inner, min_size=1, max_size=3).map(tuple)
    return st.one_of(
        parts.map(Chain),
        parts.map(Group),
        st.builds(Chord, parts.map(Group), _leaf),
    )


def _label(node: Node, counter: Iterator[int]) -> Node:
    """The same shape with labels 0, 1, 2, ... in the order of the text."""
    if isinstance(node, Leaf):
        return Leaf(next(counter))
    if isinstance(node, Chord):
        header = _label(node.header, counter)
        assert isinstance(header, Group)
        return Chord(header, Leaf(next(counter)))
    parts = tuple(_label(p, counter) for p in node.parts)
    return Chain(parts) if isinstance(node, Chain) else Group(parts)


shapes = st.recursive(_leaf, _nodes, max_leaves=10).map(lambda n: _label(n, itertools.count()))


# --- the reference ----------------------------------------------------------------------------


@dataclass
class Expected:
    inputs: dict[int, Any] = field(default_factory=dict)  # None: no input (a first step)
    parents: dict[int, set[int]] = field(default_factory=dict)  # whose results it takes


def _result(label: int) -> str:
    return f"r{label}"


def evaluate(node: Node, given: Any, given_from: set[int], into: Expected) -> tuple[Any, set[int]]:
    """``node``'s result (as JSON) and the steps it comes from, given the previous result."""
    if isinstance(node, Leaf):
        into.inputs[node.label] = given
        into.parents[node.label] = given_from
        return _result(node.label), {node.label}
    if isinstance(node, Chord):
        value, sources = evaluate(node.header, given, given_from, into)
        return evaluate(node.callback, value, sources, into)
    if isinstance(node, Chain):
        value, sources = given, given_from
        for part in node.parts:
            value, sources = evaluate(part, value, sources, into)
        return value, sources
    results = [evaluate(part, given, given_from, into) for part in node.parts]
    return [value for value, _ in results], set().union(*(s for _, s in results))


# --- the app ----------------------------------------------------------------------------------


class Harness:
    def __init__(self) -> None:
        self.app = App("memory://")
        self.lock = threading.Lock()
        self.clock = itertools.count()
        self.runs: list[tuple[int, Any, int, int]] = []  # label, input, start, end

        @self.app.task(name="props.step", retries=0)
        def step(*args: Any) -> str:
            label, given = (args[0], None) if len(args) == 1 else (args[1], args[0])
            with self.lock:
                start = next(self.clock)
            with self.lock:
                self.runs.append((label, given, start, next(self.clock)))
            return _result(label)

        self.step = step

    def canvas(self, node: Node) -> Canvas:
        if isinstance(node, Leaf):
            return self.step.s(node.label)
        if isinstance(node, Chord):
            header = self.canvas(node.header)
            assert not isinstance(header, str)
            return chord(header, self.step.s(node.callback.label))  # type: ignore[arg-type]
        parts = [self.canvas(p) for p in node.parts]
        return chain(*parts) if isinstance(node, Chain) else group(parts)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.app.close()


@settings(max_examples=scaled(0.5))
@given(shapes)
@example(Chain((Leaf(0), Group((Leaf(1), Leaf(2))), Leaf(3))))  # the docstring's shape
@example(Group((Group((Leaf(0), Leaf(1))), Chain((Leaf(2), Leaf(3))))))  # nested list
@example(Chord(Group((Chain((Leaf(0), Group((Leaf(1), Leaf(2))))),)), Leaf(3)))
def test_each_step_runs_once_in_graph_order(harness: Harness, shape: Node) -> None:
    harness.app.client.use_broker(CountingBroker(), "memory://")
    harness.runs.clear()
    expected = Expected()
    output, _ = evaluate(shape, None, set(), expected)

    handle = harness.canvas(shape).send()
    harness.app.run_until_idle()

    labels = sorted(label for label, *_ in harness.runs)
    assert labels == sorted(expected.inputs), f"steps run: {labels}"  # each once
    runs = {label: (given, start, end) for label, given, start, end in harness.runs}
    for label, (received, start, _) in runs.items():
        assert received == expected.inputs[label], f"step {label} received {received!r}"
        for parent in expected.parents[label]:
            assert runs[parent][2] < start, f"step {label} started before step {parent} ended"
    assert handle.status() == "succeeded"
    assert handle.result(timeout=5) == output
