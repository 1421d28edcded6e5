"""Abuse limits: connection caps, message rate, slow DATA, storage errors, old TLS."""

from __future__ import annotations

import errno
import shutil
import smtplib
import ssl
import subprocess
import tracemalloc
import warnings

import pytest
import trio

from firmware.smtpd import DATA_BLOCK_TIMEOUT, DATA_GRACE, serve_smtp
from firmware.wal._files import OS_FILES
from tests.integration.conftest import in_thread, make_message, send_mail
from tests.test_qmgr import MemoryStore
from tests.test_smtpd import open_session, service
from firmware.qmgr import HoldQueue


async def read_reply(stream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while not data.endswith(b"\r\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data


async def test_connection_caps_answer_421(nursery):
    queue = HoldQueue(MemoryStore(), hold_seconds=300, max_messages=10, max_bytes=10**6)
    svc = service(queue, max_connections=3, max_connections_per_ip=2, limit_exempt_networks=())
    [(host, port)] = await nursery.start(serve_smtp, svc, [("127.0.0.1", 0)])

    async def connect(source):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        return stream, await read_reply(stream)

    a1, r1 = await connect("127.0.0.1")
    a2, r2 = await connect("127.0.0.1")
    a3, r3 = await connect("127.0.0.1")
    assert r1.startswith(b"220 ") and r2.startswith(b"220 ")
    assert r3.startswith(b"421 4.7.0 Too many connections from your address")
    b1, s1 = await connect("127.0.0.2")
    assert s1.startswith(b"220 ")
    c1, t1 = await connect("127.0.0.3")
    assert t1.startswith(b"421 4.7.0 Too many connections")
    await a1.aclose()
    with trio.fail_after(10):
        while svc.limits.connections != 2:
            await trio.sleep(0.01)
    a4, r4 = await connect("127.0.0.1")
    assert r4.startswith(b"220 ")
    for s in (a2, a3, a4, b1, c1):
        await s.aclose()
    with trio.fail_after(10):
        while svc.limits.connections:
            await trio.sleep(0.01)
    assert svc.limits.per_ip == {} and svc.counters["limited"] == 2


async def test_message_rate_per_address_answers_450(nursery, autojump_clock):
    client, _, _ = await open_session(nursery, messages_per_minute_per_ip=3)
    await client.stream.send_all(b"EHLO c\r\n")
    await client.reply()
    for _ in range(3):
        await client.stream.send_all(b"MAIL FROM:<a@lan.example>\r\nRSET\r\n")
        assert (await client.reply()).startswith(b"250 ")
        await client.reply()
    await client.stream.send_all(b"MAIL FROM:<a@lan.example>\r\n")
    assert (await client.reply()).startswith(b"450 4.7.1")
    await trio.sleep(20)  # one token back
    await client.stream.send_all(b"MAIL FROM:<a@lan.example>\r\n")
    assert (await client.reply()).startswith(b"250 ")


async def test_loopback_is_exempt_from_the_message_rate(nursery, autojump_clock):
    from firmware.smtpd import Session
    queue = HoldQueue(MemoryStore(), hold_seconds=300, max_messages=10, max_bytes=10**6)
    svc = service(queue, messages_per_minute_per_ip=1)
    for peer, exempt, expect in (("127.0.0.1", True, b"250 "), ("192.168.1.9", False, b"450 ")):
        ours, theirs = trio.testing.memory_stream_pair()
        session = Session(svc, ours, peer, implicit_tls=False)
        session.rate_exempt = exempt
        nursery.start_soon(session.run)
        from tests.test_smtpd import Client
        client = Client(theirs)
        await client.reply()
        await client.stream.send_all(b"EHLO c\r\n")
        await client.reply()
        answers = []
        for _ in range(2):
            await client.stream.send_all(b"MAIL FROM:<a@lan.example>\r\nRSET\r\n")
            answers.append(await client.reply())
            await client.reply()
        assert answers[0].startswith(b"250 ") and answers[1].startswith(expect)


async def test_a_trickling_client_is_cut_off(nursery, autojump_clock):
    client, queue, store = await open_session(nursery)
    await client.stream.send_all(b"EHLO c\r\nMAIL FROM:<a@lan.example>\r\n"
                                 b"RCPT TO:<b@ext.example>\r\nDATA\r\n")
    for _ in range(4):
        await client.reply()
    start = trio.current_time()
    # The worst trickle: one byte just before each data-block timeout.
    cut = None
    while cut is None:
        await trio.sleep(DATA_BLOCK_TIMEOUT - 1)
        try:
            await client.stream.send_all(b"x")
        except trio.BrokenResourceError:
            break
        with trio.move_on_after(0.5):
            cut = await client.reply()
    held = trio.current_time() - start
    assert cut is not None and cut.startswith(b"421 4.4.2")
    assert held <= DATA_GRACE + DATA_BLOCK_TIMEOUT + 1
    assert queue.usage().messages == 0 and not store.bodies
    print(f"\na client trickling DATA one byte every {DATA_BLOCK_TIMEOUT - 1:.0f} s is cut off "
          f"after {held:.0f} s")


async def test_storage_errors_answer_451_never_250(start_gateway, monkeypatch):
    running = await start_gateway(None, hold=3600)
    port = running.smtp[0][1]
    message = make_message("stored?")

    def failing(name, code):
        def fail(*args):
            raise OSError(code, f"{name} failed")
        return fail

    # A full disk on write: refused, and the next message (space back) is taken.
    monkeypatch.setattr(OS_FILES, "writev", failing("writev", errno.ENOSPC))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await in_thread(send_mail, port, message)
    assert refused.value.smtp_code == 451 and refused.value.smtp_error.startswith(b"4.3.0")
    monkeypatch.undo()
    await in_thread(send_mail, port, message)
    # A failed fsync: refused, and the log is not trusted again until it is recovered.
    monkeypatch.setattr(OS_FILES, "fdatasync", failing("fdatasync", errno.EIO))
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await in_thread(send_mail, port, message)
        assert refused.value.smtp_code == 451
    monkeypatch.undo()
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        await in_thread(send_mail, port, message)
    assert refused.value.smtp_code // 100 == 4
    assert len(running.queue.held_for("127.0.0.1")) == 1


async def test_tls_below_1_2_is_refused(start_gateway):
    running = await start_gateway(None, hold=3600)
    port = running.smtps[0][1]

    def handshake(maximum):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():  # old versions are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = maximum
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # this client is willing; the server is not
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.version()

    assert await in_thread(handshake, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError) as refused:
            await in_thread(handshake, old)
        # The server's refusal (an alert, or it hangs up on the hello), not the client's own
        # refusal to speak an old version.
        assert refused.value.reason != "NO_PROTOCOLS_AVAILABLE"
        assert "VERSION" in str(refused.value) or isinstance(refused.value, ssl.SSLEOFError), \
            refused.value
    if shutil.which("openssl"):
        out = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_1",
             "-cipher", "DEFAULT:@SECLEVEL=0"],
            stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and b"Cipher is (NONE)" in text, text
        assert b"no protocols available" not in text  # it was the server that refused


async def test_memory_of_1000_idle_connections(nursery):
    queue = HoldQueue(MemoryStore(), hold_seconds=300, max_messages=10, max_bytes=10**6)
    svc = service(queue)
    [(host, port)] = await nursery.start(serve_smtp, svc, [("127.0.0.1", 0)])
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        streams = []
        for _ in range(1000):
            stream = await trio.open_tcp_stream(host, port)
            assert (await read_reply(stream)).startswith(b"220 ")
            streams.append(stream)
        await trio.sleep(0.2)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per = (current - base) / 1000
    print(f"\n1,000 idle connections: {(current - base) / 1e6:.1f} MB traced "
          f"({per / 1024:.1f} KiB each, both ends in this process), peak {peak / 1e6:.1f} MB")
    assert svc.limits.connections == 1000
    assert per < 64 * 1024
    for s in streams:
        await s.aclose()
