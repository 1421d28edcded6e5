"""Delivery of released mail: upstream over SMTP (the sans-IO client) or into an outbox directory.

Each released message is tried at once, through the route for its sender (B10) and with its
client's own credentials when it came with AUTH (S4, B9). Results are per recipient: delivered
ones are recorded, so neither a retry nor a restart sends to them twice; 5xx ones are recorded as
failed at once; 4xx ones are retried with backoff and jitter until `retry_seconds` have passed
since the release, then fail. When no recipient is left, the failed ones get one bounce (S11),
never for a null sender; bounces wait while the gateway is offline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import ssl
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import trio

from firmware import dsn, durable
from firmware.credentials import CredentialsError, KeyDestroyed, KeyStore, Vault
from firmware.qmgr import Delivery, HoldQueue
from firmware.routes import Route, Router
from firmware.smtp import (
    CLIENT,
    CLOSED,
    NEED_DATA,
    Auth,
    AuthResponse,
    Connection,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Hello,
    LocalProtocolError,
    MailFrom,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Rset,
    StartTLS,
    parse_ehlo_reply,
)
from firmware.wal import StoreError

log = logging.getLogger("matte.relay")

CONNECT_TIMEOUT = 30.0
# RFC 5321 4.5.3.2 client timeouts: 5 min greeting/commands, 10 min for the final reply to DATA.
REPLY_TIMEOUT = 300.0
DATA_BLOCK_TIMEOUT = 180.0  # for the upstream to take the next part of the content
DATA_END_TIMEOUT = 600.0
# The most one os.sendfile call sends: it runs in the event loop, and a part of the store not in
# the page cache (after a restart) is read from the disk during the call, so this bounds the
# pause (about 10 ms on an SD card). A worker thread per call costs more than the copy it saves.
SENDFILE_SLICE = 256 * 1024
FIRST_RETRY = 30.0
MAX_RETRY_INTERVAL = 300.0
OFFLINE_POLL = 10.0  # how often a waiting bounce looks whether the gateway is back online
WORKERS = 8
# Upstream sessions kept open between messages for the same route and credentials, as Postfix's
# connection cache does: closed after this long idle, never reused after POOL_MAX_AGE.
POOL_IDLE_SECONDS = 5.0
POOL_MAX_AGE = 300.0
POOL_MAX_IDLE = WORKERS
HEADERS_READ = dsn.MAX_ORIGINAL_HEADERS + 4  # what of a body is read for its bounce

Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]


class UpstreamError(Exception):
    """The upstream could not be reached or broke the protocol: a temporary failure."""


class Unreachable(UpstreamError):
    """No connection to the upstream at all: the gateway is offline as far as mail goes."""


class CertificateNotVerified(UpstreamError):
    """The upstream's TLS certificate did not verify: never send through it (a 4xx)."""


class StaleConnection(UpstreamError):
    """A pooled session did not answer RSET with 250: the upstream closed it meanwhile."""


# Everything a delivery attempt may raise that means "try again later".
TEMPORARY_ERRORS = (UpstreamError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.TooSlowError, ssl.SSLError, ssl.CertificateError)

# Before the routes existed the relay had one upstream: it is a Route now.
Upstream = Route


def temporary(text: str) -> Reply:
    return Reply.of(451, f"4.4.1 {text}")


class SmtpClient:
    """One upstream SMTP session, driven through the sans-IO client connection."""

    def __init__(self, route: Route, connect: Connect = trio.open_tcp_stream) -> None:
        self.route = route
        self._open = connect
        self.conn = Connection(CLIENT)
        self.stream: trio.abc.Stream | None = None
        self.extensions: dict[str, str] = {}
        self.opened_at = trio.current_time()

    async def connect(self) -> None:
        route = self.route
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                self.stream = await self._open(route.host, route.port)
        except (OSError, trio.TooSlowError) as exc:
            raise Unreachable(f"cannot connect to {route.describe()}: "
                              f"{exc or type(exc).__name__}") from None
        with trio.fail_after(CONNECT_TIMEOUT):
            if route.tls == "implicit":
                await self._start_tls()
        greeting = await self.reply()
        if greeting.code != 220:
            raise UpstreamError(f"greeting {greeting.code} {greeting.text}")
        await self._ehlo()
        if route.tls == "starttls":
            reply = await self.command(StartTLS())
            if reply.code != 220:
                raise UpstreamError(f"STARTTLS refused: {reply.code} {reply.text}")
            with trio.fail_after(CONNECT_TIMEOUT):
                await self._start_tls()
            self.conn.tls_started()
            await self._ehlo()

    async def _start_tls(self) -> None:
        assert self.stream is not None
        context = self.route.tls_context or ssl.create_default_context()
        self.stream = trio.SSLStream(self.stream, context, server_hostname=self.route.host)
        try:
            await self.stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise CertificateNotVerified(
                    f"TLS certificate of {self.route.describe()} not verified: "
                    f"{cause.verify_message or cause}") from None
            raise

    async def _ehlo(self) -> None:
        reply = await self.command(Hello("EHLO", self.route.helo))
        if reply.code != 250:
            reply = await self.command(Hello("HELO", self.route.helo))
            if reply.code != 250:
                raise UpstreamError(f"HELO refused: {reply.code} {reply.text}")
            self.extensions = {}
        else:
            self.extensions = parse_ehlo_reply(reply)

    async def login(self, username: str, password: str) -> Reply:
        """AUTH PLAIN, or LOGIN when that is all the upstream offers (S4)."""
        offered = self.extensions.get("AUTH", "").upper().split()
        if "LOGIN" in offered and "PLAIN" not in offered:
            reply = await self.command(Auth("LOGIN"))
            if reply.code == 334:
                reply = await self.command(AuthResponse(username.encode()))
            if reply.code == 334:
                reply = await self.command(AuthResponse(password.encode()))
            return reply
        token = b"\0" + username.encode() + b"\0" + password.encode()
        return await self.command(Auth("PLAIN", token))

    async def send(self, event) -> None:
        self._check_open()
        await self.stream.send_all(self.conn.send(event))

    async def send_stored(self, body: "StoredBody") -> None:
        """A stored body as message content. Without a line starting with "." it goes on the
        wire exactly as stored: over plain TCP the kernel copies it from the store's files to
        the socket (os.sendfile), none of it through Python. Otherwise it is dot-stuffed."""
        self._check_open()
        stream = self.stream
        if body.dot_lines or not isinstance(stream, trio.SocketStream):
            await self.send_content(body.chunks(), canonical=True)
            return
        # The stuffer is left at a line start, as the stored body ends (it is empty or ends
        # with CRLF), so EndOfData adds just ".\r\n".
        sock = stream.socket
        async with body.open() as pieces:
            for fd, pos, left in pieces:
                while left:
                    try:
                        sent = os.sendfile(sock.fileno(), fd, pos, min(left, SENDFILE_SLICE))
                    except BlockingIOError:
                        with trio.fail_after(DATA_BLOCK_TIMEOUT):
                            await trio.lowlevel.wait_writable(sock)
                        continue
                    if sent == 0:
                        raise StoreError(f"a store file ends {left} bytes before the body")
                    pos += sent
                    left -= sent
                    await trio.lowlevel.checkpoint()  # let the other tasks run between slices

    async def send_content(self, chunks: AsyncIterator[bytes], canonical: bool = False) -> None:
        """Message content, dot-stuffed (see DataChunk for `canonical`). `chunks` is closed
        even when the sending is cut short, so a stored body's files close at once."""
        async with aclosing(chunks):
            async for chunk in chunks:
                with trio.fail_after(DATA_BLOCK_TIMEOUT):
                    await self.send(DataChunk(chunk, canonical))

    async def send_batch(self, events) -> None:
        """Several commands in one write (RFC 2920 pipelining); replies come in order."""
        self._check_open()
        await self.stream.send_all(b"".join([self.conn.send(e) for e in events]))

    def _check_open(self) -> None:
        assert self.stream is not None
        if self.conn.state is CLOSED:  # e.g. it answered 421: nothing more may be sent
            raise UpstreamError("the upstream closed the session")

    @property
    def closed(self) -> bool:
        """The upstream ended the session (421) or its protocol state broke."""
        return self.stream is None or self.conn.state is CLOSED

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
            except LocalProtocolError:
                pass  # a STARTTLS whose handshake failed: nothing more may be said
            except TEMPORARY_ERRORS:
                pass
        await self.abort()

    async def abort(self) -> None:
        """Close without QUIT: a session left in an unknown state must not be reused, and an
        unfinished DATA is abandoned by closing (RFC 5321 3.8)."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


class StoredBody:
    """A released message's body as the store keeps it: CRLF line ends only (DATA refused
    anything else), and empty or ending with CRLF. `dot_lines`: a line starts with "."."""

    def __init__(self, queue: HoldQueue, id: bytes, dot_lines: bool) -> None:
        self.queue = queue
        self.id = id
        self.dot_lines = dot_lines

    def chunks(self) -> AsyncIterator[bytes]:
        return self.queue.read_body(self.id)

    def open(self):
        """(fd, position, length) pieces of the store's files, closed on exit."""
        return self.queue.open_body(self.id)


# Message content: a stored body, or chunks made on the spot (a bounce).
Content = StoredBody | Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    size: int | None = None
    body: str | None = None  # BODY= of MAIL
    smtputf8: bool = False


async def transaction(route: Route, credentials: tuple[str, str] | None, envelope: Envelope,
                      content: Content, *, connect: Connect = trio.open_tcp_stream,
                      pool: "ConnectionPool | None" = None) -> dict[str, Reply]:
    """One mail transaction: a reply per recipient (4xx/5xx for each one that did not get it).

    With a pool, an open session for the same route and credentials is used when there is one
    (RSET first; one that does not answer it is dropped and a new session opened), and a
    session that ends cleanly goes back to it. `content`: a stored body, or made here (a
    bounce).

    Raises Unreachable when there is no connection at all and the other UpstreamErrors when the
    session broke; the caller decides what that means.
    """
    login = credentials or (
        (route.username, route.password or "") if route.username is not None else None)
    key = pool.key(route, login) if pool is not None else None
    if pool is not None:
        client = pool.take(key)
        if client is not None:
            try:
                results = await _mail(client, envelope, content, reset=True)
            except StaleConnection as exc:
                log.debug("pooled session to %s dropped: %s", route.describe(), exc)
                await client.abort()
            except BaseException:
                await client.quit()
                raise
            else:
                await pool.give(key, client)
                return results
    client = SmtpClient(route, connect)
    keep = False
    try:
        await client.connect()
        if login is not None:
            reply = await client.login(*login)
            if reply.code != 235:
                return dict.fromkeys(envelope.recipients, reply)
        results = await _mail(client, envelope, content, reset=False)
        keep = pool is not None and not client.closed
        return results
    finally:
        if keep:
            await pool.give(key, client)
        else:
            await client.quit()


async def _mail(client: SmtpClient, envelope: Envelope, content: Content, *,
                reset: bool) -> dict[str, Reply]:
    """MAIL, RCPT, DATA on a greeted session (after RSET when it is reused). Raises
    StaleConnection only when RSET was not answered with 250: nothing was sent then."""
    ext = client.extensions
    recipients = envelope.recipients
    mail = MailFrom(
        envelope.sender,
        size=envelope.size if "SIZE" in ext else None,
        body=envelope.body if "8BITMIME" in ext else None,
        smtputf8=envelope.smtputf8 and "SMTPUTF8" in ext,
    )
    pipelining = "PIPELINING" in ext
    if reset:
        try:
            if pipelining:  # RFC 2920: RSET, MAIL, every RCPT and DATA in one write
                await client.send_batch([Rset(), mail, *map(RcptTo, recipients), Data()])
            else:
                await client.send(Rset())
            reply = await client.reply(CONNECT_TIMEOUT)
        except TEMPORARY_ERRORS as exc:
            raise StaleConnection(f"{type(exc).__name__}: {exc}") from None
        if reply.code != 250:
            raise StaleConnection(f"RSET answered {reply.code} {reply.text}")
    elif pipelining:
        await client.send_batch([mail, *map(RcptTo, recipients), Data()])
    if pipelining:
        reply = await client.reply()
        if client.closed:  # 421: the session is over, nothing more will be answered
            return dict.fromkeys(recipients, reply)
        results: dict[str, Reply] = {}
        for r in recipients:
            results[r] = await client.reply()
            if client.closed:
                return {**results, **dict.fromkeys(recipients[len(results):], results[r])}
        data_reply = await client.reply()
        if reply.code != 250:
            results = dict.fromkeys(recipients, reply)
        accepted = [r for r in recipients if results[r].code < 400]
        if data_reply.code == 354 and (reply.code != 250 or not accepted):
            await client.abort()  # DATA accepted with nothing to send: abandon it, never "."
            return results
    else:
        reply = await client.command(mail)
        if reply.code != 250:
            return dict.fromkeys(recipients, reply)
        results = {}
        for r in recipients:
            results[r] = await client.command(RcptTo(r))
        accepted = [r for r in recipients if results[r].code < 400]
        if not accepted:
            return results
        data_reply = await client.command(Data())
    if not accepted:
        return results
    if data_reply.code != 354:
        return {**results, **dict.fromkeys(accepted, data_reply)}
    if isinstance(content, StoredBody):
        await client.send_stored(content)
    else:
        await client.send_content(content())
    reply = await client.command(EndOfData(), DATA_END_TIMEOUT)
    return {**results, **dict.fromkeys(accepted, reply)}


class ConnectionPool:
    """Idle upstream sessions, greeted and logged in, by route and credentials. A session is in
    here or with the one transaction using it, never both; it comes back only after a
    transaction that ended cleanly (not 421, no error)."""

    def __init__(self, *, idle_seconds: float = POOL_IDLE_SECONDS,
                 max_age: float = POOL_MAX_AGE, max_idle: int = POOL_MAX_IDLE) -> None:
        self.idle_seconds = idle_seconds
        self.max_age = max_age
        self.max_idle = max_idle
        self._idle: dict[tuple, list[tuple[float, SmtpClient]]] = {}
        self._count = 0
        self._changed = trio.Event()
        # Credentials are keyed by a keyed hash: the pool keeps no password.
        self._secret = os.urandom(32)

    def key(self, route: Route, login: tuple[str, str] | None) -> tuple:
        who = None
        if login is not None:
            who = hmac.new(self._secret, "\0".join(login).encode(), hashlib.sha256).digest()
        return (route.host, route.port, route.tls, route.helo, id(route.tls_context), who)

    def take(self, key: tuple) -> SmtpClient | None:
        sessions = self._idle.get(key)
        if not sessions:
            return None
        _since, client = sessions.pop()  # the most recently used: the least likely to be gone
        if not sessions:
            del self._idle[key]
        self._count -= 1
        return client

    async def give(self, key: tuple, client: SmtpClient) -> None:
        now = trio.current_time()
        if client.closed or now - client.opened_at >= self.max_age:
            await client.quit()
            return
        self._idle.setdefault(key, []).append((now, client))
        self._count += 1
        self._changed.set()
        while self._count > self.max_idle:
            await self._close_oldest()

    async def _close_oldest(self) -> None:
        key = min(self._idle, key=lambda k: self._idle[k][0][0])
        sessions = self._idle[key]
        _since, client = sessions.pop(0)
        if not sessions:
            del self._idle[key]
        self._count -= 1
        await client.quit()

    async def run(self) -> None:
        """Close sessions idle for idle_seconds; all of them when cancelled."""
        try:
            while True:
                if not self._count:
                    self._changed = trio.Event()
                    await self._changed.wait()
                    continue
                oldest = min(sessions[0][0] for sessions in self._idle.values())
                await trio.sleep_until(oldest + self.idle_seconds)
                # The same sum as the deadline slept to: now - idle_seconds can round below
                # `oldest`, and the loop would spin without closing anything.
                now = trio.current_time()
                while self._count and min(sessions[0][0] for sessions in self._idle.values()
                                          ) + self.idle_seconds <= now:
                    await self._close_oldest()
        finally:
            with trio.CancelScope(shield=True):
                while self._count:
                    await self._close_oldest()


class Relay:
    def __init__(self, queue: HoldQueue, *, upstream: Route | None = None,
                 router: Router | None = None, outbox: Path | None = None,
                 retry_seconds: float, now: Callable[[], float], workers: int = WORKERS,
                 vault: Vault | None = None, online: Callable[[], bool] = lambda: True,
                 connect: Connect = trio.open_tcp_stream, hostname: str = "matte.local",
                 keys: KeyStore | None = None) -> None:
        self.queue = queue
        self.router = router or Router(default=upstream)
        self.outbox = outbox
        self.retry_seconds = retry_seconds
        self.now = now
        self.workers = workers
        self.vault = vault
        self.keys = keys  # the messages' wrapped keys (B9), read for each attempt
        self.online = online  # the board's NIC: bounces wait while it is down
        self.connect = connect  # the network; tests put memory streams here
        self.hostname = hostname
        self.pool: ConnectionPool | None = None  # upstream sessions reused while run() runs
        self._sending = trio.CapacityLimiter(workers)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.outbox is not None:
            self.outbox.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self.pool = ConnectionPool()
            nursery.start_soon(self.pool.run)
            nursery.start_soon(self._dispatch, nursery)
            task_status.started()

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        # A task per released message: one waiting to retry, or a bounce waiting for the link,
        # holds no sending slot, so it never holds up the rest of the mail.
        async for delivery in self.queue.deliveries:
            nursery.start_soon(self._deliver_logged, delivery)

    async def _deliver_logged(self, d: Delivery) -> None:
        try:
            await self.deliver(d)
        except StoreError as exc:
            # Its delivery could not be recorded: it stays released and unfinished in the store,
            # so a restart tries it again (a recipient may then get it twice).
            log.error("message %s: the store could not record its delivery: %s", d.id.hex(), exc)

    # -- one message --------------------------------------------------------------------------

    async def deliver(self, d: Delivery) -> None:
        route = self.router.route(d.sender, d.destination)
        failed: dict[str, list] = dict(d.failed)  # recipient -> [code, text], kept by the queue
        pending = d.recipients
        deadline = d.released_at + self.retry_seconds
        interval = FIRST_RETRY
        while pending:
            if not self.queue.is_pending(d.id):
                return  # cancelled or finished meanwhile
            results = await self._attempt(d, route, pending)
            done = tuple(r for r in pending if results[r].code < 400)
            refused = {r: [results[r].code, results[r].text]
                       for r in pending if results[r].code >= 500}
            pending = tuple(r for r in pending if 400 <= results[r].code < 500)
            if done and (pending or refused or failed):
                await self.queue.delivered(d.id, done)
            if refused:
                log.warning("message %s refused for %d recipient(s): %s", d.id.hex(),
                            len(refused), _reasons(refused))
                await self.queue.failed(d.id, refused)
                failed.update(refused)
            if not pending:
                break
            if done and any(results[r].code == 452 for r in pending):
                continue  # the upstream's recipient limit (RFC 5321 4.5.3.1.10): the rest now
            reasons = sorted({f"{results[r].code} {results[r].text}" for r in pending})
            self.queue.note_deferred(d.id, "; ".join(reasons))
            remaining = deadline - self.now()
            if remaining <= 0:
                expired = {r: [results[r].code, results[r].text] for r in pending}
                log.warning("message %s undeliverable to %d recipient(s) after %d s: %s",
                            d.id.hex(), len(expired), self.retry_seconds, _reasons(expired))
                await self.queue.failed(d.id, expired)
                failed.update(expired)
                break
            # Jitter spreads retries so a recovering upstream is not hit by all at once.
            await trio.sleep(min(remaining, interval * random.uniform(0.8, 1.2)))
            interval = min(interval * 2, MAX_RETRY_INTERVAL)
        if not self.queue.is_pending(d.id):
            return
        if not failed:
            await self.queue.finish(d.id, "delivered")
        elif not d.sender:
            log.info("message %s from <> failed for %d recipient(s): no bounce for a bounce",
                     d.id.hex(), len(failed))
            await self.queue.finish(d.id, "failed", failed=sorted(failed), bounce="null sender")
        else:
            await self._bounce(d, route, failed)

    async def _attempt(self, d: Delivery, route: Route | None,
                       recipients: tuple[str, ...]) -> dict[str, Reply]:
        async with self._sending:  # at most `workers` messages go out at once
            return await self._attempt_now(d, route, recipients)

    async def _attempt_now(self, d: Delivery, route: Route | None,
                           recipients: tuple[str, ...]) -> dict[str, Reply]:
        if route is None and self.outbox is None:
            return dict.fromkeys(recipients, NO_ROUTE)
        try:
            if route is None:
                await self._write_outbox(d.id.hex(), d.sender, recipients,
                                         lambda: self.queue.read_body(d.id))
                return dict.fromkeys(recipients, Reply.of(250, "2.0.0 written to outbox"))
            try:
                credentials = await self._credentials(d)
            except KeyDestroyed as exc:
                if route.username is None:
                    log.error("message %s: its sender's credentials are gone (%s) and the route "
                              "%s has none configured: not sent", d.id.hex(), exc,
                              route.describe())
                    return dict.fromkeys(recipients, CREDENTIALS_GONE)
                log.warning("message %s: its sender's credentials are gone (%s): sent with the "
                            "credentials configured for %s", d.id.hex(), exc, route.describe())
                credentials = None  # the transaction logs in with the route's own
            except CredentialsError as exc:
                log.error("message %s: its sender's credentials cannot be opened: %s",
                          d.id.hex(), exc)
                return dict.fromkeys(recipients, BAD_CREDENTIALS)
            envelope = Envelope(d.sender, recipients, d.size, d.mail_options.get("body"),
                                bool(d.mail_options.get("smtputf8")))
            return await transaction(route, credentials, envelope,
                                     StoredBody(self.queue, d.id, d.dot_lines),
                                     connect=self.connect, pool=self.pool)
        except CertificateNotVerified as exc:
            # Said loudly: nothing goes out until the certificate (or ca_file) is fixed.
            log.warning("delivery of %s deferred: %s", d.id.hex(), exc)
            return dict.fromkeys(recipients, Reply.of(451, f"4.7.5 {exc}"))
        except TEMPORARY_ERRORS as exc:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.info("delivery of %s deferred: %s", d.id.hex(), text)
            return dict.fromkeys(recipients, temporary(text))

    async def _credentials(self, d: Delivery) -> tuple[str, str] | None:
        if d.credentials is None:
            return None
        if self.vault is None:
            raise CredentialsError("no device key to open them with")
        wrapped = await self.keys.wrapped_key(d.id) if self.keys is not None else None
        return self.vault.open(d.id, d.credentials, wrapped)

    # -- the bounce (S11) ---------------------------------------------------------------------

    async def _bounce(self, d: Delivery, route: Route | None, failed: dict[str, list]) -> None:
        failures = [dsn.Failure(r, code, text) for r, (code, text) in failed.items()]
        message = dsn.build(sender=d.sender, failures=failures,
                            original_headers=await self._original_headers(d.id),
                            hostname=self.hostname, message_ref=d.id.hex(),
                            date=self.now(), arrival_date=d.received_at or d.released_at)
        envelope = Envelope("", (d.sender,), len(message),
                            "8BITMIME" if any(b > 127 for b in message) else None,
                            not d.sender.isascii())
        interval = FIRST_RETRY
        deadline = self.now() + self.retry_seconds  # for temporary refusals, as for mail
        while self.queue.is_pending(d.id):
            if not self.online():
                await trio.sleep(OFFLINE_POLL)  # S11: bounces wait while the gateway is offline
                continue
            outcome, why = await self._send_bounce(d, route, envelope, message)
            if outcome == "sent":
                log.info("message %s: bounce sent to %s for %d recipient(s)", d.id.hex(),
                         d.sender, len(failed))
                await self.queue.finish(d.id, "bounced", failed=sorted(failed))
                return
            if outcome == "failed" or (outcome == "temporary" and self.now() >= deadline):
                log.warning("message %s: bounce to %s failed (%s); dropped", d.id.hex(),
                            d.sender, why)
                await self.queue.finish(d.id, "failed", failed=sorted(failed),
                                        bounce=f"dropped: {why}")
                return
            if outcome == "temporary":
                log.info("message %s: bounce to %s deferred: %s", d.id.hex(), d.sender, why)
            await trio.sleep(interval * random.uniform(0.8, 1.2))
            interval = min(interval * 2, MAX_RETRY_INTERVAL)

    async def _send_bounce(self, d: Delivery, route: Route | None, envelope: Envelope,
                           message: bytes) -> tuple[str, str]:
        """("sent" | "unreachable" | "temporary" | "failed", why): an unreachable upstream is
        waited for, a temporary refusal (4xx, a broken session) retried until retry_seconds
        have passed, a permanent one (5xx) is final."""
        async with self._sending:
            return await self._send_bounce_now(d, route, envelope, message)

    async def _send_bounce_now(self, d: Delivery, route: Route | None, envelope: Envelope,
                               message: bytes) -> tuple[str, str]:

        async def content():
            yield message

        try:
            if route is None:
                if self.outbox is None:
                    return "failed", NO_ROUTE.text
                await self._write_outbox(f"{d.id.hex()}.bounce", "", envelope.recipients,
                                         content)
                return "sent", ""
            try:
                credentials = await self._credentials(d)
            except KeyDestroyed:
                credentials = None  # the sender must still learn: the route's own, or none
            reply = (await transaction(route, credentials, envelope, content,
                                       connect=self.connect, pool=self.pool))[d.sender]
        except Unreachable as exc:
            log.info("message %s: bounce waits, the upstream is unreachable: %s",
                     d.id.hex(), exc)
            return "unreachable", str(exc)
        except CredentialsError as exc:
            return "failed", f"{type(exc).__name__}: {exc}"
        except TEMPORARY_ERRORS as exc:
            return "temporary", f"{type(exc).__name__}: {exc}"
        if reply.code < 400:
            return "sent", ""
        return ("temporary" if reply.code < 500 else "failed"), f"{reply.code} {reply.text}"

    async def _original_headers(self, id: bytes) -> bytes:
        data = bytearray()
        chunks = self.queue.read_body(id)
        try:
            async for chunk in chunks:
                data += chunk
                if b"\r\n\r\n" in data or len(data) >= HEADERS_READ:
                    break
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        return bytes(data[:HEADERS_READ])

    # -- the outbox ---------------------------------------------------------------------------

    async def _write_outbox(self, name: str, sender: str, recipients: tuple[str, ...],
                            content: Callable[[], AsyncIterator[bytes]]) -> None:
        """One `.eml` per message, the exact bytes received, and its envelope beside it."""
        assert self.outbox is not None
        path = self.outbox / f"{name}.eml"
        tmp = path.with_suffix(".tmp")
        f = await trio.to_thread.run_sync(open, tmp, "wb")
        try:
            async with aclosing(content()) as chunks:
                async for chunk in chunks:
                    await trio.to_thread.run_sync(f.write, chunk)
            await trio.to_thread.run_sync(_sync_close, f)
        except BaseException:
            f.close()
            raise
        envelope = json.dumps({"from": sender, "to": list(recipients)}, ensure_ascii=False)
        await trio.to_thread.run_sync(durable.write_file, path.with_suffix(".envelope.json"),
                                      envelope.encode())
        await trio.to_thread.run_sync(_rename_durably, tmp, path)


NO_ROUTE = Reply.of(554, "5.4.4 No upstream server for this message (not an intercepted "
                    "connection, and no upstream.host)")
BAD_CREDENTIALS = Reply.of(554, "5.7.0 The sender's stored credentials cannot be read")
CREDENTIALS_GONE = Reply.of(554, "5.7.0 The sender's stored credentials are gone (their key "
                            "was lost) and no credentials are configured for this route")


def _reasons(failures: dict[str, list]) -> str:
    return "; ".join(f"{r}: {code} {text}" for r, (code, text) in failures.items())


def _sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _rename_durably(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    durable.fsync_directory(src.parent)


async def check_credentials(route: Route | None, username: str, password: str, *,
                            connect: Connect = trio.open_tcp_stream) -> Reply:
    """S4: a client's AUTH is checked live, against the server its mail will go to, before the
    gateway answers."""
    if route is None:
        return Reply.of(235, "2.7.0 Authentication accepted (no upstream server to check with)")
    client = SmtpClient(route, connect)
    try:
        await client.connect()
        if "AUTH" not in client.extensions:
            return Reply.of(454, "4.7.0 The upstream server offers no authentication")
        reply = await client.login(username, password)
    except CertificateNotVerified as exc:
        log.warning("could not check credentials: %s", exc)
        return Reply.of(454, "4.7.0 The upstream server's certificate could not be verified")
    except TEMPORARY_ERRORS as exc:
        log.warning("could not check credentials with %s: %s", route.describe(), exc)
        return Reply.of(454, "4.7.0 Cannot reach the upstream server to check credentials")
    finally:
        await client.quit()
    if reply.code == 235:
        return Reply.of(235, "2.7.0 Authentication successful")
    if 400 <= reply.code < 600:
        return reply  # the upstream's own refusal (535, 454...), passed on as it is
    # Anything else (another 2xx, a 3xx dialogue we cannot finish) is not a success, and is not
    # a reply our client may be sent at this point of its AUTH.
    log.warning("unexpected answer to AUTH from %s: %d %s", route.describe(), reply.code,
                reply.text)
    return Reply.of(535, "5.7.8 Authentication credentials invalid")
