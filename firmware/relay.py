"""Delivery of released mail: upstream over SMTP (the sans-IO client) or into an outbox directory.

Each released message is tried at once; recipients that get a temporary failure are retried with
backoff and jitter until `retry_seconds` have passed since the release (S11). Recipients already
delivered are recorded, so neither a retry nor a restart sends to them twice.
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trio

from firmware.qmgr import Delivery, HoldQueue
from firmware.smtp import (
    CLIENT,
    NEED_DATA,
    Auth,
    Connection,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    StartTLS,
    parse_ehlo_reply,
)

log = logging.getLogger("matte.relay")

CONNECT_TIMEOUT = 30.0
# RFC 5321 4.5.3.2 client timeouts: 5 min greeting/commands, 10 min for the final reply to DATA.
REPLY_TIMEOUT = 300.0
DATA_END_TIMEOUT = 600.0
FIRST_RETRY = 30.0
MAX_RETRY_INTERVAL = 300.0
WORKERS = 8


class UpstreamError(Exception):
    """The upstream could not be reached or broke the protocol: a temporary failure."""


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    tls: str  # "none" | "starttls" | "implicit"
    username: str | None
    password: str | None
    tls_context: ssl.SSLContext | None
    helo: str


def temporary(text: str) -> Reply:
    return Reply.of(451, f"4.4.1 {text}")


class SmtpClient:
    """One upstream SMTP session, driven through the sans-IO client connection."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.conn = Connection(CLIENT)
        self.stream: trio.abc.Stream | None = None
        self.extensions: dict[str, str] = {}

    async def connect(self) -> None:
        up = self.upstream
        with trio.fail_after(CONNECT_TIMEOUT):
            self.stream = await trio.open_tcp_stream(up.host, up.port)
            if up.tls == "implicit":
                await self._start_tls()
        greeting = await self.reply()
        if greeting.code != 220:
            raise UpstreamError(f"greeting {greeting.code} {greeting.text}")
        await self._ehlo()
        if up.tls == "starttls":
            reply = await self.command(StartTLS())
            if reply.code != 220:
                raise UpstreamError(f"STARTTLS refused: {reply.code} {reply.text}")
            await self._start_tls()
            self.conn.tls_started()
            await self._ehlo()

    async def _start_tls(self) -> None:
        assert self.stream is not None and self.upstream.tls_context is not None
        self.stream = trio.SSLStream(self.stream, self.upstream.tls_context,
                                     server_hostname=self.upstream.host)
        await self.stream.do_handshake()

    async def _ehlo(self) -> None:
        reply = await self.command(Hello("EHLO", self.upstream.helo))
        if reply.code != 250:
            reply = await self.command(Hello("HELO", self.upstream.helo))
            if reply.code != 250:
                raise UpstreamError(f"HELO refused: {reply.code} {reply.text}")
            self.extensions = {}
        else:
            self.extensions = parse_ehlo_reply(reply)

    async def login(self, username: str, password: str) -> Reply:
        token = b"\0" + username.encode() + b"\0" + password.encode()
        return await self.command(Auth("PLAIN", token))

    async def send(self, event) -> None:
        assert self.stream is not None
        await self.stream.send_all(self.conn.send(event))

    async def command(self, event, timeout: float = REPLY_TIMEOUT) -> Reply:
        await self.send(event)
        return await self.reply(timeout)

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        assert self.stream is not None
        with trio.fail_after(timeout):
            while True:
                try:
                    event = self.conn.next_event()
                except RemoteProtocolError as exc:
                    raise UpstreamError(f"protocol error from upstream: {exc}") from None
                if isinstance(event, Reply):
                    return event
                if isinstance(event, ConnectionClosed):
                    raise UpstreamError("upstream closed the connection")
                assert event is NEED_DATA
                self.conn.receive_data(await self.stream.receive_some(65536))

    async def quit(self) -> None:
        if self.stream is None:
            return
        with trio.move_on_after(5):
            try:
                await self.command(Quit())
            except (UpstreamError, trio.BrokenResourceError, trio.ClosedResourceError,
                    ssl.SSLError, OSError):
                pass
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()


class Relay:
    def __init__(self, queue: HoldQueue, *, upstream: Upstream | None, outbox: Path | None,
                 retry_seconds: float, now: Callable[[], float], workers: int = WORKERS) -> None:
        assert (upstream is None) != (outbox is None)
        self.queue = queue
        self.upstream = upstream
        self.outbox = outbox
        self.retry_seconds = retry_seconds
        self.now = now
        self.workers = workers

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.outbox is not None:
            self.outbox.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        async for delivery in self.queue.deliveries:
            await self.deliver(delivery)

    # -- one message --------------------------------------------------------------------------

    async def deliver(self, d: Delivery) -> None:
        pending = d.recipients
        deadline = d.released_at + self.retry_seconds
        interval = FIRST_RETRY
        while True:
            if not self.queue.is_pending(d.id):
                return  # cancelled or finished meanwhile
            results = await self._attempt(d, pending)
            done = tuple(r for r in pending if results[r].code < 400)
            failed = {r: results[r] for r in pending if results[r].code >= 500}
            pending = tuple(r for r in pending if 400 <= results[r].code < 500)
            if pending and done:
                await self.queue.delivered(d.id, done)
            if not pending:
                if failed:
                    log.warning("message %s failed for %d recipient(s): %s", d.id.hex(),
                                len(failed), "; ".join(f"{r}: {x.code} {x.text}"
                                                       for r, x in failed.items()))
                    await self.queue.finish(d.id, "failed", failed=sorted(failed))
                else:
                    await self.queue.finish(d.id, "delivered")
                return
            remaining = deadline - self.now()
            reasons = sorted({f"{results[r].code} {results[r].text}" for r in pending})
            self.queue.note_deferred(d.id, "; ".join(reasons))
            if remaining <= 0:
                log.warning("message %s undeliverable after %d s: %s", d.id.hex(),
                            self.retry_seconds, "; ".join(reasons))
                await self.queue.finish(d.id, "failed", failed=sorted(pending + tuple(failed)))
                return
            # Jitter spreads retries so a recovering upstream is not hit by all at once.
            await trio.sleep(min(remaining, interval * random.uniform(0.8, 1.2)))
            interval = min(interval * 2, MAX_RETRY_INTERVAL)

    async def _attempt(self, d: Delivery, recipients: tuple[str, ...]) -> dict[str, Reply]:
        try:
            if self.outbox is not None:
                await self._write_outbox(d, recipients)
                return dict.fromkeys(recipients, Reply.of(250, "2.0.0 written to outbox"))
            return await self._send_upstream(d, recipients)
        except (UpstreamError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError, ssl.SSLError, ssl.CertificateError) as exc:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.info("delivery of %s deferred: %s", d.id.hex(), text)
            return dict.fromkeys(recipients, temporary(text))

    async def _send_upstream(self, d: Delivery, recipients: tuple[str, ...]) -> dict[str, Reply]:
        assert self.upstream is not None
        client = SmtpClient(self.upstream)
        try:
            await client.connect()
            up = self.upstream
            if up.username is not None:
                reply = await client.login(up.username, up.password or "")
                if reply.code != 235:
                    return dict.fromkeys(recipients, reply)
            ext = client.extensions
            mail = MailFrom(
                d.sender,
                size=d.size if "SIZE" in ext else None,
                body=d.mail_options.get("body") if "8BITMIME" in ext else None,
                smtputf8=bool(d.mail_options.get("smtputf8")) and "SMTPUTF8" in ext,
            )
            reply = await client.command(mail)
            if reply.code != 250:
                return dict.fromkeys(recipients, reply)
            results: dict[str, Reply] = {}
            if "PIPELINING" in ext:
                for r in recipients:
                    await client.send(RcptTo(r))
                for r in recipients:
                    results[r] = await client.reply()
            else:
                for r in recipients:
                    results[r] = await client.command(RcptTo(r))
            accepted = [r for r in recipients if results[r].code < 400]
            if not accepted:
                return results
            reply = await client.command(Data())
            if reply.code != 354:
                return {**results, **dict.fromkeys(accepted, reply)}
            async for chunk in self.queue.read_body(d.id):
                await client.send(DataChunk(chunk))
            reply = await client.command(EndOfData(), DATA_END_TIMEOUT)
            return {**results, **dict.fromkeys(accepted, reply)}
        finally:
            await client.quit()

    async def _write_outbox(self, d: Delivery, recipients: tuple[str, ...]) -> None:
        """One `.eml` per message, the exact bytes received, and its envelope beside it."""
        assert self.outbox is not None
        name = self.outbox / f"{d.id.hex()}.eml"
        tmp = name.with_suffix(".tmp")
        f = await trio.to_thread.run_sync(open, tmp, "wb")
        try:
            async for chunk in self.queue.read_body(d.id):
                await trio.to_thread.run_sync(f.write, chunk)
            await trio.to_thread.run_sync(_sync_close, f)
        except BaseException:
            f.close()
            raise
        envelope = json.dumps({"from": d.sender, "to": list(recipients)}, ensure_ascii=False)
        await trio.to_thread.run_sync(_write_durably, name.with_suffix(".envelope.json"),
                                      envelope.encode())
        await trio.to_thread.run_sync(_rename_durably, tmp, name)


def _sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename_durably(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    fd = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def check_credentials(upstream: Upstream | None, username: str, password: str) -> Reply:
    """S4: a client's AUTH is checked live against its upstream before the gateway answers."""
    if upstream is None:
        return Reply.of(235, "2.7.0 Authentication accepted (no upstream server to check with)")
    client = SmtpClient(upstream)
    try:
        await client.connect()
        if "AUTH" not in client.extensions:
            return Reply.of(454, "4.7.0 The upstream server offers no authentication")
        reply = await client.login(username, password)
    except (UpstreamError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
            trio.TooSlowError, ssl.SSLError) as exc:
        log.warning("could not check credentials with the upstream: %s", exc)
        return Reply.of(454, "4.7.0 Cannot reach the upstream server to check credentials")
    finally:
        await client.quit()
    if reply.code == 235:
        return Reply.of(235, "2.7.0 Authentication successful")
    return reply
