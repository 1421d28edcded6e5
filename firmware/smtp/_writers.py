"""Serializing what this side sends: commands (client role) and content."""

from __future__ import annotations

import base64

from ._errors import LocalProtocolError
from ._events import (
    Auth,
    AuthResponse,
    Data,
    Event,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)

__all__ = ["write_command", "write_reply", "DotStuffer"]


def write_reply(reply: Reply) -> bytes:
    return bytes(reply)


def _mail(event: MailFrom) -> str:
    parts = [f"MAIL FROM:<{event.sender}>"]
    if event.size is not None:
        parts.append(f"SIZE={event.size}")
    if event.body is not None:
        parts.append(f"BODY={event.body}")
    if event.smtputf8:
        parts.append("SMTPUTF8")
    if event.auth is not None:
        parts.append(f"AUTH={event.auth}")
    return " ".join(parts)


def _auth(event: Auth) -> str:
    if event.initial is None:
        return f"AUTH {event.mechanism}"
    initial = base64.b64encode(event.initial).decode() or "="
    return f"AUTH {event.mechanism} {initial}"


_SIMPLE = {Data: "DATA", Rset: "RSET", Noop: "NOOP", Quit: "QUIT", StartTLS: "STARTTLS"}


def write_command(event: Event) -> bytes:
    """One command line; events validate their fields, so no CR/LF gets in."""
    kind = type(event)
    if kind in _SIMPLE:
        line = _SIMPLE[kind]
    elif kind is Hello:
        line = f"{event.verb} {event.domain}"
    elif kind is MailFrom:
        line = _mail(event)
    elif kind is RcptTo:
        line = f"RCPT TO:<{event.recipient}>"
    elif kind is Vrfy:
        line = f"VRFY {event.arg}"
    elif kind is Help:
        line = f"HELP {event.arg}" if event.arg else "HELP"
    elif kind is Auth:
        line = _auth(event)
    elif kind is AuthResponse:
        line = base64.b64encode(event.data).decode()
    else:
        raise LocalProtocolError(f"cannot send {kind.__name__} as a command")
    return line.encode("utf-8") + b"\r\n"


def _crlf_only(data: bytes) -> bool:
    """No bare CR or LF in `data`. splitlines() ends a line at CRLF, CR and LF alike: the
    octets outside the lines are 2 per end exactly when every end is a CRLF (faster in
    CPython than counting CRLF pairs)."""
    lines = data.splitlines()
    ends = len(lines) - (not data.endswith((b"\r", b"\n")) and bool(lines))
    return len(data) - sum(map(len, lines)) == 2 * ends


# Dots looked at one by one before stuffing falls back to one replace over the whole chunk.
_DOT_PROBES = 8


def _stuff_dots(data: bytes) -> bytes:
    """Another "." before every line-inner "\n." (the chunk's first byte is the caller's).
    Most content has few dots: finding them with memchr and looking at the byte before is
    about a hundred times faster than the two-byte search of replace()."""
    i = data.find(b".", 1)
    for _ in range(_DOT_PROBES):
        if i == -1:
            return data
        if data[i - 1] == 0x0A:
            break
        i = data.find(b".", i + 1)
    return data.replace(b"\n.", b"\n..")


class DotStuffer:
    """Canonical CRLF and dot-stuffing for outgoing content, across chunks.

    Bare CR and bare LF become CRLF (what goes upstream is canonical), and a
    line starting with "." gets another one (RFC 5321 4.5.2). A CR at the end
    of a chunk is held until the next byte shows whether it starts a CRLF.
    """

    __slots__ = ("line_start", "pending_cr")

    def __init__(self) -> None:
        self.line_start = True  # the DATA command's CRLF starts the first line
        self.pending_cr = False

    def feed(self, data: bytes, canonical: bool = False) -> bytes:
        """`canonical`: the caller knows `data` has no bare CR or LF (see DataChunk)."""
        if self.pending_cr:
            data = b"\r" + data
            self.pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self.pending_cr = True
        if not data:
            return b""
        if not canonical and not _crlf_only(data):
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            data = data.replace(b"\n", b"\r\n")
        data = _stuff_dots(data)
        if self.line_start and data[:1] == b".":
            data = b"." + data
        self.line_start = data.endswith(b"\n")
        return data

    def end(self) -> bytes:
        tail = b""
        if self.pending_cr:
            tail = b"\r\n"
            self.pending_cr = False
            self.line_start = True
        tail += b".\r\n" if self.line_start else b"\r\n.\r\n"
        self.line_start = True
        return tail
