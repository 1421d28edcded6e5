"""Smuggling (B8) beyond the twelve end-of-data variants, pipelined and STARTTLS injection,
open-relay address tricks, and the bytes that reach the upstream, captured raw."""

from __future__ import annotations

import re
import smtplib
import ssl

import pytest
import trio

from tests.integration.conftest import in_thread, wait_for
from tests.integration.test_smuggling import VARIANTS, converse, smuggling_attempt

from .rawupstream import RawUpstream

# hannob/smtpsmug and SEC Consult sequences not among the twelve: an end marker split over
# lines, doubled, with a trailing space or TAB, behind a bare CR in the text, and with an
# ideographic or fullwidth full stop (which some servers fold to ".").
MORE = [b"\r\n.\n\r\n", b"\r\n.\r \n", b"\r\n.\x00\n", b"\r\n. \r\n", b"\r\n.\t\r\n",
        b"\r\n..\n", b"\r\n\r.\r\n", b"\n\n.\n\n", b"\r\n\xe3\x80\x82\r\n",
        b"\r\n\xef\xbc\x8e\r\n", b"\n.\x00\r\n", b"\r\n\x1b.\r\n"]
# (A sequence holding a real CRLF.CRLF is not smuggling: every server ends the data there.)
ALL = VARIANTS + MORE
OUTCOME: dict[bytes, str] = {}


@pytest.mark.parametrize("variant", ALL, ids=[repr(v) for v in ALL])
async def test_no_variant_smuggles_a_second_message(start_gateway, variant):
    running = await start_gateway(None, hold=3600)
    replies = await converse(running.smtp[0][1], smuggling_attempt(variant))
    held = running.queue.held_for("127.0.0.1")
    assert all(h.sender != "ceo@lan.example" and h.subject != "smuggled" for h in held)
    assert len(held) <= 1
    # Either the whole message is refused, or everything up to CRLF.CRLF is one message
    # whose text holds the would-be commands; never two messages.
    assert (b"554 5.6.0" in replies and held == []) or (
        len(held) == 1 and replies.count(b"250 2.0.0 Ok") == 1)
    assert replies.rstrip().endswith(b"221 2.0.0 Bye")
    OUTCOME[variant] = "refused" if held == [] else "one message"


def test_smuggling_figures():
    # Runs after the parametrized test above (same module, file order).
    refused = sum(1 for v in OUTCOME.values() if v == "refused")
    assert len(OUTCOME) == len(ALL)
    print(f"\nsmuggling variants tried {len(ALL)}: none smuggled a message; {refused} refused "
          f"with 554 5.6.0, {len(ALL) - refused} taken as the text of one message")


async def test_pipelined_commands_after_data_are_not_part_of_the_message(start_gateway):
    running = await start_gateway(None, hold=3600)
    payload = (b"EHLO c\r\nMAIL FROM:<a@lan.example>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\n"
               b"Subject: one\r\n\r\nbody\r\n.\r\nRSET\r\nMAIL FROM:<x@lan.example>\r\n"
               b"RCPT TO:<y@ext.example>\r\nDATA\r\nSubject: two\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    replies = await converse(running.smtp[0][1], payload)
    held = running.queue.held_for("127.0.0.1")
    assert sorted(h.subject for h in held) == ["one", "two"]
    assert replies.count(b"\r\n354 ") == 2 and replies.rstrip().endswith(b"221 2.0.0 Bye")


async def test_starttls_command_injection_is_never_answered(start_gateway):
    running = await start_gateway(None, hold=3600)
    stream = await trio.open_tcp_stream("127.0.0.1", running.smtp[0][1])
    with trio.fail_after(20):
        greeting = await stream.receive_some(4096)
        assert greeting.startswith(b"220 ")
        await stream.send_all(b"EHLO c\r\n")
        ehlo = b""
        while not re.search(rb"(^|\r\n)250 ", ehlo):
            ehlo += await stream.receive_some(4096)
        # The injected command rides in the same segment as STARTTLS.
        await stream.send_all(b"STARTTLS\r\nRSET\r\n")
        answer = await stream.receive_some(4096)
        assert answer.startswith(b"220 ") and answer.count(b"\r\n") == 1
        context = ssl.create_default_context(cafile=str(running.ca_file))
        tls = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError):
            return  # refusing the connection outright also never answers RSET
        await tls.send_all(b"NOOP\r\n")
        after = b""
        while after.count(b"\r\n") < 1:
            chunk = await tls.receive_some(4096)
            if not chunk:
                break
            after += chunk
        # Either the session goes on with NOOP answered first (the RSET was dropped), or it
        # ends; the RSET is never answered, in the clear or inside TLS.
        assert after == b"" or after.startswith(b"250 ") or after.startswith(b"421 ") \
            or after.startswith(b"5"), after
        if after.startswith(b"250 "):
            await tls.send_all(b"QUIT\r\n")
            rest = after
            while chunk := await tls.receive_some(4096):
                rest += chunk
            assert rest.count(b"\r\n") == 2 and rest.split(b"\r\n")[1].startswith(b"221 ")
        await tls.aclose()


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


async def test_upstream_bytes_are_dot_stuffed_crlf_only(start_gateway, nursery):
    upstream = await nursery.start(RawUpstream().serve)
    running = await start_gateway(upstream.port, hold=1)
    body = (b"Subject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\t\r\nplain\r\n"
            b". \r\nend")
    def send():
        with smtplib.SMTP("127.0.0.1", running.smtp[0][1], timeout=30) as s:
            s.sendmail("a@lan.example", ["b@ext.example"], body)
    await in_thread(send)
    await wait_for(lambda: upstream.transactions(), timeout=30)
    [data] = upstream.transactions()
    assert not BARE.search(b"".join(upstream.sessions))
    assert data == (b"Subject: dots\r\n\r\n..starts with a dot\r\n...two dots\r\n..\t\r\n"
                    b"plain\r\n.. \r\nend\r\n.\r\n")


RELAY_TRICKS = ["user%ext.example@gw.lan.example", "@gw.lan.example:user@ext.example",
                '"user@ext.example"@gw.lan.example', "ext.example!user"]


async def test_open_relay_tricks_are_relayed_as_given_never_rerouted(start_gateway, nursery):
    upstream = await nursery.start(RawUpstream().serve)
    running = await start_gateway(upstream.port, hold=1)
    answers = {}
    for rcpt in RELAY_TRICKS:
        def send(rcpt=rcpt):
            with smtplib.SMTP("127.0.0.1", running.smtp[0][1], timeout=30) as s:
                s.ehlo()
                s.mail("a@lan.example")
                code, _ = s.rcpt(rcpt)
                if code != 250:
                    return code
                s.data(b"Subject: trick\r\n\r\nx\r\n")
                return code
        answers[rcpt] = await in_thread(send)
    taken = [r for r, code in answers.items() if code == 250]
    for r, code in answers.items():
        assert code == 250 or 500 <= code < 600, (r, code)
    await wait_for(lambda: len(upstream.transactions()) == len(taken), timeout=30)
    got = sorted(rcpts[0] for _, rcpts in upstream.envelopes())
    # The one upstream gets the recipient exactly as the client wrote it: no %-hack, no
    # source route, no bang path is turned into another destination by the gateway.
    assert got == sorted(b"<" + r.encode() + b">" for r in taken)
    assert all(len(rcpts) == 1 for _, rcpts in upstream.envelopes())
    assert len(upstream.sessions) >= 1 and all(
        b"RCPT TO:<user@ext.example>" not in s for s in upstream.sessions)
    print(f"\nopen-relay tricks: {len(taken)} relayed as given, "
          f"{len(answers) - len(taken)} refused at RCPT")
