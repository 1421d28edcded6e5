"""Upstream sessions reused across messages (the connection pool): several messages over one
connection to a real aiosmtpd upstream that counts its connections, with and without PIPELINING,
and a pooled connection the upstream dropped replaced cleanly by a new one."""

from __future__ import annotations

import threading
import time

import pytest
import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from firmware.qmgr import HoldQueue, WallClock
from firmware.relay import ConnectionPool, Relay
from firmware.routes import Route, Router
from tests.integration.conftest import free_port, wait_for
from tests.test_qmgr import MemoryStore

REFUSED = "refused@ext.example"


class CountingUpstream:
    """aiosmtpd handler: what it received, how many sessions it had and how many it lost;
    PIPELINING offered or not; RCPT to REFUSED answered 550."""

    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.lock = threading.Lock()
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.opened = 0
        self.lost = 0
        self.commands: list[str] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RSET(self, server, session, envelope):
        with self.lock:
            self.commands.append("RSET")
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == REFUSED:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  envelope.original_content))
        return "250 2.0.0 Ok: stored"

    def count(self, what: str) -> int:
        with self.lock:
            return getattr(self, what)


class CountingController(Controller):
    def __init__(self, handler: CountingUpstream, **kwargs) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=free_port(), **kwargs)
        self.counter = handler

    def factory(self):
        counter = self.counter

        class Counted(SMTP):
            def connection_made(self, transport):
                with counter.lock:
                    counter.opened += 1
                super().connection_made(transport)

            def connection_lost(self, error):
                with counter.lock:
                    counter.lost += 1
                super().connection_lost(error)

        return Counted(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def start_upstream():
    controllers = []

    def start(pipelining: bool, **kwargs) -> tuple[CountingUpstream, int]:
        handler = CountingUpstream(pipelining)
        controller = CountingController(handler, **kwargs)
        controller.start()
        controllers.append(controller)
        # start() connects once to see that it listens: counted from when that one is gone
        deadline = time.monotonic() + 10
        while handler.count("lost") < 1:
            assert time.monotonic() < deadline, "aiosmtpd's own check did not end"
            time.sleep(0.01)
        with handler.lock:
            handler.opened = handler.lost = 0
        return handler, controller.port

    yield start
    for controller in controllers:
        controller.stop()


def message(n: int) -> bytes:
    return (f"From: s@lan.example\r\nTo: a@ext.example\r\nSubject: {n}\r\n\r\n"
            f"Body {n}\r\n.starts with a dot\r\n").encode()


async def gateway(nursery, port: int):
    store = MemoryStore()
    clock = WallClock()
    queue = HoldQueue(store, hold_seconds=60, max_messages=100, max_bytes=10**8, now=clock)
    relay = Relay(queue, router=Router(default=Route("127.0.0.1", port, "none", "gw.example")),
                  retry_seconds=600, now=clock, hostname="gw.example")
    await nursery.start(relay.run)
    return queue, store


async def send(queue, store, n: int, recipients=("a@ext.example",)) -> bytes:
    id = n.to_bytes(16, "big")
    body = message(n)
    await store.write_body(id, 0, body)
    await queue.accept(id, client_ip="192.168.1.5", sender="s@lan.example",
                       recipients=recipients, summary={}, size=len(body), hold=False,
                       mail_options={})
    await wait_for(lambda: not queue.is_pending(id))
    return id


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_several_messages_over_one_upstream_connection(start_upstream, pipelining):
    upstream, port = start_upstream(pipelining)
    async with trio.open_nursery() as nursery:
        queue, store = await gateway(nursery, port)
        for n in range(1, 4):
            await send(queue, store, n)
        # one refused recipient: the others get it, the sender a bounce, on the same session
        await send(queue, store, 4, recipients=("a@ext.example", REFUSED, "b@ext.example"))
        await send(queue, store, 5)
        nursery.cancel_scope.cancel()
    received = upstream.messages
    assert [(m[0], m[1]) for m in received] == [
        ("s@lan.example", ["a@ext.example"])] * 3 + [
        ("s@lan.example", ["a@ext.example", "b@ext.example"]),
        ("<>", ["s@lan.example"]),
        ("s@lan.example", ["a@ext.example"])]
    assert received[0][2] == message(1)  # the dot-stuffed line came back unstuffed
    assert b"No such user" in received[4][2]  # the bounce names the refusal
    assert upstream.count("opened") == 1
    assert upstream.commands == ["RSET"] * 5  # before each transaction on a reused session
    assert queue.counters["delivered"] == 4 and queue.counters["deferred"] == 0
    await wait_for(lambda: upstream.count("lost") == 1)  # the pool closed it on stopping


async def test_a_pooled_connection_the_upstream_dropped_is_replaced(start_upstream):
    # The upstream closes a session idle for 0.3 s; the pool would keep it for longer.
    upstream, port = start_upstream(True, timeout=0.3)
    async with trio.open_nursery() as nursery:
        queue, store = await gateway(nursery, port)
        await send(queue, store, 1)
        await wait_for(lambda: upstream.count("lost") == 1)
        await send(queue, store, 2)
        nursery.cancel_scope.cancel()
    assert [m[2] for m in upstream.messages] == [message(1), message(2)]  # each exactly once
    assert upstream.count("opened") == 2
    assert queue.counters["delivered"] == 2 and queue.counters["deferred"] == 0


class IdleSession:
    """Stands for a greeted upstream session in the pool: only what the pool looks at."""

    def __init__(self) -> None:
        self.closed = False
        self.opened_at = trio.current_time()
        self.quit_at: float | None = None

    async def quit(self) -> None:
        self.quit_at = trio.current_time()


class StepBudget(trio.abc.Instrument):
    """Cancels `scope` once the run has taken `limit` task steps: a loop that never blocks
    would otherwise keep the autojump clock from moving, and the test from ending."""

    def __init__(self, scope: trio.CancelScope, limit: int) -> None:
        self.scope, self.limit, self.steps = scope, limit, 0

    def before_task_step(self, task) -> None:
        self.steps += 1
        if self.steps == self.limit:
            self.scope.cancel()


async def test_an_idle_session_is_closed_whatever_the_rounding_of_its_time(autojump_clock):
    """Given at a time t where (t + 5) - 5 < t in floating point, a session is still closed
    after 5 s idle, without the pool's task spinning (it did, now and then, in the suite)."""
    pool = ConnectionPool(idle_seconds=5.0)
    while (trio.current_time() + 5.0) - 5.0 >= trio.current_time():
        autojump_clock.jump(0.001)
    with trio.CancelScope() as scope:
        budget = StepBudget(scope, 10_000)
        trio.lowlevel.add_instrument(budget)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run)
                session = IdleSession()
                given = trio.current_time()
                await pool.give(("host",), session)
                await trio.sleep(10)
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(budget)
    assert not scope.cancelled_caught, f"the pool spun for {budget.steps} task steps"
    assert session.quit_at == given + 5.0
