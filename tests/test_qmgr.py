"""The hold queue, with minutes of hold passing on trio's autojump clock.

The store here is kept in memory: the autojump clock would jump while a real fsync runs in a
worker thread. The store itself is tested on real files in tests/wal, and the whole gateway in
tests/integration.
"""

from __future__ import annotations

import os

import pytest
import trio

from firmware.qmgr import HoldQueue, WallClock
from firmware.wal import Accept, Finish, Recovered, Update

HOLD = 300.0


class MemoryStore:
    """The Log's interface in memory; `recovered()` folds its records as a replay would."""

    def __init__(self):
        self.records = []
        self.bodies: dict[bytes, bytearray] = {}

    async def write_body(self, id, offset, data):
        body = self.bodies.setdefault(id, bytearray())
        assert offset == len(body)
        body += data
        await trio.lowlevel.checkpoint()

    async def commit(self, record):
        await trio.lowlevel.checkpoint()
        self.records.append(record)

    def abandon(self, id):
        self.bodies.pop(id, None)

    async def read_body(self, id):
        yield bytes(self.bodies[id])

    def statistics(self):
        return {"records": len(self.records)}

    def recovered(self) -> dict:
        out = {}
        for r in self.records:
            if isinstance(r, Accept):
                out[r.id] = Recovered(r, [], r.size)
            elif isinstance(r, Update) and r.id in out:
                out[r.id].updates.append(r)
            elif isinstance(r, Finish):
                out.pop(r.id, None)
        return out


async def open_queue(store, nursery, *, on_boot="send", max_messages=500, max_bytes=10**9,
                     now=None):
    recovered = store.recovered()
    queue = HoldQueue(store, hold_seconds=HOLD, max_messages=max_messages, max_bytes=max_bytes,
                      now=now)
    queue.recover(recovered, on_boot)
    await nursery.start(queue.run)
    return store, queue


async def put(queue, body=b"Subject: hi\r\n\r\nhello\r\n", *, ip="127.0.0.1", hold=True,
              recipients=("r@ext.example",)):
    id = os.urandom(16)
    reservation = queue.reserve(len(body))
    await queue.write_body(id, 0, body)
    msg = await queue.accept(id, client_ip=ip, sender="s@lan.example", recipients=recipients,
                             summary={"from": "s@lan.example", "to": list(recipients[:1]),
                                      "cc": [], "subject": "hi"},
                             size=len(body), hold=hold, mail_options={})
    reservation.close()
    return msg


async def next_delivery(queue, timeout=HOLD * 10):
    with trio.fail_after(timeout):
        return await queue.deliveries.receive()


async def test_release_after_the_hold_and_not_before(nursery, autojump_clock):
    _, queue = await open_queue(MemoryStore(), nursery)
    msg = await put(queue)
    start = trio.current_time()
    delivery = await next_delivery(queue)
    assert delivery.id == msg.id
    assert trio.current_time() - start == pytest.approx(HOLD, abs=0.01)
    assert queue.held_for("127.0.0.1") == []


async def test_cancel_send_now_extend(nursery, autojump_clock):
    _, queue = await open_queue(MemoryStore(), nursery)
    a, b, c = await put(queue), await put(queue), await put(queue)
    assert [v.id for v in queue.held_for("::ffff:127.0.0.1")] == [a.id, b.id, c.id]
    assert queue.held_count() == 3
    assert not await queue.cancel(a.id, "127.0.0.2")  # someone else's
    assert await queue.cancel(a.id, "127.0.0.1")
    assert not await queue.cancel(a.id, "127.0.0.1")  # already gone
    assert await queue.send_now(b.id, "127.0.0.1")
    assert (await next_delivery(queue, 1)).id == b.id
    assert queue.held_count() == 1
    assert await queue.extend(c.id, "127.0.0.1", 600)
    assert not await queue.extend(c.id, "127.0.0.1", 0)
    start = trio.current_time()
    assert (await next_delivery(queue)).id == c.id
    assert trio.current_time() - start == pytest.approx(HOLD + 600, abs=0.01)
    assert queue.counters["cancelled"] == 1 and queue.counters["sent_now"] == 1


async def test_passed_mail_goes_at_once_and_is_never_listed(nursery, autojump_clock):
    _, queue = await open_queue(MemoryStore(), nursery)
    msg = await put(queue, hold=False)
    assert queue.held_for("127.0.0.1") == []
    assert (await next_delivery(queue, 0.1)).id == msg.id


async def test_capacity_counts_messages_being_received(nursery):
    _, queue = await open_queue(MemoryStore(), nursery, max_messages=2, max_bytes=100)
    first = queue.reserve(10)
    assert not isinstance(first, type(queue.usage()))
    second = queue.reserve(10)
    third = queue.reserve(0)
    assert getattr(third, "code", None) == 452
    first.close()
    second.close()
    assert getattr(queue.reserve(101), "code", None) == 452


@pytest.mark.parametrize("on_boot", ["send", "resume"])
async def test_restart_recovers_held_mail(on_boot, autojump_clock):
    clock = WallClock()  # one wall clock across the "restart", moved by the autojump clock
    async with trio.open_nursery() as nursery:
        store, queue = await open_queue(MemoryStore(), nursery, now=clock)
        kept = await put(queue)
        cancelled = await put(queue)
        extended = await put(queue)
        await queue.cancel(cancelled.id, "127.0.0.1")
        await queue.extend(extended.id, "127.0.0.1", 3600)
        nursery.cancel_scope.cancel()
    await trio.sleep(60)  # the gateway was off for a minute

    async with trio.open_nursery() as nursery:
        _, queue = await open_queue(store, nursery, on_boot=on_boot, now=clock)
        if on_boot == "send":  # S7: everything held goes at once
            got = {(await next_delivery(queue, 0.1)).id for _ in range(2)}
            assert got == {kept.id, extended.id}
        else:  # B2: the remaining hold is kept, absolute deadlines
            assert [v.id for v in queue.held_for("127.0.0.1")] == [kept.id, extended.id]
            [view] = [v for v in queue.held_for("127.0.0.1") if v.id == extended.id]
            assert view.release_at == pytest.approx(kept.release_at + 3600, abs=1)
            start = trio.current_time()
            assert (await next_delivery(queue)).id == kept.id
            assert trio.current_time() - start == pytest.approx(HOLD - 60, abs=1)
        nursery.cancel_scope.cancel()


async def test_mail_held_by_a_clock_that_has_gone_back_is_not_held_for_the_difference(
        autojump_clock, caplog):
    """A board without a real-time clock accepted mail while its clock was a year ahead; NTP
    set it right before the restart. on_boot = "resume" must not hold that mail for a year."""
    right, year = WallClock(), 365 * 86400.0
    ahead = lambda: right() + year  # noqa: E731
    async with trio.open_nursery() as nursery:
        store, queue = await open_queue(MemoryStore(), nursery, now=ahead)
        misdated = await put(queue)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        _, queue = await open_queue(store, nursery, on_boot="resume", now=right)
        kept = await put(queue)  # received on the right clock: its hold is kept
        assert (await next_delivery(queue, 1)).id == misdated.id
        assert [v.id for v in queue.held_for("127.0.0.1")] == [kept.id]
        nursery.cancel_scope.cancel()
    assert "clock has gone back" in caplog.text


async def test_whether_a_body_has_dot_lines_survives_a_restart(autojump_clock):
    """The relay sends a body as stored only when no line of it starts with "."; a record
    from before that was kept says nothing, and then the body is dot-stuffed (safe)."""
    async with trio.open_nursery() as nursery:
        store, queue = await open_queue(MemoryStore(), nursery)
        ids = {}
        for dot_lines in (False, True):
            id = os.urandom(16)
            await queue.write_body(id, 0, b"x\r\n")
            await queue.accept(id, client_ip="127.0.0.1", sender="s@lan.example",
                               recipients=("r@ext.example",), summary={}, size=3, hold=True,
                               mail_options={}, dot_lines=dot_lines)
            ids[id] = dot_lines
        nursery.cancel_scope.cancel()
    old = Accept(os.urandom(16), 3, {k: v for k, v in store.records[0].meta.items()
                                      if k != "dots"})
    store.bodies[old.id] = bytearray(b"x\r\n")
    store.records.append(old)
    ids[old.id] = True
    async with trio.open_nursery() as nursery:
        _, queue = await open_queue(store, nursery, on_boot="send")
        got = {}
        for _ in range(3):
            d = await next_delivery(queue, 0.1)
            got[d.id] = d.dot_lines
        assert got == ids
        nursery.cancel_scope.cancel()


async def test_delivery_outcomes_finish_the_message(nursery, autojump_clock):
    store, queue = await open_queue(MemoryStore(), nursery)
    msg = await put(queue, hold=False, recipients=("a@x.example", "b@x.example"))
    delivery = await next_delivery(queue, 0.1)
    assert b"".join([c async for c in queue.read_body(delivery.id)]).endswith(b"hello\r\n")
    await queue.delivered(msg.id, ("a@x.example",))
    await queue.finish(msg.id, "delivered")
    assert not queue.is_pending(msg.id)
    assert queue.store_status()["messages"] == 0


async def test_an_accepted_message_takes_over_its_reservation(nursery):
    _, queue = await open_queue(MemoryStore(), nursery, max_messages=2, max_bytes=100)
    reservation = queue.reserve(10)
    id = os.urandom(16)
    await queue.write_body(id, 0, b"x" * 10)
    await queue.accept(id, client_ip="127.0.0.1", sender="s@lan.example",
                       recipients=("r@ext.example",), summary={}, size=10, hold=True,
                       mail_options={}, reservation=reservation)
    # Counted once: as a stored message, no longer as a reservation.
    assert queue.usage().messages == 1 and queue.usage().bytes == 10
    assert not queue.is_full()
    reservation.close()  # the session's own cleanup afterwards changes nothing
    assert queue.usage().messages == 1


async def test_a_release_the_store_cannot_record_is_tried_again(nursery, autojump_clock):
    from firmware.qmgr import RELEASE_RETRY_SECONDS
    from firmware.wal import StoreError

    store = MemoryStore()
    _, queue = await open_queue(store, nursery)
    msg = await put(queue)
    real_commit, failures = store.commit, []

    async def commit_failing_once(record):
        if isinstance(record, Update) and not failures:
            failures.append(record)
            raise StoreError("No space left on device")
        await real_commit(record)

    store.commit = commit_failing_once
    start = trio.current_time()
    delivery = await next_delivery(queue)  # the timer task survived the failure
    assert delivery.id == msg.id and failures
    assert trio.current_time() - start == pytest.approx(HOLD + RELEASE_RETRY_SECONDS, abs=0.01)
