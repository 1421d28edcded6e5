"""Bounce messages: RFC 3464 delivery status notifications (S11). Pure: no I/O, no clock.

A bounce says, in Japanese and English, which recipients did not get the message and why, gives
one machine-readable block per failed recipient, and carries the original headers (never the
body). Everything that came from outside (the subject, the upstream's reply text, addresses) is
stripped of control characters, and text goes out base64 or RFC 2047 encoded, so a hostile
header can add no header to the bounce.
"""

from __future__ import annotations

import base64
import email.header
import email.parser
import email.policy
import email.utils
import os
import re
from dataclasses import dataclass

MAX_ORIGINAL_HEADERS = 64 * 1024  # what of the original header block is attached
MAX_SUBJECT = 200
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass(frozen=True)
class Failure:
    recipient: str
    code: int
    text: str


def clean(text: str, limit: int = 1000) -> str:
    """One line of text from outside: controls become spaces, runs of space one space."""
    return " ".join(_CONTROLS.sub(" ", text).split())[:limit]


def status_of(failure: Failure) -> str:
    """The enhanced status code (RFC 3463) of a reply, or one derived from its class."""
    m = _ENHANCED.match(failure.text)
    if m and m.group(1) == str(failure.code)[0]:
        return ".".join(m.groups())
    return f"{failure.code // 100}.0.0"


def header_block(message_start: bytes) -> bytes:
    """The original header block (without the blank line), cut to whole lines within the limit."""
    end = message_start.find(b"\r\n\r\n")
    block = message_start if end < 0 else message_start[:end + 2]
    if len(block) > MAX_ORIGINAL_HEADERS:
        block = block[:block.rfind(b"\r\n", 0, MAX_ORIGINAL_HEADERS) + 2]
    return block


def original_subject(headers: bytes) -> str:
    try:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            headers + b"\r\n")
        return clean(str(parsed.get("subject", "")), MAX_SUBJECT)
    except Exception:  # a hostile header must not stop the bounce: it just goes without it
        return ""


def build(*, sender: str, failures: list[Failure], original_headers: bytes, hostname: str,
          message_ref: str, date: float, arrival_date: float) -> bytes:
    """The whole bounce (CRLF lines), to be sent `MAIL FROM:<>` to `sender`."""
    assert sender, "never a bounce for a null sender"
    headers = header_block(original_headers)
    subject = original_subject(headers)
    boundary = _boundary(headers)
    host = clean(hostname, 255)
    when = email.utils.formatdate(date, usegmt=True)

    human = _human_text(subject, failures, message_ref)
    title = "配信できなかったメール / Undelivered mail"
    if subject:
        title += f": {subject}"
    status_fields = [f"Reporting-MTA: dns; {host}",
                     f"X-Matte-Queue-ID: {clean(message_ref, 64)}",
                     f"Arrival-Date: {email.utils.formatdate(arrival_date, usegmt=True)}"]
    blocks = []
    for f in failures:
        blocks.append("\r\n".join([
            f"Final-Recipient: rfc822; {_address(f.recipient)}",
            "Action: failed",
            f"Status: {status_of(f)}",
            f"Diagnostic-Code: smtp; {f.code} {clean(f.text)}",
            f"Last-Attempt-Date: {when}",
        ]))
    delivery_status = "\r\n".join(status_fields) + "\r\n\r\n" + "\r\n\r\n".join(blocks) + "\r\n"
    eight_bit = any(b > 127 for b in headers)

    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_address(sender)}>",
        "Subject: " + email.header.Header(title, "utf-8", header_name="Subject").encode(
            linesep="\r\n"),
        f"Date: {when}",
        f"Message-ID: <{os.urandom(12).hex()}.bounce@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a delivery status notification (RFC 3464).",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: base64",
        "",
        *_base64_lines(human.encode()),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        delivery_status,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "",
    ]
    return ("\r\n".join(lines) + "\r\n").encode() + headers + \
        f"\r\n--{boundary}--\r\n".encode()


def _human_text(subject: str, failures: list[Failure], message_ref: str) -> str:
    listing = "\r\n".join(f"  {_address(f.recipient)}: {f.code} {clean(f.text)}"
                          for f in failures)
    subject_ja = f"件名「{subject}」の" if subject else ""
    subject_en = f' "{subject}"' if subject else ""
    return (
        f"{subject_ja}メールを次の宛先に配信できませんでした。\r\n"
        f"宛先と理由:\r\n{listing}\r\n\r\n"
        f"Your message{subject_en} could not be delivered to the recipients below.\r\n"
        f"Recipients and reasons:\r\n{listing}\r\n\r\n"
        f"(Matte, message {clean(message_ref, 64)}: the original headers are attached.)\r\n"
    )


def _address(address: str) -> str:
    return clean(address, 512).replace(" ", "")


def _base64_lines(data: bytes) -> list[str]:
    encoded = base64.b64encode(data).decode()
    return [encoded[i:i + 76] for i in range(0, len(encoded), 76)] or [""]


def _boundary(content: bytes) -> str:
    while True:
        boundary = "=_matte_" + os.urandom(12).hex()
        if boundary.encode() not in content:
            return boundary
