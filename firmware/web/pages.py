"""The /mail page: server-rendered HTML, works without JavaScript.

Rendering (`render_mail_page`) is a pure function of the held list, so a
richer page can reuse the pieces. Everything that comes from mail is
escaped; a body is never shown (S6).
"""

from __future__ import annotations

import html
import re
import time
import urllib.parse
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .context import ACTIONS, WebContext, parse_id, perform
from .http import Request, Response

__all__ = ["handle_page", "render_mail_page", "EXTEND_STEP", "STYLESHEET"]

EXTEND_STEP = 300  # the "+5 min" button
_MAX_LISTED = 3  # recipients shown per row before "+N more"
_ACTION_PATH = re.compile(r"/mail/([^/]+)/([a-z]+)")
# Notices are chosen from this table by key, so nothing from the URL is echoed.
NOTICES = {
    "cancelled": ("取り消しました。", "Cancelled: it will not be sent."),
    "sent": ("送信しました。", "Released: it is being sent now."),
    "extended": ("保留を 5 分延長しました。", "Hold extended by 5 minutes."),
    "gone": ("そのメールはもう保留されていません。", "That mail is no longer held."),
}
_ACTION_NOTICE = {"cancel": "cancelled", "send": "sent", "extend": "extended"}


def _stylesheet() -> bytes:
    return resources.files(__package__).joinpath("static/mail.css").read_bytes()


STYLESHEET = _stylesheet()


async def handle_page(ctx: WebContext, request: Request) -> Response | None:
    """Answer the page's paths; None for a path that is not the page's."""
    path = request.path
    if path == "/":
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        return Response.redirect("/mail", 302)
    if path == "/mail":
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        notice = urllib.parse.parse_qs(request.query).get("done", [""])[0]
        ip = request.client_ip
        page = render_mail_page(
            ctx.queue.held_for(ip),
            ip=ip,
            token=ctx.token_for(ip),
            store=ctx.queue.store_status(),
            now=time.time(),
            notice=notice,
        )
        return Response.html(page)
    if path == "/static/mail.css":
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        return Response(200, STYLESHEET, "text/css; charset=utf-8")
    match = _ACTION_PATH.fullmatch(path)
    if match and match[2] in ACTIONS:
        if request.method != "POST":
            return _not_allowed("POST")
        return await _form_action(ctx, request, match[1], match[2])
    return None


async def _form_action(ctx: WebContext, request: Request, id_text: str, action: str) -> Response:
    ip = request.client_ip
    form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"))
    if not ctx.token_ok(ip, form.get("token", [""])[0]):
        ctx.count("token_refused")
        return _message_page(
            403,
            "この操作は受け付けられません。ページを再読み込みしてください。",
            "This action was refused (bad token). Reload the page and try again.",
        )
    id = parse_id(id_text)
    if id is None or not await perform(ctx, action, id, ip, EXTEND_STEP):
        return Response.redirect("/mail?done=gone")
    return Response.redirect(f"/mail?done={_ACTION_NOTICE[action]}")


def _not_allowed(allow: str) -> Response:
    response = _message_page(405, "この方法では使えません。", "Method not allowed.")
    response.headers.append(("Allow", allow))
    return response


def _message_page(status: int, ja: str, en: str) -> Response:
    body = _document(
        "Matte",
        f'<main><p class="notice error">{_e(ja)} <span lang="en">{_e(en)}</span></p>'
        '<p><a href="/mail">保留中のメール <span lang="en">Held mail</span></a></p></main>',
    )
    return Response.html(body, status)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _document(title: str, body: str, *, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (
        "<!doctype html>\n"
        '<html lang="ja"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{_e(title)}</title>"
        '<link rel="stylesheet" href="/static/mail.css"></head>\n'
        f"<body>\n{body}\n</body></html>\n"
    )


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _remaining(seconds: float) -> str:
    if seconds <= 0:
        return '<span class="due">送信中 <span lang="en">sending</span></span>'
    minutes, secs = divmod(int(seconds + 0.999), 60)
    return f'<span class="left">あと {minutes}:{secs:02d} <span lang="en">left</span></span>'


def _addresses(addresses: Sequence[str]) -> str:
    shown = "<br>".join(_e(a) for a in addresses[:_MAX_LISTED])
    if len(addresses) > _MAX_LISTED:
        more = len(addresses) - _MAX_LISTED
        shown += f'<br><span class="more">ほか {more} 件 <span lang="en">+{more} more</span></span>'
    return shown


def _recipients(item: Any) -> str:
    parts = []
    if item.to:
        parts.append(f'<div><span class="label">To</span> {_addresses(item.to)}</div>')
    if item.cc:
        parts.append(f'<div><span class="label">Cc</span> {_addresses(item.cc)}</div>')
    if item.bcc_count:
        parts.append(f'<div><span class="label">Bcc</span> {int(item.bcc_count)}</div>')
    return "".join(parts) or '<span class="none">—</span>'


def _button(item_id: str, action: str, token: str, ja: str, en: str) -> str:
    return (
        f'<form method="post" action="/mail/{item_id}/{action}">'
        f'<input type="hidden" name="token" value="{_e(token)}">'
        f'<button type="submit" class="{action}">{ja} <span lang="en">{en}</span></button>'
        "</form>"
    )


def _row(item: Any, token: str, now: float) -> str:
    item_id = item.id.hex()
    subject = item.subject or ""
    subject_html = _e(subject) if subject else '<span class="none">(件名なし / no subject)</span>'
    sender = item.from_ or item.sender or ""
    sender_html = _e(sender) if sender else '<span class="none">&lt;&gt;</span>'
    return (
        f'<tr id="m-{item_id}">'
        f'<td class="subject">{subject_html}</td>'
        f'<td class="from">{sender_html}</td>'
        f'<td class="to">{_recipients(item)}</td>'
        f'<td class="size">{_size(int(item.size))}</td>'
        f'<td class="received">{_clock(item.received_at)}</td>'
        f'<td class="release">releases at <time>{_clock(item.release_at)}</time><br>'
        f"{_remaining(item.release_at - now)}</td>"
        '<td class="actions">'
        + _button(item_id, "cancel", token, "取消", "Cancel")
        + _button(item_id, "send", token, "今すぐ送信", "Send now")
        + _button(item_id, "extend", token, "延長 +5分", "+5 min")
        + "</td></tr>"
    )


def _store_line(store: dict[str, Any]) -> str:
    try:
        return (
            "保管 <span lang=\"en\">Store</span>: "
            f"{int(store['messages'])} / {int(store['max_messages'])} 通 "
            f"<span lang=\"en\">messages</span>, "
            f"{_size(int(store['bytes']))} / {_size(int(store['max_bytes']))}"
        )
    except (KeyError, TypeError, ValueError):
        return ""


def render_mail_page(
    held: Sequence[Any],
    *,
    ip: str,
    token: str,
    store: dict[str, Any],
    now: float,
    notice: str = "",
    refresh: int = 30,
) -> str:
    """The whole /mail document for the mail held from `ip`."""
    parts = [
        '<header><h1>保留中のメール <span lang="en">Held mail</span></h1>',
        f'<p class="scope">{_e(ip)} から送信したメールだけを表示しています。 '
        f'<span lang="en">Only mail sent from {_e(ip)} is shown.</span></p></header>',
    ]
    if notice in NOTICES:
        ja, en = NOTICES[notice]
        parts.append(f'<p class="notice">{_e(ja)} <span lang="en">{_e(en)}</span></p>')
    parts.append("<main>")
    if held:
        parts.append(
            "<table><thead><tr>"
            '<th>件名 <span lang="en">Subject</span></th>'
            '<th>差出人 <span lang="en">From</span></th>'
            '<th>宛先 <span lang="en">Recipients</span></th>'
            '<th>サイズ <span lang="en">Size</span></th>'
            '<th>受付 <span lang="en">Received</span></th>'
            '<th>送信予定 <span lang="en">Release</span></th>'
            '<th>操作 <span lang="en">Actions</span></th>'
            "</tr></thead><tbody>"
        )
        parts.extend(_row(item, token, now) for item in held)
        parts.append("</tbody></table>")
    else:
        parts.append(
            '<p class="empty">保留中のメールはありません。 <span lang="en">No held mail.</span></p>'
        )
    parts.append("</main>")
    parts.append(
        f'<footer><p>{_store_line(store)} · 表示 {_clock(now)} '
        '<a href="/mail">再読み込み <span lang="en">Reload</span></a></p></footer>'
    )
    return _document("保留中のメール — Matte", "\n".join(parts), refresh=refresh)
