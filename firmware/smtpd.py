"""The inbound SMTP server: trio glue between a socket, the sans-IO state machine and the queue.

One `Session` per connection. It feeds bytes to `smtp.Connection`, answers each command in order
(replies to pipelined commands go out together), streams DATA into the store as it arrives, and
answers 250 only after the queue says the message is durable.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import ssl
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Awaitable, Callable, Sequence

import trio

from firmware import policy
from firmware.netaddr import ip_in, normalize_ip
from firmware.qmgr import HoldQueue, Reservation
from firmware.smtp import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    SERVER,
    Auth,
    AuthResponse,
    Connection,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)
from firmware.summary import HeaderCollector, summarize
from firmware.wal import StoreError

log = logging.getLogger("matte.smtpd")

# RFC 5321 4.5.3.2: a server should wait at least 5 minutes for a command, 3 for a data block.
COMMAND_TIMEOUT = 300.0
DATA_BLOCK_TIMEOUT = 180.0
TLS_HANDSHAKE_TIMEOUT = 30.0
RECEIVE_SIZE = 256 * 1024
# A client that keeps making mistakes is cut off rather than served forever (Postfix: 20).
MAX_ERRORS = 20
# Abuse limits. The per-address ones do not apply to loopback (the host's own MTA, a
# benchmark), as Postfix exempts its own networks from anvil's limits.
MAX_CONNECTIONS = 1024  # at once, from everyone
MAX_CONNECTIONS_PER_IP = 256  # at once, from one address
MESSAGES_PER_MINUTE_PER_IP = 600  # accepted for delivery; a burst of as many, then this rate
# DATA must keep arriving at this mean rate (bytes/s) once DATA_GRACE seconds have passed;
# a client trickling a byte now and then is cut off instead of holding a slot for hours.
MIN_DATA_RATE = 1024
DATA_GRACE = 60.0
LIMIT_EXEMPT_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# (username, password, route) -> the upstream's answer; route is what SmtpService.route_of gave.
Authenticator = Callable[[str, str, object], Awaitable[Reply]]

OK = Reply.of(250, "2.0.0 Ok")
BYE = Reply.of(221, "2.0.0 Bye")
TIMEOUT = Reply.of(421, "4.4.2 Timeout, closing connection")
TOO_MANY_ERRORS = Reply.of(421, "4.7.0 Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply.of(421, "4.7.0 Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply.of(421, "4.7.0 Too many connections from your address, "
                             "try again later")
RATE_LIMITED = Reply.of(450, "4.7.1 Too many messages from your address, try again later")
TOO_SLOW = Reply.of(421, "4.4.2 Message data arriving too slowly, closing connection")
NOT_ALLOWED = Reply.of(554, "5.7.1 Your address is not allowed to send mail through this gateway")
STORE_ERROR = Reply.of(451, "4.3.0 Could not store the message, try again later")
NEED_TLS = Reply.of(530, "5.7.0 Must issue a STARTTLS command first")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
BAD_MECHANISM = Reply.of(
    504, "5.5.4 Unsupported authentication mechanism: use PLAIN or LOGIN "
    "(challenge-response mechanisms cannot be relayed upstream)")
BAD_AUTH_DATA = Reply.of(501, "5.5.2 Cannot decode the authentication data")
# Replies sent for every message, built (and encoded) once.
SENDER_OK = Reply.of(250, "2.1.0 Sender ok")
RECIPIENT_OK = Reply.of(250, "2.1.5 Recipient ok")
START_DATA = Reply.of(354, "End data with <CR><LF>.<CR><LF>")


class ClientLimits:
    """Who is connected and how fast each address sends: one owner (the accept path and
    MAIL) for the per-address counts."""

    def __init__(self) -> None:
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)

    def take_message(self, ip: str, per_minute: int, now: float) -> bool:
        """A token bucket of ``per_minute`` tokens refilled at ``per_minute`` a minute."""
        tokens, at = self._buckets.get(ip, (per_minute, now))
        tokens = min(per_minute, tokens + (now - at) * per_minute / 60.0)
        if tokens < 1:
            self._buckets[ip] = (tokens, now)
            return False
        if len(self._buckets) > 4096:  # forget full buckets: they carry no state
            self._buckets = {k: v for k, v in self._buckets.items()
                             if v[0] + (now - v[1]) * per_minute / 60.0 < per_minute}
        self._buckets[ip] = (tokens - 1, now)
        return True


@dataclass
class SmtpService:
    """What every session shares: settings, the queue, TLS, and how to check a password."""

    queue: HoldQueue
    hostname: str
    max_message_size: int
    max_recipients: int
    allowed_networks: Sequence
    plain_auth_networks: Sequence
    sender_rules: Sequence[str]
    recipient_rules: Sequence[str]
    tls_context: ssl.SSLContext | None
    authenticate: Authenticator
    counters: dict = field(default_factory=lambda: {"connections": 0, "refused": 0})
    # Abuse limits (see the constants); tests lower them.
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    messages_per_minute_per_ip: int = MESSAGES_PER_MINUTE_PER_IP
    min_data_rate: int = MIN_DATA_RATE
    limit_exempt_networks: Sequence = LIMIT_EXEMPT_NETWORKS
    limits: ClientLimits = field(default_factory=ClientLimits)
    # Delivery's side of AUTH (S4, B9, B10): which upstream a message will take (sender or
    # None, original destination or None), how a client's credentials are sealed for its
    # message, and, in transparent mode, how a connection's original destination is found.
    route_of: Callable[[str | None, tuple | None], object] = lambda sender, destination: None
    seal: Callable[[bytes, str, str], dict] | None = None
    original_destination: Callable[[object], tuple[str, int] | None] | None = None


@dataclass
class Transaction:
    sender: str
    options: dict
    reservation: Reservation
    recipients: list[str] = field(default_factory=list)
    id: bytes | None = None
    size: int = 0
    too_big: bool = False
    store_failed: bool = False
    data_started: float = 0.0
    headers: HeaderCollector | None = None


@lru_cache(maxsize=64)
def _hello_reply(*lines: str) -> Reply:
    """The same few HELO/EHLO replies for every session: built and encoded once each."""
    return Reply.of(250, *lines)


class PlainStream:
    """A plain TCP connection for the request-reply hot path.

    trio's SocketStream tries each recv before waiting and wraps every call in bookkeeping;
    an SMTP server almost always reads right after answering, when nothing has arrived yet,
    so it waits first and then reads with one syscall. STARTTLS wraps the SocketStream itself.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.socket_stream = stream
        self._fd = stream.socket.fileno()

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                return os.read(self._fd, max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._fd)
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    def close(self) -> None:
        self.socket_stream.socket.close()

    async def aclose(self) -> None:
        await self.socket_stream.aclose()


class TooSlow(Exception):
    """The client sends its message more slowly than MIN_DATA_RATE."""


class Session:
    rate_exempt = False  # set by the accept path for LIMIT_EXEMPT_NETWORKS

    def __init__(self, service: SmtpService, stream: trio.abc.Stream, peer_ip: str,
                 *, implicit_tls: bool) -> None:
        self.service = service
        self.socket_stream = stream
        self.stream: trio.abc.Stream = (
            stream if implicit_tls or not isinstance(stream, trio.SocketStream)
            else PlainStream(stream))
        self.peer_ip = normalize_ip(peer_ip)
        self.implicit_tls = implicit_tls
        self.conn = Connection(SERVER, tls=implicit_tls)
        self.out = bytearray()
        self.tx: Transaction | None = None
        self.errors = 0
        self.auth_state: tuple[str, list[bytes]] | None = None
        self.original_dst: tuple[str, int] | None = None  # transparent mode (B10)
        self.credentials: tuple[str, str] | None = None  # after 235; sealed with each message
        self.auth_route: object = None  # the route those credentials were checked on

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.implicit_tls:
                if not await self._handshake():
                    return
            if not ip_in(self.peer_ip, self.service.allowed_networks):
                self.service.counters["refused"] += 1
                log.info("refused %s: not in allowed_networks", self.peer_ip)
                self._reply(NOT_ALLOWED)
                await self._flush()
                return
            self._reply(Reply.of(220, f"{self.service.hostname} ESMTP Matte"))
            await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            log.debug("connection from %s lost: %s", self.peer_ip, exc)
        except TooSlow:
            self._reply(TOO_SLOW)
            with trio.move_on_after(5):
                await self._flush()
        except Exception:
            # A defect met by one session ends that session, not the listener of everyone.
            log.exception("session with %s failed; connection closed", self.peer_ip)
        finally:
            await self._abort_transaction()
            if isinstance(self.stream, PlainStream):
                self.stream.close()  # a plain socket closes at once: no scope, no checkpoint
            else:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self.stream.aclose()

    async def _serve(self) -> None:
        # One scope for the whole session: its deadline is armed only while waiting for the
        # client (cheaper than a new scope per read, and never cuts off our own work).
        with trio.CancelScope() as self.waiting:
            await self._serve_commands()
        if self.waiting.cancelled_caught:
            self._reply(TIMEOUT)
        with trio.move_on_after(DATA_BLOCK_TIMEOUT):  # a client that never reads
            await self._flush()

    async def _serve_commands(self) -> None:
        conn = self.conn
        while conn.state is not CLOSED:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                self.waiting.deadline = math.inf
                await self._protocol_error(exc)
                continue
            if event is NEED_DATA:
                self._arm_deadline()  # before the flush: a client that never reads is waited
                await self._flush()   # for no longer than one that never writes
                await self._receive()
                continue
            self.waiting.deadline = math.inf  # a whole command: our own work has no deadline
            if event is PAUSED:  # cannot happen: every command is answered before the next
                raise RuntimeError("SMTP connection paused with no reply pending")
            if isinstance(event, ConnectionClosed):
                return
            reply = await self._handle(event)
            if reply is not None:
                self._reply(reply)
            if isinstance(event, StartTLS) and reply.code == 220:
                await self._flush()
                if not await self._handshake():
                    return
                conn.tls_started()

    def _arm_deadline(self) -> None:
        if self.waiting.deadline == math.inf:
            # Armed once per command or data block, not per read: a client trickling a command
            # a byte at a time gets no longer than one that sends nothing.
            timeout = DATA_BLOCK_TIMEOUT if self.tx and self.tx.id else COMMAND_TIMEOUT
            self.waiting.deadline = trio.current_time() + timeout

    async def _receive(self) -> None:
        self.conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    async def _handshake(self) -> bool:
        assert self.service.tls_context is not None
        self.stream = trio.SSLStream(self.socket_stream, self.service.tls_context,
                                     server_side=True)
        with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT):
            await self.stream.do_handshake()
            return True
        log.info("TLS handshake with %s timed out", self.peer_ip)
        return False

    def _reply(self, reply: Reply) -> None:
        self.out += self.conn.send(reply)

    async def _flush(self) -> None:
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            await self.stream.send_all(data)

    async def _protocol_error(self, exc: RemoteProtocolError) -> None:
        if self.tx is not None and self.tx.id is not None:
            await self._abort_transaction()  # e.g. bare LF in DATA: the message is not accepted
        self.errors += 1
        self._reply(TOO_MANY_ERRORS if self.errors >= MAX_ERRORS else exc.reply)

    # -- commands -----------------------------------------------------------------------------

    async def _handle(self, event) -> Reply | None:
        if isinstance(event, DataChunk):
            await self._data_chunk(event.data)
            return None
        if isinstance(event, EndOfData):
            return await self._end_of_data(event)
        if isinstance(event, Hello):
            await self._abort_transaction()
            return self._hello(event)
        if isinstance(event, MailFrom):
            return await self._mail(event)
        if isinstance(event, RcptTo):
            return self._rcpt(event)
        if isinstance(event, Data):
            return self._data()
        if isinstance(event, Rset):
            await self._abort_transaction()
            return OK
        if isinstance(event, Noop):
            return OK
        if isinstance(event, Quit):
            return BYE
        if isinstance(event, Vrfy):
            return Reply.of(252, "2.5.2 Cannot VRFY user, but will accept the message")
        if isinstance(event, Help):
            return Reply.of(214, "2.0.0 Matte holds outgoing mail before relaying it; "
                            "see the /mail page of this gateway")
        if isinstance(event, StartTLS):
            if self.service.tls_context is None:
                return Reply.of(454, "4.7.0 TLS not available")
            return Reply.of(220, "2.0.0 Ready to start TLS")
        if isinstance(event, Auth):
            return await self._auth(event)
        if isinstance(event, AuthResponse):
            return await self._auth_response(event.data)
        raise RuntimeError(f"unexpected SMTP event {event!r}")

    def _auth_offered(self) -> bool:
        return self.conn.tls or ip_in(self.peer_ip, self.service.plain_auth_networks)

    def _hello(self, event: Hello) -> Reply:
        name = self.service.hostname
        if event.verb == "HELO":
            return _hello_reply(name)
        lines = [name, "PIPELINING", f"SIZE {self.service.max_message_size}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.service.tls_context is not None and not self.conn.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(AUTH_MECHANISMS))
        return _hello_reply(*lines)

    async def _mail(self, event: MailFrom) -> Reply:
        refusal = policy.check_size(event.size, self.service.max_message_size)
        if refusal is not None:
            return refusal
        refusal = await self._check_route_credentials(event.sender)
        if refusal is not None:
            return refusal
        service = self.service
        if (not self.rate_exempt and not service.limits.take_message(
                self.peer_ip, service.messages_per_minute_per_ip, trio.current_time())):
            log.info("MAIL from %s refused: message rate limit", self.peer_ip)
            return RATE_LIMITED
        reservation = self.service.queue.reserve(event.size or 0)
        if isinstance(reservation, Reply):
            return reservation
        options = {}
        if event.body:
            options["body"] = event.body
        if event.smtputf8:
            options["smtputf8"] = True
        self.tx = Transaction(event.sender, options, reservation)
        return SENDER_OK

    def _rcpt(self, event: RcptTo) -> Reply:
        assert self.tx is not None
        if len(self.tx.recipients) >= policy.MAX_ENVELOPE_RECIPIENTS:
            return policy.TOO_MANY_RECIPIENTS
        usage = self.service.queue.usage()
        if usage.bytes > usage.max_bytes:
            return policy.STORE_FULL
        self.tx.recipients.append(event.recipient)
        return RECIPIENT_OK

    def _data(self) -> Reply:
        assert self.tx is not None
        self.tx.id = os.urandom(16)
        self.tx.headers = HeaderCollector()
        self.tx.data_started = trio.current_time()
        return START_DATA

    async def _data_chunk(self, data: bytes) -> None:
        tx = self.tx
        assert tx is not None and tx.id is not None
        offset = tx.size
        tx.size += len(data)
        if trio.current_time() - tx.data_started > DATA_GRACE + tx.size / self.service.min_data_rate:
            log.info("%s sends DATA too slowly (%d bytes in %.0f s): cut off", self.peer_ip,
                     tx.size, trio.current_time() - tx.data_started)
            raise TooSlow
        if tx.too_big or tx.size > self.service.max_message_size:
            tx.too_big = True  # keep reading to the end, store nothing more (S8)
            return
        if tx.store_failed:
            return
        tx.reservation.grow(tx.size)
        tx.headers.feed(data)
        try:
            await self.service.queue.write_body(tx.id, offset, data)
        except StoreError as exc:
            log.error("store failed while receiving from %s: %s", self.peer_ip, exc)
            tx.store_failed = True

    async def _end_of_data(self, end: EndOfData) -> Reply:
        tx = self.tx
        assert tx is not None and tx.id is not None
        if tx.too_big:
            await self._abort_transaction()
            return policy.too_big(self.service.max_message_size)
        if tx.store_failed:
            await self._abort_transaction()
            return STORE_ERROR
        usage = self.service.queue.usage()
        if usage.bytes > usage.max_bytes:
            await self._abort_transaction()
            return policy.STORE_FULL
        decision = policy.decide(
            tx.sender, tx.recipients,
            sender_rules=self.service.sender_rules,
            recipient_rules=self.service.recipient_rules,
            max_recipients=self.service.max_recipients,
        )
        try:
            with trio.CancelScope(shield=True):
                msg = await self.service.queue.accept(
                    tx.id,
                    client_ip=self.peer_ip,
                    sender=tx.sender,
                    recipients=tuple(tx.recipients),
                    summary=summarize(tx.headers.header_bytes()),
                    size=tx.size,
                    hold=decision.hold,
                    mail_options=tx.options,
                    dot_lines=end.dot_lines,
                    reservation=tx.reservation,
                    credentials=self._sealed_credentials(tx.id),
                    destination=self._destination(),
                )
        except (StoreError, OSError) as exc:  # OSError: the credentials' key file
            log.error("store failed, message from %s refused: %s", self.peer_ip, exc)
            await self._abort_transaction()
            return STORE_ERROR
        tx.id = None  # accepted: no longer ours to discard
        self._end_transaction()
        ref = msg.id.hex()
        if decision.hold:
            return Reply.of(250, f"2.0.0 Ok: held for {round(msg.release_at - msg.received_at)}"
                            f" s as {ref}")
        return Reply.of(250, f"2.0.0 Ok: queued as {ref} ({decision.reason}: not held)")

    # -- AUTH (S4) ----------------------------------------------------------------------------

    async def _auth(self, event: Auth) -> Reply:
        if not self._auth_offered():
            return NEED_TLS
        if event.mechanism not in AUTH_MECHANISMS:
            return BAD_MECHANISM
        self.auth_state = (event.mechanism, [])
        if event.mechanism == "PLAIN":
            if event.initial is None:
                return Reply(334, ("",))
            return await self._auth_response(event.initial)
        if event.initial is not None:
            return await self._auth_response(event.initial)
        return Reply(334, ("VXNlcm5hbWU6",))  # "Username:"

    async def _auth_response(self, data: bytes) -> Reply:
        assert self.auth_state is not None
        mechanism, answers = self.auth_state
        answers.append(data)
        if mechanism == "LOGIN" and len(answers) == 1:
            return Reply(334, ("UGFzc3dvcmQ6",))  # "Password:"
        self.auth_state = None
        try:
            if mechanism == "PLAIN":
                _authzid, user, password = answers[0].split(b"\0")
            else:
                user, password = answers
            username, secret = user.decode("utf-8"), password.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return BAD_AUTH_DATA
        # The sender is not known yet: a username that is an address routes like one.
        route = self.service.route_of(username if "@" in username else None,
                                      self._destination())
        reply = await self.service.authenticate(username, secret, route)
        log.info("AUTH %s for %r from %s: %d", mechanism, username, self.peer_ip, reply.code)
        if reply.code == 235:
            self.credentials, self.auth_route = (username, secret), route
        return reply

    def _destination(self) -> tuple[str, int, str] | None:
        """Transparent mode: where this connection was going, in the TLS mode it used there."""
        if self.original_dst is None:
            return None
        tls = "implicit" if self.implicit_tls else "starttls" if self.conn.tls else "none"
        return (*self.original_dst, tls)

    def _authenticated(self) -> bool:
        return self.credentials is not None and self.conn.authenticated

    async def _check_route_credentials(self, sender: str) -> Reply | None:
        """The sender's domain may route to another server than the one AUTH was checked with:
        check the credentials there too before taking the message (S4, B10)."""
        if not self._authenticated():
            return None
        route = self.service.route_of(sender, self._destination())
        if route == self.auth_route:
            return None
        reply = await self.service.authenticate(*self.credentials, route)
        log.info("AUTH for %r from %s re-checked for sender %s: %d", self.credentials[0],
                 self.peer_ip, sender, reply.code)
        if reply.code != 235:
            return Reply.of(530 if reply.code >= 500 else 454,
                            f"{'5' if reply.code >= 500 else '4'}.7.0 Your credentials were "
                            f"not accepted by the server for this sender: {reply.text}")
        self.auth_route = route
        return None

    def _sealed_credentials(self, id: bytes) -> dict | None:
        if not self._authenticated() or self.service.seal is None:
            return None
        return self.service.seal(id, *self.credentials)

    # -- cleanup ------------------------------------------------------------------------------

    def _end_transaction(self) -> None:
        if self.tx is not None:
            self.tx.reservation.close()
            self.tx = None

    async def _abort_transaction(self) -> None:
        tx, self.tx = self.tx, None
        if tx is None:
            return
        tx.reservation.close()
        if tx.id is not None and tx.size:
            self.service.queue.discard(tx.id)


async def handle_connection(service: SmtpService, implicit_tls: bool,
                            stream: trio.SocketStream) -> None:
    service.counters["connections"] += 1
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:  # gone before we looked
        await trio.aclose_forcefully(stream)
        return
    limits, ip = service.limits, normalize_ip(peer)
    exempt = ip_in(ip, service.limit_exempt_networks)
    refusal = None
    if limits.connections >= service.max_connections:
        refusal = TOO_MANY_CONNECTIONS
    elif not exempt and limits.per_ip.get(ip, 0) >= service.max_connections_per_ip:
        refusal = TOO_MANY_FROM_YOU
    if refusal is not None:
        service.counters["limited"] = service.counters.get("limited", 0) + 1
        log.info("refused a connection from %s: %s", ip, refusal.lines[0])
        if not implicit_tls:  # on a TLS port there is no cheap way to say it
            with trio.move_on_after(5):
                try:
                    await stream.send_all(b"%d %s\r\n" % (refusal.code, refusal.lines[0].encode()))
                except trio.BrokenResourceError:
                    pass
        await trio.aclose_forcefully(stream)
        return
    limits.connections += 1
    limits.per_ip[ip] = limits.per_ip.get(ip, 0) + 1
    try:
        await _serve_connection(service, implicit_tls, stream, peer, exempt)
    finally:
        limits.connections -= 1
        if limits.per_ip[ip] == 1:
            del limits.per_ip[ip]
        else:
            limits.per_ip[ip] -= 1


async def _serve_connection(service: SmtpService, implicit_tls: bool,
                            stream: trio.SocketStream, peer: str, exempt: bool) -> None:
    session = Session(service, stream, peer, implicit_tls=implicit_tls)
    session.rate_exempt = exempt
    if service.original_destination is not None:
        try:
            session.original_dst = service.original_destination(stream.socket)
        except OSError as exc:
            log.warning("original destination of a connection from %s: %s", peer, exc)
    await session.run()


# Out of descriptors or memory: wait and accept again, as trio.serve_listeners does.
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def _accept_loop(listener: trio.SocketListener, handler, nursery) -> None:
    """trio.serve_listeners without its second, forced close of every connection: each
    Session closes its own stream, and the forced close cost a tenth of the CPU per message."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("accept failed (%s), retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(handler, stream)


async def serve_smtp(service: SmtpService, listen: Sequence[tuple[str, int]], *,
                     implicit_tls: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every (host, port); report what was bound; serve until cancelled."""
    listeners = []
    for host, port in listen:
        listeners += await trio.open_tcp_listeners(port, host=host, backlog=1024)
    bound = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    handler = partial(handle_connection, service, implicit_tls)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, nursery)
        task_status.started(bound)
