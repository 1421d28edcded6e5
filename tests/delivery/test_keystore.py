"""Credentials are destroyed when their message is done (B9): each message's wrapped key lives in
its own file outside the log, and unlinking that file shreds the credentials the log still holds.

Real files throughout: the log in tmp_path, the key store beside it, the device key; the upstream
is a scripted SMTP server on memory streams (tests/delivery/test_relay.py)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from firmware import durable
from firmware.credentials import CredentialsError, KeyDestroyed, KeyStore, Vault
from firmware.qmgr import HoldQueue
from firmware.relay import Relay
from firmware.routes import Route, Router
from firmware.wal import Log
from tests.delivery.test_relay import MESSAGE, FakeUpstream

IP = "192.168.1.5"
USER, PASSWORD = "alice@lan.example", "hunter2-Pässword"
AUTH_TOKEN = b"AUTH PLAIN AGFsaWNlQGxhbi5leGFtcGxlAGh1bnRlcjItUMOkc3N3b3Jk"  # \0USER\0PASSWORD


class Gateway:
    def __init__(self, data: Path, store: Log, recovered: dict, queue: HoldQueue,
                 keys: KeyStore, vault: Vault, upstream: FakeUpstream) -> None:
        self.data, self.store, self.recovered = data, store, recovered
        self.queue, self.keys, self.vault, self.upstream = queue, keys, vault, upstream

    async def submit(self, *, hold: bool, sender: str = "s@lan.example",
                     with_credentials: bool = True) -> bytes:
        id = os.urandom(16)
        await self.store.write_body(id, 0, MESSAGE)
        sealed = self.vault.seal(id, USER, PASSWORD) if with_credentials else None
        await self.queue.accept(id, client_ip=IP, sender=sender, recipients=("a@ext.example",),
                                summary={}, size=len(MESSAGE), hold=hold, mail_options={},
                                credentials=sealed)
        return id

    async def until_finished(self, id: bytes) -> None:
        with trio.fail_after(30):
            while self.queue.is_pending(id):
                await trio.sleep(0.01)


@asynccontextmanager
async def gateway(data: Path, route: Route | None = None):
    """The store, queue, key store and relay as the gateway wires them, on `data`."""
    route = route or Route("upstream.example", 25, "none", "gw.example")
    store, recovered = await Log.open(data / "store")
    keys = await trio.to_thread.run_sync(KeyStore.open, data / "keys")
    vault = await trio.to_thread.run_sync(Vault.load_or_create, data / "credentials.key")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        queue = HoldQueue(store, hold_seconds=3600, max_messages=100, max_bytes=10**8, keys=keys)
        queue.recover(recovered, "hold")
        await queue.remove_orphan_keys()
        upstream = FakeUpstream(nursery)
        relay = Relay(queue, router=Router(default=route), retry_seconds=600, now=queue._now,
                      connect=upstream.connect, vault=vault, keys=keys, hostname="gw.example")
        await nursery.start(relay.run)
        await nursery.start(queue.run)
        try:
            yield Gateway(data, store, recovered, queue, keys, vault, upstream)
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await store.aclose()


def key_files(data: Path) -> set[str]:
    return {p.name for p in (data / "keys").iterdir()}


async def test_the_key_file_is_private_while_held_and_gone_after_delivery(tmp_path):
    async with gateway(tmp_path) as gw:
        id = await gw.submit(hold=True)
        key = tmp_path / "keys" / id.hex()
        assert key_files(tmp_path) == {id.hex()}
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
        wrapped = key.read_bytes()

    # What the log holds, read back by a restart: the sealed credentials without their key.
    async with gateway(tmp_path) as gw:
        sealed = gw.recovered[id].accept.meta["cred"]
        assert "key" not in sealed
        assert key_files(tmp_path) == {id.hex()}  # a held message keeps its key over a restart
        with pytest.raises(KeyDestroyed):
            gw.vault.open(id, sealed)  # the log and the device key alone do not open it
        assert gw.vault.open(id, sealed, wrapped) == (USER, PASSWORD)
        assert await gw.queue.send_now(id, IP)
        await gw.until_finished(id)
        assert gw.upstream.auth == [AUTH_TOKEN]  # delivered with the client's own password
        assert key_files(tmp_path) == set()

        # Gone for good: no file under the data dir holds the wrapped key any more, so nothing
        # there opens the log's sealed credentials, even with the device key.
        assert await gw.keys.wrapped_key(id) is None
        candidates = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert any(p.suffix == ".wal" for p in candidates)
        for path in candidates:
            content = path.read_bytes()
            assert wrapped not in content, path
            with pytest.raises(CredentialsError):
                gw.vault.open(id, sealed, content)
        with pytest.raises(KeyDestroyed):
            gw.vault.open(id, sealed)


async def test_the_key_file_is_gone_after_cancel(tmp_path):
    async with gateway(tmp_path) as gw:
        id = await gw.submit(hold=True)
        kept = await gw.submit(hold=True)
        assert key_files(tmp_path) == {id.hex(), kept.hex()}
        assert await gw.queue.cancel(id, IP)
        assert key_files(tmp_path) == {kept.hex()}
        assert gw.upstream.received == []


async def test_the_key_file_is_gone_after_a_bounce_sent_with_the_same_credentials(tmp_path):
    async with gateway(tmp_path) as gw:
        gw.upstream.rcpt = lambda address: "550 5.1.1 No such user"
        id = await gw.submit(hold=False)
        await gw.until_finished(id)
        assert len(gw.upstream.bounces()) == 1
        assert gw.upstream.auth == [AUTH_TOKEN, AUTH_TOKEN]  # the delivery, then the bounce
        assert key_files(tmp_path) == set()


async def test_mail_without_auth_has_no_key_file(tmp_path):
    async with gateway(tmp_path) as gw:
        id = await gw.submit(hold=True, with_credentials=False)
        assert key_files(tmp_path) == set()
        assert "cred" not in gw.queue._messages[id].meta()


async def test_boot_removes_the_key_files_of_messages_not_held(tmp_path):
    async with gateway(tmp_path) as gw:
        held = await gw.submit(hold=True)
    never_accepted = os.urandom(16).hex()
    (tmp_path / "keys" / never_accepted).write_bytes(os.urandom(60))
    assert key_files(tmp_path) == {held.hex(), never_accepted}
    async with gateway(tmp_path) as gw:
        assert key_files(tmp_path) == {held.hex()}
        assert gw.queue.is_pending(held)


class Crash(BaseException):
    """The process dying at this point (nothing after it runs)."""


async def test_a_crash_between_the_finish_record_and_the_unlink(tmp_path, monkeypatch):
    async with gateway(tmp_path) as gw:
        id = await gw.submit(hold=True)

        async def die(self, message_id):
            raise Crash

        monkeypatch.setattr(KeyStore, "destroy", die)
        with pytest.raises(Crash):
            await gw.queue.cancel(id, IP)  # the Finish record is durable, the file is not gone
        assert key_files(tmp_path) == {id.hex()}
    monkeypatch.undo()
    async with gateway(tmp_path) as gw:
        assert id not in gw.recovered
        assert key_files(tmp_path) == set()


async def test_a_lost_key_with_route_credentials_delivers_with_those(tmp_path, caplog):
    async with gateway(tmp_path) as gw:
        id = await gw.submit(hold=True)
    (tmp_path / "keys" / id.hex()).unlink()
    route = Route("upstream.example", 25, "none", "gw.example", None, "relay", "relay-pw")
    async with gateway(tmp_path, route) as gw:
        assert await gw.queue.send_now(id, IP)
        await gw.until_finished(id)
        assert gw.upstream.auth == [b"AUTH PLAIN AHJlbGF5AHJlbGF5LXB3"]  # \0relay\0relay-pw
        assert gw.upstream.deliveries() == [("s@lan.example", ["a@ext.example"])]
        assert gw.upstream.bounces() == []
    assert "credentials are gone" in caplog.text


async def test_a_lost_key_without_route_credentials_fails_for_good_with_a_bounce(
        tmp_path, caplog):
    async with gateway(tmp_path) as gw:
        id = await gw.submit(hold=True)
    (tmp_path / "keys" / id.hex()).unlink()
    with caplog.at_level(logging.ERROR, "matte.relay"):
        async with gateway(tmp_path) as gw:
            assert await gw.queue.send_now(id, IP)
            await gw.until_finished(id)
            assert gw.upstream.deliveries() == []
            [bounce] = gw.upstream.bounces()
            assert "credentials are gone" in bounce.as_string()
            assert gw.upstream.auth == []  # the lost credentials are not guessed at
    assert f"message {id.hex()}: its sender's credentials are gone" in caplog.text


async def test_a_refused_accept_leaves_no_key_file(tmp_path):
    async with gateway(tmp_path) as gw:
        id = os.urandom(16)

        async def broken(record):
            raise OSError(5, "Input/output error")

        gw.store.commit = broken
        with pytest.raises(OSError):
            await gw.queue.accept(id, client_ip=IP, sender="s@lan.example",
                                  recipients=("a@ext.example",), summary={}, size=1, hold=True,
                                  mail_options={}, credentials=gw.vault.seal(id, USER, PASSWORD))
        assert key_files(tmp_path) == set()


async def test_destroying_many_keys_at_once_shares_directory_syncs(tmp_path, monkeypatch):
    keys = KeyStore.open(tmp_path / "keys")
    vault = Vault.load_or_create(tmp_path / "credentials.key")
    ids = [os.urandom(16) for _ in range(20)]
    for id in ids:
        await keys.keep(id, vault.seal(id, USER, PASSWORD))
    release = threading.Event()
    syncs = []
    real_sync = durable.fsync_directory

    def held_sync(directory):
        syncs.append(len(os.listdir(directory)))
        release.wait(10)  # the first sync lasts until every unlink is done
        real_sync(directory)

    monkeypatch.setattr(durable, "fsync_directory", held_sync)
    async with trio.open_nursery() as nursery:
        for id in ids:
            nursery.start_soon(keys.destroy, id)
        with trio.fail_after(10):
            while os.listdir(tmp_path / "keys"):
                await trio.sleep(0.01)
        release.set()
    # Every unlink is covered by a sync that started after it; 20 unlinks, at most 2 syncs.
    assert syncs[-1] == 0 and len(syncs) <= 2
