"""The NATS fixtures themselves (``tests/servers.py``), driven with nats-py directly: no taskmill
broker here, so a failure of the NATS broker's tests can be told apart from one of its servers.

What each shows: the shared server runs JetStream with ``sync_interval: always``; a file stream
keeps every acknowledged message across a SIGKILL and a restart on the same port; a frozen
(SIGSTOP) server makes a request time out and answers again once thawed; a replicas-3 stream on
the 3-node cluster keeps taking publishes with its leader SIGKILLed, and that node comes back
and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError

from servers import NatsCluster, NatsServer
from taskmill.testing import await_until


def _name() -> str:
    """A stream name of this test's own (the session's server is shared)."""
    return f"t{uuid.uuid4().hex[:10]}"


async def _close(nc: NatsClient) -> None:
    # after the server was killed under it, closing may find the socket already gone
    with contextlib.suppress(Exception):
        await nc.close()


@pytest.mark.timeout(30)
async def test_shared_server_runs_jetstream_with_sync_always(nats_server: NatsServer) -> None:
    status, varz = nats_server.monitor("/varz")
    assert status == 200
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert str(varz["jetstream"]["config"]["store_dir"]).startswith(str(nats_server.directory))
    nc = await nats_server.connect()
    try:
        info = await nc.jsm().account_info()
        assert info.limits is not None  # JetStream answers for the default account
        js = nc.jetstream()
        name = _name()
        await js.add_stream(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE)
        ack = await js.publish(f"{name}.a", b"x", timeout=5)
        assert (ack.stream, ack.seq) == (name, 1)
    finally:
        await nc.close()


@pytest.mark.timeout(60)
async def test_file_stream_keeps_acknowledged_messages_across_sigkill(
    nats_server_own: NatsServer,
) -> None:
    server = nats_server_own
    port, n, name = server.port, 300, _name()
    nc = await server.connect()
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE)
    acks = [await js.publish(f"{name}.m", str(i).encode(), timeout=5) for i in range(n)]
    assert [a.seq for a in acks] == list(range(1, n + 1))

    server.kill()  # SIGKILL right after the last ack: no graceful flush
    await _close(nc)
    with pytest.raises(nats.errors.NoServersError):  # the port is really closed
        await server.connect()
    server.start()
    assert server.port == port  # same URL for the clients

    nc = await server.connect()
    try:
        js = nc.jetstream()
        info = await js.stream_info(name)
        assert (info.state.messages, info.state.first_seq, info.state.last_seq) == (n, 1, n)
        first, last = await js.get_msg(name, 1), await js.get_msg(name, n)
        assert (first.data, last.data) == (b"0", str(n - 1).encode())
    finally:
        await nc.close()


@pytest.mark.timeout(30)
async def test_frozen_server_times_out_then_answers_once_thawed(
    nats_server_own: NatsServer,
) -> None:
    server, name = nats_server_own, _name()
    nc = await server.connect()
    try:
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE)
        assert (await js.publish(f"{name}.m", b"before", timeout=5)).seq == 1
        server.freeze()
        try:
            t0 = time.monotonic()
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish(f"{name}.m", b"frozen", timeout=0.5)
            assert time.monotonic() - t0 < 3  # the client's own timeout, not a hang
        finally:
            server.thaw()
        # The timed-out publish sat in the kernel's buffers and is stored on the thaw, before
        # this one: a publish that timed out may still land (what Nats-Msg-Id dedupe is for).
        assert (await js.publish(f"{name}.m", b"after", timeout=5)).seq == 3
        assert (await js.get_msg(name, 2)).data == b"frozen"
    finally:
        await nc.close()


async def _publish_acked(js: JetStreamContext, subject: str, i: int, timeout: float) -> int:
    """Publish message ``i`` until acknowledged (a retry during a leader election carries the
    same Nats-Msg-Id, so it is stored once); its stream sequence."""
    headers = {"Nats-Msg-Id": f"m{i}"}

    async def attempt() -> int | None:
        try:
            return (await js.publish(subject, str(i).encode(), timeout=1, headers=headers)).seq
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError):
            return None  # no stream leader right now, or the connection is moving to a node

    return await await_until(attempt, timeout=timeout, interval=0.05, what=f"an ack for m{i}")


@pytest.mark.timeout(90)
async def test_cluster_stream_survives_losing_its_leader_node(nats_cluster: NatsCluster) -> None:
    cluster, name, half = nats_cluster, _name(), 200
    assert len({node.server_name for node in cluster.nodes}) == 3
    assert cluster.url == ",".join(cluster.urls)
    nc = await cluster.connect(reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await js.add_stream(
            name=name, subjects=[f"{name}.>"], storage=StorageType.FILE, num_replicas=3
        )
        for i in range(half):
            await _publish_acked(js, f"{name}.m", i, timeout=10)
        leader = (await js.stream_info(name)).cluster.leader  # type: ignore[union-attr]
        victim = next(i for i, node in enumerate(cluster.nodes) if node.server_name == leader)

        cluster.kill(victim)  # the stream's leader: the others must elect a new one
        seqs = [await _publish_acked(js, f"{name}.m", i, timeout=20) for i in range(half, 2 * half)]
        assert seqs == list(range(half + 1, 2 * half + 1))  # no gap, no duplicate
        info = await js.stream_info(name)
        assert info.state.messages == 2 * half
        assert info.cluster is not None and info.cluster.leader != leader

        await asyncio.to_thread(cluster.start_node, victim)  # keeps nc's loop running meanwhile
        back = cluster.nodes[victim]
        await await_until(
            lambda: back.stream_messages(name) == 2 * half,
            timeout=20,
            what=lambda: f"{back.server_name} to catch up: {back.stream_messages(name)}",
        )
        assert cluster.meta_leader() is not None
    finally:
        await _close(nc)
