"""A client's upstream credentials at rest (B9).

Each message that came with AUTH gets its own random key; the username and password are sealed
with it (AES-GCM), and that key is itself sealed with the device key. The message id is the
associated data of both, so a sealed blob copied onto another message does not open. The device
key lives in a file of its own (mode 0600) outside the log directory: the log alone, or a copy
of it, never yields a password. When the message is done, its Finish record says so and the log's
reclaim and compaction drop the record that carried the wrapped key; the plaintext password is
never written anywhere.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("matte.credentials")

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM nonce size (NIST SP 800-38D)
FORMAT = 1


class CredentialsError(Exception):
    """Sealed credentials that do not open (another device key, or altered bytes)."""


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

    def open(self, message_id: bytes, sealed: dict) -> tuple[str, str]:
        """The (username, password) sealed for `message_id`; CredentialsError if they do not open."""
        try:
            if sealed.get("v") != FORMAT:
                raise CredentialsError(f"unknown sealed-credentials format {sealed.get('v')!r}")
            message_key = _decrypt(self._device, sealed["key"], message_id)
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    # Appears whole or not at all, and only once durable: a key lost after a message was sealed
    # with it would make that message's credentials unreadable.
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key
