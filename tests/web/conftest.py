"""A fake hold queue and a real serve_web on loopback, with a small h11 client."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field, replace

import h11
import pytest
import trio

from firmware.web import WebApp, serve_web

SECRET = b"test secret, not for production"


@dataclass(frozen=True)
class Held:
    id: bytes
    client_ip: str
    sender: str
    from_: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc_count: int
    subject: str
    size: int
    received_at: float
    release_at: float


@dataclass
class FakeQueue:
    """Implements the HoldQueue methods the web server may call, and records actions."""

    items: dict[bytes, Held] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"accepted": 5, "released": 2, "cancelled": 1})
    max_messages: int = 500
    max_bytes: int = 200 * 1024 * 1024
    fail: bool = False
    version: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    clock_offset: float = 0.0  # the gateway's wall clock against this machine's

    def now(self) -> float:
        return time.time() + self.clock_offset

    def add(self, client_ip: str, subject: str = "Quarterly report", **kw) -> Held:
        now = kw.pop("received_at", 1_700_000_000.0 + len(self.items))
        held = Held(
            id=kw.pop("id", os.urandom(16)),
            client_ip=client_ip,
            sender=kw.pop("sender", "alice@example.com"),
            from_=kw.pop("from_", "Alice <alice@example.com>"),
            to=kw.pop("to", ("bob@example.net",)),
            cc=kw.pop("cc", ()),
            bcc_count=kw.pop("bcc_count", 0),
            subject=subject,
            size=kw.pop("size", 2048),
            received_at=now,
            release_at=kw.pop("release_at", now + 300),
        )
        assert not kw, kw
        self.items[held.id] = held
        return held

    def _mine(self, id: bytes, ip: str) -> Held | None:
        held = self.items.get(id)
        return held if held is not None and held.client_ip == ip else None

    def held_for(self, ip: str) -> list[Held]:
        if self.fail:
            raise RuntimeError("queue broke")
        return sorted((h for h in self.items.values() if h.client_ip == ip), key=lambda h: h.received_at)

    async def cancel(self, id: bytes, ip: str) -> bool:
        self.calls.append(("cancel", id, ip))
        if self._mine(id, ip) is None:
            return False
        del self.items[id]
        return True

    async def send_now(self, id: bytes, ip: str) -> bool:
        self.calls.append(("send_now", id, ip))
        if self._mine(id, ip) is None:
            return False
        del self.items[id]
        return True

    async def extend(self, id: bytes, ip: str, seconds: int) -> bool:
        self.calls.append(("extend", id, ip, seconds))
        held = self._mine(id, ip)
        if held is None:
            return False
        self.items[id] = replace(held, release_at=held.release_at + seconds)
        return True

    def store_status(self) -> dict:
        return {
            "messages": len(self.items),
            "bytes": sum(h.size for h in self.items.values()),
            "max_messages": self.max_messages,
            "max_bytes": self.max_bytes,
        }

    def statistics(self) -> dict:
        return dict(self.stats)

    @property
    def change_version(self) -> int:
        return self.version

    async def wait_changed(self, seen: int) -> int:
        while self.version == seen:
            await self.changed.wait()
        return self.version

    def notify(self) -> None:
        """What the real queue does after every change."""
        self.version += 1
        self.changed.set()
        self.changed = trio.Event()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


async def connect(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port from the given source address."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_reply(stream: trio.SocketStream, conn: h11.Connection) -> Reply:
    status, headers, body = None, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, bytes(body))
        else:
            raise AssertionError(f"unexpected {event!r}")


async def send_request(
    stream: trio.SocketStream,
    conn: h11.Connection,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> None:
    hdrs = list((headers or {}).items())
    if not any(k.lower() == "host" for k, _ in hdrs):
        hdrs.insert(0, ("Host", "matte.test"))
    if body or method == "POST":
        hdrs.append(("Content-Length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=path, headers=hdrs))
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    source: str = "127.0.0.1",
) -> Reply:
    stream = await connect(port, source)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        with trio.fail_after(10):
            await send_request(stream, conn, method, path, headers, body)
            return await read_reply(stream, conn)


async def raw_exchange(port: int, data: bytes, *, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes, read until the server closes."""
    stream = await connect(port, source)
    got = bytearray()
    async with stream:
        with trio.fail_after(10):
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                got += chunk
    return bytes(got)


def make_app(queue, **kwargs) -> WebApp:
    kwargs.setdefault("names", ("matte.test",))
    return WebApp(queue, SECRET, **kwargs)


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
async def port(nursery, queue) -> int:
    bound = await nursery.start(serve_web, [("127.0.0.1", 0)], make_app(queue))
    assert len(bound) == 1 and bound[0][0] == "127.0.0.1"
    return bound[0][1]
