"""The supervisor: the LED's one owner, and the watchdog kicked only while everything is healthy.

Watchdog tests run on real time (a kicker thread); they wait for the kicker's own progress
(its count of checks), never for a duration.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import threading
import time

import pytest
import trio

from board import SimBoard
from firmware import app
from firmware.config import loads
from firmware.supervisor import ServiceStopped, Supervisor, led_state

# -- which state the LED shows ------------------------------------------------------------------


def state(**kw):
    args = dict(booting=False, store_fault=False, upstream_down_for=None,
                upstream_fault_seconds=60, full=False, held=0)
    args.update(kw)
    return led_state(**args)


def test_led_state_each_and_priority():
    assert state() == "ready"
    assert state(held=1) == "holding"
    assert state(held=500, full=True) == "queue-full"
    assert state(full=True, store_fault=True) == "fault"
    assert state(upstream_down_for=59.9, held=1) == "holding"
    assert state(upstream_down_for=60, held=1) == "fault"
    assert state(booting=True, store_fault=True) == "booting"


class FakeQueue:
    def __init__(self):
        self.held, self.full = 0, False

    def held_count(self):
        return self.held

    def is_full(self):
        return self.full


class FakeStore:
    def __init__(self):
        self.stats = {"broken": None, "write_errors": 0, "batches": 0}

    def statistics(self):
        return dict(self.stats)


def test_led_follows_queue_and_store_and_logs_every_change(caplog):
    caplog.set_level(logging.INFO, "matte.supervisor")
    board, queue, store = SimBoard(), FakeQueue(), FakeStore()
    sup = Supervisor(board)
    sup.show()
    sup.watch(queue=queue, store=store)
    sup.show()  # no change, no second "booting"
    sup.ready()
    queue.held = 3
    sup.show()
    queue.full = True
    sup.show()
    store.stats["write_errors"] = 1  # a failed write: fault until a batch is written again
    sup.show()
    sup.show()
    store.stats["batches"] = 1
    sup.show()
    store.stats["broken"] = "EIO"  # refuses writes: fault for good
    store.stats["batches"] = 2
    sup.show()
    assert board.led_states == ["booting", "ready", "holding", "queue-full", "fault",
                                "queue-full", "fault"]
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LED: ")]
    assert changes == ["LED: off -> booting", "LED: booting -> ready", "LED: ready -> holding",
                       "LED: holding -> queue-full", "LED: queue-full -> fault",
                       "LED: fault -> queue-full", "LED: queue-full -> fault"]


async def test_upstream_unreachable_long_enough_is_a_fault():
    clock = [1000.0]
    board, queue = SimBoard(), FakeQueue()
    sup = Supervisor(board, upstream_fault_seconds=300, now=lambda: clock[0])
    sup.watch(queue=queue)
    sup.ready()
    up = {"reachable": False}

    async def connect(host, port):
        await trio.lowlevel.checkpoint()
        if not up["reachable"]:
            raise OSError("connection refused")
        return "stream"

    observed = sup.watch_connect(connect)
    for _ in range(3):
        with pytest.raises(OSError):
            await observed("upstream.example", 25)
        clock[0] += 100
        sup.show()
    # down since the first failure, 300 s ago: not the last one
    assert board.led_states == ["ready", "fault"]
    up["reachable"] = True
    assert await observed("upstream.example", 25) == "stream"
    sup.show()
    assert board.led == "ready"


# -- the watchdog -------------------------------------------------------------------------------


class KickRecorder(SimBoard):
    """Records, at each kick, how long ago the event loop last showed it was alive."""

    def __init__(self):
        super().__init__()
        self.supervisor: Supervisor | None = None
        self.beat_ages: list[float] = []

    def kick_watchdog(self):
        super().kick_watchdog()
        self.beat_ages.append(time.monotonic() - self.supervisor._beat)


def kicker(**kw) -> tuple[Supervisor, KickRecorder]:
    board = KickRecorder()
    sup = Supervisor(board, **{"kick_seconds": 0.01, "stall_seconds": 0.3, **kw})
    board.supervisor = sup
    return sup, board


async def wait_checks(sup: Supervisor, board: SimBoard, n: int) -> None:
    """Let the kicker thread decide n more times (each decision kicks or refuses)."""
    target = sup.kicks + sup.refusals + n
    while sup.kicks + sup.refusals < target:
        await trio.sleep(0.005)


async def test_kicks_while_healthy(nursery):
    sup, board = kicker()
    await nursery.start(sup.run)
    await wait_checks(sup, board, 20)
    assert board.kicks >= 20 and sup.kick_stops == 0 and sup.refusals == 0


@pytest.mark.parametrize("how", ["raises", "returns"])
async def test_kicks_stop_when_a_service_stops(how, caplog):
    sup, board = kicker()
    go = trio.Event()

    async def service(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await go.wait()
        if how == "raises":
            raise RuntimeError("disk on fire")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await nursery.start(sup.supervise, "relay", service)
            await wait_checks(sup, board, 5)
            go.set()
            await trio.sleep_forever()  # cancelled when the service stops
    if how == "raises":
        assert caught.group_contains(RuntimeError, match="disk on fire", depth=None)
    else:
        assert caught.group_contains(ServiceStopped, match="relay stopped", depth=None)
    assert sup.statistics()["dead_services"] == ["relay"]
    assert sup.health(time.monotonic()) == "service relay stopped"
    assert sup.kick_stops == 1
    assert any("watchdog kicks stop: service relay stopped" in r.getMessage()
               for r in caplog.records)


async def test_kicks_stop_while_the_loop_is_blocked_and_resume_after(caplog):
    sup, board = kicker(stall_seconds=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await wait_checks(sup, board, 5)
        refusals = sup.refusals
        deadline = time.monotonic() + 5
        while sup.refusals < refusals + 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # blocks the event loop: the heartbeat stops
        await wait_checks(sup, board, 5)  # the loop runs again: kicks resume
        nursery.cancel_scope.cancel()
    assert sup.refusals >= refusals + 5 and sup.kick_stops == 1
    # never kicked while the loop had been silent longer than the threshold
    assert max(board.beat_ages) <= 0.2 + 0.05
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("watchdog kicks stop: event loop blocked for") for m in messages)
    assert any(m.startswith("watchdog kicks resume") for m in messages)


# -- the whole gateway --------------------------------------------------------------------------


def config_text(tmp_path, extra=""):
    return f"""
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:0"]
listen_tls = []
[web]
listen = ["127.0.0.1:0"]
[hold]
seconds = 3600
{extra}
[board]
kick_seconds = 0.02
stall_seconds = 5
"""


def send(port, tag):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("a@lan.example", ["b@ext.example"],
                   f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())


async def test_healthy_gateway_under_load_never_stops_kicking_and_shows_its_state(
        tmp_path, nursery):
    board = SimBoard()
    config = loads(config_text(tmp_path, "max_messages = 120"), source="t.toml")
    running = await nursery.start(lambda task_status: app.serve(
        config, the_board=board, task_status=task_status))
    sup = running.supervisor
    assert board.led_states == ["booting", "ready"]
    port = running.smtp[0][1]
    kicks_before = sup.kicks

    def load(n):
        for i in range(20):
            send(port, f"m{n}-{i}")

    threads = [threading.Thread(target=load, args=(n,)) for n in range(6)]
    await trio.to_thread.run_sync(lambda: [t.start() for t in threads] + [t.join() for t in threads])
    assert running.queue.held_count() == 120
    assert board.led == "queue-full"
    with pytest.raises(smtplib.SMTPException):
        await trio.to_thread.run_sync(send, port, "one too many")
    await wait_checks(sup, board, 3)
    assert sup.kicks > kicks_before and sup.kick_stops == 0
    assert board.led_states == ["booting", "ready", "holding", "queue-full"]


async def test_a_stopped_service_takes_the_gateway_down(tmp_path, monkeypatch, caplog):
    from firmware import qmgr

    crash = trio.Event()

    async def crashing_run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await crash.wait()
        raise RuntimeError("timer task crashed")

    monkeypatch.setattr(qmgr.HoldQueue, "run", crashing_run)
    board = SimBoard()
    config = loads(config_text(tmp_path), source="t.toml")
    with pytest.raises(BaseException) as caught:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(lambda task_status: app.serve(
                config, the_board=board, task_status=task_status))
            port = running.smtp[0][1]
            await trio.to_thread.run_sync(send, port, "before")
            crash.set()
            await trio.sleep_forever()
    assert "timer task crashed" in repr(caught.value)
    assert running.supervisor.statistics()["dead_services"] == ["queue"]
    with pytest.raises(OSError):  # nothing answers SMTP any more, let alone 250
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not board.closed  # not a clean stop: the watchdog stays armed
