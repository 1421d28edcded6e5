"""What the page shows of a message: From, To, Cc and Subject, decoded (pure).

Input is whatever a client sent, so nothing here may raise: undecodable bytes
and unknown charsets become U+FFFD, and the strings handed out never contain
NUL, CR or LF (other text, bidi controls included, is kept; escaping is the
page's job).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from email.utils import getaddresses

__all__ = ["MAX_HEADER_BYTES", "HeaderCollector", "decode_words", "summarize"]

# The page needs a few header fields; 64 KiB bounds memory and parsing time per message.
MAX_HEADER_BYTES = 64 * 1024

_BLANK_LINES = (b"\r\n\r\n", b"\n\n", b"\r\r")


def _end_of_header(data: bytes | bytearray, start: int = 0) -> int:
    """Where the first blank line (CRLF CRLF, LF LF or CR CR) at or after `start` begins, or
    -1 (bytes.find for each: much faster than a regular expression with alternatives)."""
    found = [i for i in (data.find(b, start) for b in _BLANK_LINES) if i != -1]
    return min(found) if found else -1


def header_block(data: bytes) -> bytes:
    """The header part of `data`: up to the first blank line, at most MAX_HEADER_BYTES."""
    if data.startswith((b"\r\n", b"\n")):  # no header at all
        return b""
    data = data[:MAX_HEADER_BYTES]
    end = _end_of_header(data)
    return data[:end] if end != -1 else data


class HeaderCollector:
    """Feed it the message as it streams in; it keeps only the header block (bounded)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        start = max(0, len(self._buf) - 3)  # a blank line may straddle chunks
        room = MAX_HEADER_BYTES - len(self._buf)
        self._buf += chunk[:room]
        if self._buf.startswith((b"\r\n", b"\n")):
            self._buf.clear()
            self.done = True
            return
        end = _end_of_header(self._buf, start)
        if end != -1:
            del self._buf[end:]
            self.done = True
        elif len(self._buf) >= MAX_HEADER_BYTES:
            self.done = True

    def header_bytes(self) -> bytes:
        """The header block seen so far (all of it once `done`), without the blank line."""
        return bytes(self._buf)

    def summarize(self) -> dict:
        return summarize(self.header_bytes())


# --- decoding --------------------------------------------------------------------------------

# Names mail in the wild uses for charsets that Python spells differently or that are
# usually meant as a superset (WHATWG Encoding and common mail-reader practice).
_CHARSET_ALIASES = {
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "ms_kanji": "cp932",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "us-ascii": "ascii",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-unknown": "ascii",
    "unknown-8bit": "utf-8",
}

# ISO-2022-JP mail often carries half-width katakana or JIS X 0212/0213 codes; the wider
# variants decode everything the strict one does.
_ISO2022JP_TRIES = ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_2004")

# Codecs that are not character sets (they interpret escapes or transform text).
_NOT_CHARSETS = {"unicode_escape", "raw_unicode_escape", "punycode", "idna", "undefined"}


def _codec_names(charset: str) -> tuple[str, ...]:
    name = charset.strip().lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return ()
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("-", "_") in _NOT_CHARSETS:
        return ()
    if info.name in ("iso2022_jp", "iso2022_jp_1", "iso2022_jp_3"):
        return (info.name,) + tuple(n for n in _ISO2022JP_TRIES if n != info.name)
    return (info.name,)


def decode_bytes(data: bytes, charset: str) -> str:
    """Bytes in a declared charset -> text; unknown charset or bad bytes -> U+FFFD."""
    names = _codec_names(charset)
    for name in names:
        try:
            return data.decode(name)
        except Exception:
            continue
    if names:
        try:
            return data.decode(names[0], errors="replace")
        except Exception:
            pass
    return data.decode("ascii", errors="replace")


def _raw_text(data: bytes) -> str:
    """Header bytes as sent (8-bit headers are not allowed, but happen) -> text."""
    if b"\x1b" in data:  # raw ISO-2022-JP, as old Japanese mailers send it
        text = decode_bytes(data, "iso-2022-jp")
        if "\ufffd" not in text:
            return text
    return data.decode("utf-8", errors="replace")


# RFC 2047 encoded-word, leniently: RFC 2231 language suffix allowed, and "?" inside Q text
# is tolerated only as far as the next "?=".
_ENCODED_WORD = re.compile(
    r"=\?(?P<charset>[^?\s*]{1,64})(?:\*[^?\s]{0,64})?\?(?P<enc>[bBqQ])\?(?P<text>[^?\s]*)\?="
)
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def _decode_b(text: str) -> bytes:
    data = _B64_JUNK.sub(b"", text.encode("ascii", "ignore"))
    if len(data) % 4 == 1:
        data = data[:-1]
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        return b""


def _decode_q(text: str) -> bytes:
    data = text.encode("ascii", "replace").replace(b"_", b" ")
    return _Q_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words in unstructured text.

    Whitespace between adjacent encoded words is dropped (RFC 2047 6.2), and the bytes of
    adjacent words in the same charset are joined before decoding, because real mailers split
    multi-byte characters across words.
    """
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset = ""
    pos = 0

    def flush() -> None:
        if pending:
            out.append(decode_bytes(b"".join(pending), pending_charset))
            pending.clear()

    for m in _ENCODED_WORD.finditer(text):
        between = text[pos : m.start()]
        if between and not (pending and between.isspace()):
            flush()
            out.append(between)
        charset = m.group("charset")
        if pending and charset.lower() != pending_charset.lower():
            flush()
        pending_charset = charset
        raw = _decode_b(m.group("text")) if m.group("enc") in "bB" else _decode_q(m.group("text"))
        pending.append(raw)
        pos = m.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


_LINE_BREAKS = re.compile(r"\r\n|[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_OTHER_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f]")


def clean(text: str) -> str:
    """No NUL, CR, LF (or other line breaks); tabs become spaces; trimmed."""
    text = _OTHER_CONTROLS.sub("", text.replace("\t", " "))
    text = _LINE_BREAKS.sub(" ", text)
    return text.strip()


# --- header fields ---------------------------------------------------------------------------

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# First bytes of the names summarize reads (from, to, cc, subject): other lines are skipped
# without parsing them, which matters for long headers and for mail with no blank line.
_WANTED_FIRST = frozenset(b"fFtTcCsS")
_FOLD = frozenset(b" \t")


def _fields(block: bytes, first_bytes: frozenset[int] | None = None) -> list[tuple[str, bytes]]:
    """(lower-case name, unfolded raw value) for each well-formed field, in order; with
    first_bytes, only fields whose name starts with one of them."""
    result: list[tuple[str, bytes]] = []
    name: str | None = None
    value: list[bytes] = []
    for line in block.splitlines():  # bytes: splits at CRLF, LF and CR only
        if line and line[0] in _FOLD:
            if name is not None:
                value.append(line)  # folded: unfolding removes only the line break (RFC 5322)
            continue
        if name is not None:
            result.append((name, b"".join(value)))
            name = None
        if first_bytes is not None and (not line or line[0] not in first_bytes):
            continue
        head, colon, rest = line.partition(b":")
        head = head.rstrip(b" \t")  # obsolete syntax allows space before the colon
        if colon and _FIELD_NAME.fullmatch(head):
            name, value = head.decode("ascii").lower(), [rest]
    if name is not None:
        result.append((name, b"".join(value)))
    return result


# The common case: a list of bare or <bracketed> dot-atom addresses, nothing to decode.
# Such a list parses to exactly these addresses (tests compare with the general path).
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_SIMPLE_ADDRESS = rf"{_DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_ITEM = rf"[ \t]*(?:<{_SIMPLE_ADDRESS}>|{_SIMPLE_ADDRESS})[ \t]*"
_SIMPLE_LIST = re.compile(rf"{_SIMPLE_ITEM}(?:,{_SIMPLE_ITEM})*")
_SIMPLE_ITEM_RE = re.compile(rf"[ \t]*<?({_SIMPLE_ADDRESS})>?[ \t]*")


def _mailboxes(raw: str) -> list[tuple[str, str]]:
    """(decoded display name, address) pairs of an address-list field."""
    if _SIMPLE_LIST.fullmatch(raw):
        return [("", _SIMPLE_ITEM_RE.fullmatch(item)[1]) for item in raw.split(",")]
    return _parsed_mailboxes(raw)


def _parsed_mailboxes(raw: str) -> list[tuple[str, str]]:
    try:
        pairs = getaddresses([raw])
    except Exception:
        pairs = [("", part) for part in raw.split(",")]
    out = []
    for name, addr in pairs:
        name, addr = clean(decode_words(name)), clean(addr)
        if name or addr:
            out.append((name, addr))
    return out


def _display(name: str, addr: str) -> str:
    if name and addr:
        return f"{name} <{addr}>"
    return name or addr


def summarize(header_bytes: bytes) -> dict:
    """{"from": str, "to": [address, ...], "cc": [address, ...], "subject": str}.

    "from" is for display ("Name <address>"); "to"/"cc" are the bare addresses (what the
    page compares with the envelope). Only the header block of header_bytes is read.
    """
    result = {"from": "", "to": [], "cc": [], "subject": ""}
    try:
        fields = _fields(header_block(bytes(header_bytes)), _WANTED_FIRST)
    except Exception:
        return result
    seen_from = seen_subject = False
    for name, value in fields:
        try:
            text = _raw_text(value)
            if name == "subject" and not seen_subject:
                seen_subject = True
                result["subject"] = clean(decode_words(text))
            elif name == "from" and not seen_from:
                seen_from = True
                boxes = _mailboxes(text)
                result["from"] = (
                    ", ".join(_display(n, a) for n, a in boxes) if boxes else clean(decode_words(text))
                )
            elif name in ("to", "cc"):
                result[name].extend(a for _, a in _mailboxes(text) if a)
        except Exception:
            continue  # one hostile field must not hide the others
    return result
