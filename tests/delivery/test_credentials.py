"""Credentials at rest (B9): sealed per message, opened only with the device key and the id."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest

from firmware.credentials import CredentialsError, Vault

ID = bytes(range(16))
OTHER_ID = bytes(range(1, 17))


def vault(tmp_path) -> Vault:
    return Vault.load_or_create(tmp_path / "credentials.key")


def test_sealed_credentials_open_with_the_same_key_and_id(tmp_path):
    v = vault(tmp_path)
    sealed = v.seal(ID, "alice@example.com", "correct horse")
    assert v.open(ID, sealed) == ("alice@example.com", "correct horse")
    # The same device key, read back from its file, opens it too (a restart).
    assert vault(tmp_path).open(ID, sealed) == ("alice@example.com", "correct horse")


def test_sealed_credentials_hold_no_byte_of_the_password(tmp_path):
    sealed = vault(tmp_path).seal(ID, "alice", "pässword-123")
    stored = msgpack.packb(sealed)
    for needle in (b"alice", "pässword-123".encode(), b"\0alice\0"):
        assert needle not in stored


def test_each_message_gets_its_own_key(tmp_path):
    v = vault(tmp_path)
    one, two = v.seal(ID, "u", "p"), v.seal(ID, "u", "p")
    assert one["key"] != two["key"] and one["data"] != two["data"]


def test_another_message_id_or_device_key_or_a_flipped_bit_does_not_open(tmp_path):
    v = vault(tmp_path)
    sealed = v.seal(ID, "u", "secret")
    with pytest.raises(CredentialsError):
        v.open(OTHER_ID, sealed)
    with pytest.raises(CredentialsError):
        Vault(os.urandom(32)).open(ID, sealed)
    for field in ("key", "data"):
        damaged = bytearray(sealed[field])
        damaged[-1] ^= 1
        with pytest.raises(CredentialsError):
            v.open(ID, {**sealed, field: bytes(damaged)})
    for broken in ({}, {"v": 2}, {**sealed, "key": b"short"}, {**sealed, "data": 7}):
        with pytest.raises(CredentialsError):
            v.open(ID, broken)


def test_the_device_key_file_is_private_and_outside_the_store(tmp_path):
    vault(tmp_path)
    key = tmp_path / "credentials.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.stat().st_size == 32
    key.chmod(0o644)
    vault(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # put right on load
    key.write_bytes(b"not a key")
    with pytest.raises(CredentialsError):
        vault(tmp_path)
