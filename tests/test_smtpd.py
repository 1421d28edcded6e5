"""The inbound session over in-memory streams, with trio's autojump clock for its deadlines."""

from __future__ import annotations

import ipaddress

import trio
import trio.testing

from firmware.config import LOCAL_NETWORKS
from firmware.qmgr import HoldQueue
from firmware.smtp import Reply
from firmware.smtpd import COMMAND_TIMEOUT, MAX_ERRORS, Session, SmtpService
from tests.test_qmgr import MemoryStore


async def refuse(username: str, password: str, route=None) -> Reply:
    return Reply.of(535, "5.7.8 Authentication credentials invalid")


def service(queue: HoldQueue, **settings) -> SmtpService:
    defaults = dict(hostname="gw.test", max_message_size=10_000, max_recipients=500,
                    allowed_networks=LOCAL_NETWORKS, plain_auth_networks=LOCAL_NETWORKS,
                    sender_rules=(), recipient_rules=(), tls_context=None, authenticate=refuse)
    return SmtpService(queue=queue, **{**defaults, **settings})


class Client:
    def __init__(self, stream):
        self.stream = stream
        self.buffer = b""

    async def reply(self) -> bytes:
        """One whole (possibly multi-line) reply."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    answer = b"\r\n".join(lines[:i + 1])
                    self.buffer = b"\r\n".join(lines[i + 1:])
                    return answer
            chunk = await self.stream.receive_some(65536)
            assert chunk, f"closed with {self.buffer!r} unread"
            self.buffer += chunk


async def open_session(nursery, peer="192.168.1.20", **settings):
    store = MemoryStore()
    queue = HoldQueue(store, hold_seconds=300, max_messages=10, max_bytes=10**6)
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(Session(service(queue, **settings), ours, peer, implicit_tls=False).run)
    client = Client(theirs)
    assert (await client.reply()).startswith(b"220 gw.test")
    return client, queue, store


async def test_an_idle_client_is_cut_off_after_the_command_timeout(nursery, autojump_clock):
    client, _, _ = await open_session(nursery)
    start = trio.current_time()
    assert (await client.reply()).startswith(b"421 4.4.2")
    assert trio.current_time() - start >= COMMAND_TIMEOUT
    assert await client.stream.receive_some(100) == b""  # and the connection closed


async def test_a_client_trickling_a_command_gets_no_more_time(nursery, autojump_clock):
    client, _, _ = await open_session(nursery)
    start = trio.current_time()

    async def trickle():
        for byte in b"NOOP and more and more and more and more and more":
            await client.stream.send_all(bytes([byte]))
            await trio.sleep(60)

    nursery.start_soon(trickle)
    assert (await client.reply()).startswith(b"421 4.4.2")
    assert trio.current_time() - start == COMMAND_TIMEOUT


async def test_pipelined_commands_are_answered_in_order_in_one_write(nursery):
    client, queue, _ = await open_session(nursery)
    await client.stream.send_all(
        b"EHLO c\r\nMAIL FROM:<a@lan.example>\r\nRCPT TO:<b@ext.example>\r\n"
        b"RCPT TO:<c@ext.example>\r\nDATA\r\n")
    replies = [await client.reply() for _ in range(5)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"354"]
    assert b"PIPELINING" in replies[0] and b"AUTH PLAIN LOGIN" in replies[0]
    assert b"STARTTLS" not in replies[0]  # no TLS context: not offered
    await client.stream.send_all(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert (await client.reply()).startswith(b"250 2.0.0 Ok: held")
    [held] = queue.held_for("192.168.1.20")
    assert held.to == () and held.bcc_count == 2 and held.subject == "x"


async def test_bare_lf_refuses_the_message_and_the_next_one_is_taken(nursery):
    client, queue, store = await open_session(nursery)
    await client.stream.send_all(b"EHLO c\r\nMAIL FROM:<a@lan.example>\r\n"
                                 b"RCPT TO:<b@ext.example>\r\nDATA\r\n")
    for _ in range(4):
        await client.reply()
    await client.stream.send_all(b"Subject: one\r\n\r\nbad\nline\r\n.\r\n")
    assert (await client.reply()).startswith(b"554 5.6.0")
    assert queue.store_status()["messages"] == 0 and queue.usage().messages == 0
    await client.stream.send_all(b"MAIL FROM:<a@lan.example>\r\nRCPT TO:<b@ext.example>\r\n"
                                 b"DATA\r\nSubject: two\r\n\r\nfine\r\n.\r\n")
    replies = [await client.reply() for _ in range(4)]
    assert replies[-1].startswith(b"250")
    assert [v.subject for v in queue.held_for("192.168.1.20")] == ["two"]


async def test_too_many_errors_close_the_connection(nursery):
    client, _, _ = await open_session(nursery)
    await client.stream.send_all(b"NONSENSE\r\n" * MAX_ERRORS)
    replies = [await client.reply() for _ in range(MAX_ERRORS)]
    assert all(r.startswith(b"500") for r in replies[:-1])
    assert replies[-1].startswith(b"421 4.7.0")
    assert await client.stream.receive_some(100) == b""


async def test_a_client_gone_mid_data_leaves_nothing_behind(nursery):
    client, queue, store = await open_session(nursery)
    await client.stream.send_all(b"EHLO c\r\nMAIL FROM:<a@lan.example>\r\n"
                                 b"RCPT TO:<b@ext.example>\r\nDATA\r\nSubject: half\r\n\r\n")
    for _ in range(4):
        await client.reply()
    await client.stream.send_all(b"some of the body\r\n")
    await trio.testing.wait_all_tasks_blocked()
    assert queue.usage().messages == 1  # room reserved while it is received
    await client.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert queue.usage().messages == 0 and queue.usage().bytes == 0
    assert store.bodies == {}  # the partial body was abandoned
    assert queue.store_status()["messages"] == 0


async def test_auth_refused_by_the_check_and_unknown_mechanisms(nursery):
    client, _, _ = await open_session(nursery)
    await client.stream.send_all(b"EHLO c\r\nAUTH CRAM-MD5\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    await client.reply()
    bad_mechanism = await client.reply()
    assert bad_mechanism.startswith(b"504 5.5.4") and b"PLAIN or LOGIN" in bad_mechanism
    assert (await client.reply()).startswith(b"535")


async def test_auth_is_not_offered_on_plain_connections_outside_plain_auth_networks(nursery):
    everyone = (ipaddress.ip_network("0.0.0.0/0"),)
    client, _, _ = await open_session(nursery, peer="203.0.113.9", allowed_networks=everyone)
    await client.stream.send_all(b"EHLO c\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    assert b"AUTH" not in await client.reply()
    assert (await client.reply()).startswith(b"530 5.7.0")


async def test_a_client_outside_allowed_networks_is_refused(nursery):
    ours, theirs = trio.testing.memory_stream_pair()
    queue = HoldQueue(MemoryStore(), hold_seconds=300, max_messages=10, max_bytes=10**6)
    nursery.start_soon(Session(service(queue), ours, "203.0.113.9", implicit_tls=False).run)
    client = Client(theirs)
    assert (await client.reply()).startswith(b"554 5.7.1")
    assert await theirs.receive_some(100) == b""


async def test_a_defect_in_one_session_ends_that_session_only(nursery):
    async def broken(username, password, route):
        raise RuntimeError("a defect")

    client, queue, _ = await open_session(nursery, authenticate=broken)
    await client.stream.send_all(b"EHLO c\r\n")
    await client.reply()
    await client.stream.send_all(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    assert await client.stream.receive_some(100) == b""  # closed, and nothing raised out
    other, _, _ = await open_session(nursery)
    await other.stream.send_all(b"NOOP\r\n")
    assert (await other.reply()).startswith(b"250")
