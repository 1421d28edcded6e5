"""Live updates (B5): a WebSocket on the page's own port that pushes the caller's list.

The h11 loop reads the upgrade request; `live_response` answers it with a Response whose
`upgrade` takes the connection over: trio-websocket gets a stream that replays the request's
bytes first, completes the handshake, and from then on every change in the hold queue sends the
caller's snapshot (the same JSON as GET /api/held). The client sends nothing that matters; its
messages are read and dropped so that a close is noticed at once.
"""

from __future__ import annotations

import json
import logging

import trio
from trio_websocket import ConnectionClosed, wrap_server_stream

from .api import held_snapshot
from .context import WebContext
from .http import REQUEST_DEADLINE, Request, Response

__all__ = ["live_response", "LIVE_PATH", "HEARTBEAT_SECONDS", "MAX_CLIENT_MESSAGE"]

log = logging.getLogger(__name__)

LIVE_PATH = "/api/live"
# A snapshot at least this often even without changes: the countdowns resynchronise, and a
# half-open connection is found out.
HEARTBEAT_SECONDS = 30.0
MAX_CLIENT_MESSAGE = 1024  # the page never sends more than a ping
_MESSAGE_QUEUE = 4


def is_upgrade(request: Request) -> bool:
    connection = (request.header("connection") or "").lower()
    upgrade = (request.header("upgrade") or "").lower()
    return "upgrade" in [t.strip() for t in connection.split(",")] and upgrade == "websocket"


def live_response(ctx: WebContext, request: Request) -> Response:
    """Answer a request for LIVE_PATH: the upgrade, or why not."""
    if request.method != "GET":
        response = Response.error(405)
        response.headers.append(("Allow", "GET"))
        return response
    if not is_upgrade(request):
        return Response.error(400, "WebSocket upgrade expected")
    ip = request.client_ip

    async def take_over(stream: trio.abc.Stream) -> None:
        ctx.count("live_connections")
        try:
            await _serve_live(ctx, ip, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass  # the browser went away
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    return Response(101, upgrade=take_over)


async def _serve_live(ctx: WebContext, ip: str, stream: trio.abc.Stream) -> None:
    queue = ctx.queue
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(REQUEST_DEADLINE) as handshake:
            ws_request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=_MESSAGE_QUEUE,
                max_message_size=MAX_CLIENT_MESSAGE,
            )
            ws = await ws_request.accept()
        if handshake.cancelled_caught:
            nursery.cancel_scope.cancel()
            return

        async def drain_client() -> None:
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(drain_client)
        try:
            while True:
                seen = queue.change_version
                await ws.send_message(json.dumps(held_snapshot(ctx, ip), ensure_ascii=False))
                with trio.move_on_after(HEARTBEAT_SECONDS):
                    await queue.wait_changed(seen)
        except ConnectionClosed:
            pass
        finally:
            nursery.cancel_scope.cancel()
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await ws.aclose()
