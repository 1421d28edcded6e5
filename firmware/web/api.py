"""The JSON API under /api/: the caller's held mail, and actions on it.

Every answer is scoped to the caller's IP (the socket's peer). Actions need
the caller's token in X-Matte-Token, so another site's page cannot make the
browser cancel or send mail (it cannot read the token).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .context import (
    ACTIONS,
    MAX_EXTEND_SECONDS,
    WebContext,
    held_to_json,
    parse_id,
    perform,
    perform_all,
)
from .http import Request, Response

__all__ = ["handle_api", "held_snapshot", "TOKEN_HEADER"]

TOKEN_HEADER = "X-Matte-Token"
_ACTION_PATH = re.compile(r"/api/held/([^/]+)/([a-z]+)")


async def handle_api(ctx: WebContext, request: Request) -> Response:
    path = request.path
    if path == "/api/held":
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        return list_held(ctx, request.client_ip)
    if path == "/api/store":
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        return Response.json(ctx.queue.store_status())
    match = _ACTION_PATH.fullmatch(path)
    if match and match[2] in ACTIONS:
        if request.method != "POST":
            return _not_allowed("POST")
        if match[1] == "all" and match[2] != "extend":
            return await _action_all(ctx, request, match[2])
        return await _action(ctx, request, match[1], match[2])
    return _error(404, "not found")


def held_snapshot(ctx: WebContext, ip: str) -> dict[str, Any]:
    """The caller's list as the page shows it (also what the live connection sends)."""
    return {
        "token": ctx.token_for(ip),
        "held": [held_to_json(item) for item in ctx.queue.held_for(ip)],
        "store": ctx.queue.store_status(),
        # the clock release_at is on: the page's countdowns ignore the browser's clock error
        "now": ctx.queue.now(),
    }


def list_held(ctx: WebContext, ip: str) -> Response:
    return Response.json(held_snapshot(ctx, ip))


async def _action_all(ctx: WebContext, request: Request, action: str) -> Response:
    ip = request.client_ip
    if not ctx.token_ok(ip, request.header(TOKEN_HEADER)):
        ctx.count("token_refused")
        return _error(403, "missing or wrong token")
    done = await perform_all(ctx, action, ip)
    return Response.json({"ok": True, "count": done})


async def _action(ctx: WebContext, request: Request, id_text: str, action: str) -> Response:
    ip = request.client_ip
    if not ctx.token_ok(ip, request.header(TOKEN_HEADER)):
        ctx.count("token_refused")
        return _error(403, "missing or wrong token")
    id = parse_id(id_text)
    if id is None:
        return _error(404, "no such message")
    seconds = 0
    if action == "extend":
        try:
            payload = json.loads(request.body)
            seconds = payload["seconds"]
        except (ValueError, TypeError, KeyError):
            return _error(400, 'body must be JSON {"seconds": N}')
        if type(seconds) is not int or not 1 <= seconds <= MAX_EXTEND_SECONDS:
            return _error(400, f"seconds must be an integer 1..{MAX_EXTEND_SECONDS}")
    if not await perform(ctx, action, id, ip, seconds):
        return _error(404, "no such message")
    return Response.json({"ok": True})


def _error(status: int, message: str) -> Response:
    return Response.json({"ok": False, "error": message}, status)


def _not_allowed(allow: str) -> Response:
    response = _error(405, "method not allowed")
    response.headers.append(("Allow", allow))
    return response
