"""The project's tasks: plain Django ``@task`` functions, nothing taskmill-specific."""

from __future__ import annotations

from typing import Any

try:
    from django.tasks import task
    from django.tasks.base import TaskContext
except ImportError:
    from django_tasks import TaskContext, task

from shop.models import Note, Order


@task
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="mail")
def fail(reason: str) -> None:
    raise ValueError(reason)


@task
def ship(order_id: int) -> str:
    order = Order.objects.get(id=order_id)
    order.shipped = True
    order.save()
    return order.ref


@task
def note(label: str) -> str:
    Note.objects.create(label=label)
    return label


@task(takes_context=True)
def attempt(context: TaskContext, label: str) -> dict[str, Any]:
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id}


@task
async def add_later(a: int, b: int) -> int:
    return a + b


@task
def bad_result() -> object:
    return {1, 2}


@task(takes_context=True)
def flaky(context: TaskContext, label: str) -> str:
    if context.attempt < 2:
        raise ConnectionError(f"{label}: the courier API timed out")
    return f"{label} on attempt {context.attempt}"
