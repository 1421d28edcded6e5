"""What the web handlers share: the hold queue and the per-IP token."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

__all__ = ["HoldQueueLike", "HeldLike", "WebContext", "token_for"]


class HeldLike(Protocol):
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


class HoldQueueLike(Protocol):
    """The part of the hold queue the web server uses (and nothing else)."""

    def held_for(self, ip: str) -> list[Any]: ...
    def now(self) -> float: ...
    async def cancel(self, id: bytes, ip: str) -> bool: ...
    async def send_now(self, id: bytes, ip: str) -> bool: ...
    async def extend(self, id: bytes, ip: str, seconds: int) -> bool: ...
    def store_status(self) -> dict[str, Any]: ...
    def statistics(self) -> dict[str, Any]: ...
    @property
    def change_version(self) -> int: ...
    async def wait_changed(self, seen: int) -> int: ...


def token_for(secret: bytes, ip: str) -> str:
    """The action token for `ip` (normalised): stateless, and another IP cannot guess it."""
    mac = hmac.new(secret, b"token:" + ip.encode("ascii"), hashlib.sha256)
    return mac.hexdigest()[:32]


@dataclass
class WebContext:
    queue: HoldQueueLike
    secret: bytes
    counters: dict[str, int] = field(default_factory=dict)
    ca_pem: bytes | None = None  # the device CA, offered for download (S3)

    def token_for(self, ip: str) -> str:
        return token_for(self.secret, ip)

    def token_ok(self, ip: str, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.token_for(ip).encode())

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


MAX_EXTEND_SECONDS = 86400
ACTIONS = ("cancel", "send", "extend")
_HEX = re.compile(r"[0-9a-fA-F]+")


def parse_id(text: str) -> bytes | None:
    """A message id from its hex form in a URL; None when it cannot be one."""
    # fromhex alone would also take spaces: two spellings of one id.
    if not text or len(text) > 64 or len(text) % 2 or not _HEX.fullmatch(text):
        return None
    return bytes.fromhex(text)


async def perform(ctx: WebContext, action: str, id: bytes, ip: str, seconds: int = 0) -> bool:
    """Run `action` on the caller's message; False when it is not theirs (or gone)."""
    queue = ctx.queue
    if action == "cancel":
        done = await queue.cancel(id, ip)
    elif action == "send":
        done = await queue.send_now(id, ip)
    elif action == "extend":
        done = await queue.extend(id, ip, seconds)
    else:
        raise ValueError(f"unknown action {action!r}")
    ctx.count(f"action_{action}_{'ok' if done else 'missing'}")
    return bool(done)


async def perform_all(ctx: WebContext, action: str, ip: str) -> int:
    """Cancel or send every message the caller has held; how many it was.

    All at once: their records then share the store's fsyncs (group commit) instead of
    waiting for one fsync each."""
    done: list[bool] = []

    async def one(id: bytes) -> None:
        done.append(await perform(ctx, action, id, ip))

    async with trio.open_nursery() as nursery:
        for item in ctx.queue.held_for(ip):
            nursery.start_soon(one, item.id)
    return sum(done)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Lone surrogates (undecodable bytes) become U+FFFD: they cannot be sent as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def held_to_json(item: Any) -> dict[str, Any]:
    return {
        "id": item.id.hex(),
        "sender": clean_text(item.sender),
        "from": clean_text(item.from_),
        "to": [clean_text(a) for a in item.to],
        "cc": [clean_text(a) for a in item.cc],
        "bcc_count": item.bcc_count,
        "subject": clean_text(item.subject),
        "size": item.size,
        "received_at": item.received_at,
        "release_at": item.release_at,
    }
