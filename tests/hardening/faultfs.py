"""A fault-injecting, in-memory file layer for the write-ahead log.

It stands in for ``firmware.wal._files.OsFiles`` and models what a disk keeps
after a power cut, in the manner of SQLite's crash tests and the ALICE study:

* file data written since the file's last fsync/fdatasync is volatile: after a
  crash each such write may be kept, dropped, replaced by garbage, or torn;
* a name created or removed since the directory's last fsync is volatile too:
  a create may vanish, an unlink may come undone.

Every mutating call is a *crash point*: the layer records, just before it, a
snapshot of what is durable and what is still volatile (cheap: durable bytes
are shared, volatile writes are a list of immutable pieces). ``crash_states``
turns one snapshot into the disk images a crash there may leave behind.

It also injects errors: ``faults["fdatasync"] = errno.EIO`` makes every later
fdatasync fail that way, until the key is removed.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WRITE, SYNC, DIRSYNC, TRUNCATE, CREATE, UNLINK = (
    "write", "fdatasync", "fsync", "ftruncate", "create", "unlink")


class _Inode:
    __slots__ = ("number", "data", "durable", "volatile")

    def __init__(self, number: int, data: bytes = b"") -> None:
        self.number = number
        self.data = bytearray(data)
        self.durable = bytes(data)
        self.volatile: list[tuple] = []  # ("w", offset, bytes) | ("t", length), in order


@dataclass(frozen=True)
class Snapshot:
    """The disk as a crash just before call ``index`` (of ``kind``) would leave it."""

    index: int
    kind: str
    mark: object  # the caller's acknowledgement count(s) when the call was made
    durable_names: dict[str, int]
    volatile_names: tuple  # ("create" | "unlink", name, inode number), in order
    inodes: dict[int, tuple[bytes, tuple]]  # number -> (durable data, volatile writes)


class FaultFiles:
    def __init__(self, files: dict[str, bytes] | None = None, *,
                 mark: Callable[[], object] = lambda: 0, record: bool = False) -> None:
        """``files``: full path -> contents, all durable (a disk after a reboot)."""
        self._lock = threading.RLock()
        self._next_inode = 0
        self._names: dict[str, _Inode] = {}
        self._durable_names: dict[str, _Inode] = {}
        self._volatile_names: list[tuple[str, str, _Inode]] = []
        self._fds: dict[int, tuple] = {}
        self._next_fd = 1000
        self.mark = mark
        self.record = record
        self.snapshots: list[Snapshot] = []
        self.calls = 0
        self.faults: dict[str, int] = {}
        self.failed: list[tuple[str, int]] = []
        for name, data in (files or {}).items():
            inode = self._new_inode(data)
            self._names[name] = self._durable_names[name] = inode

    # -- the fault and crash machinery ----------------------------------------------------------

    def _new_inode(self, data: bytes = b"") -> _Inode:
        self._next_inode += 1
        return _Inode(self._next_inode, data)

    def _point(self, kind: str) -> None:
        """Called (under the lock) before every mutating call."""
        if self.record:
            inodes = {i.number: (i.durable, tuple(i.volatile))
                      for i in {*self._names.values(), *self._durable_names.values(),
                                *(v[2] for v in self._volatile_names)}}
            self.snapshots.append(Snapshot(
                self.calls, kind, self.mark(),
                {n: i.number for n, i in self._durable_names.items()},
                tuple((op, n, i.number) for op, n, i in self._volatile_names), inodes))
        self.calls += 1
        code = self.faults.get(kind)
        if code is not None:
            self.failed.append((kind, code))
            raise OSError(code, os.strerror(code))

    def final_snapshot(self) -> None:
        """One more crash point after the last call (the clean end of the run)."""
        with self._lock:
            self._point("end")

    def files(self) -> dict[str, bytes]:
        """What is visible now (as a clean shutdown would leave it)."""
        with self._lock:
            return {n: bytes(i.data) for n, i in self._names.items()}

    # -- OsFiles --------------------------------------------------------------------------------

    def mkdir(self, path: Path) -> None:
        pass  # the store directory is part of the model's root

    def listdir(self, path: Path) -> list[str]:
        prefix = str(path).rstrip("/") + "/"
        with self._lock:
            return [n[len(prefix):] for n in self._names
                    if n.startswith(prefix) and "/" not in n[len(prefix):]]

    def lock(self, fd: int) -> None:
        pass

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        name = str(path)
        with self._lock:
            if flags & os.O_DIRECTORY:
                kind, inode = "dir", None
            else:
                kind = "file"
                inode = self._names.get(name)
                if inode is not None and flags & os.O_CREAT and flags & os.O_EXCL:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name)
                if inode is None:
                    if not flags & os.O_CREAT:
                        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
                    self._point(CREATE)
                    inode = self._names[name] = self._new_inode()
                    self._volatile_names.append(("create", name, inode))
            fd = self._next_fd
            self._next_fd += 1
            self._fds[fd] = (kind, name, inode, bool(flags & os.O_APPEND))
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            del self._fds[fd]

    def _file(self, fd: int) -> tuple:
        entry = self._fds.get(fd)
        if entry is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return entry

    def pread(self, fd: int, length: int, pos: int) -> bytes:
        with self._lock:
            return bytes(self._file(fd)[2].data[pos : pos + length])

    def writev(self, fd: int, buffers) -> int:
        data = b"".join(bytes(b) for b in buffers)
        with self._lock:
            kind, name, inode, append = self._file(fd)
            self._point(WRITE)
            offset = len(inode.data) if append else 0  # the log only appends
            _apply(inode.data, ("w", offset, data))
            inode.volatile.append(("w", offset, data))
            return len(data)

    def ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            inode = self._file(fd)[2]
            self._point(TRUNCATE)
            _apply(inode.data, ("t", length))
            inode.volatile.append(("t", length))

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            kind, name, inode, _ = self._file(fd)
            self._point(SYNC)
            if inode is not None:
                inode.durable = bytes(inode.data)
                inode.volatile = []

    def fsync(self, fd: int) -> None:
        with self._lock:
            kind, name, inode, _ = self._file(fd)
            self._point(DIRSYNC if kind == "dir" else SYNC)
            if kind == "dir":
                prefix = name.rstrip("/") + "/"
                for op, n, i in self._volatile_names:
                    if n.startswith(prefix):
                        if op == "create":
                            self._durable_names[n] = i
                        else:
                            self._durable_names.pop(n, None)
                self._volatile_names = [v for v in self._volatile_names
                                        if not v[1].startswith(prefix)]
            else:
                inode.durable = bytes(inode.data)
                inode.volatile = []

    def unlink(self, path: Path) -> None:
        name = str(path)
        with self._lock:
            inode = self._names.get(name)
            if inode is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
            self._point(UNLINK)
            del self._names[name]
            self._volatile_names.append(("unlink", name, inode))


def _apply(buf: bytearray, op: tuple) -> None:
    if op[0] == "t":
        del buf[op[1]:]
        return
    _, offset, data = op
    if len(buf) < offset:
        buf += bytes(offset - len(buf))  # a hole reads as zeros
    buf[offset : offset + len(data)] = data


# -- crash states -------------------------------------------------------------------------------

KEEP, DROP, GARBAGE, TORN = "keep", "drop", "garbage", "torn"


def materialize(snap: Snapshot, write_fate, name_kept, rng: random.Random) -> dict[str, bytes]:
    """The disk image for one choice of fates: ``write_fate(inode, index, op)`` gives
    KEEP, DROP, GARBAGE or TORN for each volatile write; ``name_kept(index, op)`` says
    whether each volatile create/unlink reached the disk."""
    names = dict(snap.durable_names)
    for k, (op, name, number) in enumerate(snap.volatile_names):
        if name_kept(k, op):
            if op == "create":
                names[name] = number
            else:
                names.pop(name, None)
    image = {}
    for name, number in names.items():
        durable, volatile = snap.inodes[number]
        buf = bytearray(durable)
        for j, op in enumerate(volatile):
            fate = write_fate(number, j, op)
            if fate == DROP:
                if op[0] == "w" and len(buf) < op[1]:
                    continue
                continue
            if op[0] == "w" and fate == GARBAGE:
                op = ("w", op[1], rng.randbytes(len(op[2])))
            elif op[0] == "w" and fate == TORN:
                op = ("w", op[1], op[2][: rng.randrange(len(op[2]))] if op[2] else b"")
            _apply(buf, op)
        image[name] = bytes(buf)
    return image


def crash_states(snap: Snapshot, rng: random.Random, random_variants: int = 3):
    """(label, image) pairs for one crash point: the named cases of the issue, then
    ``random_variants`` random mixtures of them."""
    last_write = None
    for number, (_, volatile) in snap.inodes.items():
        for j, op in enumerate(volatile):
            if op[0] == "w":
                last_write = (number, j)  # inodes are visited in creation order
    all_names = lambda k, op: True  # noqa: E731
    yield "only synced data", materialize(snap, lambda *a: DROP, lambda k, op: False, rng)
    yield "every write kept", materialize(snap, lambda *a: KEEP, all_names, rng)
    yield "names not synced vanish", materialize(
        snap, lambda *a: KEEP, lambda k, op: op == "unlink", rng)
    yield "unlinks not synced undone", materialize(
        snap, lambda *a: KEEP, lambda k, op: op == "create", rng)
    if last_write is not None:
        for label, fate in (("last write torn", TORN), ("last write garbage", GARBAGE),
                            ("last write dropped", DROP)):
            yield label, materialize(
                snap, lambda n, j, op, fate=fate: fate if (n, j) == last_write else KEEP,
                all_names, rng)
    for _ in range(random_variants):
        fates = {}

        def fate(n, j, op):
            if (n, j) not in fates:
                fates[(n, j)] = rng.choice((KEEP, KEEP, DROP, GARBAGE, TORN))
            return fates[(n, j)]

        kept = {}
        yield "random mixture", materialize(
            snap, fate, lambda k, op: kept.setdefault(k, rng.random() < 0.5), rng)
