"""Which part answers which path, and serve_web, the listening service."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from . import metrics
from .api import handle_api
from .context import HoldQueueLike, WebContext
from .http import Request, Response, peer_ip, serve_connection
from .pages import handle_page

__all__ = ["WebApp", "serve_web", "MAX_CONNECTIONS"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # beyond it new connections are closed at once


class WebApp:
    """The request handler: routes a Request to the api, the page or /metrics."""

    def __init__(self, queue: HoldQueueLike, secret: bytes) -> None:
        self.ctx = WebContext(queue, secret)

    async def __call__(self, request: Request) -> Response:
        self.ctx.count("requests")
        path = request.path
        if path == "/api" or path.startswith("/api/"):
            return await handle_api(self.ctx, request)
        if path == "/metrics":
            if request.method not in ("GET", "HEAD"):
                response = Response.error(405)
                response.headers.append(("Allow", "GET, HEAD"))
                return response
            return self.metrics()
        response = await handle_page(self.ctx, request)
        return response if response is not None else Response.error(404)

    def metrics(self) -> Response:
        queue = self.ctx.queue
        text = metrics.render_metrics(queue.store_status(), queue.statistics(), self.ctx.counters)
        return Response.text(text, content_type=metrics.CONTENT_TYPE)

    def statistics(self) -> dict[str, int]:
        return dict(self.ctx.counters)


async def serve_web(
    listen: Sequence[tuple[str, int]],
    queue: HoldQueueLike,
    secret: bytes,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the page, the API and /metrics on every `listen` address.

    Binds everything first, then reports the (host, port) pairs actually bound.
    """
    app = WebApp(queue, secret)
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
            except (OSError, ValueError):
                await stream.aclose()
                return
            await serve_connection(stream, app, ip)
        except Exception:
            # One broken connection must never take the listener down.
            log.exception("web: connection failed")
        finally:
            limiter.release()

    log.info("web: listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))
    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)
