"""SMTP events: frozen dataclasses that validate when built.

Building an invalid event raises LocalProtocolError, so an event that exists
can always be serialized safely (no CR/LF smuggled into a command or reply).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._errors import LocalProtocolError

__all__ = [
    "Event",
    "Hello",
    "MailFrom",
    "RcptTo",
    "Data",
    "DataChunk",
    "EndOfData",
    "Rset",
    "Noop",
    "Quit",
    "Vrfy",
    "Help",
    "StartTLS",
    "Auth",
    "AuthResponse",
    "Reply",
    "ConnectionClosed",
    "MAX_COMMAND_LINE",
    "MAX_TEXT_LINE",
    "MAX_AUTH_LINE",
    "MAX_REPLY_LINE",
    "MAX_PATH",
]

# RFC 5321 4.5.3.1.4: command line, including the command word and CRLF.
MAX_COMMAND_LINE = 512
# RFC 5321 4.5.3.1.6: text line of message content, including CRLF.
MAX_TEXT_LINE = 1000
# RFC 4954 4: AUTH command and continuation lines, including CRLF.
MAX_AUTH_LINE = 12288
# RFC 5321 4.5.3.1.5: reply line, including the code and CRLF.
MAX_REPLY_LINE = 512
# RFC 5321 4.5.3.1.3: reverse-path or forward-path, including punctuation.
MAX_PATH = 256

# RFC 5321 4.1.2 / RFC 6531 3.3 (non-ASCII allowed here; the caller decides
# whether SMTPUTF8 permits it). Underscores in labels are tolerated: real
# hosts have them.
# The classes are written as "any but these ASCII octets": the same sets as
# [A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff] (atext), [\x20\x21\x23-\x5b\x5d-\x7e
# \u0080-\U0010ffff] (qtext) and [A-Za-z0-9_\-\u0080-\U0010ffff] (label), but they compile
# in a fraction of the time (30 ms less at start-up).
ATEXT = r'[^\x00-\x20\x7f"(),.:;<>@\[\\\]]'
QTEXT = r'[^\x00-\x1f"\\\x7f]'
LABEL_CHAR = r"[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"
_ATOM = rf"{ATEXT}+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = rf'"(?:{QTEXT}|\\[\x20-\x7e])*"'
_LABEL = rf"{LABEL_CHAR}+"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[\x21-\x5a\x5e-\x7e]+\])"
MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED})@{_DOMAIN}"
ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"
_MAILBOX_RE = re.compile(MAILBOX)
_POSTMASTER_RE = re.compile("postmaster", re.IGNORECASE)
_HELO_DOMAIN_RE = re.compile(r"[^\x00-\x20\x7f]+")
_MECHANISM_RE = re.compile(r"[A-Z0-9_\-]{1,20}")
# RFC 3461 4: xtext
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ARG_RE = re.compile(r"[^\x00-\x1f\x7f]*")
_ENHANCED_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def _fail(msg: str) -> LocalProtocolError:
    return LocalProtocolError(msg)


def _require_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(f"{name} must be str, not {type(value).__name__}")
    return value


def _require_bytes(obj: object, name: str, value: object) -> None:
    if isinstance(value, (bytearray, memoryview)):
        object.__setattr__(obj, name, bytes(value))
    elif not isinstance(value, bytes):
        raise _fail(f"{name} must be bytes, not {type(value).__name__}")


def is_mailbox(address: str) -> bool:
    """True for ``local@domain`` as RFC 5321 4.1.2 allows it (no brackets)."""
    return _MAILBOX_RE.fullmatch(address) is not None


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True)
class Hello(Event):
    verb: str
    domain: str

    def __post_init__(self) -> None:
        verb = _require_str("verb", self.verb).upper()
        if verb not in ("EHLO", "HELO"):
            raise _fail(f"verb must be EHLO or HELO, not {self.verb!r}")
        object.__setattr__(self, "verb", verb)
        if not _HELO_DOMAIN_RE.fullmatch(_require_str("domain", self.domain)):
            raise _fail(f"invalid {verb} domain {self.domain!r}")


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    sender: str
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    auth: str | None = None  # RFC 4954 5: the xtext value as given, "<>" allowed

    def __post_init__(self) -> None:
        sender = _require_str("sender", self.sender)
        if sender and not is_mailbox(sender):
            raise _fail(f"invalid sender address {sender!r}")
        if len(sender.encode()) + 2 > MAX_PATH:
            raise _fail("sender address too long")
        if not sender.isascii() and not self.smtputf8:
            raise _fail("non-ASCII sender needs smtputf8")
        if self.size is not None and (
            type(self.size) is not int or self.size < 0
        ):
            raise _fail(f"size must be a non-negative int or None, not {self.size!r}")
        if self.body is not None:
            body = _require_str("body", self.body).upper()
            if body not in ("7BIT", "8BITMIME"):
                raise _fail(f"body must be 7BIT or 8BITMIME, not {self.body!r}")
            object.__setattr__(self, "body", body)
        if type(self.smtputf8) is not bool:
            raise _fail("smtputf8 must be bool")
        if self.auth is not None:
            auth = _require_str("auth", self.auth)
            if auth != "<>" and not (auth and _XTEXT_RE.fullmatch(auth)):
                raise _fail(f"invalid AUTH= value {auth!r}")


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    recipient: str

    def __post_init__(self) -> None:
        rcpt = _require_str("recipient", self.recipient)
        if not (is_mailbox(rcpt) or _POSTMASTER_RE.fullmatch(rcpt)):
            raise _fail(f"invalid recipient address {rcpt!r}")
        if len(rcpt.encode()) + 2 > MAX_PATH:
            raise _fail("recipient address too long")


@dataclass(frozen=True, slots=True)
class Data(Event):
    pass


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    """Message content: unstuffed, CRLF line endings, no terminating dot.

    Sent by a client, content with bare CR or LF is made canonical first. ``canonical=True``
    says the sender knows it already is (content read by this package's server side, which
    refuses bare CR/LF, and stored as read): the pass that looks for them is skipped.
    Dot-stuffing is done either way."""

    data: bytes
    canonical: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        _require_bytes(self, "data", self.data)


@dataclass(frozen=True, slots=True)
class EndOfData(Event):
    """The end of message content. From a server connection, ``dot_lines`` says whether a
    line of the content read starts with "." (it must be dot-stuffed when sent on); content
    without one goes on the wire exactly as read. Ignored when a client sends it."""

    dot_lines: bool = field(default=True, compare=False)


@dataclass(frozen=True, slots=True)
class Rset(Event):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Event):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    arg: str

    def __post_init__(self) -> None:
        arg = _require_str("arg", self.arg)
        if not arg or not _ARG_RE.fullmatch(arg):
            raise _fail(f"invalid VRFY argument {arg!r}")


@dataclass(frozen=True, slots=True)
class Help(Event):
    arg: str = ""

    def __post_init__(self) -> None:
        if not _ARG_RE.fullmatch(_require_str("arg", self.arg)):
            raise _fail(f"invalid HELP argument {self.arg!r}")


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    pass


@dataclass(frozen=True, slots=True)
class Auth(Event):
    mechanism: str
    initial: bytes | None = None  # decoded; b"" was sent as "="

    def __post_init__(self) -> None:
        mech = _require_str("mechanism", self.mechanism).upper()
        if not _MECHANISM_RE.fullmatch(mech):
            raise _fail(f"invalid SASL mechanism {self.mechanism!r}")
        object.__setattr__(self, "mechanism", mech)
        if self.initial is not None:
            _require_bytes(self, "initial", self.initial)


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    data: bytes  # decoded

    def __post_init__(self) -> None:
        _require_bytes(self, "data", self.data)


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    pass


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """An SMTP reply; ``lines`` hold the text after the code (enhanced code
    included, e.g. "2.0.0 Ok")."""

    code: int
    lines: tuple[str, ...] = field(default=("",))
    # The wire form, made once: most replies are constants sent again and again.
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.code) is not int or not 200 <= self.code <= 599:
            raise _fail(f"reply code must be an int in 200..599, not {self.code!r}")
        lines = self.lines
        if isinstance(lines, str):
            lines = (lines,)
        lines = tuple(lines)
        if not lines:
            raise _fail("a reply needs at least one line")
        for line in lines:
            _require_str("reply line", line)
            if "\r" in line or "\n" in line or "\x00" in line:
                raise _fail(f"CR, LF or NUL in reply line {line!r}")
            if len(line.encode()) + 6 > MAX_REPLY_LINE:
                raise _fail("reply line longer than MAX_REPLY_LINE")
        object.__setattr__(self, "lines", lines)

    @classmethod
    def of(cls, code: int, *lines: str) -> Reply:
        """``Reply.of(250, "2.1.0 Ok")``; one argument per line."""
        return cls(code, lines or ("",))

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code of the first line, if any."""
        m = _ENHANCED_RE.match(self.lines[0])
        if m is None or m.group(1) != str(self.code)[0]:
            return None
        return m.group(0).rstrip(" ")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:  # 2xx: positive completion
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:  # 3xx: send more
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:  # 4xx: try again later
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:  # 5xx: do not retry as is
        return 500 <= self.code < 600

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def __bytes__(self) -> bytes:
        if self._wire is not None:
            return self._wire
        code = str(self.code)
        out = [f"{code}-{line}\r\n" for line in self.lines[:-1]]
        last = self.lines[-1]
        # RFC 5321 4.2: Reply-code [ SP textstring ] CRLF
        out.append(f"{code} {last}\r\n" if last else f"{code}\r\n")
        wire = "".join(out).encode()
        object.__setattr__(self, "_wire", wire)
        return wire
