"""SMTP smuggling over a real socket (B8): only CRLF.CRLF ends DATA, nothing is smuggled in."""

from __future__ import annotations

import pytest
import trio

VARIANTS = [b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n",
            b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]


async def converse(port: int, payload: bytes) -> bytes:
    """Send everything pipelined in one write, then read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    with trio.fail_after(20):
        received += await stream.receive_some(4096)  # greeting
        await stream.send_all(payload)
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return bytes(received)


def smuggling_attempt(variant: bytes) -> bytes:
    """One message whose text ends with `variant` and then a second, smuggled transaction."""
    return (
        b"EHLO client.lan.example\r\n"
        b"MAIL FROM:<alice@lan.example>\r\nRCPT TO:<bob@ext.example>\r\nDATA\r\n"
        b"From: alice@lan.example\r\nSubject: outer\r\n\r\nhello" + variant +
        b"MAIL FROM:<ceo@lan.example>\r\nRCPT TO:<victim@ext.example>\r\nDATA\r\n"
        b"From: ceo@lan.example\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n"
        b"QUIT\r\n"
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=[repr(v) for v in VARIANTS])
async def test_smuggled_transaction_is_never_held(start_gateway, variant):
    running = await start_gateway(None, hold=3600)
    replies = await converse(running.smtp[0][1], smuggling_attempt(variant))
    held = running.queue.held_for("127.0.0.1")
    assert len(held) <= 1
    assert all(h.subject != "smuggled" for h in held)
    assert all(h.sender != "ceo@lan.example" for h in held)
    assert replies.rstrip().endswith(b"221 2.0.0 Bye")
    # A bare CR, a bare LF or a NUL refuses the whole message, smuggled text and all.
    assert held == [] and b"554 5.6.0" in replies
