"""taskmill: background jobs for Python.

>>> from taskmill import App
>>> app = App("memory://")
>>> @app.task(retries=3)
... def add(a: int, b: int) -> int:
...     return a + b
>>> job = add.send(1, 2)
>>> app.run_until_idle()
1
>>> job.result(timeout=5)
3
>>> app.close()
"""

from taskmill.app import App
from taskmill.context import JobContext, current_job
from taskmill.errors import (
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DuplicateJobError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    SerializationError,
    SoftTimeLimitExceeded,
    TaskmillError,
    TaskTimeoutError,
    UnknownScheduleError,
    UnknownTaskError,
    WorkerLostError,
)
from taskmill.handle import JobHandle
from taskmill.hooks import JobView
from taskmill.job import Job, JobState
from taskmill.limits import Limit
from taskmill.retry import Backoff, Cancel, Retry
from taskmill.settings import Settings
from taskmill.task import BoundTask, Task
from taskmill.workflows import (
    Signature,
    WorkflowFailedError,
    WorkflowHandle,
    chain,
    chord,
    group,
)

__all__ = [
    "App",
    "Backoff",
    "BoundTask",
    "BrokerError",
    "BrokerUnavailableError",
    "Cancel",
    "ConfigurationError",
    "DuplicateJobError",
    "Job",
    "JobCancelledError",
    "JobContext",
    "JobFailedError",
    "JobHandle",
    "JobNotFoundError",
    "JobState",
    "JobView",
    "Limit",
    "PayloadTooLargeError",
    "QueueFullError",
    "Retry",
    "SerializationError",
    "Settings",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskTimeoutError",
    "TaskmillError",
    "UnknownScheduleError",
    "UnknownTaskError",
    "WorkerLostError",
    "WorkflowFailedError",
    "WorkflowHandle",
    "chain",
    "chord",
    "current_job",
    "group",
]
__version__ = "0.1.0"
