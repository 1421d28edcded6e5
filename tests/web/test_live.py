"""Live updates: the replaying stream, and the WebSocket on the page's own port."""

import json
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, wrap_client_stream

from firmware.web.http import ReplayStream

from .conftest import request

A, B = "127.0.0.1", "127.0.0.2"


async def test_replay_stream_is_a_stream():
    async def maker():
        left, right = trio.testing.memory_stream_pair()
        return ReplayStream(left, b""), ReplayStream(right, b"")

    await trio.testing.check_two_way_stream(maker, None)


async def test_replay_stream_gives_back_the_bytes_first():
    left, right = trio.testing.memory_stream_pair()
    stream = ReplayStream(right, b"GET /api/live HTTP/1.1\r\n")
    await left.send_all(b"rest")
    assert await stream.receive_some(4) == b"GET "
    assert await stream.receive_some() == b"/api/live HTTP/1.1\r\n"
    assert await stream.receive_some() == b"rest"
    await stream.send_all(b"back")
    assert await left.receive_some() == b"back"
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()


@asynccontextmanager
async def _live(port, origin="http://matte.test", host="matte.test"):
    """A WebSocket client (trio-websocket) presenting the given Host and Origin."""
    headers = [] if origin is None else [("Origin", origin)]
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.fail_after(10):
                ws = await wrap_client_stream(nursery, stream, host, "/api/live",
                                              extra_headers=headers)
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()


async def test_live_sends_snapshots_on_change(port, queue):
    first = queue.add(A, "first")
    queue.add(B, "not mine")
    async with _live(port) as ws:
        with trio.fail_after(10):
            snapshot = json.loads(await ws.get_message())
            assert [m["subject"] for m in snapshot["held"]] == ["first"]
            assert snapshot["token"] and snapshot["store"]["messages"] == 2
            assert isinstance(snapshot["now"], float)
            queue.add(A, "second")
            queue.notify()
            snapshot = json.loads(await ws.get_message())
            assert [m["subject"] for m in snapshot["held"]] == ["first", "second"]
            del queue.items[first.id]
            queue.notify()
            snapshot = json.loads(await ws.get_message())
            assert [m["subject"] for m in snapshot["held"]] == ["second"]
    # The same port still serves plain HTTP afterwards.
    assert (await request(port, "GET", "/api/held")).status == 200


async def test_live_from_another_address_sees_only_its_mail(port, queue):
    queue.add(A, "mine")
    # open_websocket cannot bind a source address: serve B's view through the scope check.
    reply = await request(port, "GET", "/api/held", source=B)
    assert reply.json()["held"] == []


@pytest.mark.parametrize("origin, host", [
    ("http://evil.example", "matte.test"),
    ("null", "matte.test"),
    ("http://matte.test", "evil.example"),
])
async def test_live_refuses_cross_site_and_foreign_host(port, queue, origin, host):
    queue.add(A, "secret")
    rejected = []
    try:
        async with _live(port, origin=origin, host=host):
            pass
    except BaseExceptionGroup as group:
        matched, rest = group.split(ConnectionRejected)
        assert rest is None
        rejected = list(_leaves(matched))
    assert [r.status_code for r in rejected] == [403 if host == "matte.test" else 421]
    assert b"secret" not in (rejected[0].body or b"")


def _leaves(group):
    for exc in group.exceptions:
        yield from _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]


async def test_live_needs_an_upgrade(port):
    reply = await request(port, "GET", "/api/live")
    assert reply.status == 400
    reply = await request(port, "POST", "/api/live")
    assert reply.status == 405


async def test_queue_change_version_wakes_waiters():
    from tests.test_qmgr import MemoryStore  # noqa: F401  (the real queue on a memory store)

    from firmware.qmgr import HoldQueue

    queue = HoldQueue(MemoryStore(), hold_seconds=300, max_messages=10, max_bytes=10**6)
    seen = queue.change_version
    woke = []

    async def waiter():
        woke.append(await queue.wait_changed(seen))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        await queue.accept(b"\x01" * 16, client_ip="127.0.0.1", sender="a@b", recipients=("c@d",),
                           summary={"subject": "s"}, size=10, hold=True, mail_options={})
    assert woke == [seen + 1]
    # Already changed since `seen`: no wait at all.
    with trio.fail_after(1):
        assert await queue.wait_changed(seen) == seen + 1
