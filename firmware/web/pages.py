"""The /mail page: server-rendered HTML that works without JavaScript, in Japanese or English.

Rendering (`render_mail_page`) is a pure function of the held list. With JavaScript,
static/mail.js takes the same markup over: live updates, countdowns, actions without reload.
Everything that comes from mail is escaped; a body is never shown (S6).
"""

from __future__ import annotations

import hashlib
import html
import re
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .context import ACTIONS, WebContext, clean_text, parse_id, perform, perform_all
from .http import Request, Response

__all__ = [
    "handle_page",
    "render_mail_page",
    "render_ca_page",
    "choose_language",
    "EXTEND_STEP",
    "STATIC",
    "LANGUAGES",
]

EXTEND_STEP = 300  # the "+5 min" button
MAX_LISTED = 3  # recipients shown per list before the rest is folded
LANGUAGES = ("ja", "en")
LANG_COOKIE = "matte_lang"
_ACTION_PATH = re.compile(r"/mail/([^/]+)/([a-z]+)")
_ACTION_NOTICE = {"cancel": "cancelled", "send": "sent", "extend": "extended"}
# Unicode controls that could reorder or hide text around them (bidi overrides, isolates,
# zero-width joiners are harmless and kept): shown as visible escapes, never obeyed.
_HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069\u200e\u200f]")

TEXT: dict[str, dict[str, str]] = {
    "title": {"ja": "保留中のメール", "en": "Held mail"},
    "scope": {"ja": "{ip} から送信したメールだけを表示しています。",
              "en": "Only mail sent from {ip} is shown."},
    "subject": {"ja": "件名", "en": "Subject"},
    "no_subject": {"ja": "(件名なし)", "en": "(no subject)"},
    "from": {"ja": "差出人", "en": "From"},
    "to": {"ja": "宛先", "en": "To"},
    "cc": {"ja": "Cc", "en": "Cc"},
    "bcc": {"ja": "Bcc", "en": "Bcc"},
    "bcc_count": {"ja": "{n} 件", "en": "{n} recipient(s)"},
    "more": {"ja": "ほか {n} 件", "en": "{n} more"},
    "size": {"ja": "サイズ", "en": "Size"},
    "received": {"ja": "受付", "en": "Received"},
    "release": {"ja": "送信予定", "en": "Sends at"},
    "left": {"ja": "あと {t}", "en": "{t} left"},
    "due": {"ja": "送信中…", "en": "sending…"},
    "cancel": {"ja": "取り消す", "en": "Cancel"},
    "send": {"ja": "今すぐ送信", "en": "Send now"},
    "extend": {"ja": "+5 分", "en": "+5 min"},
    "cancel_all": {"ja": "すべて取り消す", "en": "Cancel all"},
    "send_all": {"ja": "すべて今すぐ送信", "en": "Send all now"},
    "empty": {"ja": "保留中のメールはありません。", "en": "No held mail."},
    "store": {"ja": "保管: {messages} / {max_messages} 通、{bytes} / {max_bytes}",
              "en": "Store: {messages} / {max_messages} messages, {bytes} / {max_bytes}"},
    "shown_at": {"ja": "表示 {t}", "en": "Shown at {t}"},
    "reload": {"ja": "再読み込み", "en": "Reload"},
    "ca_link": {"ja": "CA 証明書 (メールソフトの TLS 設定用)",
                "en": "CA certificate (for the mail clients' TLS)"},
    "back": {"ja": "保留中のメールへ戻る", "en": "Back to held mail"},
    "refused": {"ja": "この操作は受け付けられません。ページを再読み込みしてください。",
                "en": "This action was refused (bad token). Reload the page and try again."},
    "not_allowed": {"ja": "この方法では使えません。", "en": "Method not allowed."},
    "cancelled": {"ja": "取り消しました。送信されません。", "en": "Cancelled: it will not be sent."},
    "sent": {"ja": "送信しました。", "en": "Released: it is being sent now."},
    "extended": {"ja": "保留を 5 分延長しました。", "en": "Hold extended by 5 minutes."},
    "gone": {"ja": "そのメールはもう保留されていません。", "en": "That mail is no longer held."},
    "all_cancelled": {"ja": "{n} 通を取り消しました。", "en": "Cancelled {n} message(s)."},
    "all_sent": {"ja": "{n} 通を送信しました。", "en": "Released {n} message(s)."},
    "live_on": {"ja": "自動更新中", "en": "Updating live"},
    "actions": {"ja": "操作", "en": "Actions"},
}
# Notices are chosen from this table by key, so nothing from the URL is echoed.
NOTICES = ("cancelled", "sent", "extended", "gone", "all_cancelled", "all_sent")

CA_TEXT = {
    "ja": """
<h1>CA 証明書</h1>
<p>メールソフトがこのゲートウェイと TLS (STARTTLS / SSL) で安全に通信できるように、
ゲートウェイの CA 証明書を一度だけ取り込みます。</p>
<p class="downloads"><a class="button" href="/ca.crt" download>CA 証明書 (matte-ca.crt)</a>
<a href="/ca.pem" download>PEM 形式 (matte-ca.pem)</a></p>
<p>SHA-256 フィンガープリント: <code class="fingerprint">{fingerprint}</code></p>
<h2>Windows</h2>
<ol><li>matte-ca.crt を開き、「証明書のインストール」を選びます。</li>
<li>「ローカル コンピューター」(または「現在のユーザー」) を選び、
「証明書をすべて次のストアに配置する」で「信頼されたルート証明機関」を選びます。</li>
<li>完了後、Outlook などのメールソフトを再起動します。</li></ol>
<h2>macOS</h2>
<ol><li>matte-ca.crt を開くと「キーチェーンアクセス」に追加されます (「システム」キーチェーン)。</li>
<li>追加された証明書をダブルクリックし、「信頼」で「この証明書を使用するとき」を
「常に信頼」にします。</li></ol>
<h2>Thunderbird</h2>
<ol><li>設定 → プライバシーとセキュリティ → 証明書 → 「証明書を管理」を開きます。</li>
<li>「認証局証明書」タブで「インポート」を選び、matte-ca.pem を選びます。</li>
<li>「この認証局によるメールユーザーの識別を信頼する」に印を付けて OK を押します。</li></ol>
<p>証明書を取り込む前に、上のフィンガープリントがゲートウェイの管理者から知らされた値と
同じことを確かめてください。</p>
""",
    "en": """
<h1>CA certificate</h1>
<p>Import the gateway's CA certificate once, so that mail clients can talk to the gateway
over TLS (STARTTLS or SSL/TLS) and verify it.</p>
<p class="downloads"><a class="button" href="/ca.crt" download>CA certificate (matte-ca.crt)</a>
<a href="/ca.pem" download>PEM format (matte-ca.pem)</a></p>
<p>SHA-256 fingerprint: <code class="fingerprint">{fingerprint}</code></p>
<h2>Windows</h2>
<ol><li>Open matte-ca.crt and choose <em>Install Certificate</em>.</li>
<li>Choose <em>Local Machine</em> (or <em>Current User</em>), then <em>Place all certificates in
the following store</em>: <em>Trusted Root Certification Authorities</em>.</li>
<li>Restart Outlook or the other mail clients.</li></ol>
<h2>macOS</h2>
<ol><li>Open matte-ca.crt: Keychain Access adds it (to the <em>System</em> keychain).</li>
<li>Double-click the certificate, open <em>Trust</em> and set <em>When using this
certificate</em> to <em>Always Trust</em>.</li></ol>
<h2>Thunderbird</h2>
<ol><li>Settings → Privacy &amp; Security → Certificates → <em>Manage Certificates</em>.</li>
<li>On the <em>Authorities</em> tab choose <em>Import</em> and pick matte-ca.pem.</li>
<li>Tick <em>Trust this CA to identify email users</em> and press OK.</li></ol>
<p>Before importing, check that the fingerprint above is the one your administrator gave you.</p>
""",
}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


STATIC = {
    "/static/mail.css": (_static("mail.css"), "text/css; charset=utf-8"),
    "/static/mail.js": (_static("mail.js"), "text/javascript; charset=utf-8"),
}


def t(lang: str, key: str, **values: Any) -> str:
    """The text for `key` in `lang`, escaped, with escaped values filled in."""
    template = html.escape(TEXT[key][lang], quote=False)
    return template.format(**{k: _e(v) for k, v in values.items()}) if values else template


def choose_language(request: Request) -> tuple[str, bool]:
    """The page's language and whether the choice came from the URL (then it is remembered)."""
    asked = urllib.parse.parse_qs(request.query).get("lang", [""])[0]
    if asked in LANGUAGES:
        return asked, True
    for part in (request.header("cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == LANG_COOKIE and value in LANGUAGES:
            return value, False
    best, best_q = "ja", 0.0
    for item in (request.header("accept-language") or "").split(","):
        tag, *params = item.strip().split(";")
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best, False


async def handle_page(ctx: WebContext, request: Request) -> Response | None:
    """Answer the page's paths; None for a path that is not the page's."""
    path = request.path
    lang, remember = choose_language(request)
    if path == "/":
        if request.method not in ("GET", "HEAD"):
            return _not_allowed(lang, "GET, HEAD")
        return Response.redirect("/mail", 302)
    if path in ("/mail", "/mail/ca"):
        if request.method not in ("GET", "HEAD"):
            return _not_allowed(lang, "GET, HEAD")
        if path == "/mail/ca":
            response = Response.html(render_ca_page(ctx.ca_pem, lang))
        else:
            query = urllib.parse.parse_qs(request.query)
            notice = query.get("done", [""])[0]
            count = query.get("n", ["0"])[0]
            ip = request.client_ip
            page = render_mail_page(
                ctx.queue.held_for(ip),
                ip=ip,
                token=ctx.token_for(ip),
                store=ctx.queue.store_status(),
                now=ctx.queue.now(),  # the clock release_at is on
                notice=notice,
                count=int(count) if count.isascii() and count.isdigit() and len(count) < 6 else 0,
                lang=lang,
            )
            response = Response.html(page)
        if remember:
            response.headers.append(
                ("Set-Cookie", f"{LANG_COOKIE}={lang}; Path=/; Max-Age=31536000; SameSite=Lax"))
        return response
    if path in STATIC:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed(lang, "GET, HEAD")
        body, content_type = STATIC[path]
        return Response(200, body, content_type)
    match = _ACTION_PATH.fullmatch(path)
    if match and match[2] in ACTIONS:
        if request.method != "POST":
            return _not_allowed(lang, "POST")
        return await _form_action(ctx, request, match[1], match[2], lang)
    return None


async def _form_action(
    ctx: WebContext, request: Request, id_text: str, action: str, lang: str
) -> Response:
    ip = request.client_ip
    form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"))
    if not ctx.token_ok(ip, form.get("token", [""])[0]):
        ctx.count("token_refused")
        return _message_page(403, lang, "refused")
    if id_text == "all" and action in ("cancel", "send"):
        done = await perform_all(ctx, action, ip)
        notice = "all_cancelled" if action == "cancel" else "all_sent"
        return Response.redirect(f"/mail?done={notice}&n={done}")
    id = parse_id(id_text)
    if id is None or not await perform(ctx, action, id, ip, EXTEND_STEP):
        return Response.redirect("/mail?done=gone")
    return Response.redirect(f"/mail?done={_ACTION_NOTICE[action]}")


def _not_allowed(lang: str, allow: str) -> Response:
    response = _message_page(405, lang, "not_allowed")
    response.headers.append(("Allow", allow))
    return response


def _message_page(status: int, lang: str, key: str) -> Response:
    body = _document(
        "Matte",
        f'<main><p class="notice error" role="alert">{t(lang, key)}</p>'
        f'<p><a href="/mail">{t(lang, "back")}</a></p></main>',
        lang=lang,
    )
    return Response.html(body, status)


def inert(value: object) -> str:
    """Text from mail made safe to show: controls that hide or reorder text become visible."""
    text = clean_text(str(value))
    text = _HIDDEN.sub(lambda m: f"\\u{ord(m[0]):04X}" if m[0] != "\x00" else "\uFFFD", text)
    return text


def _e(value: object) -> str:
    return html.escape(inert(value), quote=True)


def _document(title: str, body: str, *, lang: str, script: bool = False, refresh: int = 0) -> str:
    # Without JavaScript the list refreshes itself; with it, mail.js updates it live.
    meta = f'<noscript><meta http-equiv="refresh" content="{refresh}"></noscript>' if refresh else ""
    js = '<script src="/static/mail.js" defer></script>' if script else ""
    return (
        "<!doctype html>\n"
        f'<html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{_e(title)}</title>"
        f'<link rel="stylesheet" href="/static/mail.css">{js}</head>\n'
        f"<body>\n{body}\n</body></html>\n"
    )


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _remaining(lang: str, seconds: float) -> str:
    if seconds <= 0:
        return t(lang, "due")
    minutes, secs = divmod(int(seconds + 0.999), 60)
    return t(lang, "left", t=f"{minutes}:{secs:02d}")


def _addresses(lang: str, kind: str, addresses: Sequence[str]) -> str:
    """A recipient list, the first few shown and the rest folded (a <details>, no script)."""
    items = "".join(f"<li>{_e(a)}</li>" for a in addresses[:MAX_LISTED])
    folded = ""
    if len(addresses) > MAX_LISTED:
        rest = "".join(f"<li>{_e(a)}</li>" for a in addresses[MAX_LISTED:])
        folded = (f'<details><summary>{t(lang, "more", n=len(addresses) - MAX_LISTED)}</summary>'
                  f"<ul>{rest}</ul></details>")
    return (f'<div class="rcpt {kind}"><dt>{t(lang, kind)} <span class="count">'
            f"({len(addresses)})</span></dt><dd><ul>{items}</ul>{folded}</dd></div>")


def _button(item_id: str, action: str, token: str, lang: str, label: str) -> str:
    return (
        f'<form method="post" action="/mail/{item_id}/{action}">'
        f'<input type="hidden" name="token" value="{_e(token)}">'
        f'<button type="submit" class="{action}" data-action="{action}">{t(lang, label)}'
        "</button></form>"
    )


def _item(item: Any, token: str, now: float, lang: str) -> str:
    item_id = item.id.hex()
    subject = item.subject or ""
    subject_html = _e(subject) if subject else f'<span class="none">{t(lang, "no_subject")}</span>'
    sender = item.from_ or item.sender or ""
    recipients = ""
    if item.to:
        recipients += _addresses(lang, "to", item.to)
    if item.cc:
        recipients += _addresses(lang, "cc", item.cc)
    if item.bcc_count:
        recipients += (f'<div class="rcpt bcc"><dt>{t(lang, "bcc")}</dt>'
                       f'<dd class="bcc-count">{t(lang, "bcc_count", n=int(item.bcc_count))}</dd>'
                       "</div>")
    release_at = float(item.release_at)
    return (
        f'<li class="mail" id="m-{item_id}" data-id="{item_id}" data-release-at="{release_at!r}">'
        f'<div class="head"><h2 class="subject">{subject_html}</h2>'
        f'<span class="countdown" role="timer">{_remaining(lang, release_at - now)}</span></div>'
        "<dl>"
        f'<div><dt>{t(lang, "from")}</dt><dd class="from">{_e(sender)}</dd></div>'
        f"{recipients}"
        f'<div class="meta"><dt>{t(lang, "received")}</dt><dd>{_clock(item.received_at)}</dd>'
        f'<dt>{t(lang, "release")}</dt><dd class="release-at">{_clock(release_at)}</dd>'
        f'<dt>{t(lang, "size")}</dt><dd class="size">{size_text(int(item.size))}</dd></div>'
        "</dl>"
        '<div class="actions">'
        + _button(item_id, "cancel", token, lang, "cancel")
        + _button(item_id, "send", token, lang, "send")
        + _button(item_id, "extend", token, lang, "extend")
        + '</div><p class="status" role="status"></p></li>'
    )


def store_text(lang: str, store: dict[str, Any]) -> str:
    try:
        return t(lang, "store", messages=int(store["messages"]),
                 max_messages=int(store["max_messages"]), bytes=size_text(int(store["bytes"])),
                 max_bytes=size_text(int(store["max_bytes"])))
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
    count: int = 0,
    lang: str = "ja",
    refresh: int = 30,
) -> str:
    """The whole /mail document for the mail held from `ip`."""
    other = "en" if lang == "ja" else "ja"
    other_name = "English" if other == "en" else "日本語"
    parts = [
        f'<header><nav class="lang"><a href="/mail?lang={other}" lang="{other}" '
        f'hreflang="{other}">{other_name}</a></nav>'
        f'<h1>{t(lang, "title")}</h1>'
        f'<p class="scope">{t(lang, "scope", ip=ip)}</p></header>',
        f'<div id="page" data-token="{_e(token)}" data-lang="{lang}" data-now="{now:.3f}" '
        f'data-extend="{EXTEND_STEP}">',
    ]
    notice_text = t(lang, notice, n=count) if notice in NOTICES else ""
    parts.append(f'<p class="notice" id="notice" role="status"'
                 f'{"" if notice_text else " hidden"}>{notice_text}</p>')
    parts.append(
        '<div class="bulk">'
        f'<form method="post" action="/mail/all/cancel"><input type="hidden" name="token" '
        f'value="{_e(token)}"><button type="submit" class="cancel" data-action="cancel-all">'
        f'{t(lang, "cancel_all")}</button></form>'
        f'<form method="post" action="/mail/all/send"><input type="hidden" name="token" '
        f'value="{_e(token)}"><button type="submit" class="send" data-action="send-all">'
        f'{t(lang, "send_all")}</button></form></div>'
    )
    parts.append("<main>")
    parts.append('<ul id="held" class="held" aria-live="polite">')
    parts.extend(_item(item, token, now, lang) for item in held)
    parts.append("</ul>")
    parts.append(f'<p class="empty" id="empty"{" hidden" if held else ""}>{t(lang, "empty")}</p>')
    parts.append("</main></div>")
    parts.append(
        f'<footer><p id="store">{store_text(lang, store)}</p>'
        f'<p><span id="shown">{t(lang, "shown_at", t=_clock(now))}</span> · '
        f'<a href="/mail" id="reload">{t(lang, "reload")}</a> · '
        f'<span id="live" data-state="off"></span></p>'
        f'<p><a href="/mail/ca">{t(lang, "ca_link")}</a></p></footer>'
    )
    return _document(f'{t(lang, "title")} — Matte', "\n".join(parts), lang=lang, script=True,
                     refresh=refresh)


def render_ca_page(ca_pem: bytes | None, lang: str) -> str:
    fingerprint = "—"
    if ca_pem is not None:
        digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(ca_pem.decode("ascii"))).hexdigest()
        fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()
    body = (f'<main class="ca">{CA_TEXT[lang].format(fingerprint=fingerprint)}'
            f'<p><a href="/mail">{t(lang, "back")}</a></p></main>')
    return _document("CA — Matte", body, lang=lang)
