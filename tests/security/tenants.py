"""S9's servers: each server broker with two tenants, ``a`` and ``b``, separated by the
broker's own access control, plain TCP on loopback (TLS is ``test_tls.py``'s subject).

- ``AclRedisServer``: the default user is the admin (``requirepass``); an ACL user per tenant
  may touch only its keys and channels (``~{prefix}*``, ``&{prefix}*``) with only the
  commands taskmill needs (``TASKMILL_REDIS_COMMANDS``, the list docs/brokers.md gives).
- ``TenantPostgresServer``: a login role per tenant (scram-sha-256, not a superuser) that owns
  a schema of its own; ``PUBLIC`` keeps no ``CREATE`` on the database or on ``public``.
- ``AccountsNatsServer``: an account per tenant, each with JetStream and one user.

Each tenant's URL is its own credentials on its own prefix or schema; ``cross_url`` is tenant
a's credentials on tenant b's prefix or schema: what S9 tries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis

from servers import START_TIMEOUT_S, NatsServer, PostgresServer, RedisServer

TENANTS = ("a", "b")

TASKMILL_REDIS_COMMANDS = (
    # the connection (redis-py's HELLO; its CLIENT SETINFO may be refused: it ignores that)
    "+ping", "+hello",
    # every state change is a Lua script run by EVALSHA, loaded again after a NOSCRIPT
    "+evalsha", "+script|load",
    # the commands the scripts run (checked against the user's ACL like any other)
    "+time", "+get", "+set", "+del", "+exists", "+expire", "+persist", "+incrby",
    "+hget", "+hmget", "+hgetall", "+hset", "+hdel", "+hincrby",
    "+zadd", "+zrem", "+zscore", "+zcard", "+zrange", "+zrangebyscore", "+zremrangebyscore",
    "+zpopmax", "+sadd", "+srem", "+smembers", "+sismember", "+lpush", "+rpush", "+ltrim",
    # outside the scripts: reads for listings, stats, the worker registry; pausing queues
    "+mget", "+zmscore", "+zcount", "+scard",
    # idle workers block on their wake lists; live events go over pub/sub
    "+blpop", "+publish", "+subscribe", "+unsubscribe",
)  # fmt: skip
"""The commands an ACL user of taskmill needs: those ``INFO commandstats`` counted while a
producer, ``run_until_idle`` and a ``taskmill worker`` with events ran every admin call under
``+@all``, and every ``redis.call`` of ``src/taskmill/brokers/lua/``. ``CONFIG GET`` (the
eviction policy check at open) is left out: taskmill skips the check when it is refused."""


def _password(tenant: str, tag: str) -> str:
    return f"pw{tenant}{tag}"


@dataclass(frozen=True)
class Tenants:
    """Each tenant's URL (its credentials, its prefix or schema); ``cross_url``: tenant a's
    credentials on tenant b's prefix or schema; ``passwords``: every secret in play."""

    kind: str
    urls: dict[str, str]
    cross_url: str
    passwords: tuple[str, ...]


# --- Redis -------------------------------------------------------------------------------------


class AclRedisServer(RedisServer):
    """``redis-server`` whose default user needs ``admin_password``, and an ACL user per
    tenant limited to its prefix's keys and channels and to taskmill's commands."""

    def __init__(self, directory: Path, tag: str, commands: tuple[str, ...]) -> None:
        super().__init__(directory)
        self.tag = tag
        self.admin_password = f"admin{tag}"
        self.commands = commands

    def prefix(self, tenant: str) -> str:
        return f"tenant{tenant}:"

    def args(self) -> list[str]:
        args = [*super().args(), "--requirepass", self.admin_password]
        for tenant in TENANTS:
            p = self.prefix(tenant)
            rule = [f"user{tenant}", "on", f">{_password(tenant, self.tag)}", "resetkeys",
                    f"~{p}*", "resetchannels", f"&{p}*", "-@all", *self.commands]  # fmt: skip
            args += ["--user", *rule]
        return args

    def client(self, **options: Any) -> redis.Redis:
        return super().client(**{"password": self.admin_password, **options})

    def tenants(self) -> Tenants:
        def url(user: str, prefix: str) -> str:
            secret = _password(user, self.tag)
            return (f"redis://user{user}:{secret}@{self.host}:{self.port}/0"
                    f"?prefix={prefix}&unavailable_after_s=2")  # fmt: skip

        urls = {t: url(t, self.prefix(t)) for t in TENANTS}
        return Tenants("redis", urls, url("a", self.prefix("b")),
                       tuple(_password(t, self.tag) for t in TENANTS))  # fmt: skip


# --- PostgreSQL --------------------------------------------------------------------------------


class TenantPostgresServer(PostgresServer):
    """A cluster with a login role per tenant (``tenant_a``: scram-sha-256 password over TCP,
    no superuser, no ``CREATEDB``/``CREATEROLE``) owning schema ``ta`` (``tb``...); ``PUBLIC``
    has no ``CREATE`` or ``TEMP`` on the database and no ``CREATE`` on ``public``."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    @staticmethod
    def role(tenant: str) -> str:
        return f"tenant_{tenant}"

    @staticmethod
    def schema(tenant: str) -> str:
        return f"t{tenant}"

    def add_tenants(self) -> None:
        with self.connect() as conn:
            conn.execute("REVOKE ALL ON DATABASE postgres FROM PUBLIC")
            conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            for t in TENANTS:
                role, schema = self.role(t), self.schema(t)
                conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                             f"PASSWORD '{_password(t, self.tag)}'")  # fmt: skip
                conn.execute(f"GRANT CONNECT ON DATABASE postgres TO {role}")
                conn.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
        hba = self.data / "pg_hba.conf"
        rules = hba.read_text()
        mine = "".join(f"host all {self.role(t)} {self.host}/32 scram-sha-256\n" for t in TENANTS)
        hba.write_text(mine + rules)
        with self.connect() as conn:
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the reload is asynchronous: wait until a wrong password is refused
            try:
                with self.connect(user=self.role("a"), password="wrong"):
                    pass
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    return
                raise
            if time.monotonic() > deadline:
                raise RuntimeError("pg_hba.conf reload did not take effect")
            time.sleep(0.02)

    def tenants(self) -> Tenants:
        def url(t: str, schema: str) -> str:
            return (f"postgresql://{self.role(t)}:{_password(t, self.tag)}@{self.host}:"
                    f"{self.port}/postgres?schema={schema}&unavailable_after_s=2")  # fmt: skip

        urls = {t: url(t, self.schema(t)) for t in TENANTS}
        return Tenants("postgres", urls, url("a", self.schema("b")),
                       tuple(_password(t, self.tag) for t in TENANTS))  # fmt: skip


# --- NATS --------------------------------------------------------------------------------------


class AccountsNatsServer(NatsServer):
    """``nats-server -js`` with an account per tenant (``TA``, ``TB``), each with JetStream
    and one user; no user outside them."""

    def __init__(self, directory: Path, tag: str) -> None:
        super().__init__(directory, sync_always=False)
        self.tag = tag

    def config(self) -> str:
        lines = [super().config(), "accounts {"]
        for t in TENANTS:
            lines += [f"  T{t.upper()}: {{", "    jetstream: enabled",
                      f'    users: [{{user: "user{t}", password: "{_password(t, self.tag)}"}}]',
                      "  }"]  # fmt: skip
        lines.append("}")
        return "\n".join(lines) + "\n"

    def tenants(self) -> Tenants:
        def url(t: str, prefix: str) -> str:
            return (f"nats://user{t}:{_password(t, self.tag)}@{self.host}:{self.port}"
                    f"?prefix={prefix}&unavailable_after=2")  # fmt: skip

        urls = {t: url(t, f"tenant{t}") for t in TENANTS}
        return Tenants("nats", urls, url("a", "tenantb"),
                       tuple(_password(t, self.tag) for t in TENANTS))  # fmt: skip


def nats_permissions(prefix: str) -> dict[str, list[str]]:
    """The subjects a NATS user of taskmill with ``prefix`` may publish and subscribe to: its
    own subjects, its KV buckets' subjects and its streams' JetStream API, nothing of another
    prefix (docs/brokers.md). Enough for tenant a's run here (producer, ``run_until_idle``,
    admin calls, events); a long-running worker process was not run under them."""
    streams = [f"{prefix}_dispatch", *(f"KV_{prefix}_{what}" for what in NATS_BUCKETS)]
    publish = [f"{prefix}.>"]
    publish += [f"$KV.{prefix}_{what}.>" for what in NATS_BUCKETS]
    for s in streams:
        publish += [f"$JS.API.STREAM.*.{s}", f"$JS.API.STREAM.MSG.*.{s}",
                    f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>",
                    f"$JS.API.CONSUMER.*.{s}", f"$JS.API.CONSUMER.*.{s}.>",
                    f"$JS.API.CONSUMER.MSG.NEXT.{s}.>", f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.>",
                    f"$JS.ACK.{s}.>", f"$JS.FC.{s}.>"]  # fmt: skip
    return {"publish": publish, "subscribe": ["_INBOX.>", f"{prefix}.>"]}


NATS_BUCKETS = ("jobs", "payloads", "keys", "leases", "workers", "queues", "misc", "workflows")


class PermissionsNatsServer(NatsServer):
    """``nats-server -js`` with one account (the global one) and a user per tenant whose
    subject permissions allow only its prefix's names (``nats_permissions``)."""

    def __init__(self, directory: Path, tag: str) -> None:
        super().__init__(directory, sync_always=False)
        self.tag = tag

    def config(self) -> str:
        users = []
        for t in TENANTS:
            perms = nats_permissions(f"tenant{t}")
            pub = ", ".join(f'"{s}"' for s in perms["publish"])
            sub = ", ".join(f'"{s}"' for s in perms["subscribe"])
            users.append(f'{{user: "user{t}", password: "{_password(t, self.tag)}", '
                         f"permissions: {{publish: {{allow: [{pub}]}}, "
                         f"subscribe: {{allow: [{sub}]}}}}}}")  # fmt: skip
        block = "authorization {\n  users: [\n    " + ",\n    ".join(users) + "\n  ]\n}\n"
        return super().config() + block

    def tenants(self) -> Tenants:
        def url(t: str, prefix: str, wait_s: int = 2) -> str:
            return (f"nats://user{t}:{_password(t, self.tag)}@{self.host}:{self.port}"
                    f"?prefix={prefix}&unavailable_after={wait_s}")  # fmt: skip

        urls = {t: url(t, f"tenant{t}") for t in TENANTS}
        # a refused subject gets no answer: a call fails when its wait is over (1 s here)
        return Tenants("nats-permissions", urls, url("a", "tenantb", 1),
                       tuple(_password(t, self.tag) for t in TENANTS))  # fmt: skip
