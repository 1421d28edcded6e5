"""A client's upstream credentials at rest (B9), destroyed by deleting one small file.

Each message that came with AUTH gets its own random key; the username and password are sealed
with it (AES-GCM), and that key is itself sealed ("wrapped") with the device key. The message id
is the associated data of both, so a sealed blob copied onto another message does not open.

Where each part lives:
- the device key: `DATA_DIR/credentials.key` (mode 0600), outside the log directory;
- the wrapped message key: `DATA_DIR/keys/<hex id>` (mode 0600, directory 0700), one file per
  message, kept by `KeyStore`; written and made durable (the file, then the directory) before
  the message's Accept record is committed;
- the sealed username and password: in the log's Accept record, and nothing else of them.

Destruction is crypto-shredding: when the message is delivered, cancelled, bounced or failed,
its Finish record is committed first, then its key file is unlinked and the directory synced.
From then on the log, even with the device key, no longer opens the credentials, however long
the log keeps the record before reclaiming its segment. On boot, key files of messages that
were not recovered (finished just before a crash, or never accepted) are removed.

A recovered message whose key file is missing (lost, or removed by hand) raises `KeyDestroyed`
when opened. Delivery then goes on with the route's own configured credentials if it has some;
if it has none, the message fails for good (`554 5.7.0`, logged as "credentials are gone") and
its sender gets a bounce, sent without the lost credentials. The plaintext password is never
written anywhere.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import msgpack
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from firmware import durable

log = logging.getLogger("matte.credentials")

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM nonce size (NIST SP 800-38D)
FORMAT = 1


class CredentialsError(Exception):
    """Sealed credentials that do not open (another device key, or altered bytes)."""


class KeyDestroyed(CredentialsError):
    """The message's wrapped key is gone from the key store: its credentials are shredded."""


class Vault:
    """Seals and opens credentials with the device key; holds no other secret."""

    def __init__(self, device_key: bytes) -> None:
        if len(device_key) != KEY_BYTES:
            raise ValueError(f"the device key must be {KEY_BYTES} bytes")
        self._device = AESGCM(device_key)

    @classmethod
    def load_or_create(cls, path: Path) -> "Vault":
        """The device key at `path`, made on first use (blocking: call in a thread)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return cls(_create_key(path))
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o): set to 0600", path, mode)
                os.fchmod(f.fileno(), 0o600)
            key = f.read()
        if len(key) != KEY_BYTES:
            raise CredentialsError(f"{path}: not a device key ({len(key)} bytes)")
        return cls(key)

    def seal(self, message_id: bytes, username: str, password: str) -> dict:
        """What the store keeps for one message: opaque without the device key."""
        message_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        secret = msgpack.packb([username, password])
        return {
            "v": FORMAT,
            "key": _encrypt(self._device, message_key, message_id),
            "data": _encrypt(AESGCM(message_key), secret, message_id),
        }

    def open(self, message_id: bytes, sealed: dict,
             wrapped_key: bytes | None = None) -> tuple[str, str]:
        """The (username, password) sealed for `message_id`; CredentialsError if they do not open.

        `wrapped_key` is the message's key file; without it the key must be in `sealed` (records
        written before the key store existed), else KeyDestroyed."""
        try:
            if sealed.get("v") != FORMAT:
                raise CredentialsError(f"unknown sealed-credentials format {sealed.get('v')!r}")
            if wrapped_key is None:
                wrapped_key = sealed.get("key")
            if wrapped_key is None:
                raise KeyDestroyed("the message's key was destroyed")
            message_key = _decrypt(self._device, wrapped_key, message_id)
            username, password = msgpack.unpackb(
                _decrypt(AESGCM(message_key), sealed["data"], message_id), raw=False)
        except CredentialsError:
            raise
        except (InvalidTag, KeyError, TypeError, ValueError, AttributeError,
                msgpack.UnpackException) as exc:
            raise CredentialsError(f"sealed credentials do not open: "
                                   f"{type(exc).__name__}") from None
        if not isinstance(username, str) or not isinstance(password, str):
            raise CredentialsError("sealed credentials do not hold a username and a password")
        return username, password


class KeyStore:
    """The wrapped key of each held message that came with AUTH, one small file each, outside
    the log: unlinking the file destroys the message's credentials (B9).

    Blocking file work runs in worker threads. Directory syncs are shared: one fsync covers
    every file created or unlinked before it started, so many messages finishing together cost
    one sync of the directory, not one each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._done = 0  # creations and unlinks finished so far (tickets)
        self._synced = 0  # the directory is durable up to this ticket
        self._syncing: trio.Event | None = None

    @classmethod
    def open(cls, directory: Path) -> "KeyStore":
        """The key store at `directory` (mode 0700), made on first use (blocking)."""
        directory.mkdir(mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode != 0o700:
            log.warning("%s had mode %o: set to 0700", directory, mode)
            directory.chmod(0o700)
        return cls(directory)

    def path(self, message_id: bytes) -> Path:
        return self.directory / message_id.hex()

    async def keep(self, message_id: bytes, sealed: dict) -> dict:
        """Make the wrapped key of `sealed` durable in its own file; returns what the log may
        keep (the sealed credentials without the key). Call before the Accept record."""
        if "key" not in sealed:
            return sealed
        await trio.to_thread.run_sync(durable.write_file, self.path(message_id), sealed["key"],
                                      0o600)
        await self._sync_directory()
        return {k: v for k, v in sealed.items() if k != "key"}

    async def wrapped_key(self, message_id: bytes) -> bytes | None:
        """The message's wrapped key, or None once it is destroyed (or was never kept)."""
        try:
            return await trio.to_thread.run_sync(self.path(message_id).read_bytes)
        except FileNotFoundError:
            return None

    async def destroy(self, message_id: bytes) -> None:
        """Unlink the message's key file and sync the directory. Call after its Finish record.
        A failure is logged, not raised: the message is finished, and the next boot removes
        the file."""
        try:
            await trio.to_thread.run_sync(_unlink, self.path(message_id))
            await self._sync_directory()
        except OSError as exc:
            log.error("key of message %s not destroyed yet (done on next boot): %s",
                      message_id.hex(), exc)

    def remove_all_but(self, kept: set[bytes]) -> int:
        """Boot: remove every key file but those of `kept` (the recovered messages), i.e. keys
        of messages finished before a crash or never accepted. Blocking; returns how many."""
        names = {id.hex() for id in kept}
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.name not in names and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        if removed:
            durable.fsync_directory(self.directory)
            log.info("removed %d key file(s) of messages no longer held", removed)
        return removed

    async def _sync_directory(self) -> None:
        self._done += 1
        ticket = self._done
        while self._synced < ticket:
            if self._syncing is not None:
                await self._syncing.wait()  # a sync already running may not cover this ticket
                continue
            self._syncing = syncing = trio.Event()
            covered = self._done
            try:
                await trio.to_thread.run_sync(durable.fsync_directory, self.directory)
                self._synced = max(self._synced, covered)
            finally:
                self._syncing = None
                syncing.set()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _encrypt(aead: AESGCM, data: bytes, message_id: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, data, message_id)


def _decrypt(aead: AESGCM, blob: bytes, message_id: bytes) -> bytes:
    if not isinstance(blob, bytes) or len(blob) <= NONCE_BYTES:
        raise ValueError("sealed value too short")
    return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], message_id)


def _create_key(path: Path) -> bytes:
    key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
    tmp = path.with_name(path.name + ".new")
    durable.write_file(tmp, key, 0o600)
    # Appears whole or not at all, and only once durable: a key lost after a message was sealed
    # with it would make that message's credentials unreadable.
    os.replace(tmp, path)
    durable.fsync_directory(path.parent)
    return key
