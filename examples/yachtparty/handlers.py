"""One handler per task type: what the seed's ``src/handlers/*.ts`` did, as plain methods.

A handler returns its result (the seed's ``{success: true, data}``) or raises: a
``ServiceError`` is worth retrying (a 5xx, a 429, a timeout), a ``PermanentTaskError`` is not
(the seed's ``shouldRetry: false``): taskmill's retry policy in ``tasks.py`` decides what
happens next, not the handler.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from examples.yachtparty.config import Config
from examples.yachtparty.db import Database
from taskmill import JobHandle, current_job

# the fields update_user_profile may set (the seed's allowlist, "for security")
PROFILE_FIELDS = frozenset({"name", "company", "title", "email", "timezone"})
# a user who has not written for this many minutes gets a nudge; the check after the last
# nudge pauses the conversation
QUIET_MINUTES = 24 * 60
NUDGES = 2


class ServiceError(Exception):
    """An external service failed in a way a later attempt may not (5xx, 429, a timeout)."""


class PermanentTaskError(Exception):
    """The task cannot succeed as sent (bad input, an unknown user): no retry."""


class Sender(Protocol):
    """How a handler sends the next task (``tasks.Processor.send``)."""

    def send(self, task_type: str, kwargs: dict[str, Any], **options: Any) -> JobHandle[Any]: ...


class AgentHandlers:
    """The handlers, with what they need: the database and the external services."""

    def __init__(self, config: Config, db: Database, sender: Sender) -> None:
        self.config = config
        self.db = db
        self.sender = sender

    def research_solution(self, user_id: str, description: str) -> dict[str, Any]:
        """Publish the event that starts the Solution Saga for the user's request."""
        reply = self._post("/events", {"type": "solution.research_requested",
                                       "user_id": user_id, "description": description})  # fmt: skip
        return {"event_id": reply["event_id"]}

    def schedule_followup(self, user_id: str, message: str) -> dict[str, Any]:
        """Write the follow-up message, then hand it to the SMS gateway. A second run of the
        same job finds its message written already (``job_id`` is unique) and only resends."""
        job_id = current_job().id
        try:
            with self.db.connection() as conn:
                conn.execute(
                    "INSERT INTO messages (user_id, direction, body, job_id) "
                    "VALUES (%s, 'outbound', %s, %s) ON CONFLICT (job_id) DO NOTHING",
                    (user_id, message, job_id),
                )
        except psycopg.errors.ForeignKeyViolation:
            raise PermanentTaskError(f"no user {user_id!r}") from None
        reply = self._post("/sms", {"user_id": user_id, "body": message})
        return {"sid": reply["sid"]}

    def update_user_profile(self, user_id: str, fields: dict[str, str]) -> dict[str, Any]:
        """Set profile fields, only those of the allowlist."""
        refused = sorted(set(fields) - PROFILE_FIELDS)
        if refused:
            raise PermanentTaskError(
                f"field(s) {', '.join(refused)} may not be set "
                f"(allowed: {', '.join(sorted(PROFILE_FIELDS))})"
            )
        with self.db.connection() as conn:
            cur = conn.execute(
                "UPDATE users SET profile = profile || %s WHERE id = %s", (Jsonb(fields), user_id)
            )
        if cur.rowcount == 0:
            raise PermanentTaskError(f"no user {user_id!r}")
        return {"updated": sorted(fields)}

    def re_engagement_check(self, user_id: str, attempt: int = 1) -> dict[str, Any]:
        """Nudge a user who went quiet during onboarding; after ``NUDGES`` nudges, pause the
        conversation. The nudge and the next check are written in one transaction."""
        quiet_s = QUIET_MINUTES * self.config.minute_s
        with self.db.connection() as conn, conn.transaction():
            row = conn.execute(
                "SELECT extract(epoch FROM now() - max(created_at)) FROM messages "
                "WHERE user_id = %s AND direction = 'inbound'",
                (user_id,),
            ).fetchone()
            silent_s = row[0] if row and row[0] is not None else None
            if silent_s is not None and silent_s < quiet_s:
                return {"action": "none", "reason": "the user wrote recently"}
            if attempt > NUDGES:
                conn.execute(
                    "UPDATE users SET conversation_paused = true WHERE id = %s", (user_id,)
                )
                return {"action": "paused"}
            conn.execute(
                "INSERT INTO messages (user_id, direction, body, job_id) "
                "VALUES (%s, 'outbound', %s, %s) ON CONFLICT (job_id) DO NOTHING",
                (user_id, "Still there? Reply to pick up where we left off.", current_job().id),
            )
            self.sender.send(
                "re_engagement_check", {"user_id": user_id, "attempt": attempt + 1},
                connection=conn, delay=quiet_s, meta={"created_by": "re_engagement_check"},
            )  # fmt: skip
        return {"action": "nudged", "attempt": attempt}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.config.services_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.http_timeout_s) as reply:
                return dict(json.load(reply))
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise ServiceError(f"{path} answered {exc.code}") from None
            raise PermanentTaskError(f"{path} refused the call: {exc.code}") from None
        except TimeoutError:
            timeout_s = self.config.http_timeout_s
            raise ServiceError(f"{path} did not answer within {timeout_s} s") from None
        except urllib.error.URLError as exc:
            raise ServiceError(f"{path} unreachable: {exc.reason}") from None
