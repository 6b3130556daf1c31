"""Every error taskmill raises on purpose. Names end in ``Error``; intent signals do not."""

from __future__ import annotations


class TaskmillError(Exception):
    """Base class of taskmill's own errors."""


class ConfigurationError(TaskmillError):
    """A setting, URL or option is not valid."""


class SerializationError(TaskmillError, TypeError):
    """A value cannot be stored as JSON, or a stored payload cannot be read back."""


class PayloadTooLargeError(TaskmillError, ValueError):
    """An encoded job is larger than the configured ``max_payload_bytes``."""


class UnknownTaskError(TaskmillError, LookupError):
    """No task with that name is registered in the app."""


class UnknownScheduleError(TaskmillError, LookupError):
    """No periodic schedule with that name is registered in the app."""


class DuplicateJobError(TaskmillError):
    """A job with the same unique key is still scheduled, queued or running."""

    def __init__(self, key: str, existing_id: str) -> None:
        super().__init__(f"a job with key {key!r} is already pending: {existing_id}")
        self.key = key
        self.existing_id = existing_id


class JobNotFoundError(TaskmillError, LookupError):
    """No job with that id exists (never did, or was pruned after ``result_ttl``)."""


class JobFailedError(TaskmillError):
    """The job failed; carries the remote exception's type, message and traceback."""

    def __init__(self, job_id: str, type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"job {job_id} failed: {type}: {message}")
        self.job_id = job_id
        self.type = type
        self.message = message
        self.traceback = traceback


class JobCancelledError(TaskmillError):
    """The job was cancelled before it produced a result."""


class BrokerError(TaskmillError):
    """The broker refused an operation (for example a read-only database).

    ``permanent`` is True when trying again cannot help until a person changes something (a
    file's permissions, the URL, the server's settings): a worker stops on such an error,
    naming it, instead of retrying forever.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class BrokerUnavailableError(BrokerError):
    """The broker could not be reached or stayed locked past the configured wait."""


class TaskTimeoutError(TaskmillError, TimeoutError):
    """The task ran longer than its ``timeout`` (its hard time limit)."""


class SoftTimeLimitExceeded(TaskmillError):
    """Raised inside a task at its ``soft_timeout``, where its pool can raise into it (async
    tasks, and sync tasks in ``--pool process``): catch it to clean up, then return or raise.

    Not a ``TimeoutError``, so an ``except TimeoutError`` around the task's own I/O does not
    swallow it. Raised out of the task, it is an ordinary failure: retried under the task's
    retry policy (list it in ``dont_retry_on`` to fail at once).
    """


class WorkerLostError(TaskmillError):
    """The process running the job died (killed, crashed, or exited) before finishing it."""


class QueueFullError(TaskmillError):
    """A queue's ``max_depth`` is reached: the send stored nothing."""
