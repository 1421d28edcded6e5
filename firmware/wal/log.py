"""The write-ahead log: segment files of framed records, group commit, replay.

One writer task (``Log.run``) owns the files. Everything queued while it was
busy is written with one writev and made durable with one fdatasync, and every
committer whose record was in that batch is woken. In-memory state is applied
by the writer after the write, in file order, so what the log reports is what
a replay would rebuild.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ._files import OS_FILES, OsFiles
from ._framing import HEADER_SIZE, FrameDecoder, frame_header
from ._records import Accept, Body, Finish, Record, Update, from_payload

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
SEGMENT_BYTES = 64 * MiB
MAX_QUEUED_BYTES = 8 * MiB  # body bytes queued or in flight before write_body waits
BODY_PIECE = 1 * MiB  # bodies are framed in pieces of at most this size
READ_CHUNK = 512 * 1024  # read_body yields about this much at a time (one thread hop each)
MAINTAIN_INTERVAL = 0.5  # seconds between reclaim/compaction checks
COPY_CHUNK = 4 * MiB  # compaction copies at most this much per batch
REPLAY_CHUNK = 1 * MiB
SUFFIX = ".wal"
_LOCK_NAME = "lock"

try:
    _IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError):  # pragma: no cover - platform without it
    _IOV_MAX = 16


class StoreError(Exception):
    """The store cannot keep (or give back) what was asked of it."""


@dataclass(frozen=True)
class Recovered:
    accept: Accept
    updates: list[Update]
    size: int

    @property
    def id(self) -> bytes:
        return self.accept.id


class _Extent:
    """Where a piece of body data lies on disk."""

    __slots__ = ("seq", "pos", "length", "frame_len")

    def __init__(self, seq: int, pos: int, length: int, frame_len: int) -> None:
        self.seq = seq
        self.pos = pos
        self.length = length
        self.frame_len = frame_len


class _Message:
    __slots__ = (
        "id",
        # as written (applied by the writer in file order)
        "pending", "pending_len", "pending_segs",
        "accept", "extents", "body_segs", "body_bytes", "updates", "rec_segs",
        "finished", "finish_seg", "all_segs",
        # as queued (checked when callers enqueue)
        "queued_len", "accept_queued", "finishing", "failed",
        # replay only: updates still expected after a compaction copy's Accept
        "copy_skip", "copy_segs",
    )

    def __init__(self, id: bytes) -> None:
        self.id = id
        self.pending: list[_Extent] = []
        self.pending_len = 0
        self.pending_segs: set[int] = set()
        self.accept: Accept | None = None
        self.extents: list[_Extent] = []
        self.body_segs: set[int] = set()
        self.body_bytes = 0
        self.updates: list[Update] = []
        self.rec_segs: set[int] = set()
        self.finished = False
        self.finish_seg: int | None = None
        self.all_segs: set[int] = set()  # every segment holding any record of this id
        self.queued_len = 0
        self.accept_queued = False
        self.finishing = False
        self.failed = False
        self.copy_skip = 0
        self.copy_segs: set[int] = set()

    # Replay and the writer share these transitions, so a replay rebuilds
    # exactly the state the writer had.
    def add_body(self, offset: int, ext: _Extent) -> None:
        if offset == 0:
            self.pending = []
            self.pending_len = 0
            self.pending_segs = set()
        if offset != self.pending_len:
            return  # stale piece of an abandoned attempt
        self.pending.append(ext)
        self.pending_len += ext.length
        self.pending_segs.add(ext.seq)

    def add_accept(self, accept: Accept, seq: int) -> bool:
        if self.pending_len != accept.size:
            return False
        self.accept = accept
        self.set_body(self.pending)
        self.pending = []
        self.pending_len = 0
        self.pending_segs = set()
        self.updates = []
        self.rec_segs = {seq}
        return True

    def set_body(self, extents: list[_Extent]) -> None:
        self.extents = extents
        self.body_segs = {e.seq for e in extents}
        self.body_bytes = sum(e.frame_len for e in extents)

    def add_finish(self, seq: int) -> None:
        self.finished = True
        self.finish_seg = seq
        self.pending = []
        self.pending_segs = set()
        self.extents = []
        self.body_segs = set()
        self.updates = []
        self.rec_segs = set()

    @property
    def size(self) -> int:
        return self.accept.size if self.accept is not None else 0

    def needed_segments(self) -> set[int]:
        if self.finished:
            # The Finish must outlive every other record of the id, or a
            # replay would bring the message back.
            if self.finish_seg is not None and self.all_segs - {self.finish_seg}:
                return {self.finish_seg}
            return set()
        return self.body_segs | self.rec_segs | self.pending_segs


def _weight(m: _Message) -> int:
    """What an unfinished message counts for in live bytes (its body, about 64 bytes a record)."""
    if m.finished:
        return 0
    return m.body_bytes + 64 * (1 + len(m.updates)) + m.pending_len


class _Segment:
    __slots__ = ("seq", "path", "size")

    def __init__(self, seq: int, path: Path, size: int) -> None:
        self.seq = seq
        self.path = path
        self.size = size


_BODY, _ACCEPT, _UPDATE, _FINISH = range(4)
_KIND = {Accept: _ACCEPT, Update: _UPDATE, Finish: _FINISH}


class _Item:
    """One frame on its way to disk."""

    __slots__ = ("kind", "id", "offset", "length", "record", "header", "payload",
                 "copy", "pos", "seq")

    def __init__(self, kind: int, id: bytes, payload: bytes, *, offset: int = 0,
                 length: int = 0, record: Record | None = None,
                 copy: _Copy | None = None) -> None:
        self.kind = kind
        self.id = id
        self.offset = offset
        self.length = length
        self.record = record
        self.payload = payload
        self.header = frame_header(payload)
        self.copy = copy
        self.pos = 0
        self.seq = 0

    @property
    def frame_len(self) -> int:
        return HEADER_SIZE + len(self.payload)


class _Copy:
    """Compaction of one live message: its body, then Accept and updates, forward."""

    __slots__ = ("id", "src", "planned", "new_extents", "aborted")

    def __init__(self, id: bytes, src: list[_Extent]) -> None:
        self.id = id
        self.src = deque(src)
        self.planned = 0
        self.new_extents: list[_Extent] = []
        self.aborted = False


class _Ticket:
    """Wakes every committer of one batch."""

    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None


class _IOFailure(Exception):
    def __init__(self, exc: OSError, fatal: bool, what: str) -> None:
        super().__init__(f"{what}: {exc}")
        self.exc = exc
        self.fatal = fatal


def _seg_name(seq: int) -> str:
    return f"{seq:016x}{SUFFIX}"


def _write_all(files: OsFiles, fd: int, parts: list) -> None:
    i = 0
    while i < len(parts):
        n = files.writev(fd, parts[i : i + _IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while n > 0:
            length = len(parts[i])
            if n >= length:
                n -= length
                i += 1
            else:
                parts[i] = memoryview(parts[i])[n:]
                n = 0


def _pread_exact(files: OsFiles, fd: int, length: int, pos: int) -> bytes:
    data = files.pread(fd, length, pos)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read: {len(data)} of {length} bytes at {pos}")
    return data


class Log:
    def __init__(self, directory: Path, segment_bytes: int, max_queued_bytes: int,
                 files: OsFiles = OS_FILES) -> None:
        self.directory = directory
        self._files = files
        self._segment_bytes = segment_bytes
        self._max_queued = max_queued_bytes
        self._segments: dict[int, _Segment] = {}
        self._msgs: dict[bytes, _Message] = {}
        self._active: _Segment | None = None
        self._fd = -1  # active segment, for writing
        self._dir_fd = -1
        self._lock_fd = -1
        self._dirty = False  # written to the active segment since its last fdatasync
        self._queue: list[_Item] = []
        self._queue_sync = False
        self._ticket = _Ticket()
        self._wake = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        self._body_bytes = 0  # queued or in flight
        self._broken: str | None = None
        self._closing = False
        self._closed = False
        self._running = False
        self._stopped = trio.Event()
        self._pins: dict[int, int] = {}
        self._copies: deque[_Copy] = deque()
        self._maintain_needed = True
        self._next_maintain = 0.0
        self._live_ids = 0  # accepted, not finished
        self._live_total = 0  # sum of _weight over every unfinished message
        self._stats = {
            "fsyncs": 0, "last_fsync_latency": 0.0, "bytes_written": 0, "batches": 0,
            "commits": 0, "records": 0, "compactions": 0, "copied_messages": 0,
            "reclaimed_segments": 0, "write_errors": 0,
        }

    # ------------------------------------------------------------------ open

    @classmethod
    async def open(cls, directory: Path, *, segment_bytes: int = SEGMENT_BYTES,
                   max_queued_bytes: int = MAX_QUEUED_BYTES, files: OsFiles = OS_FILES,
                   ) -> tuple[Log, dict[bytes, Recovered]]:
        """Replay the segments in ``directory`` (created if missing). ``files`` is the
        file layer (tests pass one that injects faults)."""
        if segment_bytes < 4096:
            raise ValueError("segment_bytes must be at least 4096")
        log = cls(Path(directory), segment_bytes, max_queued_bytes, files)
        try:
            recovered = await trio.to_thread.run_sync(log._open_sync)
        except BaseException:
            log._close_fds()
            raise
        return log, recovered

    def _open_sync(self) -> dict[bytes, Recovered]:
        d, files = self.directory, self._files
        files.mkdir(d)
        self._lock_fd = files.open(d / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            files.lock(self._lock_fd)
        except BlockingIOError:
            raise StoreError(f"{d}: the store is in use by another log") from None
        self._dir_fd = files.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        seqs = []
        for p in map(d.joinpath, files.listdir(d)):
            if p.suffix == SUFFIX:
                try:
                    seqs.append(int(p.stem, 16))
                except ValueError:
                    raise StoreError(f"{p}: not a segment name") from None
        seqs.sort()
        for i, seq in enumerate(seqs):
            self._replay_segment(seq, last=(i == len(seqs) - 1))

        recovered: dict[bytes, Recovered] = {}
        for id, m in list(self._msgs.items()):
            if m.finished:
                continue
            if m.accept is None:
                # Never accepted: the sender was not answered, so it never existed.
                del self._msgs[id]
                continue
            m.pending, m.pending_len, m.pending_segs = [], 0, set()
            m.queued_len = m.accept.size
            m.accept_queued = True
            recovered[id] = Recovered(m.accept, list(m.updates), m.accept.size)
        self._live_ids, self._live_total = self._recount()

        if seqs:
            active = self._segments[seqs[-1]]
            self._fd = files.open(active.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        else:
            active = self._create_segment(1)
            self._segments[1] = active
        self._active = active
        return recovered

    def _replay_segment(self, seq: int, last: bool) -> None:
        path = self.directory / _seg_name(seq)
        dec = FrameDecoder()
        files = self._files
        fd = files.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while dec.error is None and (chunk := files.pread(fd, REPLAY_CHUNK, pos)):
                pos += len(chunk)
                dec.feed(chunk)
                while (frame := dec.next_frame()) is not None:
                    self._replay_frame(path, seq, *frame)
        finally:
            files.close(fd)
        good = dec.offset
        if dec.error is not None or dec.pending:
            why = dec.error or f"incomplete frame ({dec.pending} bytes)"
            if not last:
                raise StoreError(
                    f"{path}: corrupt record at byte {good} ({why}) in a segment that is "
                    f"not the last one; refusing to replay past it")
            logger.warning("%s: dropping torn tail at byte %d (%s)", path, good, why)
            fd = files.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                files.ftruncate(fd, good)
                files.fsync(fd)
            finally:
                files.close(fd)
        self._segments[seq] = _Segment(seq, path, good)

    def _replay_frame(self, path: Path, seq: int, pos: int, payload: bytes) -> None:
        try:
            rec = from_payload(payload)
        except ValueError as exc:
            # The CRC matched, so this is not a torn write: never skip it silently.
            raise StoreError(f"{path}: byte {pos}: {exc}") from None
        m = self._msgs.get(rec.id)
        if m is None:
            m = self._msgs[rec.id] = _Message(rec.id)
        m.all_segs.add(seq)
        if m.finished:
            return
        if type(rec) is Body:
            frame_len = HEADER_SIZE + len(payload)
            m.add_body(rec.offset, _Extent(seq, pos + frame_len - len(rec.data),
                                           len(rec.data), frame_len))
        elif type(rec) is Accept and m.accept is not None:
            # A compaction copy (an id is accepted once). Its copied updates follow it,
            # possibly torn off by a crash: keep the updates already known and skip
            # their copies; the older records stay needed until every copy is seen.
            if m.pending_len == rec.size:
                m.set_body(m.pending)
            m.pending, m.pending_len, m.pending_segs = [], 0, set()
            m.copy_skip = len(m.updates)
            m.copy_segs = {seq}
            m.rec_segs.add(seq)
            if not m.copy_skip:
                m.rec_segs = m.copy_segs
        elif type(rec) is Accept:
            if not m.add_accept(rec, seq):
                logger.warning("%s: byte %d: Accept of %s does not match its body (%d != %d);"
                               " ignored", path, pos, rec.id.hex(), rec.size, m.pending_len)
        elif type(rec) is Update:
            if m.accept is not None:
                m.rec_segs.add(seq)
                if m.copy_skip:
                    m.copy_skip -= 1
                    m.copy_segs.add(seq)
                    if not m.copy_skip:
                        m.rec_segs = m.copy_segs
                else:
                    m.updates.append(rec)
        else:
            m.add_finish(seq)

    def _create_segment(self, seq: int) -> _Segment:
        path = self.directory / _seg_name(seq)
        files = self._files
        fd = files.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                        0o600)
        try:
            files.fsync(self._dir_fd)  # the new name is durable before anything is in it
        except BaseException:
            files.close(fd)
            raise
        if self._fd >= 0:
            files.close(self._fd)
        self._fd = fd
        return _Segment(seq, path, 0)

    # ------------------------------------------------------------ public API

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StoreError(f"the log refuses writes after an earlier failure: {self._broken}")
        if self._closing:
            raise StoreError("the log is closed")

    async def write_body(self, id: bytes, offset: int, data: bytes) -> None:
        """Queue a piece of a message body (not waited for durability: the
        message's Accept, committed later in the same order, covers it)."""
        self._check_usable()
        m = self._msgs.get(id)
        if offset == 0:
            if m is None:
                m = self._msgs[id] = _Message(id)
                self._live_total += _weight(m)
            elif m.accept_queued or m.finishing:
                raise ValueError(f"message {id.hex()} is already accepted or finished")
            m.queued_len = 0
            m.failed = False
        elif m is None or offset != m.queued_len:
            have = m.queued_len if m is not None else 0
            raise ValueError(f"body offset {offset} for {id.hex()} but {have} bytes queued")
        elif m.accept_queued or m.finishing:
            raise ValueError(f"message {id.hex()} is already accepted or finished")
        data = bytes(data) if not isinstance(data, bytes) else data
        # Waits only when the writer is behind (no checkpoint otherwise: a receiving session
        # yields on every read anyway, and a task switch per body piece costs CPU).
        while self._body_bytes > self._max_queued:
            await self._space.park()
            self._check_usable()
        # The checks above may be stale after waiting.
        if m.queued_len != offset or m.accept_queued or m.finishing:
            raise ValueError(f"concurrent writes to message {id.hex()}")
        if not data and offset != 0:
            return
        piece = 0
        while True:
            chunk = data[piece : piece + BODY_PIECE] if len(data) > BODY_PIECE else data
            payload = Body(id, offset + piece, chunk).to_payload()
            self._enqueue(_Item(_BODY, id, payload, offset=offset + piece, length=len(chunk)))
            self._body_bytes += len(payload)
            piece += len(chunk)
            if piece >= len(data):
                break
        m.queued_len = offset + len(data)

    async def commit(self, record: Accept | Update | Finish) -> None:
        """Append ``record`` and return once it is durable (fdatasync done)."""
        self._check_usable()
        kind = _KIND.get(type(record))
        if kind is None:
            raise TypeError(f"commit takes Accept, Update or Finish, not {type(record).__name__}")
        m = self._msgs.get(record.id)
        if kind == _ACCEPT:
            if m is None and record.size == 0:
                m = self._msgs[record.id] = _Message(record.id)
                self._live_total += _weight(m)
            if m is None or m.queued_len != record.size:
                have = m.queued_len if m is not None else 0
                raise ValueError(f"Accept size {record.size} for {record.id.hex()} but the "
                                 f"body has {have} bytes")
            if m.accept_queued or m.finishing:
                raise ValueError(f"message {record.id.hex()} is already accepted or finished")
            if m.failed:
                raise StoreError(f"the body of {record.id.hex()} was lost to a write error")
            m.accept_queued = True
        elif kind == _UPDATE:
            if m is None or not m.accept_queued or m.finishing:
                raise KeyError(record.id)
        else:
            if m is None or m.finishing:
                await trio.lowlevel.checkpoint()
                return  # nothing left to finish
            m.finishing = True
        ticket = self._ticket
        self._enqueue(_Item(kind, record.id, record.to_payload(), record=record), sync=True)
        self._stats["commits"] += 1
        # Once queued the record will be written: the caller must learn how that went, so a
        # cancelled caller cannot take back in memory what reaches the disk. The wait is bounded:
        # the writer sets every ticket, and fails them all if it is stopped.
        with trio.CancelScope(shield=True):
            await ticket.event.wait()
        if ticket.error is not None:
            raise StoreError(str(ticket.error)) from ticket.error
        if kind == _ACCEPT and m.accept is not record:
            raise StoreError(f"the body of {record.id.hex()} was lost to a write error")

    def abandon(self, id: bytes) -> None:
        """Queue a Finish for a message whose body will never be accepted
        (sender gone), without waiting; safe to call from cleanup code."""
        m = self._msgs.get(id)
        if m is None or m.finishing or self._broken is not None or self._closing:
            return
        m.finishing = True
        self._enqueue(_Item(_FINISH, id, Finish(id, "abandoned").to_payload(),
                            record=Finish(id, "abandoned")), sync=True)

    def _enqueue(self, item: _Item, sync: bool = False) -> None:
        self._queue.append(item)
        if sync:
            self._queue_sync = True
        self._wake.set()

    @asynccontextmanager
    async def open_body(self, id: bytes) -> AsyncIterator[list[tuple[int, int, int]]]:
        """The accepted body of ``id`` where it lies: (fd, position, length) pieces, in order,
        of segment files opened for reading and closed on exit. The files stay readable while
        open even if the segment is reclaimed meanwhile (the log never writes over a body)."""
        m = self._msgs.get(id)
        if m is None or m.accept is None or m.finished:
            raise KeyError(id)
        extents = list(m.extents)
        seqs = list(dict.fromkeys(e.seq for e in extents))
        paths = [self._segments[s].path for s in seqs]
        # Pinned until opened: reclaim does not unlink a pinned segment.
        for s in seqs:
            self._pins[s] = self._pins.get(s, 0) + 1
        try:
            opened = await trio.to_thread.run_sync(_open_all, self._files, paths)
        finally:
            for s in seqs:
                self._pins[s] -= 1
                if not self._pins[s]:
                    del self._pins[s]
        fds = dict(zip(seqs, opened))
        try:
            yield [(fds[e.seq], e.pos, e.length) for e in extents]
        finally:
            for fd in opened:
                self._files.close(fd)

    async def read_body(self, id: bytes) -> AsyncIterator[bytes]:
        """The accepted body of ``id``, in chunks of about READ_CHUNK bytes.

        Use ``async with contextlib.aclosing(log.read_body(id)) as chunks`` when
        not reading to the end, so the files are closed promptly.
        """
        async with self.open_body(id) as pieces:
            group: list[tuple[int, int, int]] = []
            size = 0
            for fd, pos, left in pieces:
                while left:
                    n = min(left, READ_CHUNK - size)
                    group.append((fd, n, pos))
                    size += n
                    pos += n
                    left -= n
                    if size >= READ_CHUNK:
                        yield await trio.to_thread.run_sync(_read_group, self._files, group)
                        group, size = [], 0
            if group:
                yield await trio.to_thread.run_sync(_read_group, self._files, group)

    def statistics(self) -> dict:
        # Cheap (kept as the writer applies records): callers ask on every change of the queue.
        return {
            "segments": len(self._segments),
            "bytes_on_disk": sum(s.size for s in self._segments.values()),
            "live_ids": self._live_ids,
            "live_bytes": self._live_bytes(),
            "queued_records": len(self._queue),
            "queued_body_bytes": self._body_bytes,
            "broken": self._broken,
            **self._stats,
        }

    async def aclose(self) -> None:
        """Write what is queued, stop the writer, close the files."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        self._wake.set()
        self._space.unpark_all()
        if self._running:
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()
        self._fail_queue(StoreError("the log is closed"))
        self._closed = True
        self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_fd", "_dir_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                self._files.close(fd)
                setattr(self, name, -1)

    def _fail_queue(self, error: BaseException) -> None:
        self._ticket.error = error
        self._ticket.event.set()
        self._ticket = _Ticket()
        self._queue = []
        self._body_bytes = 0
        self._space.unpark_all()

    # ---------------------------------------------------------------- writer

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The writer task; returns after ``aclose``."""
        if self._running or self._closed:
            raise RuntimeError("the writer is already running or the log is closed")
        self._running = True
        try:
            task_status.started()
            while True:
                busy = self._queue or (self._copies and not self._closing and not self._broken)
                maintain = self._maintain_needed and not self._broken and not self._closing
                if maintain and trio.current_time() >= self._next_maintain:
                    with trio.CancelScope(shield=True):
                        await self._maintain()
                    # Rate-limited: it walks every known message.
                    self._next_maintain = trio.current_time() + MAINTAIN_INTERVAL
                elif busy:
                    with trio.CancelScope(shield=True):
                        await self._batch()
                elif self._closing:
                    return
                else:
                    with trio.move_on_at(self._next_maintain if maintain else math.inf):
                        await self._wake.wait()
                    if self._wake.is_set():
                        self._wake = trio.Event()
        finally:
            self._running = False
            if not self._closing:
                self._broken = self._broken or "the log writer stopped"
                self._fail_queue(StoreError("the log writer stopped"))
            self._stopped.set()

    async def _batch(self) -> None:
        items, self._queue = self._queue, []
        sync, self._queue_sync = self._queue_sync, False
        ticket, self._ticket = self._ticket, _Ticket()
        body_bytes = 0
        for i in items:
            if i.kind == _BODY:
                body_bytes += len(i.payload)
            elif i.kind == _ACCEPT and self._msgs[i.id].failed:
                # Part of its body was lost by an earlier failed write after this
                # Accept was queued: writing it would acknowledge a message that
                # a replay would not find. Its committer sees it was not applied.
                self._msgs[i.id].accept_queued = False
                i.kind = -1
        if self._stats["write_errors"]:
            items = [i for i in items if i.kind != -1]
        if self._broken is not None:
            ticket.error = StoreError(f"the log refuses writes: {self._broken}")
            ticket.event.set()
            self._body_bytes -= body_bytes
            self._space.unpark_all()
            return
        reads, tail = self._plan_copy()
        if tail:
            sync = True
        rotate = self._active.size >= self._segment_bytes
        new_seq = max(self._segments) + 1 if rotate else 0
        paths = {s: self._segments[s].path for s in {e.seq for _, e, _ in reads}}
        try:
            written, new_seg = await trio.to_thread.run_sync(
                self._io_batch, items, reads, tail, paths, new_seq, sync)
        except _IOFailure as exc:
            self._stats["write_errors"] += 1
            if exc.fatal:
                self._broken = str(exc)
                logger.error("write-ahead log: %s; refusing further writes", exc)
            else:
                logger.error("write-ahead log: %s", exc)
            for c in {r[0] for r in reads}:
                c.aborted = True
            self._copies = deque(c for c in self._copies if not c.aborted)
            for i in items:
                if (m := self._msgs.get(i.id)) is None:
                    continue
                if i.kind == _BODY:
                    m.failed = True
                elif i.kind == _ACCEPT:
                    m.accept_queued = False
                    m.failed = True
                elif i.kind == _FINISH:
                    m.finishing = False
            ticket.error = exc
            ticket.event.set()
            self._body_bytes -= body_bytes
            self._space.unpark_all()
            if self._broken:
                self._fail_queue(StoreError(f"the log refuses writes: {self._broken}"))
            return
        if new_seg is not None:
            self._segments[new_seg.seq] = new_seg
            self._active = new_seg
            self._maintain_needed = True
        self._apply(written)
        self._stats["batches"] += 1
        self._stats["records"] += len(written)
        ticket.event.set()
        self._body_bytes -= body_bytes
        self._space.unpark_all()

    def _io_batch(self, items, reads, tail, paths, new_seq, sync):
        """Worker thread: (rotate), read copy sources, writev, fdatasync."""
        active = self._active
        files = self._files
        new_seg = None
        try:
            if new_seq:
                if self._dirty:
                    # The old segment must be whole before the next one starts.
                    files.fdatasync(self._fd)
                    self._dirty = False
                new_seg = self._create_segment(new_seq)
                active = new_seg
        except OSError as exc:
            raise _IOFailure(exc, True, "cannot start a new segment") from exc
        written: list[_Item] = []
        try:
            if reads:
                fds = dict(zip(paths, _open_all(files, list(paths.values()))))
                try:
                    for copy, ext, offset in reads:
                        data = _pread_exact(files, fds[ext.seq], ext.length, ext.pos)
                        written.append(_Item(_BODY, copy.id, Body(copy.id, offset, data)
                                             .to_payload(), offset=offset,
                                             length=ext.length, copy=copy))
                finally:
                    for fd in fds.values():
                        files.close(fd)
        except OSError as exc:
            raise _IOFailure(exc, False, "cannot read a segment for compaction") from exc
        written.extend(tail)
        written.extend(items)
        start = pos = active.size
        parts = []
        seq = active.seq
        for it in written:
            it.pos = pos
            it.seq = seq
            pos += it.frame_len
            parts.append(it.header)
            parts.append(it.payload)
        try:
            _write_all(files, self._fd, parts)
        except OSError as exc:
            try:
                files.ftruncate(self._fd, start)
            except OSError:
                raise _IOFailure(exc, True, "write failed and could not be undone") from exc
            raise _IOFailure(exc, False, "write failed") from exc
        active.size = pos
        self._dirty = True
        self._stats["bytes_written"] += pos - start
        if sync:
            t0 = time.monotonic()
            try:
                files.fdatasync(self._fd)
            except OSError as exc:
                # After a failed fsync the page cache state is unknown: stop.
                raise _IOFailure(exc, True, "fdatasync failed") from exc
            self._dirty = False
            self._stats["fsyncs"] += 1
            self._stats["last_fsync_latency"] = time.monotonic() - t0
        return written, new_seg

    def _apply(self, written: list[_Item]) -> None:
        """Apply written frames to memory, in file order (as a replay would)."""
        msgs = self._msgs
        for it in written:
            m = msgs.get(it.id)
            if m is None:
                continue
            seq = it.seq
            m.all_segs.add(seq)
            if m.finished:
                continue
            was_live, weight = m.accept is not None, _weight(m)
            kind = it.kind
            frame_len = it.frame_len
            if kind == _BODY:
                ext = _Extent(seq, it.pos + frame_len - it.length, it.length, frame_len)
                if it.copy is not None:
                    it.copy.new_extents.append(ext)
                else:
                    m.add_body(it.offset, ext)
            elif kind == _ACCEPT:
                if it.copy is not None:
                    m.set_body(it.copy.new_extents)
                    m.rec_segs = {seq}
                    self._maintain_needed = True
                else:
                    m.add_accept(it.record, seq)
            elif kind == _UPDATE:
                if it.copy is None:
                    m.updates.append(it.record)
                m.rec_segs.add(seq)
            else:
                m.add_finish(seq)
                self._maintain_needed = True
            self._live_ids += (m.accept is not None and not m.finished) - was_live
            self._live_total += _weight(m) - weight
            it.payload = b""  # let body data go

    # --------------------------------------------------- reclaim, compaction

    def _live_bytes(self) -> int:
        return self._live_total

    def _recount(self) -> tuple[int, int]:
        """(live ids, live bytes) counted from scratch; kept up to date from then on."""
        live = [m for m in self._msgs.values() if not m.finished]
        return (sum(1 for m in live if m.accept is not None), sum(_weight(m) for m in live))

    def _plan_copy(self):
        """Next compaction step: up to COPY_CHUNK of source extents, and the
        Accept + updates of a message whose body is all planned."""
        reads = []
        tail: list[_Item] = []
        budget = COPY_CHUNK
        while self._copies and budget > 0 and not self._closing:
            c = self._copies[0]
            m = self._msgs.get(c.id)
            if m is None or m.finished or m.finishing or c.aborted:
                self._copies.popleft()
                continue
            while c.src and budget > 0:
                ext = c.src.popleft()
                reads.append((c, ext, c.planned))
                c.planned += ext.length
                budget -= ext.length
            if c.src:
                break
            # Snapshot of the updates as of now; anything queued later lands after it.
            tail.append(_Item(_ACCEPT, c.id, m.accept.to_payload(), record=m.accept, copy=c))
            for u in m.updates:
                tail.append(_Item(_UPDATE, c.id, u.to_payload(), record=u, copy=c))
            self._copies.popleft()
            self._stats["copied_messages"] += 1
        return reads, tail

    async def _maintain(self) -> None:
        """Unlink segments nobody needs; start compaction when the files are
        much larger than the live data."""
        self._maintain_needed = False
        while len(self._segments) > 1:
            needed: set[int] = set()
            for m in self._msgs.values():
                needed |= m.needed_segments()
            for c in self._copies:
                needed |= {e.seq for e in c.new_extents}
            dead = [s for s in self._segments
                    if s != self._active.seq and s not in needed and s not in self._pins]
            if not dead:
                break
            paths = [self._segments[s].path for s in dead]
            try:
                await trio.to_thread.run_sync(self._unlink_sync, paths)
            except OSError as exc:
                logger.error("write-ahead log: cannot remove old segments: %s", exc)
                return
            for s in dead:
                del self._segments[s]
            self._stats["reclaimed_segments"] += len(dead)
            gone = set(dead)
            for id, m in list(self._msgs.items()):
                if m.all_segs & gone:
                    m.all_segs -= gone
                    if m.finished and not m.all_segs:
                        del self._msgs[id]
        self._plan_compaction()

    def _unlink_sync(self, paths: list[Path]) -> None:
        for p in paths:
            try:
                self._files.unlink(p)
            except FileNotFoundError:
                pass
        # Durable before anything relies on it (a later unlink of a Finish).
        self._files.fsync(self._dir_fd)

    def _plan_compaction(self) -> None:
        if self._copies or len(self._segments) < 2:
            return
        total = sum(s.size for s in self._segments.values())
        if total <= max(2 * self._live_bytes(), 2 * self._segment_bytes):
            return
        oldest = min(self._segments)
        users = [m for m in self._msgs.values()
                 if not m.finished and oldest in m.needed_segments()]
        if not users or any(m.accept is None or m.pending for m in users):
            return  # a body still being received: try again later
        self._stats["compactions"] += 1
        self._copies.extend(_Copy(m.id, m.extents) for m in users)
        self._wake.set()


def _open_all(files: OsFiles, paths: Iterable[Path]) -> list[int]:
    fds: list[int] = []
    try:
        for p in paths:
            fds.append(files.open(p, os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            files.close(fd)
        raise
    return fds


def _read_group(files: OsFiles, group: list[tuple[int, int, int]]) -> bytes:
    """Worker thread: (fd, length, pos) pieces, joined."""
    if len(group) == 1:
        return _pread_exact(files, *group[0])
    return b"".join([_pread_exact(files, *g) for g in group])
