"""The jobs: save → score → extract, each step sending the next (README.md says why this
rather than a workflow). Run them with ``taskmill worker examples.task_tracker.tasks:app``.

Each step's job id is derived from the message (``save-KEY``, ``score-KEY``, ``extract-KEY``):
a send whose id is stored already stores nothing, so a step that runs again (its worker died
after sending the next step) does not send the next step twice, and the web side finds every
step of a message without keeping a status column.
"""

from __future__ import annotations

from typing import Any

from examples.task_tracker.model_client import ModelError, ModelRejected, call_model
from examples.task_tracker.settings import Settings, classify
from examples.task_tracker.store import MessageStore
from taskmill import App, Backoff, current_job

settings = Settings.from_env()
app = App(settings.broker_url, events=True, lease_s=settings.lease_s)
_store: MessageStore | None = None

STEPS = ("save", "score", "extract")


def step_job_id(step: str, key: str) -> str:
    """The job id of one step of one message."""
    return f"{step}-{key}"


def message_key(chat_id: int, message_id: int) -> str:
    """A Telegram message is unique by chat and message id."""
    return f"{chat_id}-{message_id}"


def store() -> MessageStore:
    """Opened on first use: importing the module (the web process, a test) opens nothing."""
    global _store
    if _store is None:
        _store = MessageStore(settings.db_path)
    return _store


@app.task(retries=5, backoff=Backoff(base=0.5, cap=10))
def save_message(chat_id: int, message_id: int, author: str, text: str) -> dict[str, Any]:
    """Store the message (once, however often the webhook delivered it), then score it."""
    key = message_key(chat_id, message_id)
    new = store().save(key, chat_id, message_id, author, text)
    score_message.options(job_id=step_job_id("score", key)).send(key)
    return {"message": key, "new": new}


def text_of(key: str) -> str:
    """The saved message's text; a step sent for a message never saved fails (and shows)."""
    message = store().get(key)
    if message is None:
        raise LookupError(f"no message {key}")
    return str(message["text"])


@app.task(retries=4, backoff=Backoff(base=0.5, cap=10), dont_retry_on=ModelRejected, timeout=60)
def score_message(key: str) -> dict[str, Any]:
    """Ask the model how much the message matters; extract its knowledge if it is signal."""
    job = current_job()
    text = text_of(key)
    job.progress(0.2, "asking the scoring model")
    answer = call_model(settings.model_url, "/score", text, settings.model_timeout_s)
    score, factors = float(answer["score"]), dict(answer["factors"])
    classification = classify(score, settings.signal_threshold)
    store().set_score(key, score, classification, factors)
    job.progress(0.9, f"scored {score:.2f}: {classification}")
    extract = classification == "signal"
    if extract:
        extract_knowledge.options(job_id=step_job_id("extract", key)).send(key)
    return {"score": score, "classification": classification, "extract": extract}


@app.task(retries=4, backoff=Backoff(base=0.5, cap=10), dont_retry_on=ModelRejected, timeout=120)
def extract_knowledge(key: str) -> dict[str, Any]:
    """Ask the model for the message's topics and keep them."""
    job = current_job()
    text = text_of(key)
    job.progress(0.3, "extracting topics")
    answer = call_model(settings.model_url, "/extract", text, settings.model_timeout_s)
    topics = [str(t) for t in answer["topics"]]
    job.progress(0.8, f"saving {len(topics)} topic(s)")
    store().set_topics(key, topics)
    return {"topics": topics}


__all__ = [
    "STEPS",
    "ModelError",
    "ModelRejected",
    "app",
    "extract_knowledge",
    "message_key",
    "save_message",
    "score_message",
    "settings",
    "step_job_id",
    "store",
]
