"""The file operations the log performs, behind one small object.

The log calls these and nothing else on the file system, so a test can put a
fault-injecting layer under it (crash states, failing fsync, a full disk).
Each method is one system call; the names and arguments are those of ``os``,
looked up on every call so the real path stays a plain system call.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class OsFiles:
    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def lock(self, fd: int) -> None:
        """An exclusive lock, or BlockingIOError when another process holds it."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, length: int, pos: int) -> bytes:
        return os.pread(fd, length, pos)

    def writev(self, fd: int, buffers) -> int:
        return os.writev(fd, buffers)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def unlink(self, path: Path) -> None:
        os.unlink(path)


OS_FILES = OsFiles()
