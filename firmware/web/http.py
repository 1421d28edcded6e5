"""The HTTP/1.1 connection loop: h11 on a trio stream, one request at a time.

Knows nothing of mail: it turns bytes into a `Request`, hands it to a
handler and writes back the `Response`. Limits keep a slow or hostile client
from holding memory or a connection for long.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import trio

from firmware.netaddr import normalize_ip

__all__ = [
    "Request",
    "Response",
    "Handler",
    "serve_connection",
    "peer_ip",
    "MAX_HEADER_BYTES",
    "MAX_BODY_BYTES",
    "REQUEST_DEADLINE",
    "SECURITY_HEADERS",
    "ReplayStream",
]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; beyond it 431
MAX_BODY_BYTES = 16 * 1024  # the API takes tiny JSON and form bodies; beyond it 413
REQUEST_DEADLINE = 10.0  # seconds to receive a whole request (and, apart, to send the answer)
_RECEIVE_SIZE = 16 * 1024
_LINGER_SECONDS = 1.0  # after an error answer, how long to drain what the client still sends
_LINGER_BYTES = 256 * 1024

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    # No inline script or style anywhere; live updates connect back to the same host.
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
)

_REASONS = {
    200: b"OK",
    302: b"Found",
    303: b"See Other",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: str  # upper case, e.g. "GET"
    path: str  # the target before "?", e.g. "/api/held"
    query: str  # after "?", undecoded ("" when absent)
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes
    client_ip: str  # the socket's peer, normalised; never from a header
    local_ip: str = ""  # the address the client reached us on, normalised
    scheme: str = "http"  # "https" on a TLS listener

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Set to take the connection over after this request (WebSocket): called with a stream
    # that replays the request's bytes first, instead of writing this response.
    upgrade: Callable[[trio.abc.Stream], Awaitable[None]] | None = None

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(status, body, "application/json; charset=utf-8")

    @classmethod
    def html(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/html; charset=utf-8")

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str | None = None) -> Response:
        return cls(status, text.encode(), content_type or "text/plain; charset=utf-8")

    @classmethod
    def redirect(cls, location: str, status: int = 303) -> Response:
        return cls(status, b"", None, [("Location", location)])

    @classmethod
    def error(cls, status: int, message: str | None = None) -> Response:
        reason = _REASONS.get(status, b"Error").decode()
        return cls.text(f"{status} {message or reason}\n", status)


Handler = Callable[[Request], Awaitable[Response]]


class _Reject(Exception):
    """The request cannot be served; answer `status` and close."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def peer_ip(stream: trio.abc.Stream) -> str:
    """The normalised address of the peer, looking through TLS wrappers."""
    inner: Any = stream
    while not hasattr(inner, "socket") and hasattr(inner, "transport_stream"):
        inner = inner.transport_stream
    return normalize_ip(inner.socket.getpeername()[0])


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    client_ip: str,
    local_ip: str = "",
    scheme: str = "http",
) -> None:
    """Serve requests on `stream` until either side closes; closes `stream`."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        while True:
            request: Request | None = None
            reject: _Reject | None = None
            # The bytes of this request as read, for a handler that takes the connection over.
            raw = bytearray(conn.trailing_data[0])
            with trio.move_on_after(REQUEST_DEADLINE) as deadline:
                try:
                    request = await _receive_request(stream, conn, client_ip, raw)
                except _Reject as exc:
                    reject = exc
            if deadline.cancelled_caught:
                # Say why only if the client had started a request.
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    await _send_error_and_close(stream, conn, _Reject(408))
                return
            if reject is not None:
                await _send_error_and_close(stream, conn, reject)
                return
            if request is None:
                return
            request = replace(request, local_ip=local_ip, scheme=scheme)
            try:
                response = await handler(request)
            except Exception:
                log.exception("web: handler failed for %s %s", request.method, request.path)
                response = Response.error(500)
            if response.upgrade is not None:
                await response.upgrade(ReplayStream(stream, bytes(raw)))
                return
            with trio.move_on_after(REQUEST_DEADLINE) as deadline:
                await _send_response(stream, conn, response, head=request.method == "HEAD")
            if deadline.cancelled_caught or conn.our_state is not h11.DONE:
                return
            if conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to tell it
    except h11.LocalProtocolError:
        log.exception("web: protocol misuse on the server side")
    finally:
        # Shielded but bounded: a TLS close_notify to a peer that never reads
        # must not hold the task.
        with trio.move_on_after(_LINGER_SECONDS) as scope:
            scope.shield = True
            await stream.aclose()


class ReplayStream(trio.abc.Stream):
    """A stream that first gives back bytes already read from `inner`, then reads on.

    The WebSocket library parses the upgrade request itself: it gets the request's bytes again
    from here, on the same connection, so the page and its live updates share one port.
    """

    def __init__(self, inner: trio.abc.Stream, replay: bytes) -> None:
        self.inner = inner
        self._replay = bytearray(replay)
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._replay:
            size = len(self._replay) if max_bytes is None else max_bytes
            data = bytes(self._replay[:size])
            del self._replay[:size]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        self._replay.clear()
        await self.inner.aclose()


async def _next_event(
    stream: trio.abc.Stream, conn: h11.Connection, raw: bytearray | None = None
) -> Any:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            raise _Reject(status if status in _REASONS else 400, str(exc)) from None
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(_RECEIVE_SIZE)
        if raw is not None:
            raw += data
        conn.receive_data(data)


async def _receive_request(
    stream: trio.abc.Stream, conn: h11.Connection, client_ip: str, raw: bytearray | None = None
) -> Request | None:
    event = await _next_event(stream, conn, raw)
    if isinstance(event, h11.ConnectionClosed):
        return None
    assert isinstance(event, h11.Request), event
    start = event
    # h11 only bounds a header block still incomplete; one that arrived whole
    # in a single read is checked here.
    head_size = len(start.method) + len(start.target) + 12
    head_size += sum(len(k) + len(v) + 4 for k, v in start.headers)
    if head_size > MAX_HEADER_BYTES:
        raise _Reject(431)
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in start.headers)
    length = dict(headers).get("content-length")
    if length is not None and int(length) > MAX_BODY_BYTES:  # h11 checked it is digits
        raise _Reject(413)
    # No "100 Continue" is sent: a waiting client sends its body after a pause anyway.
    body = bytearray()
    while True:
        event = await _next_event(stream, conn, raw)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _Reject(413)
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # the client closed mid-body
            return None
    target = start.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    return Request(
        method=start.method.decode("ascii", "replace").upper(),
        path=path,
        query=query,
        headers=headers,
        body=bytes(body),
        client_ip=client_ip,
    )


async def _send_response(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    response: Response,
    *,
    head: bool = False,
    close: bool = False,
) -> None:
    headers: list[tuple[str, str]] = []
    if response.content_type is not None:
        headers.append(("Content-Type", response.content_type))
    headers.append(("Content-Length", str(len(response.body))))
    headers.extend(SECURITY_HEADERS)
    headers.extend(response.headers)
    if close:
        headers.append(("Connection", "close"))
    out = conn.send(
        h11.Response(
            status_code=response.status,
            headers=_encode_headers(headers),
            reason=_REASONS.get(response.status, b""),
        )
    )
    assert out is not None
    if response.body and not head:
        out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


def _encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _send_error_and_close(
    stream: trio.abc.Stream, conn: h11.Connection, reject: _Reject
) -> None:
    # IDLE too: h11 lets a server answer a request it could not parse.
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # a response already started: nothing sensible to add
    with trio.move_on_after(_LINGER_SECONDS) as scope:
        scope.shield = True  # may run after a deadline fired
        response = Response.error(reject.status, reject.message)
        await _send_response(stream, conn, response, close=True)
        # Half-close and drain a little, so that the client reads the answer
        # instead of a reset caused by its unread upload.
        send_eof = getattr(stream, "send_eof", None)
        if send_eof is not None:
            await send_eof()
        drained = 0
        while drained < _LINGER_BYTES:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                break
            drained += len(data)
