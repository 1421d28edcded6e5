"""Sans-IO framing of log records.

A frame is ``MAGIC | length (u32 BE) | crc32 of payload (u32 BE) | payload``.
The decoder never raises on bad input: it stops at the first frame that is
torn or corrupt and reports where the good data ends, so the caller decides
whether that is a torn tail (truncate) or damage in the middle (refuse).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

MAGIC = b"MT"
_HEADER = struct.Struct(">2sII")
HEADER_SIZE = _HEADER.size  # 10 bytes

# Larger than any frame the log writes (bodies are split into 1 MiB pieces);
# a bigger length field can only be damage, so do not wait for it.
MAX_PAYLOAD = 16 * 1024 * 1024

# Compact the buffer once this much consumed data sits in front of it.
_COMPACT_AT = 1 << 20


def frame_header(payload: bytes) -> bytes:
    """The 10-byte header for ``payload`` (lets writers avoid copying the payload)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload))


def encode_frame(payload: bytes) -> bytes:
    return frame_header(payload) + payload


class FrameDecoder:
    """Feed bytes, iterate complete payloads.

    ``offset`` is the stream position just after the last good frame: when the
    input ends with ``pending`` bytes or with ``error`` set, the torn or corrupt
    tail starts there.
    """

    def __init__(self, start: int = 0) -> None:
        self._buf = bytearray()
        self._pos = 0  # consumed bytes at the front of _buf
        self._base = start  # stream offset of _buf[0]
        self.error: str | None = None
        self.frame_offset: int | None = None  # start of the frame last returned

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def pending(self) -> int:
        """Bytes fed but not (yet) part of a complete good frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self.error is None:
            self._buf += data

    def next_frame(self) -> tuple[int, bytes] | None:
        """(stream offset of the frame, payload), or None when more data is needed
        or the stream is corrupt (see ``error``)."""
        if self.error is not None:
            return None
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return self._maybe_compact()
        magic, length, crc = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            self.error = f"bad magic {bytes(magic)!r}"
            return None
        if length > MAX_PAYLOAD:
            self.error = f"frame length {length} exceeds {MAX_PAYLOAD}"
            return None
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return self._maybe_compact()
        payload = bytes(buf[pos + HEADER_SIZE : end])
        if zlib.crc32(payload) != crc:
            self.error = "CRC mismatch"
            return None
        start = self._base + pos
        self._pos = end
        self.frame_offset = start
        return start, payload

    def _maybe_compact(self) -> None:
        if self._pos >= _COMPACT_AT or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        return None

    def __iter__(self) -> Iterator[bytes]:
        while (frame := self.next_frame()) is not None:
            yield frame[1]
