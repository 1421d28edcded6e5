"""Retries and bounces (S11) on trio's autojump clock: the upstream is a scripted SMTP server on
memory streams, the store is in memory, so ten minutes of retries pass in milliseconds."""

from __future__ import annotations

import email
import email.policy
import math

import pytest
import trio
import trio.testing

from firmware.credentials import Vault
from firmware.qmgr import HoldQueue, WallClock
from firmware.relay import DATA_BLOCK_TIMEOUT, REPLY_TIMEOUT, Relay
from firmware.routes import Route, Router
from tests.test_qmgr import MemoryStore

RETRY = 600
MESSAGE = (b"From: Sender <s@lan.example>\r\nTo: a@ext.example\r\n"
           b"Subject: =?utf-8?q?report=0D=0ABcc:_victim@evil.example?=\r\n\r\nThe body.\r\n")


class FakeUpstream:
    """An SMTP server script: `rcpt(address)` and `end_of_data()` give the replies;
    `mode` makes it unreachable, or, for mail with a sender (not for bounces), silent after
    MAIL, drop the connection in the middle of DATA or stop reading after 354."""

    def __init__(self, nursery) -> None:
        self.nursery = nursery
        # "normal" | "unreachable" | "silent-after-mail" | "drop-in-data" | "stall-in-data"
        self.mode = "normal"
        self.rcpt = lambda address: "250 2.1.5 Ok"
        self.end_of_data = lambda: "250 2.0.0 Ok"
        self.bounce_rcpt = "250 2.1.5 Ok"  # what RCPT gets in a transaction from <>
        self.ehlo = lambda: None  # a reply instead of the usual EHLO answer
        self.connections = 0
        self.received: list[tuple[str, list[str], bytes]] = []
        self.auth: list[bytes] = []

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.connections += 1
        if self.mode == "unreachable":
            raise OSError(113, "No route to host")
        if self.mode == "stall-in-data":  # a sender waits until this side reads
            ours, theirs = trio.testing.lockstep_stream_pair()
        else:
            ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, theirs)
        return ours

    async def _serve(self, stream) -> None:
        buffer = b""

        async def line() -> bytes:
            nonlocal buffer
            while b"\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError
                buffer += data
            out, buffer = buffer.split(b"\r\n", 1)
            return out

        async def say(text: str) -> None:
            await stream.send_all(text.encode() + b"\r\n")

        try:
            await say("220 upstream.example ESMTP")
            sender, rcpts = None, []
            while True:
                command = await line()
                verb = command[:4].upper()
                special = self.ehlo() if verb == b"EHLO" else None
                if special is not None:
                    await say(special)
                    if special.startswith("421"):
                        return
                elif verb == b"EHLO":
                    await say("250-upstream.example\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN")
                elif verb == b"AUTH":
                    self.auth.append(command)
                    await say("235 2.7.0 Authentication successful")
                elif verb == b"MAIL":
                    sender, rcpts = command[10:].decode().split(">")[0].lstrip("<"), []
                    await say("250 2.1.0 Ok")
                    if self.mode == "silent-after-mail" and sender:
                        await trio.sleep_forever()
                elif verb == b"RCPT":
                    address = command[8:].decode().strip("<>")
                    reply = self.rcpt(address) if sender else self.bounce_rcpt
                    if reply.startswith("2"):
                        rcpts.append(address)
                    await say(reply)
                elif verb == b"DATA":
                    await say("354 go ahead")
                    if self.mode == "stall-in-data" and sender:
                        await trio.sleep_forever()
                    data = b""
                    while not data.endswith(b"\r\n.\r\n"):
                        if self.mode == "drop-in-data" and data and sender:
                            await stream.aclose()
                            return
                        data += await line() + b"\r\n"
                    reply = self.end_of_data() if sender else "250 2.0.0 Ok"
                    if reply.startswith("2"):
                        self.received.append((sender, rcpts, data[:-3]))
                    await say(reply)
                elif verb == b"QUIT":
                    await say("221 bye")
                    return
                else:
                    await say("502 5.5.1 unknown")
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    def bounces(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(data, policy=email.policy.SMTP)
                for sender, _, data in self.received if sender == ""]

    def deliveries(self) -> list[tuple[str, list[str]]]:
        return [(sender, rcpts) for sender, rcpts, _ in self.received if sender != ""]


async def start(nursery, *, online=lambda: True, vault=None):
    store = MemoryStore()
    clock = WallClock()
    queue = HoldQueue(store, hold_seconds=60, max_messages=100, max_bytes=10**8, now=clock)
    upstream = FakeUpstream(nursery)
    route = Route("upstream.example", 25, "none", "gw.example")
    relay = Relay(queue, router=Router(default=route), retry_seconds=RETRY, now=clock,
                  online=online, connect=upstream.connect, vault=vault, hostname="gw.example")
    await nursery.start(relay.run)
    await nursery.start(queue.run)
    return queue, store, upstream


async def submit(queue, store, *, sender="s@lan.example", recipients=("a@ext.example",),
                 credentials=None) -> bytes:
    id = bytes([len(store.bodies)]) * 16
    await store.write_body(id, 0, MESSAGE)
    await queue.accept(id, client_ip="192.168.1.5", sender=sender, recipients=recipients,
                       summary={}, size=len(MESSAGE), hold=False, mail_options={},
                       credentials=credentials)
    return id


async def until_finished(queue, id) -> float:
    start = trio.current_time()
    while queue.is_pending(id):
        await trio.sleep(1)
    return trio.current_time() - start


def outcome(store, id) -> str:
    [finish] = [r for r in store.records if type(r).__name__ == "Finish" and r.id == id]
    return finish.outcome


def dsn_blocks(bounce) -> dict[str, tuple[str, str]]:
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["Auto-Submitted"] == "auto-replied"
    _, status, headers = bounce.get_payload()
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"The body." not in bounce.as_bytes()
    _, *blocks = status.get_payload()
    return {b["Final-Recipient"].split("; ")[1]: (b["Action"], b["Status"]) for b in blocks}


async def test_a_4xx_is_retried_with_backoff_until_it_goes(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    replies = iter(["451 4.3.0 try later"] * 3)
    upstream.rcpt = lambda address: next(replies, "250 2.1.5 Ok")
    id = await submit(queue, store)
    took = await until_finished(queue, id)
    assert upstream.deliveries() == [("s@lan.example", ["a@ext.example"])]
    assert upstream.connections == 4
    # 30 s, 60 s, 120 s apart, each within the jitter of +-20 %
    assert 0.8 * 210 <= took <= 1.2 * 210 + 2
    assert outcome(store, id) == "delivered" and upstream.bounces() == []


@pytest.mark.parametrize("mode", ["4xx", "timeout", "drop-in-data", "unreachable-then-back"])
async def test_temporary_failures_retry_for_ten_minutes_then_bounce_once(
        nursery, autojump_clock, mode):
    queue, store, upstream = await start(nursery)
    if mode == "4xx":
        upstream.end_of_data = lambda: "452 4.3.1 Insufficient system storage"
    elif mode == "timeout":
        upstream.mode = "silent-after-mail"
    elif mode == "drop-in-data":
        upstream.mode = "drop-in-data"
    else:
        upstream.mode = "unreachable"
    id = await submit(queue, store)
    released = trio.current_time()
    while not any(type(r).__name__ == "Update" and "failed" in r.changes
                  for r in store.records):
        await trio.sleep(1)
    assert RETRY <= trio.current_time() - released <= RETRY + 2 * REPLY_TIMEOUT
    assert upstream.deliveries() == []
    attempts = upstream.connections
    assert attempts >= (3 if mode == "timeout" else 5)
    if mode == "unreachable-then-back":
        await trio.sleep(3600)  # the bounce waits for the upstream
        assert queue.is_pending(id) and upstream.received == []
        upstream.mode = "normal"
    await until_finished(queue, id)
    [bounce] = upstream.bounces()
    assert upstream.deliveries() == []
    assert dsn_blocks(bounce) == {"a@ext.example": ("failed", "4.4.1" if mode != "4xx"
                                                    else "4.3.1")}
    assert [to for s, to, _ in upstream.received if s == ""] == [["s@lan.example"]]
    assert outcome(store, id) == "bounced"
    assert "Bcc" not in bounce  # the hostile subject added nothing


async def test_a_5xx_bounces_at_once(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    upstream.end_of_data = lambda: "554 5.3.4 Message too big for system"
    id = await submit(queue, store)
    took = await until_finished(queue, id)
    assert took < 5 and upstream.connections == 2  # the message, then its bounce
    [bounce] = upstream.bounces()
    assert dsn_blocks(bounce) == {"a@ext.example": ("failed", "5.3.4")}


async def test_mixed_results_bounce_only_the_failed_recipients(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    upstream.rcpt = {"ok@ext.example": "250 2.1.5 Ok",
                     "gone@ext.example": "550 5.1.1 No such user",
                     "full@ext.example": "452 4.2.2 Mailbox full"}.get
    id = await submit(queue, store, recipients=("ok@ext.example", "gone@ext.example",
                                                "full@ext.example"))
    await until_finished(queue, id)
    assert upstream.deliveries() == [("s@lan.example", ["ok@ext.example"])]  # once only
    [bounce] = upstream.bounces()
    assert dsn_blocks(bounce) == {"gone@ext.example": ("failed", "5.1.1"),
                                  "full@ext.example": ("failed", "4.2.2")}
    assert outcome(store, id) == "bounced"


async def test_a_null_sender_is_never_bounced(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    upstream.rcpt = lambda address: "550 5.1.1 No such user"
    upstream.bounce_rcpt = "550 5.1.1 No such user"
    id = await submit(queue, store, sender="")
    await until_finished(queue, id)
    await trio.sleep(3600)
    assert upstream.received == [] and upstream.connections == 1
    assert outcome(store, id) == "failed"


async def test_bounces_wait_while_the_nic_is_down(nursery, autojump_clock):
    online = True
    queue, store, upstream = await start(nursery, online=lambda: online)
    upstream.rcpt = lambda address: "550 5.1.1 No such user"
    online = False
    id = await submit(queue, store)
    await trio.sleep(6 * 3600)
    assert queue.is_pending(id) and upstream.connections == 1  # the bounce did not even try
    online = True
    await until_finished(queue, id)
    assert len(upstream.bounces()) == 1


async def test_a_refused_bounce_is_logged_and_dropped(nursery, autojump_clock, caplog):
    queue, store, upstream = await start(nursery)
    upstream.rcpt = lambda address: "550 5.1.1 No such user"
    upstream.bounce_rcpt = "550 5.1.1 No such user"
    id = await submit(queue, store)
    await until_finished(queue, id)
    assert upstream.received == []
    assert outcome(store, id) == "failed"
    assert "bounce to s@lan.example failed" in caplog.text


async def test_a_bounce_refused_for_now_is_tried_again(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    upstream.rcpt = lambda address: "550 5.1.1 No such user"
    upstream.bounce_rcpt = "451 4.7.1 greylisted, try again later"
    id = await submit(queue, store)
    await trio.sleep(100)
    assert queue.is_pending(id) and upstream.received == []
    upstream.bounce_rcpt = "250 2.1.5 Ok"
    await until_finished(queue, id)
    assert outcome(store, id) == "bounced"
    assert dsn_blocks(upstream.bounces()[0]) == {"a@ext.example": ("failed", "5.1.1")}


async def test_a_bounce_refused_for_now_until_the_window_closes_is_dropped(
        nursery, autojump_clock, caplog):
    queue, store, upstream = await start(nursery)
    upstream.rcpt = lambda address: "550 5.1.1 No such user"
    upstream.bounce_rcpt = "451 4.7.1 greylisted, try again later"
    id = await submit(queue, store)
    assert await until_finished(queue, id) >= RETRY
    assert outcome(store, id) == "failed" and upstream.received == []
    assert "bounce to s@lan.example failed (451 4.7.1 greylisted" in caplog.text


async def test_the_messages_own_credentials_are_used_for_delivery_and_bounce(
        nursery, autojump_clock, tmp_path):
    vault = Vault.load_or_create(tmp_path / "credentials.key")
    queue, store, upstream = await start(nursery, vault=vault)
    upstream.rcpt = lambda a: "250 2.1.5 Ok" if a == "ok@ext.example" else "550 5.1.1 No"
    id = bytes([0]) * 16
    sealed = vault.seal(id, "alice", "s3cret")
    assert await submit(queue, store, recipients=("ok@ext.example", "no@ext.example"),
                        credentials=sealed) == id
    await until_finished(queue, id)
    assert upstream.auth == [b"AUTH PLAIN AGFsaWNlAHMzY3JldA=="] * 2  # \0alice\0s3cret
    assert len(upstream.bounces()) == 1


async def test_a_restart_neither_resends_nor_forgets_the_bounce(autojump_clock):
    store = None
    async with trio.open_nursery() as nursery:
        queue, store, upstream = await start(nursery)
        upstream.rcpt = lambda a: {"ok@ext.example": "250 2.1.5 Ok",
                                   "gone@ext.example": "550 5.1.1 No such user"}.get(
                                       a, "451 4.4.1 later")
        id = await submit(queue, store, recipients=("ok@ext.example", "gone@ext.example",
                                                    "later@ext.example"))
        await trio.sleep(10)  # first try done, retry pending
        assert upstream.deliveries() == [("s@lan.example", ["ok@ext.example"])]
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        clock = WallClock()
        queue = HoldQueue(store, hold_seconds=60, max_messages=100, max_bytes=10**8, now=clock)
        queue.recover(store.recovered(), "send")
        upstream = FakeUpstream(nursery)
        relay = Relay(queue, router=Router(default=Route("u.example", 25, "none", "gw")),
                      retry_seconds=RETRY, now=clock, connect=upstream.connect)
        await nursery.start(relay.run)
        upstream.rcpt = lambda a: "250 2.1.5 Ok"
        await until_finished(queue, id)
        assert upstream.deliveries() == [("s@lan.example", ["later@ext.example"])]
        [bounce] = upstream.bounces()
        assert dsn_blocks(bounce) == {"gone@ext.example": ("failed", "5.1.1")}
        nursery.cancel_scope.cancel()


def test_reply_timeout_is_bounded():
    assert math.isfinite(REPLY_TIMEOUT)


async def test_an_upstream_that_stops_reading_the_content_defers_it(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    upstream.mode = "stall-in-data"
    start_time = trio.current_time()
    id = await submit(queue, store)
    while not queue.counters["deferred"]:
        await trio.sleep(1)
    assert trio.current_time() - start_time == pytest.approx(DATA_BLOCK_TIMEOUT, abs=2)
    upstream.mode = "normal"
    await until_finished(queue, id)
    assert outcome(store, id) == "delivered"
    assert upstream.deliveries() == [("s@lan.example", ["a@ext.example"])]


async def test_messages_waiting_to_retry_do_not_hold_up_the_others(nursery, autojump_clock):
    queue, store, upstream = await start(nursery)
    upstream.rcpt = lambda address: ("451 4.7.1 greylisted" if address.startswith("slow")
                                     else "250 2.1.5 Ok")
    for i in range(12):  # more than the relay sends at once
        await submit(queue, store, recipients=(f"slow{i}@ext.example",))
    await trio.sleep(1)
    quick = await submit(queue, store, recipients=("quick@ext.example",))
    assert await until_finished(queue, quick) <= 2  # not after the others' retry window
    assert ("s@lan.example", ["quick@ext.example"]) in upstream.deliveries()


async def test_an_upstream_closing_the_session_defers_instead_of_crashing(nursery,
                                                                          autojump_clock):
    queue, store, upstream = await start(nursery)
    busy = iter(["421 4.3.2 too busy"] * 2)
    upstream.ehlo = lambda: next(busy, None)  # the first two sessions end at EHLO
    id = await submit(queue, store)
    await until_finished(queue, id)
    assert outcome(store, id) == "delivered"
    assert upstream.deliveries() == [("s@lan.example", ["a@ext.example"])]
