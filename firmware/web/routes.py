"""Which part answers which path, and serve_web, the listening service."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import trio

from firmware.netaddr import normalize_ip

from . import metrics
from .api import handle_api
from .context import HoldQueueLike, WebContext
from .http import Request, Response, peer_ip, serve_connection
from .live import LIVE_PATH, live_response
from .pages import handle_page

__all__ = ["WebApp", "serve_web", "MAX_CONNECTIONS", "RateLimiter"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # beyond it new connections are closed at once
# From one address: so that one host (a WebSocket per tab, or a flood) cannot take every slot
# and lock the others out of their page.
MAX_CONNECTIONS_PER_IP = 32


class RateLimiter:
    """A token bucket per client address: `rate` requests a second, bursts of `burst`."""

    MAX_TRACKED = 4096  # addresses remembered; beyond it idle ones are forgotten

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)

    def allow(self, ip: str, now: float) -> bool:
        tokens, at = self._buckets.get(ip, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if len(self._buckets) >= self.MAX_TRACKED and ip not in self._buckets:
            self._forget_idle(now)
        if tokens < 1:
            self._buckets[ip] = (tokens, now)
            return False
        self._buckets[ip] = (tokens - 1, now)
        return True

    def _forget_idle(self, now: float) -> None:
        full = [ip for ip, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for ip in full:
            del self._buckets[ip]
        if len(self._buckets) >= self.MAX_TRACKED:
            self._buckets.clear()  # a flood of addresses: start over rather than grow


RATE_PER_SECOND = 20.0  # per client address; the page itself needs one request every few seconds
RATE_BURST = 200


def _host_name(host_header: str) -> str:
    """The host part of a Host header, lower case, without port or trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class WebApp:
    """The request handler: routes a Request to the api, the page or /metrics."""

    def __init__(
        self,
        queue: HoldQueueLike,
        secret: bytes,
        *,
        names: Sequence[str] = (),
        ca_pem: bytes | None = None,
        rate: float = RATE_PER_SECOND,
        burst: int = RATE_BURST,
        services: dict[str, dict] | None = None,
    ) -> None:
        self.ctx = WebContext(queue, secret, ca_pem=ca_pem)
        # Other services' live counters for /metrics (e.g. {"smtp": {"connections": 3}}).
        self.services = services or {}
        # Host names and addresses the page answers to (DNS rebinding): the configured ones,
        # "localhost", and always the address the connection came in on.
        self.names = {_host_name(n) for n in (*names, "localhost")}
        self.ca_pem = ca_pem
        self.limiter = RateLimiter(rate, burst)

    def host_ok(self, request: Request) -> bool:
        host = request.header("host")
        if not host:
            return False
        name = _host_name(host)
        if name in self.names:
            return True
        try:
            return bool(request.local_ip) and normalize_ip(name) == request.local_ip
        except ValueError:
            return False

    def same_site(self, request: Request) -> bool:
        """False when the browser says the request comes from another site's page."""
        site = request.header("sec-fetch-site")
        if site is not None and site.strip().lower() not in ("same-origin", "none"):
            return False
        origin = request.header("origin")
        if origin is None:
            return True  # not a browser, or an old one: the token alone decides
        expected = f"{request.scheme}://{(request.header('host') or '').strip().lower()}"
        return origin.strip().lower() == expected

    async def __call__(self, request: Request) -> Response:
        self.ctx.count("requests")
        if not self.limiter.allow(request.client_ip, trio.current_time()):
            self.ctx.count("rate_limited")
            response = Response.error(429)
            response.headers.append(("Retry-After", "1"))
            return response
        if not request.header("host"):
            self.ctx.count("host_refused")
            return Response.error(400, "Host header required")
        if not self.host_ok(request):
            self.ctx.count("host_refused")
            return Response.error(421, "this gateway does not answer to that host name")
        path = request.path
        if request.method not in ("GET", "HEAD") or path == LIVE_PATH:
            if not self.same_site(request):
                self.ctx.count("cross_site_refused")
                return Response.error(403, "cross-site request refused")
        if path == LIVE_PATH:
            return live_response(self.ctx, request)
        if path == "/api" or path.startswith("/api/"):
            return await handle_api(self.ctx, request)
        if path == "/metrics":
            if request.method not in ("GET", "HEAD"):
                response = Response.error(405)
                response.headers.append(("Allow", "GET, HEAD"))
                return response
            return self.metrics()
        if path in ("/ca.pem", "/ca.crt") and self.ca_pem is not None:
            return self.ca_certificate(request, der=path == "/ca.crt")
        response = await handle_page(self.ctx, request)
        return response if response is not None else Response.error(404)

    def ca_certificate(self, request: Request, *, der: bool) -> Response:
        if request.method not in ("GET", "HEAD"):
            response = Response.error(405)
            response.headers.append(("Allow", "GET, HEAD"))
            return response
        assert self.ca_pem is not None
        if der:  # Windows and macOS open a .crt (DER) with their certificate importers
            body = ssl.PEM_cert_to_DER_cert(self.ca_pem.decode("ascii"))
            response = Response(200, body, "application/x-x509-ca-cert")
            name = "matte-ca.crt"
        else:
            response = Response(200, self.ca_pem, "application/x-pem-file")
            name = "matte-ca.pem"
        response.headers.append(("Content-Disposition", f'attachment; filename="{name}"'))
        return response

    def metrics(self) -> Response:
        queue = self.ctx.queue
        stats = {**queue.statistics(), **self.services}
        text = metrics.render_metrics(queue.store_status(), stats, self.ctx.counters)
        return Response.text(text, content_type=metrics.CONTENT_TYPE)

    def statistics(self) -> dict[str, int]:
        return dict(self.ctx.counters)


async def serve_web(
    listen: Sequence[tuple[str, int]],
    app: WebApp,
    *,
    tls_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the page, the API and /metrics on every `listen` address (HTTPS with `tls_context`).

    Binds everything first, then reports the (host, port) pairs actually bound.
    """
    scheme = "https" if tls_context is not None else "http"
    listeners: list[trio.SocketListener] = []
    bound: list[tuple[str, int]] = []
    try:
        for host, port in listen:
            for listener in await trio.open_tcp_listeners(port, host=host or None):
                listeners.append(listener)
                name = listener.socket.getsockname()
                bound.append((name[0], name[1]))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    per_ip: dict[str, int] = {}

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            app.ctx.count("connections_refused")
            await stream.aclose()
            return
        try:
            app.ctx.count("connections")
            try:
                ip = peer_ip(stream)
                local_ip = normalize_ip(stream.socket.getsockname()[0])
            except (OSError, ValueError):
                await stream.aclose()
                return
            if per_ip.get(ip, 0) >= MAX_CONNECTIONS_PER_IP:
                app.ctx.count("connections_refused")
                await stream.aclose()
                return
            per_ip[ip] = per_ip.get(ip, 0) + 1
            try:
                served: trio.abc.Stream = stream
                if tls_context is not None:
                    # The handshake happens on first use, under the request deadline.
                    served = trio.SSLStream(stream, tls_context, server_side=True,
                                            https_compatible=True)
                await serve_connection(served, app, ip, local_ip, scheme)
            finally:
                per_ip[ip] -= 1
                if not per_ip[ip]:
                    del per_ip[ip]
        except Exception:
            # One broken connection must never take the listener down.
            log.exception("web: connection failed")
        finally:
            limiter.release()

    if not listeners:
        task_status.started(bound)
        return
    log.info("web: listening on %s (%s)", ", ".join(f"{h}:{p}" for h, p in bound), scheme)
    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)
