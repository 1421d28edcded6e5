"""Parsing what the peer sends: command lines, message content, replies.

Everything works on whole buffers with bytes.find/count/replace so that a
100 MB message costs a few passes in C, not a Python loop per byte or line.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Callable

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    MAILBOX,
    MAX_PATH,
    MAX_REPLY_LINE,
    MAX_TEXT_LINE,
    ROUTE,
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

__all__ = [
    "remote_error",
    "parse_command",
    "parse_auth_response",
    "COMMAND_TYPES",
    "DataReader",
    "ReplyReader",
    "parse_ehlo_reply",
]


def remote_error(code: int, text: str, msg: str | None = None) -> RemoteProtocolError:
    return RemoteProtocolError(msg or text, Reply(code, (text,)))


# ---------------------------------------------------------------- commands

_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")
_PATH_RE = re.compile(rf"<(?:{ROUTE})?({MAILBOX})>")
_NULL_PATH_RE = re.compile(r"<(?:{ROUTE})?>".replace("{ROUTE}", ROUTE))
_POSTMASTER_PATH_RE = re.compile(r"<(postmaster)>", re.IGNORECASE)
_PARAM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_SIZE_RE = re.compile(r"[0-9]{1,20}")
_FROM_RE = re.compile(r"FROM: *", re.IGNORECASE)
_TO_RE = re.compile(r"TO: *", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]{1,20}")


def _syntax(usage: str) -> RemoteProtocolError:
    return remote_error(501, f"5.5.4 Syntax: {usage}")


def _decode(arg: bytes, usage: str) -> str:
    try:
        return arg.decode("utf-8")
    except UnicodeDecodeError:
        raise _syntax(usage) from None


def _no_arg(cls: type[Event], usage: str) -> Callable[[bytes, bool], Event]:
    def parse(arg: bytes, smtputf8: bool) -> Event:
        if arg:
            raise _syntax(usage)
        return cls()

    return parse


def _parse_hello(verb: str) -> Callable[[bytes, bool], Event]:
    def parse(arg: bytes, smtputf8: bool) -> Event:
        # the domain is the first word; clients that add more are tolerated
        words = _decode(arg, f"{verb} hostname").split(" ")
        if not words[0]:
            raise _syntax(f"{verb} hostname")
        return Hello(verb, words[0])

    return parse


def _split_path(
    text: str, prefix: re.Pattern[str], usage: str, status: str, null_ok: bool
) -> tuple[str, list[str]]:
    m = prefix.match(text)
    if m is None:
        raise _syntax(usage)
    rest = text[m.end() :]
    if not rest.startswith("<"):
        raise remote_error(501, f"{status} Address must be enclosed in <>")
    m = _PATH_RE.match(rest)
    if m is not None:
        address = m.group(1)
    elif null_ok and (m := _NULL_PATH_RE.match(rest)) is not None:
        address = ""
    elif not null_ok and (m := _POSTMASTER_PATH_RE.match(rest)) is not None:
        address = m.group(1)
    else:
        raise remote_error(501, f"{status} Bad address syntax")
    params = rest[m.end() :]
    if params and params[0] != " ":
        raise remote_error(501, f"{status} Bad address syntax")
    if len(m.group(0).encode()) > MAX_PATH:
        raise remote_error(501, f"{status} Address too long")
    return address, params.split()


def _parse_mail(arg: bytes, smtputf8: bool) -> Event:
    usage = "MAIL FROM:<address>"
    text = _decode(arg, usage)
    sender, params = _split_path(text, _FROM_RE, usage, "5.1.7", True)
    seen: dict[str, str | None] = {}
    for param in params:
        m = _PARAM_RE.fullmatch(param)
        if m is None:
            raise _syntax(usage + " [parameters]")
        key = m.group(1).upper()
        if key in seen:
            raise remote_error(501, f"5.5.4 Duplicate parameter {key}")
        if key not in ("SIZE", "BODY", "SMTPUTF8", "AUTH"):
            raise remote_error(555, f"5.5.4 Unsupported parameter {key}")
        seen[key] = m.group(2)
    size = seen.get("SIZE")
    if "SIZE" in seen and (size is None or not _SIZE_RE.fullmatch(size)):
        raise remote_error(501, "5.5.4 Syntax: SIZE=<number>")
    body = seen.get("BODY")
    if "BODY" in seen and (body is None or body.upper() not in ("7BIT", "8BITMIME")):
        raise remote_error(501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
    if seen.get("SMTPUTF8") is not None:
        raise remote_error(501, "5.5.4 Syntax: SMTPUTF8 takes no value")
    utf8 = "SMTPUTF8" in seen
    auth = seen.get("AUTH")
    if "AUTH" in seen and auth is None:
        raise remote_error(501, "5.5.4 Syntax: AUTH=<mailbox>")
    if not sender.isascii() and not utf8:
        raise remote_error(501, "5.6.7 Non-ASCII address needs SMTPUTF8")
    try:
        return MailFrom(
            sender,
            size=int(size) if size is not None else None,
            body=body,
            smtputf8=utf8,
            auth=auth,
        )
    except LocalProtocolError as exc:
        raise remote_error(501, "5.5.4 Invalid MAIL parameter") from exc


def _parse_rcpt(arg: bytes, smtputf8: bool) -> Event:
    usage = "RCPT TO:<address>"
    text = _decode(arg, usage)
    rcpt, params = _split_path(text, _TO_RE, usage, "5.1.3", False)
    if params:
        raise remote_error(555, "5.5.4 Unsupported RCPT parameter")
    if not rcpt.isascii() and not smtputf8:
        raise remote_error(501, "5.6.7 Non-ASCII address needs SMTPUTF8")
    return RcptTo(rcpt)


def _parse_vrfy(arg: bytes, smtputf8: bool) -> Event:
    text = _decode(arg, "VRFY address").strip(" ")
    if not text:
        raise _syntax("VRFY address")
    return Vrfy(text)


def _parse_help(arg: bytes, smtputf8: bool) -> Event:
    return Help(_decode(arg, "HELP [topic]").strip(" "))


def _parse_noop(arg: bytes, smtputf8: bool) -> Event:
    return Noop()  # RFC 5321 4.1.1.9: an argument is allowed and ignored


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise remote_error(501, "5.5.2 Invalid base64 data") from None


def _parse_auth(arg: bytes, smtputf8: bool) -> Event:
    usage = "AUTH mechanism [initial-response]"
    words = _decode(arg, usage).split(" ")
    if len(words) > 2 or not _TOKEN_RE.fullmatch(words[0]):
        raise _syntax(usage)
    initial: bytes | None = None
    if len(words) == 2:
        # RFC 4954 4: "=" is an empty initial response
        initial = b"" if words[1] == "=" else _b64(words[1])
    return Auth(words[0], initial)


# verb -> (event type, parser(arg bytes, smtputf8 in effect))
COMMAND_TYPES: dict[bytes, tuple[type[Event], Callable[[bytes, bool], Event]]] = {
    b"EHLO": (Hello, _parse_hello("EHLO")),
    b"HELO": (Hello, _parse_hello("HELO")),
    b"MAIL": (MailFrom, _parse_mail),
    b"RCPT": (RcptTo, _parse_rcpt),
    b"DATA": (Data, _no_arg(Data, "DATA")),
    b"RSET": (Rset, _no_arg(Rset, "RSET")),
    b"NOOP": (Noop, _parse_noop),
    b"QUIT": (Quit, _no_arg(Quit, "QUIT")),
    b"VRFY": (Vrfy, _parse_vrfy),
    b"HELP": (Help, _parse_help),
    b"STARTTLS": (StartTLS, _no_arg(StartTLS, "STARTTLS")),
    b"AUTH": (Auth, _parse_auth),
}


def check_line(line: bytes) -> bytes:
    """Strip the CRLF of a line that ends at LF; reject bare CR/LF and controls."""
    if line[-2:] != b"\r\n":
        raise remote_error(
            500, "5.5.2 Bare LF received; only CRLF line endings are accepted"
        )
    line = line[:-2]
    if _CONTROL_RE.search(line) is not None:
        if b"\r" in line:
            raise remote_error(
                500, "5.5.2 Bare CR received; only CRLF line endings are accepted"
            )
        raise remote_error(500, "5.5.2 Invalid character in command")
    return line


def parse_command(
    line: bytes,
) -> tuple[type[Event], Callable[[bytes, bool], Event], bytes]:
    """Split a checked command line into (event type, parser, argument)."""
    line = line.rstrip(b" ")
    verb, _, arg = line.partition(b" ")
    entry = COMMAND_TYPES.get(verb.upper())
    if entry is None:
        raise remote_error(500, "5.5.2 Command unrecognized")
    return entry[0], entry[1], arg.lstrip(b" ")


def parse_auth_response(line: bytes) -> AuthResponse:
    text = line.strip(b" ")
    if text == b"*":
        raise remote_error(501, "5.7.0 Authentication cancelled")
    try:
        return AuthResponse(_b64(text.decode("ascii")) if text else b"")
    except UnicodeDecodeError:
        raise remote_error(501, "5.5.2 Invalid base64 data") from None


# ---------------------------------------------------------------- DATA

_MARKER = b"\r\n.\r\n"
_MARKER_PREFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


def _holdback(data: bytes) -> int:
    """Length of the tail of ``data`` that may start an end marker."""
    for prefix in _MARKER_PREFIXES:
        if data.endswith(prefix):
            return len(prefix)
    return 0


BARE_EOL = "5.6.0 Message rejected: only CRLF line endings are accepted (bare CR or LF)"
LONG_LINE = f"5.6.0 Message rejected: line longer than {MAX_TEXT_LINE} octets"
# RFC 5322 forbids NUL; a server that drops NULs would read "\r\n\x00.\r\n"
# as the end of the message, so it must never be relayed
NUL_OCTET = "5.6.0 Message rejected: NUL octets are not accepted"


class DataReader:
    """Message content after 354 up to CRLF.CRLF.

    ``read(buf)`` consumes from the bytearray ``buf`` and returns
    (content bytes or None, ended). Only ``.\\r\\n`` right after a CRLF (the
    DATA command's CRLF counts) ends the message. Content with a bare CR/LF, a
    NUL or an over-long line is consumed and dropped until the end, where
    ``error`` says why. Never keeps more than 4 bytes between calls.

    The content read is empty or ends with CRLF (the one before the end
    marker); ``dot_lines`` says whether a line of it starts with "." (it had
    to be dot-stuffed on the wire, and must be again when sent on).
    """

    __slots__ = ("line_start", "line_len", "error", "dot_lines")

    def __init__(self) -> None:
        self.line_start = True  # the previous bytes were CRLF
        self.line_len = 0  # raw octets of the current line so far
        self.error: RemoteProtocolError | None = None
        self.dot_lines = False

    def read(self, buf: bytearray) -> tuple[bytes | None, bool]:
        if not buf:
            return None, False
        data = bytes(buf)
        if self.line_start:
            if data.startswith(b".\r\n"):
                del buf[:3]
                return None, True
            if len(data) < 3 and b".\r\n".startswith(data):
                return None, False
        # Without a CRLF "." there is neither an end marker nor a stuffed dot: one search
        # instead of two, and no replace (most content has no line starting with ".").
        dotted = data.find(b"\r\n.") != -1
        idx = data.find(_MARKER) if dotted else -1
        if idx != -1:
            cut = idx + 2  # content keeps the CRLF before the dot
        else:
            cut = len(data) - _holdback(data)
            if cut == 0:
                return None, False
        chunk = data[:cut] if cut != len(data) else data
        if self.error is None:
            self._check(chunk)
        if self.error is not None:
            if idx != -1:
                del buf[: idx + 5]
                return None, True
            del buf[:cut]
            self.line_start = False
            return None, False
        del buf[:cut]
        if self.line_start and chunk[:1] == b".":
            chunk = chunk[1:]
            self.dot_lines = self.dot_lines or chunk[:1] == b"."
        # every CRLF "." left in the content is a stuffed dot (RFC 5321 4.5.2); a CRLF ".."
        # cannot straddle chunks (a chunk never ends with CRLF ".", see _holdback)
        if dotted:
            self.dot_lines = self.dot_lines or b"\r\n.." in chunk
            chunk = chunk.replace(b"\r\n.", b"\r\n")
        # only a chunk cut right before the marker ends with CRLF
        self.line_start = idx != -1
        return chunk, False

    def _check(self, raw: bytes) -> None:
        # splitlines() ends a line at CRLF, bare CR and bare LF alike: with `ends` line ends,
        # the octets that are not in any line number 2 * ends exactly when every end is a
        # CRLF. (A few passes in C; counting CRLF pairs directly is several times slower.)
        lines = raw.splitlines()
        lengths = list(map(len, lines))
        ends = len(lines) - (not raw.endswith((b"\r", b"\n")) and bool(lines))
        if len(raw) - sum(lengths) != 2 * ends:
            self.error = remote_error(554, BARE_EOL, "bare CR or LF in message content")
            return
        if b"\x00" in raw:
            self.error = remote_error(554, NUL_OCTET, "NUL in message content")
            return
        if not lines:
            return
        # Octets per line with its CRLF; the first line continues the last chunk's unfinished
        # one (line_len), an unfinished last line continues in the next chunk.
        if ends == 0:
            line_len = self.line_len + len(raw)
        else:
            first = self.line_len + lengths[0] + 2
            longest = max(lengths[1:ends]) + 2 if ends > 1 else 0
            line_len = 0 if ends == len(lines) else lengths[-1]
            if first > MAX_TEXT_LINE or longest > MAX_TEXT_LINE:
                line_len = MAX_TEXT_LINE
        if line_len >= MAX_TEXT_LINE:
            self.error = remote_error(554, LONG_LINE, "line too long in message")
        else:
            self.line_len = line_len


# ---------------------------------------------------------------- replies

_REPLY_LINE_RE = re.compile(rb"([2-5][0-9][0-9])([ -]|\r?\n)")
MAX_REPLY_LINES = 128  # not in any RFC: bounds memory for one reply


class ReplyReader:
    """Replies from a server; multi-line replies become one Reply."""

    __slots__ = ("code", "lines")

    def __init__(self) -> None:
        self.code: int | None = None
        self.lines: list[str] = []

    def read(self, buf: bytearray) -> Reply | None:
        while True:
            i = buf.find(b"\n", 0, MAX_REPLY_LINE)
            if i == -1:
                if len(buf) >= MAX_REPLY_LINE:
                    raise RemoteProtocolError("reply line too long")
                return None
            line = bytes(buf[: i + 1])
            del buf[: i + 1]
            m = _REPLY_LINE_RE.match(line)
            if m is None:
                raise RemoteProtocolError(f"malformed reply line {line[:40]!r}")
            code = int(m.group(1))
            if self.code is not None and code != self.code:
                raise RemoteProtocolError("reply code changed within a multi-line reply")
            self.code = code
            sep = m.group(2)
            text = line[4:].rstrip(b"\r\n") if sep in (b" ", b"-") else b""
            if b"\r" in text or b"\x00" in text:
                raise RemoteProtocolError("CR or NUL inside a reply line")
            self.lines.append(text.decode("utf-8", "replace"))
            if sep == b"-":
                if len(self.lines) >= MAX_REPLY_LINES:
                    raise RemoteProtocolError("reply has too many lines")
                continue
            try:
                reply = Reply(code, tuple(self.lines))
            except LocalProtocolError as exc:
                raise RemoteProtocolError(f"invalid reply: {exc}") from None
            self.code = None
            self.lines = []
            return reply


_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def parse_ehlo_reply(reply: Reply) -> dict[str, str]:
    """Extensions of a 250 EHLO reply: upper-case keyword -> parameters.

    The first line (the server's name) is skipped; lines that are not an
    extension keyword (e.g. the old "AUTH=LOGIN") are ignored; the first
    occurrence of a keyword wins.
    """
    if not reply.is_positive:
        return {}
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, rest = line.strip().partition(" ")
        if not _KEYWORD_RE.fullmatch(keyword):
            continue
        extensions.setdefault(keyword.upper(), " ".join(rest.split()))
    return extensions
