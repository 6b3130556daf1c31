"""The workflow graph: how ``chain``, ``group`` and ``chord`` compile to steps (each step's
input shape, the workflow's output shape), and which steps a stored state makes ready, which
failures block the workflow, and what a shape's value is. No broker: jobs are built here."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from taskmill import chain, chord, group
from taskmill._ids import workflow_of
from taskmill.errors import ConfigurationError
from taskmill.job import ErrorInfo, Job, JobState
from taskmill.workflows import Signature, Spec, Step, _View, compile_canvas


def sig(task: str, *args: Any, accepts_failures: bool = False, **kwargs: Any) -> Signature:
    return Signature(task, args, kwargs, accepts_failures=accepts_failures)


def inputs(spec: Spec) -> dict[str, tuple[str, Any]]:
    """Each step's task and input shape: the graph without arguments."""
    return {name: (step.task, step.input) for name, step in spec.steps.items()}


# --- compiling ----------------------------------------------------------------------------------


def test_one_signature_is_one_step_with_its_arguments() -> None:
    spec = compile_canvas(sig("add", 1, 2, scale=3))
    assert spec.steps == {"0": Step("add", [1, 2], {"scale": 3}, None, False)}
    assert spec.output == "0"


def test_a_chain_feeds_each_result_to_the_next_step() -> None:
    spec = compile_canvas(chain(sig("a"), sig("b"), sig("c")))
    assert inputs(spec) == {"0": ("a", None), "1": ("b", "0"), "2": ("c", "1")}
    assert spec.output == "2"


def test_a_group_runs_its_members_side_by_side_and_outputs_their_list() -> None:
    spec = compile_canvas(group([sig("a"), sig("b"), sig("c")]))
    assert inputs(spec) == {"0": ("a", None), "1": ("b", None), "2": ("c", None)}
    assert spec.output == ["0", "1", "2"]


def test_a_group_inside_a_chain_fans_out_then_in() -> None:
    spec = compile_canvas(chain(sig("fetch"), group([sig("left"), sig("right")]), sig("merge")))
    assert inputs(spec) == {
        "0": ("fetch", None),
        "1": ("left", "0"),
        "2": ("right", "0"),
        "3": ("merge", ["1", "2"]),
    }
    assert spec.output == "3"


def test_a_chord_is_a_group_then_its_callback() -> None:
    callback = sig("total", accepts_failures=True)
    via_chord = compile_canvas(chord([sig("a"), sig("b")], callback))
    assert via_chord == compile_canvas(chain(group([sig("a"), sig("b")]), callback))
    assert inputs(via_chord)["2"] == ("total", ["0", "1"])
    assert via_chord.steps["2"].accepts_failures is True


def test_nesting_keeps_the_shape_of_the_results() -> None:
    canvas = group([sig("a"), chain(sig("b"), sig("c")), group([sig("d"), sig("e")])])
    spec = compile_canvas(canvas)
    assert inputs(spec) == {
        "0": ("a", None),
        "1": ("b", None),
        "2": ("c", "1"),
        "3": ("d", None),
        "4": ("e", None),
    }
    assert spec.output == ["0", "2", ["3", "4"]]  # a chain gives its last step's result


def test_a_chain_of_chains_is_one_chain_and_a_group_input_reaches_every_member() -> None:
    spec = compile_canvas(chain(chain(sig("a"), sig("b")), group([chain(sig("c"), sig("d"))])))
    assert inputs(spec) == {"0": ("a", None), "1": ("b", "0"), "2": ("c", "1"), "3": ("d", "2")}
    assert spec.output == ["3"]


def test_a_compiled_graph_survives_its_storage_as_json() -> None:
    spec = compile_canvas(chord([sig("a", 1), group([sig("b"), sig("c")])], sig("d", x=[1])))
    stored = msgspec.json.encode(spec)
    assert msgspec.json.decode(stored, type=Spec) == spec


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: chain(), "chain() needs at least one step"),
        (lambda: group([]), "group() needs at least one member"),
        (lambda: chain(sig("a"), "b"), "a workflow step is task.s(...), chain(...), group(...)"),
        (lambda: group([sig("a"), 3]), "not 3"),
    ],
)
def test_what_is_not_a_graph_is_refused_when_built(build: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_a_step_names_its_workflow_and_other_jobs_none() -> None:
    assert workflow_of("wf:0192-abc:3") == "0192-abc"
    assert workflow_of("wf:0192-abc:3:extra") == "0192-abc:3"  # the step is after the last ':'
    assert workflow_of("0192-abc") is None
    assert workflow_of("wf::3") is None


# --- the graph at run time: readiness, blocking failures, values ------------------------------


def job(step: str, state: JobState, result: Any = None, error: str | None = None) -> Job:
    return Job(
        id=f"wf:w:{step}",
        task="t",
        queue="default",
        state=state,
        payload=b"[]",
        result=msgspec.json.encode(result) if state is JobState.SUCCEEDED else None,
        error=ErrorInfo(type="ValueError", message=error) if error else None,
    )


def view(spec: Spec, **jobs: Job) -> _View:
    return _View(spec, {name: jobs.get(f"s{name}") for name in spec.steps})


FAN = compile_canvas(chain(sig("fetch"), group([sig("left"), sig("right")]), sig("merge")))
"""0 → (1, 2) → 3"""


def ready(v: _View) -> list[str]:
    return [name for name in v.spec.steps if v.ready(name)]


def test_a_step_is_ready_once_every_parent_succeeded() -> None:
    assert ready(view(FAN)) == ["0"]
    s0 = job("0", JobState.SUCCEEDED, 1)
    assert ready(view(FAN, s0=s0)) == ["1", "2"]
    left_done = view(FAN, s0=s0, s1=job("1", JobState.SUCCEEDED, 2), s2=job("2", JobState.RUNNING))
    assert ready(left_done) == []
    both = view(FAN, s0=s0, s1=job("1", JobState.SUCCEEDED, 2), s2=job("2", JobState.SUCCEEDED, 3))
    assert ready(both) == ["3"]


def test_a_failed_parent_blocks_its_child_and_the_workflow() -> None:
    s0 = job("0", JobState.SUCCEEDED, 1)
    s1, s2 = job("1", JobState.FAILED, error="no"), job("2", JobState.SUCCEEDED, 3)
    failed = view(FAN, s0=s0, s1=s1, s2=s2)
    assert ready(failed) == []
    assert failed.blocked_failures() == {"wf:w:1": ("ValueError", "no")}


def test_a_callback_that_accepts_failures_runs_after_one_and_gets_the_error_in_its_place() -> None:
    spec = compile_canvas(chord([sig("a"), sig("b")], sig("total", accepts_failures=True)))
    v = view(spec, s0=job("0", JobState.SUCCEEDED, 5), s1=job("1", JobState.FAILED, error="bad"))
    assert ready(v) == ["2"]
    assert v.blocked_failures() == {}
    assert v.value(spec.steps["2"].input) == [
        5,
        {"error": {"type": "ValueError", "message": "bad"}},
    ]


def test_a_cancelled_parent_blocks_even_a_callback_that_accepts_failures() -> None:
    spec = compile_canvas(chord([sig("a"), sig("b")], sig("total", accepts_failures=True)))
    v = view(spec, s0=job("0", JobState.SUCCEEDED, 5), s1=job("1", JobState.CANCELLED))
    assert ready(v) == []
    assert v.blocked_failures() == {"wf:w:1": ("cancelled", "wf:w:1 was cancelled")}


def test_a_failed_output_step_blocks_the_workflow() -> None:
    spec = compile_canvas(group([sig("a"), sig("b")]))
    v = view(spec, s0=job("0", JobState.SUCCEEDED, 1), s1=job("1", JobState.FAILED, error="x"))
    assert v.blocked_failures() == {"wf:w:1": ("ValueError", "x")}


def test_an_enqueued_step_is_not_ready_again() -> None:
    s0 = job("0", JobState.SUCCEEDED, 1)
    queued = view(FAN, s0=s0, s1=job("1", JobState.QUEUED), s2=job("2", JobState.QUEUED))
    assert ready(queued) == []


def test_the_output_value_has_the_output_shape() -> None:
    spec = compile_canvas(group([sig("a"), group([sig("b"), sig("c")])]))
    v = view(
        spec,
        s0=job("0", JobState.SUCCEEDED, "x"),
        s1=job("1", JobState.SUCCEEDED, {"k": 1}),
        s2=job("2", JobState.SUCCEEDED, None),
    )
    assert v.value(spec.output) == ["x", [{"k": 1}, None]]
