"""The sans-IO SMTP connection: bytes in, events out; events in, bytes out."""

from __future__ import annotations

from collections import deque

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    Auth,
    AuthResponse,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Event,
    Hello,
    MailFrom,
    RcptTo,
    Reply,
    StartTLS,
)
from ._readers import (
    DataReader,
    ReplyReader,
    check_line,
    parse_auth_response,
    parse_command,
    remote_error,
)
from ._state import (
    AUTH,
    CLIENT,
    CLOSED,
    COMMANDS_ALLOWED,
    DATA,
    EVENT_TRIGGERED_TRANSITIONS,
    GREETED,
    GREETING,
    MAIL,
    NEED_DATA,
    PAUSED,
    RCPT,
    READY,
    SERVER,
    START,
    TLS_PENDING,
    Sentinel,
    lookup_transition,
)
from ._writers import DotStuffer, write_command

__all__ = ["Connection"]

_NOT_GREETED = "5.5.1 Send EHLO or HELO first"
_SEQUENCE_TEXT: dict[tuple[Sentinel, type], str] = {
    (READY, RcptTo): "5.5.1 Need MAIL before RCPT",
    (READY, Data): "5.5.1 Need MAIL and RCPT before DATA",
    (MAIL, Data): "5.5.1 Need RCPT before DATA",
    (MAIL, MailFrom): "5.5.1 Nested MAIL command",
    (RCPT, MailFrom): "5.5.1 Nested MAIL command",
    (MAIL, Auth): "5.5.1 AUTH not allowed during a mail transaction",
    (RCPT, Auth): "5.5.1 AUTH not allowed during a mail transaction",
    (MAIL, StartTLS): "5.5.1 STARTTLS not allowed during a mail transaction",
    (RCPT, StartTLS): "5.5.1 STARTTLS not allowed during a mail transaction",
}
_COMMAND_STATES = (GREETED, READY, MAIL, RCPT)


class Connection:
    """One SMTP session, either side.

    Server: ``receive_data``; ``next_event()`` gives one command (then
    PAUSED until ``send(reply)``), DataChunk/EndOfData while in DATA,
    NEED_DATA, or ConnectionClosed; a RemoteProtocolError raised by it counts
    as the pending command and its ``.reply`` is what to send.

    Client: ``send(command)`` gives bytes; ``next_event()`` gives Reply
    events in order (the first is the greeting).
    """

    def __init__(self, role: Sentinel, *, tls: bool = False) -> None:
        if role is not SERVER and role is not CLIENT:
            raise ValueError(f"role must be SERVER or CLIENT, not {role!r}")
        self.role = role
        self.state: Sentinel = START
        self.tls = tls  # True from the start for implicit TLS (port 465)
        self.authenticated = False
        self.hello: Hello | None = None
        # the accepted MAIL of the transaction in progress (None outside one)
        self.mail_from: MailFrom | None = None
        self._buf = bytearray()
        self._eof = False
        # server: the command (or RemoteProtocolError) awaiting a reply
        self._pending: Event | RemoteProtocolError | None = None
        self._error_next_state: Sentinel | None = None
        self._discarding = False  # inside an over-long command line
        self._data: DataReader | None = None
        # client
        self._awaiting: deque[object] = deque([GREETING])
        self._replies = ReplyReader()
        self._stuffer: DotStuffer | None = None  # set while sending content

    def __repr__(self) -> str:
        return f"<Connection {self.role!r} {self.state!r}>"

    # ------------------------------------------------------------ common

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after end of file")
        if self.state is TLS_PENDING or self.state is CLOSED:
            # bytes sent before the TLS handshake must not count as
            # encrypted ones (CVE-2011-0411 style injection)
            return
        self._buf += data

    def next_event(self) -> Event | Sentinel:
        if self.state is CLOSED:
            return ConnectionClosed()
        if self.state is TLS_PENDING:
            return ConnectionClosed() if self._eof else PAUSED
        if self.role is SERVER:
            return self._server_next()
        return self._client_next()

    def send(self, event: Event) -> bytes:
        if self.state is CLOSED:
            raise LocalProtocolError("connection is closed")
        if self.role is SERVER:
            return self._server_send(event)
        return self._client_send(event)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS is done: start over (RFC 3207 4.2)."""
        if self.state is not TLS_PENDING:
            raise LocalProtocolError("tls_started() without an accepted STARTTLS")
        self.tls = True
        self.hello = None
        self.authenticated = False
        self.mail_from = None
        self._buf.clear()
        self._awaiting.clear()
        self.state = GREETED

    def _enter(self, new: Sentinel) -> None:
        if new is not MAIL and new is not RCPT and new is not DATA:
            self.mail_from = None
        if new is DATA:
            if self.role is SERVER:
                self._data = DataReader()
            else:
                self._stuffer = DotStuffer()
        else:
            self._data = None
        if new is TLS_PENDING or new is CLOSED:
            self._buf.clear()
            self._stuffer = None
        self.state = new

    # ------------------------------------------------------------ server

    def _server_next(self) -> Event | Sentinel:
        if self._pending is not None or self.state is START:
            return PAUSED
        if self.state is DATA:
            return self._server_data()
        buf = self._buf
        if self._discarding:
            i = buf.find(b"\n")
            if i == -1:
                buf.clear()
                return ConnectionClosed() if self._eof else NEED_DATA
            del buf[: i + 1]
            self._discarding = False
            self._fail(remote_error(500, "5.5.6 Line too long"))
        # RFC 4954 4: AUTH lines may be longer than other commands
        if self.state is AUTH or buf[:5].upper() == b"AUTH ":
            limit = MAX_AUTH_LINE
        else:
            limit = MAX_COMMAND_LINE
        i = buf.find(b"\n", 0, limit)
        if i == -1:
            if len(buf) >= limit:
                # drop the line as it comes so memory stays flat
                self._discarding = True
                return self._server_next()
            return ConnectionClosed() if self._eof else NEED_DATA
        line = bytes(buf[: i + 1])
        del buf[: i + 1]
        try:
            line = check_line(line)
            if self.state is AUTH:
                event: Event = parse_auth_response(line)
            else:
                kind, parse, arg = parse_command(line)
                self._check_sequence(kind)
                smtputf8 = self.mail_from is not None and self.mail_from.smtputf8
                event = parse(arg, smtputf8)
        except RemoteProtocolError as err:
            self._fail(err)
        self._pending = event
        return event

    def _fail(self, err: RemoteProtocolError) -> None:
        # an error in AUTH or DATA ends that exchange
        self._error_next_state = READY if self.state in (AUTH, DATA) else None
        self._pending = err
        raise err

    def _check_sequence(self, kind: type) -> None:
        if kind is StartTLS and self.tls:
            raise remote_error(503, "5.5.1 TLS already active")
        if kind is Auth and self.authenticated:
            raise remote_error(503, "5.5.1 Already authenticated")
        if kind in COMMANDS_ALLOWED[self.state]:
            return
        if self.state is GREETED:
            raise remote_error(503, _NOT_GREETED)
        text = _SEQUENCE_TEXT.get((self.state, kind), "5.5.1 Bad sequence of commands")
        raise remote_error(503, text)

    def _server_data(self) -> Event | Sentinel:
        assert self._data is not None
        chunk, ended = self._data.read(self._buf)
        if ended:
            if self._data.error is not None:
                self._fail(self._data.error)
            self._pending = EndOfData(self._data.dot_lines)
            return self._pending
        if chunk:
            return DataChunk(chunk)
        return ConnectionClosed() if self._eof else NEED_DATA

    def _server_send(self, reply: Event) -> bytes:
        if not isinstance(reply, Reply):
            raise LocalProtocolError(f"a server sends only Reply, not {type(reply).__name__}")
        data = bytes(reply)
        pending = self._pending
        if self.state is START:
            key: object = GREETING
        elif pending is None:
            if reply.code == 421:  # RFC 5321 3.8: may be sent at any time
                self._enter(CLOSED)
                return data
            raise LocalProtocolError("no command is waiting for a reply")
        elif isinstance(pending, RemoteProtocolError):
            if reply.is_intermediate:
                raise LocalProtocolError(f"{reply.code} is not a reply to an error")
            self._pending = None
            new = CLOSED if reply.code == 421 else self._error_next_state
            if new is not None:
                self._enter(new)
            return data
        else:
            key = type(pending)
        try:
            new = lookup_transition(self.state, key, reply.code)
        except ValueError:
            raise LocalProtocolError(
                f"{reply.code} is not a valid reply to {getattr(key, '__name__', key)}"
            ) from None
        self._pending = None
        if reply.is_positive:
            if key is Hello:
                self.hello = pending  # type: ignore[assignment]
            elif key is MailFrom:
                self.mail_from = pending  # type: ignore[assignment]
            elif key is Auth or key is AuthResponse:
                self.authenticated = True
        if new is not None:
            self._enter(new)
        return data

    # ------------------------------------------------------------ client

    def _client_next(self) -> Event | Sentinel:
        try:
            reply = self._replies.read(self._buf)
        except RemoteProtocolError:
            self._enter(CLOSED)
            raise
        if reply is None:
            return ConnectionClosed() if self._eof else NEED_DATA
        key = self._awaiting.popleft() if self._awaiting else None
        new: Sentinel | None = CLOSED if reply.code == 421 else None
        table = EVENT_TRIGGERED_TRANSITIONS.get(self.state, {})
        if new is None and key in table:
            try:
                new = lookup_transition(self.state, key, reply.code)
            except ValueError:
                new = None  # an odd 3xx: the server's problem, not a transition
        if reply.is_positive:
            if key is Hello:
                self.hello = self._sent_hello
            elif key is Auth or key is AuthResponse:
                self.authenticated = True
        if new is not None:
            self._enter(new)
        return reply

    _sent_hello: Hello | None = None

    def _client_send(self, event: Event) -> bytes:
        if self.state is TLS_PENDING:
            raise LocalProtocolError("call tls_started() before sending")
        kind = type(event)
        if kind is DataChunk or kind is EndOfData:
            if self._stuffer is None:
                raise LocalProtocolError("message content needs a 354 reply to DATA first")
            if kind is DataChunk:
                chunk: DataChunk = event  # type: ignore[assignment]
                return self._stuffer.feed(chunk.data, chunk.canonical)
            data = self._stuffer.end()
            self._stuffer = None
            self._awaiting.append(EndOfData)
            return data
        if self._stuffer is not None:
            raise LocalProtocolError("finish the message with EndOfData first")
        data = write_command(event)
        if kind is Hello:
            self._sent_hello = event  # type: ignore[assignment]
        if kind is MailFrom:
            self.mail_from = event  # type: ignore[assignment]
        self._awaiting.append(kind)
        return data
