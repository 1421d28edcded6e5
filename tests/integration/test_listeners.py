"""Who may connect and where mail goes by default: IPv6 (B1), allowed networks, the outbox."""

from __future__ import annotations

import json
import smtplib

import pytest
import trio

from tests.integration.conftest import in_thread, make_message, send_mail, wait_for


async def test_ipv6_listener_scopes_by_exact_address(start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=3600, smtp_extra="")
    v6_port = next(port for host, port in running.smtp if host == "::1")

    def send_over_v6():
        with smtplib.SMTP("::1", v6_port, timeout=30) as s:
            return s.sendmail("sender@lan.example", ["rcpt@ext.example"],
                              make_message("over ipv6"))

    assert await in_thread(send_over_v6) == {}
    assert [v.subject for v in running.queue.held_for("::1")] == ["over ipv6"]
    assert running.queue.held_for("127.0.0.1") == []


async def test_clients_outside_allowed_networks_are_refused(start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=3600,
                                  smtp_extra='allowed_networks = ["127.0.0.2/32"]')
    port = running.smtp[0][1]

    def from_source(source):
        try:
            with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
                return s.sendmail("sender@lan.example", ["rcpt@ext.example"],
                                  make_message(f"from {source}"))
        except smtplib.SMTPConnectError as exc:
            return exc.smtp_code, exc.smtp_error

    code, text = await in_thread(from_source, "127.0.0.1")
    assert (code, text[:5]) == (554, b"5.7.1")  # never an open relay
    assert await in_thread(from_source, "127.0.0.2") == {}
    assert [v.subject for v in running.queue.held_for("127.0.0.2")] == ["from 127.0.0.2"]
    assert running.queue.store_status()["messages"] == 1


async def test_outbox_upstream_writes_the_exact_message_and_its_envelope(start_gateway,
                                                                         tmp_path):
    running = await start_gateway(None, hold=3600,
                                  extra='[whitelist]\nsenders = ["scanner@lan.example"]')
    message = make_message("scan to mail", body="line one\r\n.leading dot\r\n")
    await in_thread(send_mail, running.smtp[0][1], message, sender="scanner@lan.example",
                    recipients=("a@ext.example", "b@ext.example"))
    outbox = tmp_path / "data" / "outbox"
    await wait_for(lambda: list(outbox.glob("*.eml")))
    [eml] = list(outbox.glob("*.eml"))
    assert eml.read_bytes() == message
    envelope = json.loads(eml.with_suffix(".envelope.json").read_text())
    assert envelope == {"from": "scanner@lan.example", "to": ["a@ext.example", "b@ext.example"]}
    assert running.queue.store_status()["messages"] == 0  # delivered: nothing left held


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:<a@lan.example> SIZE=notanumber\r\n", b"501"),
    (b"RCPT TO:<b@ext.example>\r\n", b"503"),
    (b"DATA\r\n", b"503"),
    (b"BDAT 10 LAST\r\n", b"500"),
    (b"VRFY postmaster\r\n", b"252"),
    (b"X" * 600 + b"\r\n", b"500"),
])
async def test_command_errors_get_the_right_reply(start_gateway, command, reply):
    running = await start_gateway(None, hold=3600)
    stream = await trio.open_tcp_stream("127.0.0.1", running.smtp[0][1])
    received = bytearray()
    with trio.fail_after(20):
        await stream.send_all(b"EHLO client\r\n" + command + b"QUIT\r\n")
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    lines = bytes(received).split(b"\r\n")
    ehlo_end = next(i for i, line in enumerate(lines) if line.startswith(b"250 "))
    assert lines[ehlo_end + 1].startswith(reply)
    assert lines[ehlo_end + 2].startswith(b"221")
