"""smtplib -> Matte -> aiosmtpd, over real loopback sockets (S1, S2, S3, S9, S12)."""

from __future__ import annotations

import json
import os
import smtplib

import trio

from tests.integration.conftest import (
    api,
    in_thread,
    make_message,
    send_mail,
    tls_client_context,
    wait_for,
)


async def held_list(running, source="127.0.0.1"):
    status, body = await in_thread(api, running.web[0][1], "GET", "/api/held", source=source)
    assert status == 200
    return body


async def test_held_message_is_listed_for_its_sender_only_and_released_after_the_hold(
        start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=2)
    message = make_message("quarterly report")
    await in_thread(send_mail, running.smtp[0][1], message)

    mine = await held_list(running)
    assert [m["subject"] for m in mine["held"]] == ["quarterly report"]
    held = mine["held"][0]
    assert held["to"] == ["rcpt@ext.example"]
    assert held["release_at"] - held["received_at"] == 2
    assert mine["store"]["messages"] == 1
    other = await held_list(running, source="127.0.0.2")
    assert other["held"] == []
    assert upstream.received() == []  # still held

    await wait_for(lambda: upstream.received())
    [got] = upstream.received()
    assert got.content == message  # the exact bytes the client sent
    assert got.sender == "sender@lan.example"
    assert got.recipients == ["rcpt@ext.example"]
    assert (await held_list(running))["held"] == []


async def test_cancelled_message_never_arrives(start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=1)
    await in_thread(send_mail, running.smtp[0][1], make_message("wrong attachment"))
    listing = await held_list(running)
    [held] = listing["held"]
    port = running.web[0][1]

    status, _ = await in_thread(api, port, "POST", f"/api/held/{held['id']}/cancel",
                                token="not-the-token")
    assert status == 403
    status, _ = await in_thread(api, port, "POST", f"/api/held/{held['id']}/cancel",
                                token=listing["token"], source="127.0.0.2")
    assert status in (403, 404)  # another address can never cancel it
    status, body = await in_thread(api, port, "POST", f"/api/held/{held['id']}/cancel",
                                   token=listing["token"])
    assert status == 200 and body["ok"] is True
    assert (await held_list(running))["held"] == []
    await trio.sleep(2.5)  # past the hold: nothing may arrive
    assert upstream.received() == []
    assert running.queue.store_status()["messages"] == 0


async def test_send_now_arrives_at_once_and_extend_moves_the_release(start_gateway, upstream,
                                                                     tmp_path):
    running = await start_gateway(upstream.port, hold=3600)
    await in_thread(send_mail, running.smtp[0][1], make_message("send me now"))
    await in_thread(send_mail, running.smtp[0][1], make_message("hold me longer"))
    listing = await held_list(running)
    by_subject = {m["subject"]: m for m in listing["held"]}
    port, token = running.web[0][1], listing["token"]

    longer = by_subject["hold me longer"]
    status, _ = await in_thread(api, port, "POST", f"/api/held/{longer['id']}/extend",
                                token=token, body={"seconds": 600})
    assert status == 200
    after = {m["subject"]: m for m in (await held_list(running))["held"]}
    assert after["hold me longer"]["release_at"] == longer["release_at"] + 600

    status, _ = await in_thread(api, port, "POST",
                                f"/api/held/{by_subject['send me now']['id']}/send", token=token)
    assert status == 200
    await wait_for(lambda: upstream.received())
    assert [b"send me now" in m.content for m in upstream.received()] == [True]
    assert [m["subject"] for m in (await held_list(running))["held"]] == ["hold me longer"]

    # B7: the audit log tells the story of each message, one JSON object a line.
    sent_id = by_subject["send me now"]["id"]
    audit = tmp_path / "data" / "audit.jsonl"
    await wait_for(lambda: '"delivery"' in audit.read_text())
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events if e.get("id") == sent_id] == [
        "accept", "release", "send-now", "delivery"]
    assert [e["event"] for e in events if e.get("id") == longer["id"]] == ["accept", "extend"]
    assert all(e["ip"] == "127.0.0.1" for e in events)


async def test_bodies_go_upstream_exactly_straight_from_the_store_unless_dot_stuffed(
        start_gateway, upstream, monkeypatch):
    """A body without a line starting with "." goes from the store's files to the upstream's
    socket by os.sendfile; one with such lines is dot-stuffed on the way. Both arrive as sent."""
    sendfile, sent = os.sendfile, []

    def counting_sendfile(out_fd, in_fd, offset, count):
        n = sendfile(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    running = await start_gateway(upstream.port, hold=3600)
    lines = "".join(f"line {i:06d} of a long report, no dot at its start.\r\n" for i in range(6000))
    plain = make_message("plain", body=lines)
    dotted = make_message("dotted", body=".hidden\r\n..two\r\nend.\r\n.\r\n")
    for message in (plain, dotted):
        await in_thread(send_mail, running.smtp[0][1], message)
    listing = await held_list(running)
    status, _ = await in_thread(api, running.web[0][1], "POST", "/api/held/all/send",
                                token=listing["token"])
    assert status == 200
    await wait_for(lambda: len(upstream.received()) == 2)
    got = {m.content.split(b"Subject: ")[1].split(b"\r\n")[0]: m.content
           for m in upstream.received()}
    assert got == {b"plain": plain, b"dotted": dotted}
    assert sum(sent) == len(plain) and len(sent) >= 2  # 330 kB: more than one slice


async def test_whitelists_and_many_recipients_pass_at_once(start_gateway, upstream):
    extra = ('[whitelist]\nsenders = ["scanner@lan.example"]\n'
             'recipients = ["partner.example", ".group.example"]')
    running = await start_gateway(upstream.port, hold=3600, extra=extra)
    port = running.smtp[0][1]
    await in_thread(send_mail, port, make_message("scan"), sender="scanner@lan.example")
    await in_thread(send_mail, port, make_message("partners"),
                    recipients=("a@partner.example", "b@eu.group.example"))
    await in_thread(send_mail, port, make_message("one outside"),
                    recipients=("a@partner.example", "c@elsewhere.example"))
    many = tuple(f"r{i}@ext.example" for i in range(501))
    await in_thread(send_mail, port, make_message("announcement"), recipients=many)

    await wait_for(lambda: len(upstream.received()) == 3)
    subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0]
                      for m in upstream.received())
    assert subjects == [b"announcement", b"partners", b"scan"]
    [big] = [m for m in upstream.received() if b"announcement" in m.content]
    assert sorted(big.recipients) == sorted(many)
    assert [m["subject"] for m in (await held_list(running))["held"]] == ["one outside"]


async def test_starttls_and_implicit_tls_verify_the_device_ca(start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=3600)
    context = tls_client_context(running.ca_file)

    def starttls():
        with smtplib.SMTP("127.0.0.1", running.smtp[0][1], timeout=30) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            s.starttls(context=context)
            s.ehlo()
            assert not s.has_extn("starttls")
            s.sendmail("sender@lan.example", ["rcpt@ext.example"], make_message("over starttls"))

    def implicit():
        with smtplib.SMTP_SSL("127.0.0.1", running.smtps[0][1], context=context,
                              timeout=30) as s:
            s.ehlo()
            assert not s.has_extn("starttls")  # already TLS
            assert s.has_extn("auth")
            s.sendmail("sender@lan.example", ["rcpt@ext.example"], make_message("over smtps"))

    await in_thread(starttls)
    await in_thread(implicit)
    subjects = sorted(m["subject"] for m in (await held_list(running))["held"])
    assert subjects == ["over smtps", "over starttls"]


async def test_full_store_answers_452_and_keeps_nothing_more(start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=3600, extra="max_messages = 2")
    port = running.smtp[0][1]
    await in_thread(send_mail, port, make_message("one"))
    await in_thread(send_mail, port, make_message("two"))

    def third():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo()
            return s.mail("sender@lan.example")

    code, text = await in_thread(third)
    assert code == 452 and text.startswith(b"4.3.1")
    assert running.queue.store_status()["messages"] == 2


async def test_oversize_is_refused_at_mail_and_at_end_of_data(start_gateway, upstream):
    running = await start_gateway(upstream.port, hold=3600,
                                  smtp_extra="max_message_size = 100000")
    port = running.smtp[0][1]

    def declared():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo()
            return s.mail("sender@lan.example", ["SIZE=100001"])

    def undeclared():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo()
            s.mail("sender@lan.example")
            s.rcpt("rcpt@ext.example")
            return s.data(make_message("too big", body="x" * 70 + "\r\n") * 2000)

    code, text = await in_thread(declared)
    assert (code, text[:5]) == (552, b"5.3.4")
    code, text = await in_thread(undeclared)
    assert (code, text[:5]) == (552, b"5.3.4")
    assert running.queue.store_status()["messages"] == 0
