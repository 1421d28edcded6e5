"""The audit log (SPEC B7): one JSON object per line for every accept, release, cancel,
send-now, delivery and bounce.

Writing it must never take the gateway down: a failed write is logged as a warning and the
event is dropped. Lines are written whole and flushed at once (appends of one line each).

It never fills the disk: a line that would take the file past `max_bytes` goes to a new file,
after audit.jsonl became audit.jsonl.1, .1 became .2, and so on up to `keep` old files (the
oldest is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "MAX_BYTES", "KEEP"]

MAX_BYTES = 8 * 1024 * 1024
KEEP = 4

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()  # ids are random bytes
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


_second: tuple[int, str] = (-1, "")  # the last whole second, formatted: one line per message


def _timestamp() -> str:
    """UTC, ISO 8601 with milliseconds: "2024-01-01T00:00:00.000Z"."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{min(int((now - whole) * 1000), 999):03d}Z"


class AuditLog:
    """`AuditLog(path).write("accept", id=b"...", sender="a@b")` appends
    {"ts": "2024-01-01T00:00:00.000Z", "event": "accept", "id": "..", "sender": "a@b"}."""

    def __init__(self, path: Path | str, *, max_bytes: int = MAX_BYTES, keep: int = KEEP):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._file = None
        self._size = 0
        self._lock = threading.Lock()
        self._failing = False
        self.written = 0
        self.dropped = 0

    def write(self, event: str, **fields: Any) -> None:
        record = {"ts": _timestamp(), "event": event}
        for key, value in fields.items():
            record.setdefault(key, value)  # ts and event cannot be overridden
        try:
            # ASCII only: no raw U+2028 or lone surrogates from hostile headers in the file
            line = json.dumps(record, ensure_ascii=True, default=_jsonable, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            self._failed(f"cannot encode {event!r} event: {e}")
            return
        line += "\n"
        with self._lock:
            try:
                if self._file is None:
                    self._open()
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._file.write(line)
                self._size += len(line)
            except OSError as e:
                self._close_quietly()
                self._failed(f"cannot write {self.path}: {e.strerror or e}")
                return
        self.written += 1
        if self._failing:
            self._failing = False
            log.warning("audit log %s is written again", self.path)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="ascii", buffering=1)
        self._size = os.fstat(self._file.fileno()).st_size

    def _rotate(self) -> None:
        self._close_quietly()
        names = [self.path, *(self.path.with_name(f"{self.path.name}.{n}")
                              for n in range(1, self.keep + 1))]
        for newer, older in reversed(list(zip(names, names[1:]))):  # the oldest is replaced
            if newer.exists():
                os.replace(newer, older)
        self._open()

    def _failed(self, why: str) -> None:
        self.dropped += 1
        if not self._failing:  # one warning per run of failures, not one per event
            self._failing = True
            log.warning("audit event dropped: %s", why)

    def _close_quietly(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict:
        return {"written": self.written, "dropped": self.dropped, "failing": self._failing}
