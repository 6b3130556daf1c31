"""Workflows: ``chain``, ``group`` and ``chord`` of task signatures, stored in the broker.

A workflow is compiled into a graph of steps. Each step is an ordinary job whose id names the
workflow and the step (``wf:<workflow>:<step>``), and the graph itself is stored with the
broker (``save_workflow``). Nothing counts down: a step is released by enqueueing its job
under that id once all its parents have finished, and since no broker stores an id twice,
the parents that finish at once (or a sweeper that comes later) release it exactly once.
Whoever finishes a step advances the workflow (the worker, right after the outcome is
stored), and every worker's maintenance loop sweeps the running workflows, so a worker that
dies between the two loses nothing. Retrying the failed steps of a failed workflow
(``App.retry_jobs``) resumes it (``resume``).

A step's input is the result of what came before it, passed as its first argument: the
previous step's result in a chain, or the list of a group's results (in order; a nested
group gives a nested list).

    >>> from taskmill import App, chain, group
    >>> app = App("memory://")
    >>> @app.task()
    ... def add(x: int, y: int) -> int:
    ...     return x + y
    >>> @app.task()
    ... def total(values: list[int]) -> int:
    ...     return sum(values)
    >>> flow = chain(add.s(1, 2), group([add.s(10), add.s(20)]), total.s())
    >>> handle = flow.send()
    >>> app.run_until_idle()
    4
    >>> handle.result(timeout=5)
    36
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import msgspec

from taskmill._ids import step_job_id, uuid7
from taskmill._ids import workflow_of as workflow_of  # public here: a job's workflow, by its id
from taskmill.brokers.features import WorkflowStore, provides, workflow_store
from taskmill.errors import (
    ConfigurationError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
)
from taskmill.job import FINISHED_STATES, Job, JobState, NewJob
from taskmill.serialization import decode, encode_payload

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import AppParts, Client
    from taskmill.registry import TaskDefinition

log = logging.getLogger("taskmill.workflows")

Shape = Union[str, list["Shape"]]  # noqa: UP007 - a recursive alias needs the string form
"""Where a value comes from: a step's id (its result), or a list of shapes (a list of them)."""

_POLL_START_S = 0.005
_POLL_MAX_S = 0.2


class WorkflowFailedError(JobFailedError):
    """A step failed and the workflow cannot finish; ``failed`` maps step job ids to their
    errors."""

    def __init__(self, workflow_id: str, failed: Mapping[str, tuple[str, str]]) -> None:
        self.workflow_id = workflow_id
        self.failed = dict(failed)
        first_id, (exc_type, message) = next(iter(self.failed.items()), ("?", ("?", "?")))
        super().__init__(first_id, exc_type, message)
        self.args = (f"workflow {workflow_id} failed: step {first_id}: {exc_type}: {message}",)


# --- the canvas ---------------------------------------------------------------------------------


class _Sendable:
    """``send()`` / ``asend()`` for every canvas form: to ``app`` if given, else to the app
    of the signatures' tasks."""

    def send(self: Any, app: AppParts | None = None) -> WorkflowHandle:
        client = app.client if app is not None else _client_of(self)
        return client.run_sync(asend_workflow(client, self))

    async def asend(self: Any, app: AppParts | None = None) -> WorkflowHandle:
        return await asend_workflow(app.client if app is not None else _client_of(self), self)


@dataclass(frozen=True)
class Signature(_Sendable):
    """A task call to make later: ``task.s(*args, **kwargs)``. In a workflow, the result of
    what comes before it is prepended to ``args``."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    accepts_failures: bool = False
    client: Client | None = field(default=None, compare=False, repr=False)
    """The client of the task's app (``task.s()`` sets it): where ``send()`` goes."""


@dataclass(frozen=True)
class Chain(_Sendable):
    steps: tuple[Canvas, ...]


@dataclass(frozen=True)
class Group(_Sendable):
    members: tuple[Canvas, ...]


def _client_of(canvas: Canvas) -> Client:
    if isinstance(canvas, Signature):
        if canvas.client is None:
            raise ConfigurationError("this signature has no app: send(app) it")
        return canvas.client
    parts = canvas.steps if isinstance(canvas, Chain) else canvas.members
    return _client_of(parts[0])


Canvas = Signature | Chain | Group


def chain(*steps: Canvas) -> Chain:
    """Run ``steps`` one after the other; each result is the next step's first argument."""
    if not steps:
        raise ConfigurationError("chain() needs at least one step")
    return Chain(tuple(_check(s) for s in steps))


def group(members: Iterable[Canvas]) -> Group:
    """Run ``members`` in parallel; the result is the list of their results, in order."""
    members = tuple(_check(m) for m in members)
    if not members:
        raise ConfigurationError("group() needs at least one member")
    return Group(members)


def chord(header: Group | Iterable[Canvas], callback: Signature) -> Chain:
    """Run ``header`` (a group) in parallel, then ``callback`` with the list of its results.
    If a member fails, the callback does not run, unless its task was declared with
    ``accepts_failures=True``: then a failed member's place in the list holds its error as
    ``{"error": {"type": ..., "message": ...}}``."""
    head = header if isinstance(header, Group) else group(header)
    return chain(head, callback)


def _check(step: Any) -> Canvas:
    if not isinstance(step, Signature | Chain | Group):
        raise ConfigurationError(
            f"a workflow step is task.s(...), chain(...), group(...) or chord(...), not {step!r}"
        )
    return step


# --- compiling ----------------------------------------------------------------------------------


class Step(msgspec.Struct, frozen=True):
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    input: Any = None  # a Shape, or None for a first step
    accepts_failures: bool = False


class Spec(msgspec.Struct, frozen=True):
    steps: dict[str, Step]
    output: Any  # a Shape


def compile_canvas(canvas: Canvas) -> Spec:
    steps: dict[str, Step] = {}

    def walk(node: Canvas, given: Shape | None) -> Shape:
        if isinstance(node, Signature):
            name = str(len(steps))
            steps[name] = Step(
                node.task, list(node.args), dict(node.kwargs), given, node.accepts_failures
            )
            return name
        if isinstance(node, Chain):
            shape = given
            for step in node.steps:
                shape = walk(step, shape)
            assert shape is not None
            return shape
        return [walk(member, given) for member in node.members]

    output = walk(canvas, None)
    return Spec(steps, output)


def _names(shape: Shape | None) -> list[str]:
    if shape is None:
        return []
    if isinstance(shape, str):
        return [shape]
    return [name for part in shape for name in _names(part)]


_spec_decoder = msgspec.json.Decoder(Spec)
_spec_encoder = msgspec.json.Encoder()


# --- sending and advancing ----------------------------------------------------------------------


async def asend_workflow(client: Client, canvas: Canvas) -> WorkflowHandle:
    """Store the workflow and enqueue its first steps. Their queues' ``max_depth`` is checked
    first, like a send's: ``QueueFullError`` stores nothing."""
    spec = compile_canvas(_check(canvas))
    for step in spec.steps.values():
        task = client.registry.get_task(step.task)  # unknown: fails here, before anything is stored
        task.bind_check((None, *step.args) if step.input is not None else step.args, step.kwargs)
        # the step's own arguments are stored now, in the workflow: refused now if they cannot
        # be (its input, a result, is checked when the step is enqueued)
        encode_payload(task.name, tuple(step.args), dict(step.kwargs), task.max_payload_bytes)
    workflow_id = uuid7()
    nothing_yet = _View(spec, {})
    first = [
        _step_job(client, workflow_id, nothing_yet, n) for n in spec.steps if nothing_yet.ready(n)
    ]
    jobs = [job for _, job in first]
    await client.check_room(jobs)
    store = workflow_store(await client.abroker())
    await store.save_workflow(workflow_id, _spec_encoder.encode(spec))
    await client.enqueue(jobs, [task for task, _ in first], depth="skip")
    return WorkflowHandle(client, workflow_id)


@dataclass
class _View:
    """A workflow's steps as stored now: the job of each step enqueued so far."""

    spec: Spec
    jobs: dict[str, Job | None]

    def state(self, step: str) -> JobState | None:
        job = self.jobs.get(step)
        return job.state if job is not None else None

    def value(self, shape: Shape) -> Any:
        if isinstance(shape, list):
            return [self.value(part) for part in shape]
        job = self.jobs[shape]
        assert job is not None
        if job.state is JobState.SUCCEEDED:
            return decode(job.result) if job.result is not None else None
        error = job.error
        return {"error": {"type": error.type if error else "unknown",
                          "message": error.message if error else ""}}  # fmt: skip

    def ready(self, step: str) -> bool:
        """Not enqueued yet, and every parent has finished as this step needs."""
        if self.jobs.get(step) is not None:
            return False
        spec_step = self.spec.steps[step]
        accepted = (
            {JobState.SUCCEEDED, JobState.FAILED}
            if spec_step.accepts_failures
            else {JobState.SUCCEEDED}
        )
        return all(self.state(p) in accepted for p in _names(spec_step.input))

    def blocked_failures(self) -> dict[str, tuple[str, str]]:
        """Failed or cancelled steps that make the workflow unable to succeed."""
        children: dict[str, list[str]] = {name: [] for name in self.spec.steps}
        for name, step in self.spec.steps.items():
            for parent in _names(step.input):
                children[parent].append(name)
        output = set(_names(self.spec.output))
        found = {}
        for name, job in self.jobs.items():
            if job is None or job.state not in (JobState.FAILED, JobState.CANCELLED):
                continue
            stuck = name in output or any(
                job.state is JobState.CANCELLED or not self.spec.steps[c].accepts_failures
                for c in children[name]
            )
            if stuck:
                err = job.error
                found[job.id] = (
                    (err.type, err.message) if err else ("cancelled", f"{job.id} was cancelled")
                )
        return found

    def lost(self) -> list[str]:
        """Steps whose job is gone though it was enqueued: a first step, or a parent of a
        step enqueued. Pruning removed it (a step's job finishes, and is pruned, before its
        workflow ends)."""
        enqueued = [name for name, job in self.jobs.items() if job is not None]
        needed = {n for n, s in self.spec.steps.items() if s.input is None}
        needed.update(p for n in enqueued for p in _names(self.spec.steps[n].input))
        return sorted(n for n in needed if self.jobs.get(n) is None)


async def _view(broker: Broker, workflow_id: str, spec: Spec) -> _View:
    names = list(spec.steps)
    jobs = await broker.get_many([step_job_id(workflow_id, n) for n in names])
    return _View(spec, dict(zip(names, jobs, strict=True)))


async def advance(client: Client, workflow_id: str) -> str | None:
    """Release every step whose parents have finished, and end the workflow once it has
    succeeded or cannot. Safe to call any number of times from anywhere: a step's job id is
    stored once. Returns the workflow's state (None if unknown).

    Released steps go through the client's enqueue pipeline without the ``max_depth`` check
    (``depth="skip"``): the workflow was accepted when it was sent (see ``taskmill.client``)."""
    broker = await client.abroker()
    store = workflow_store(broker)
    record = await store.get_workflow(workflow_id)
    if record is None:
        return None
    spec = _spec_decoder.decode(record.spec)
    view = await _view(broker, workflow_id, spec)
    if record.state == "cancelled":
        await _cancel_pending(broker, view)
        return record.state
    if record.state != "running":
        return record.state
    if all(view.state(n) is JobState.SUCCEEDED for n in _names(spec.output)):
        await store.end_workflow(workflow_id, "succeeded")
        return "succeeded"
    if view.blocked_failures():
        await store.end_workflow(workflow_id, "failed")
        return "failed"
    ready = [_step_job(client, workflow_id, view, n) for n in spec.steps if view.ready(n)]
    if ready:
        jobs = [job for _, job in ready]
        await client.enqueue(jobs, [task for task, _ in ready], depth="skip")
    return "running"


def _step_job(
    client: Client, workflow_id: str, view: _View, name: str
) -> tuple[TaskDefinition, NewJob]:
    step = view.spec.steps[name]
    task = client.registry.get_task(step.task)
    args = tuple(step.args) if step.input is None else (view.value(step.input), *step.args)
    opts = replace(task.defaults, job_id=step_job_id(workflow_id, name), key=None, connection=None)
    return task, task.build(opts, args, dict(step.kwargs))


async def _cancel_pending(broker: Broker, view: _View) -> None:
    for job in view.jobs.values():
        if job is not None and job.state not in FINISHED_STATES:
            await broker.cancel(job.id)


async def resume(client: Client, retried: Iterable[str]) -> list[str]:
    """Resume the failed workflows of steps just retried (what ``App.retry_jobs`` calls
    after the broker requeued them): a workflow that no failed or cancelled step blocks any
    more is ``running`` again, and advanced at once, so what its retried steps release when
    they succeed is released, and the steps its failure held back (in other branches) are
    released now. Returns the ids of the workflows resumed.

    Left as they are: a workflow that is not ``failed`` (running, succeeded, cancelled:
    a retried step runs alone), one that another failed step still blocks (it resumes when
    that one is retried too), and one whose enqueued steps' jobs were pruned (resuming
    would enqueue them again and run them twice)."""
    workflow_ids = sorted({w for job_id in retried if (w := workflow_of(job_id)) is not None})
    if not workflow_ids:
        return []
    broker = await client.abroker()
    if not provides(broker, WorkflowStore):
        return []  # a job whose id looks like a step's, with no workflow behind it
    resumed = []
    for workflow_id in workflow_ids:
        if await _reopen(broker, workflow_id):
            resumed.append(workflow_id)
            try:
                await advance(client, workflow_id)
            except Exception as exc:  # the retry is done; any worker's sweep advances it
                log.error("workflow %s: advancing after a retry failed: %s", workflow_id, exc)
    return resumed


async def _reopen(broker: Broker, workflow_id: str) -> bool:
    store = workflow_store(broker)
    record = await store.get_workflow(workflow_id)
    if record is None or record.state != "failed":
        return False
    view = await _view(broker, workflow_id, _spec_decoder.decode(record.spec))
    if view.blocked_failures():
        return False
    lost = view.lost()
    if lost:
        log.warning(
            "workflow %s stays failed: the jobs of its steps %s were pruned, and resuming "
            "would run them again",
            workflow_id,
            ", ".join(lost),
        )
        return False
    return await store.reopen_workflow(workflow_id)


async def sweep(client: Client, limit: int = 1000) -> int:
    """Advance every running workflow (what workers' maintenance loops call): releases steps
    whose parents finished while nobody advanced them (a worker died in between). Returns how
    many workflows were looked at."""
    broker = await client.abroker()
    if not provides(broker, WorkflowStore):
        return 0  # no workflow can have been sent
    ids = await workflow_store(broker).running_workflows(limit)
    for workflow_id in ids:
        try:
            await advance(client, workflow_id)
        except Exception as exc:  # one broken workflow must not stop the others
            log.error("workflow %s: advancing failed: %s", workflow_id, exc)
    return len(ids)


# --- looking at workflows (the admin API: App.get_workflow, App.list_workflows) -------------


class WorkflowStep(msgspec.Struct, frozen=True):
    """One step of a workflow: its name in the graph (``"0"``, ``"1"``, … in the order the
    canvas lists them), its task, its job's id, that job's state (None: not enqueued yet,
    waiting for its parents; or pruned), and the steps whose results it takes."""

    name: str
    task: str
    job_id: str
    state: JobState | None
    parents: list[str]


class WorkflowStatus(msgspec.Struct, frozen=True):
    """A workflow as the broker holds it: ``running``, ``succeeded``, ``failed`` or
    ``cancelled``, its times (seconds since the epoch) and its steps, in graph order."""

    id: str
    state: str
    created_at: float
    finished_at: float | None
    steps: list[WorkflowStep]


async def workflow_status(client: Client, workflow_id: str) -> WorkflowStatus:
    """A workflow and its steps' states (two reads); ``JobNotFoundError`` if unknown."""
    (status,) = await workflow_statuses(client, [workflow_id])
    if status is None:
        raise JobNotFoundError(f"workflow {workflow_id} does not exist (or was pruned)")
    return status


async def running_workflow_statuses(client: Client, limit: int = 50) -> list[WorkflowStatus]:
    """The running workflows, oldest first (at most ``limit``), with their steps."""
    broker = await client.abroker()
    ids = await workflow_store(broker).running_workflows(limit)
    # one that ended between the two reads is still shown, as it ended
    return [s for s in await workflow_statuses(client, ids) if s is not None]


async def workflow_statuses(client: Client, workflow_ids: list[str]) -> list[WorkflowStatus | None]:
    """The workflows of ``workflow_ids`` (None for an unknown one): a read per workflow,
    and one ``get_many`` for all their steps."""
    broker = await client.abroker()
    store = workflow_store(broker)
    records = [await store.get_workflow(w) for w in workflow_ids]
    specs = [None if r is None else _spec_decoder.decode(r.spec) for r in records]
    step_ids = [
        step_job_id(r.id, name)
        for r, spec in zip(records, specs, strict=True)
        if r is not None and spec is not None
        for name in spec.steps
    ]
    jobs = iter(await broker.get_many(step_ids))
    out: list[WorkflowStatus | None] = []
    for record, spec in zip(records, specs, strict=True):
        if record is None or spec is None:
            out.append(None)
            continue
        steps = []
        for name, step in spec.steps.items():
            job = next(jobs)
            steps.append(
                WorkflowStep(
                    name=name,
                    task=step.task,
                    job_id=step_job_id(record.id, name),
                    state=None if job is None else job.state,
                    parents=_names(step.input),
                )
            )
        out.append(
            WorkflowStatus(record.id, record.state, record.created_at, record.finished_at, steps)
        )
    return out


# --- the handle ---------------------------------------------------------------------------------


class WorkflowHandle:
    """What ``chain(...).send(app)`` returns: the workflow's id, its state, its result."""

    __slots__ = ("_client", "id")

    def __init__(self, client: Client, workflow_id: str) -> None:
        self._client = client
        self.id = workflow_id

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"

    async def astatus(self) -> str:
        """``running``, ``succeeded``, ``failed`` or ``cancelled``."""
        record = await workflow_store(await self._client.abroker()).get_workflow(self.id)
        if record is None:
            raise JobNotFoundError(f"workflow {self.id} does not exist (or was pruned)")
        return record.state

    async def asteps(self) -> dict[str, JobState | None]:
        """Each step's job id and state (None: not enqueued yet)."""
        broker = await self._client.abroker()
        record = await workflow_store(broker).get_workflow(self.id)
        if record is None:
            raise JobNotFoundError(f"workflow {self.id} does not exist (or was pruned)")
        view = await _view(broker, self.id, _spec_decoder.decode(record.spec))
        return {step_job_id(self.id, n): view.state(n) for n in view.spec.steps}

    async def aresult(self, timeout: float | None = None) -> Any:
        """Wait for the workflow to end: its result (the last step's, or a group's list);
        ``WorkflowFailedError`` or ``JobCancelledError``; ``TimeoutError`` after ``timeout``."""
        broker = await self._client.abroker()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_START_S
        while True:
            state = await self.astatus()
            if state != "running":
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"workflow {self.id} is still running after {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        record = await workflow_store(broker).get_workflow(self.id)
        assert record is not None
        view = await _view(broker, self.id, _spec_decoder.decode(record.spec))
        if state == "cancelled":
            raise JobCancelledError(f"workflow {self.id} was cancelled")
        if state == "failed":
            raise WorkflowFailedError(self.id, view.blocked_failures())
        return view.value(view.spec.output)

    async def acancel(self) -> str:
        """Cancel every step not finished yet (a running one is asked to stop), and release
        no more. The workflow's state after."""
        store = workflow_store(await self._client.abroker())
        await store.end_workflow(self.id, "cancelled")
        await advance(self._client, self.id)  # cancels the pending steps
        return await self.astatus()

    def status(self) -> str:
        return self._client.run_sync(self.astatus())

    def steps(self) -> dict[str, JobState | None]:
        return self._client.run_sync(self.asteps())

    def result(self, timeout: float | None = None) -> Any:
        return self._client.run_sync(self.aresult(timeout))

    def cancel(self) -> str:
        return self._client.run_sync(self.acancel())
