"""Bounces (S11): RFC 3464 reports that Python's email reads as valid DSNs; no header injection."""

from __future__ import annotations

import base64
import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import dsn

ORIGINAL = (b"From: Sender <sender@lan.example>\r\nTo: a@ext.example, b@ext.example\r\n"
            b"Subject: =?utf-8?b?5Zub5Y2K5pyf5aCx5ZGK?= Q3\r\nMessage-ID: <q3@lan.example>\r\n"
            b"\r\nThe secret body.\r\n")
TOP_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version",
               "Content-Type"]


def bounce(original=ORIGINAL, failures=None) -> email.message.EmailMessage:
    failures = failures or [dsn.Failure("b@ext.example", 550, "5.1.1 No such user"),
                            dsn.Failure("c@ext.example", 451, "4.4.1 Connection timed out")]
    raw = dsn.build(sender="sender@lan.example", failures=failures, original_headers=original,
                    hostname="gw.example", message_ref="00ff", date=1_700_000_600.0,
                    arrival_date=1_700_000_000.0)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF lines only
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    return email.message_from_bytes(raw, policy=email.policy.SMTP)


def test_a_bounce_is_a_delivery_status_report():
    msg = bounce()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"].addresses[0].addr_spec == "sender@lan.example"
    assert "MAILER-DAEMON@gw.example" in msg["From"]
    assert "四半期報告" in msg["Subject"]
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "配信できませんでした" in text and "could not be delivered" in text
    assert "b@ext.example" in text and "c@ext.example" in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.example"
    assert [(b["Final-Recipient"], b["Action"], b["Status"], b["Diagnostic-Code"])
            for b in per_recipient] == [
        ("rfc822; b@ext.example", "failed", "5.1.1", "smtp; 550 5.1.1 No such user"),
        ("rfc822; c@ext.example", "failed", "4.4.1", "smtp; 451 4.4.1 Connection timed out"),
    ]

    assert headers.get_content_type() == "text/rfc822-headers"
    attached = headers.get_payload(decode=True)
    assert attached.startswith(b"From: Sender <sender@lan.example>\r\n")
    assert b"Message-ID: <q3@lan.example>" in attached
    raw = msg.as_bytes()
    assert b"secret body" not in raw  # never the body
    assert b"secret body" not in base64.b64decode(human.get_payload())


def test_status_without_an_enhanced_code_comes_from_the_reply_class():
    assert dsn.status_of(dsn.Failure("x@y", 554, "Go away")) == "5.0.0"
    assert dsn.status_of(dsn.Failure("x@y", 421, "4.7.0 later")) == "4.7.0"
    assert dsn.status_of(dsn.Failure("x@y", 550, "4.7.0 mismatched class")) == "5.0.0"


def test_a_huge_header_block_is_cut_to_whole_lines():
    original = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(3000))
    block = dsn.header_block(original + b"\r\nbody")
    assert len(block) <= dsn.MAX_ORIGINAL_HEADERS and block.endswith(b"\r\n")
    assert bounce(original).get_payload()[2].get_payload(decode=True) == block


HOSTILE_SUBJECTS = [
    "=?utf-8?q?hi=0D=0ABcc:_victim@evil.example?=",
    "=?utf-8?b?aGkNCkJjYzogdmljdGltQGV2aWwuZXhhbXBsZQ==?=",
    "=?utf-8?q?hi=0ABcc:_victim@evil.example=0A=0A--boundary?=",
    "plain\u2028Bcc: victim@evil.example",
]


def test_hostile_encoded_subjects_add_no_header():
    for subject in HOSTILE_SUBJECTS:
        original = b"From: a@b.example\r\nSubject: " + subject.encode() + b"\r\n\r\nbody\r\n"
        msg = bounce(original)
        assert list(msg.keys()) == TOP_HEADERS, subject
        assert "Bcc" not in msg and "\n" not in msg["Subject"]
        assert len(msg.get_payload()) == 3


@settings(max_examples=200, deadline=None)
@given(subject=st.text(), reply=st.text(), recipient=st.from_regex(r"[a-z0-9.]{1,20}@x\.example",
                                                                   fullmatch=True))
def test_any_subject_or_reply_text_keeps_the_shape(subject, reply, recipient):
    original = b"From: a@b.example\r\nSubject: " + subject.encode("utf-8", "replace").replace(
        b"\r", b"").replace(b"\n", b"") + b"\r\n\r\nbody\r\n"
    msg = bounce(original, [dsn.Failure(recipient, 550, reply)])
    assert list(msg.keys()) == TOP_HEADERS
    human, status, headers = msg.get_payload()
    [_, block] = status.get_payload()
    assert block["Final-Recipient"] == f"rfc822; {recipient}"
    assert block["Status"].startswith("5.")
