"""The audit log (SPEC B7): one JSON object per line for every accept, release, cancel,
send-now, delivery and bounce.

Writing it must never take the gateway down, nor hold it up: lines are written by a thread of
the log's own, whole and flushed at once (appends of one line each); a failed write is logged as
a warning and the event is dropped.

It never fills the disk: a line that would take the file past `max_bytes` goes to a new file,
after audit.jsonl became audit.jsonl.1, .1 became .2, and so on up to `keep` old files (the
oldest is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "MAX_BYTES", "KEEP"]

MAX_BYTES = 8 * 1024 * 1024
KEEP = 4
MAX_QUEUED_LINES = 10_000  # waiting for the disk; more are dropped (and counted)
# How long the writer lets lines gather before it writes them (one wake-up and one write for
# many: cheaper than a write per line in the event loop); what a crash can lose of the log.
GATHER_SECONDS = 0.01

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
    {"ts": "2024-01-01T00:00:00.000Z", "event": "accept", "id": "..", "sender": "a@b"}.

    The file belongs to the log's own thread: `write` only queues the line, so the event loop
    never waits for the disk (a small write can sleep while the kernel pushes a large message
    out to slow flash). Lines reach the file within about GATHER_SECONDS; `flush` waits until
    every line queued so far is in the file, `close` too.
    """

    def __init__(self, path: Path | str, *, max_bytes: int = MAX_BYTES, keep: int = KEEP):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._file = None  # the writer thread's, as is _size
        self._size = 0
        self._pending: list[str] = []  # lines written, not yet taken by the thread
        self._wake: queue.SimpleQueue = queue.SimpleQueue()  # True, a flush's Event, None: stop
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # _pending, the thread's start, the failure counters
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
        with self._lock:
            queued = len(self._pending)
            if queued < MAX_QUEUED_LINES:
                self._pending.append(line + "\n")
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
                    self._thread.start()
        if queued >= MAX_QUEUED_LINES:
            self._failed(f"{MAX_QUEUED_LINES} lines wait for {self.path}: the disk does not "
                         "keep up")
        elif queued == 0:  # the thread is woken once a batch: lines written meanwhile join it
            self._wake.put(True)

    def flush(self) -> None:
        """Return once every line written before is in the file (or dropped)."""
        if self._thread is not None:
            done = threading.Event()
            self._wake.put(done)
            done.wait()

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._wake.put(None)
            thread.join()

    def _run(self) -> None:
        try:
            while True:
                item = self._wake.get()
                if item is True:
                    time.sleep(GATHER_SECONDS)
                with self._lock:  # every line written before `item` was put
                    lines, self._pending = self._pending, []
                if lines:
                    try:
                        self._append(lines)
                    except Exception:  # a defect: the log must go on, and say so
                        log.exception("audit: %d line(s) lost", len(lines))
                if item is None:
                    return
                if isinstance(item, threading.Event):
                    item.set()
        finally:
            self._close_quietly()

    def _append(self, lines: list[str]) -> None:
        """One write for the lines that fit in the current file (a new one when they do not)."""
        done = 0
        try:
            if self._file is None:
                self._open()
            while done < len(lines):
                batch, size = [], self._size
                for line in lines[done:]:
                    if size and size + len(line) > self.max_bytes:
                        break
                    batch.append(line)
                    size += len(line)
                if batch:
                    self._file.write("".join(batch))
                    self._size = size
                    done += len(batch)
                else:
                    self._rotate()
        except OSError as e:
            self._close_quietly()
            for _ in lines[done:]:
                self._failed(f"cannot write {self.path}: {e.strerror or e}")
            return
        finally:
            self.written += done
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
        with self._lock:
            self.dropped += 1
            first = not self._failing
            self._failing = True
        if first:  # one warning per run of failures, not one per event
            log.warning("audit event dropped: %s", why)

    def _close_quietly(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict:
        return {"written": self.written, "dropped": self.dropped, "failing": self._failing}
