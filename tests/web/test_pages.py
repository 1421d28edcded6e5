import json
import re
import time
import urllib.parse
from html.parser import HTMLParser

import pytest
import trio
from functools import partial

from firmware.web import token_for
from firmware.web.pages import choose_language, render_mail_page
from firmware.web.http import Request

from .conftest import SECRET, request

A, B = "127.0.0.1", "127.0.0.2"
HOSTILE_SUBJECTS = [
    '<script>alert("x")</script> & <b>bold</b>',
    '"><img src=x onerror=alert(1)>',
    "<a href=\"javascript:alert(1)\">click</a>",
    "javascript:alert(1)",
    "</li></ul><form action=//evil><button>",
    "invoice\u202egpj.exe",
    "nul\x00byte",
    "bad utf-8 \udcff\udcfe",
    "<svg/onload=alert(1)>",
    "<!-- comment --><style>*{display:none}</style>",
]


class Elements(HTMLParser):
    """The elements a browser would create from the page, with their attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(page: str) -> list[tuple[str, dict]]:
    parser = Elements()
    parser.feed(page)
    return parser.tags


def _form(token: str, **extra) -> dict:
    return {
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        "body": urllib.parse.urlencode({"token": token, **extra}).encode(),
    }


async def test_root_redirects_to_mail(port):
    reply = await request(port, "GET", "/")
    assert reply.status == 302 and reply.headers["location"] == "/mail"


async def test_page_lists_only_callers_mail(port, queue):
    queue.add(A, "Mine from A")
    queue.add(B, "Theirs from B")
    page = (await request(port, "GET", "/mail")).text
    assert "Mine from A" in page and "Theirs from B" not in page
    page = (await request(port, "GET", "/mail", source=B)).text
    assert "Theirs from B" in page and "Mine from A" not in page


@pytest.mark.parametrize("subject", HOSTILE_SUBJECTS)
async def test_hostile_strings_render_inert(port, queue, subject):
    queue.add(A, subject, from_=subject, to=(subject, "x@y"), cc=(subject,))
    reply = await request(port, "GET", "/mail")
    assert reply.status == 200
    page = reply.text
    tags = elements(page)
    # Exactly the page's own elements: the hostile text created none.
    assert [t for t, _ in tags if t in ("script", "img", "svg", "b", "style", "a", "form")] == [
        "script", "a", "form", "form", "form", "form", "form", "a", "a"]
    assert [a.get("src") for t, a in tags if t == "script"] == ["/static/mail.js"]
    assert not any(k.startswith("on") for _, attrs in tags for k in attrs)
    assert not any("javascript:" in (v or "") for _, attrs in tags for v in attrs.values())
    assert "\u202e" not in page and "\x00" not in page
    if "\u202e" in subject:
        assert "invoice\\u202Egpj.exe" in page


async def test_page_shows_fields_countdown_and_forms(port, queue):
    now = time.time()
    held = queue.add(A, "Report", received_at=now, release_at=now + 250, bcc_count=2,
                     cc=("c@example.org",), size=3 * 1024 * 1024)
    page = (await request(port, "GET", "/mail", headers={"Accept-Language": "en"})).text
    assert re.search(r"4:(0\d|1\d) left", page)
    assert time.strftime("%H:%M:%S", time.localtime(held.release_at)) in page
    assert "3.0 MB" in page and "2 recipient(s)" in page and "c@example.org" in page
    token = token_for(SECRET, A)
    for action in ("cancel", "send", "extend"):
        assert f'<form method="post" action="/mail/{held.id.hex()}/{action}">' in page
    for action in ("cancel", "send"):
        assert f'<form method="post" action="/mail/all/{action}">' in page
    assert page.count(f'<input type="hidden" name="token" value="{token}">') == 5
    assert "body" not in page.lower().split("<body>")[1].replace("</body>", "")  # never a body


async def test_countdowns_use_the_gateways_clock_not_this_machines(port, queue):
    """The gateway's clock has kept its offset since it started while the system clock was
    stepped (NTP on a board without a real-time clock): countdowns still count the hold."""
    queue.clock_offset = -3 * 365 * 86400.0
    now = queue.now()
    queue.add(A, "Report", received_at=now, release_at=now + 250)
    page = (await request(port, "GET", "/mail", headers={"Accept-Language": "en"})).text
    assert re.search(r"4:(0\d|1\d) left", page)
    snapshot = json.loads((await request(port, "GET", "/api/held")).body)
    assert snapshot["held"][0]["release_at"] - snapshot["now"] == pytest.approx(250, abs=5)


async def test_long_recipient_lists_are_folded_with_a_count(port, queue):
    to = tuple(f"r{i}@example.com" for i in range(12))
    queue.add(A, "many", to=to)
    page = (await request(port, "GET", "/mail", headers={"Accept-Language": "en"})).text
    assert "(12)" in page and "<summary>9 more</summary>" in page
    first, folded = page.split("<details>")
    assert "r2@example.com" in first and "r3@example.com" not in first
    assert "r11@example.com" in folded


async def test_empty_page_and_store_line(port, queue):
    page = (await request(port, "GET", "/mail", headers={"Accept-Language": "en"})).text
    assert "No held mail." in page
    assert "Store: 0 / 500 messages, 0 B / 200.0 MB" in page


@pytest.mark.parametrize("header, lang", [
    ("en-US,en;q=0.9", "en"), ("ja,en;q=0.5", "ja"), ("fr, en;q=0.3, ja;q=0.2", "en"),
    ("", "ja"), ("de", "ja"), ("en;q=bad, ja;q=0.1", "ja"),
])
def test_language_from_accept_language(header, lang):
    req = Request("GET", "/mail", "", (("accept-language", header),), b"", A)
    assert choose_language(req) == (lang, False)


async def test_language_switch_is_remembered(port):
    reply = await request(port, "GET", "/mail?lang=en", headers={"Accept-Language": "ja"})
    assert '<html lang="en">' in reply.text and "Held mail" in reply.text
    assert '<a href="/mail?lang=ja" lang="ja" hreflang="ja">日本語</a>' in reply.text
    cookie = reply.headers["set-cookie"].split(";")[0]
    assert cookie == "matte_lang=en"
    again = await request(port, "GET", "/mail", headers={"Accept-Language": "ja", "Cookie": cookie})
    assert '<html lang="en">' in again.text
    ja = await request(port, "GET", "/mail", headers={"Accept-Language": "ja"})
    assert '<html lang="ja">' in ja.text and "保留中のメール" in ja.text
    assert "set-cookie" not in ja.headers


async def test_page_has_no_inline_script_and_works_without_it(port, queue):
    queue.add(A, "x")
    page = (await request(port, "GET", "/mail")).text
    tags = elements(page)
    scripts = [a for t, a in tags if t == "script"]
    assert scripts == [{"src": "/static/mail.js", "defer": None}]
    assert re.search(r"<script[^>]*>\s*</script>", page)  # empty: nothing inline
    assert '<noscript><meta http-equiv="refresh"' in page
    css = await request(port, "GET", "/static/mail.css")
    js = await request(port, "GET", "/static/mail.js")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")
    assert js.status == 200 and js.headers["content-type"].startswith("text/javascript")
    assert b"textContent" in js.body and b"innerHTML" not in js.body


async def test_form_cancel_redirects(port, queue):
    held = queue.add(A, "x")
    reply = await request(port, "POST", f"/mail/{held.id.hex()}/cancel", **_form(token_for(SECRET, A)))
    assert reply.status == 303 and reply.headers["location"] == "/mail?done=cancelled"
    assert held.id not in queue.items
    page = (await request(port, "GET", "/mail?done=cancelled", headers={"Accept-Language": "en"})).text
    assert "Cancelled: it will not be sent." in page


async def test_form_send_and_extend(port, queue):
    a, b = queue.add(A, "a"), queue.add(A, "b")
    token = token_for(SECRET, A)
    reply = await request(port, "POST", f"/mail/{a.id.hex()}/send", **_form(token))
    assert reply.headers["location"] == "/mail?done=sent" and a.id not in queue.items
    before = queue.items[b.id].release_at
    reply = await request(port, "POST", f"/mail/{b.id.hex()}/extend", **_form(token))
    assert reply.headers["location"] == "/mail?done=extended"
    assert queue.items[b.id].release_at == before + 300


async def test_form_cancel_all_and_send_all_only_touch_callers_mail(port, queue):
    mine = [queue.add(A, f"m{i}") for i in range(3)]
    theirs = queue.add(B, "theirs")
    token = token_for(SECRET, A)
    reply = await request(port, "POST", "/mail/all/cancel", **_form(token))
    assert reply.headers["location"] == "/mail?done=all_cancelled&n=3"
    assert list(queue.items) == [theirs.id]
    assert all(m.id not in queue.items for m in mine)
    page = (await request(port, "GET", reply.headers["location"], headers={"Accept-Language": "en"})).text
    assert "Cancelled 3 message(s)." in page
    again = queue.add(A, "later")
    reply = await request(port, "POST", "/mail/all/send", **_form(token))
    assert reply.headers["location"] == "/mail?done=all_sent&n=1"
    assert again.id not in queue.items and theirs.id in queue.items


async def test_form_bad_token_is_403_and_no_change(port, queue):
    held = queue.add(A, "x")
    for token in ("", "0" * 32, token_for(SECRET, B)):
        for path in (f"/mail/{held.id.hex()}/cancel", "/mail/all/cancel"):
            reply = await request(port, "POST", path, **_form(token))
            assert reply.status == 403
    assert held.id in queue.items and queue.calls == []


async def test_form_others_message_untouched(port, queue):
    theirs = queue.add(B, "x")
    reply = await request(port, "POST", f"/mail/{theirs.id.hex()}/cancel", **_form(token_for(SECRET, A)))
    assert reply.headers["location"] == "/mail?done=gone"
    assert theirs.id in queue.items


async def test_notice_is_not_reflected(port):
    page = (await request(port, "GET", "/mail?done=%3Cscript%3Ex&n=%3Cb%3E")).text
    assert "<script>x" not in page and "&lt;script" not in page and "<b>" not in page


async def test_get_on_form_action_is_405(port, queue):
    held = queue.add(A, "x")
    reply = await request(port, "GET", f"/mail/{held.id.hex()}/cancel")
    assert reply.status == 405 and reply.headers["allow"] == "POST"
    assert held.id in queue.items and queue.calls == []


def test_render_overdue_and_blank_fields(queue):
    held = queue.add(A, "", from_="", sender="")
    page = render_mail_page([held], ip=A, token="t", store={}, now=held.release_at + 5, lang="en")
    assert "sending…" in page and "(no subject)" in page


async def test_ca_page_and_download(nursery, queue, tmp_path):
    from firmware import tls
    from firmware.web import serve_web

    from .conftest import make_app

    device = tls.ensure_device_certificates(tmp_path, ["matte.test"])
    pem = device.ca_cert.read_bytes()
    bound = await nursery.start(serve_web, [("127.0.0.1", 0)], make_app(queue, ca_pem=pem))
    port = bound[0][1]
    page = await request(port, "GET", "/mail/ca", headers={"Accept-Language": "en"})
    for words in ("Windows", "macOS", "Thunderbird", 'href="/ca.crt"', 'href="/ca.pem"'):
        assert words in page.text
    ja = await request(port, "GET", "/mail/ca", headers={"Accept-Language": "ja"})
    assert "信頼されたルート証明機関" in ja.text
    got = await request(port, "GET", "/ca.pem")
    assert got.body == pem and "attachment" in got.headers["content-disposition"]
    der = await request(port, "GET", "/ca.crt")
    import ssl
    import hashlib
    assert der.body == ssl.PEM_cert_to_DER_cert(pem.decode())
    fingerprint = hashlib.sha256(der.body).hexdigest().upper()
    assert ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)) in page.text
    assert (await request(port, "POST", "/ca.pem")).status == 405
    assert (await request(port, "GET", "/mail")).text.count('href="/mail/ca"') == 1


async def test_page_over_https_with_the_device_certificate(nursery, queue, tmp_path):
    import ssl

    from firmware import tls
    from firmware.web import serve_web

    from .conftest import make_app

    device = tls.ensure_device_certificates(tmp_path, ["matte.test", "127.0.0.1"])
    port = (await nursery.start(partial(serve_web, [("127.0.0.1", 0)], make_app(queue),
                                        tls_context=tls.server_context(device))))[0][1]
    queue.add(A, "over https")
    client = ssl.create_default_context(cafile=str(device.ca_cert))
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client,
                                                 https_compatible=True)
    async with stream:
        import h11

        from .conftest import read_reply, send_request

        conn = h11.Connection(h11.CLIENT)
        with trio.fail_after(10):
            await send_request(stream, conn, "POST", "/api/held/all/cancel",
                               headers={"Origin": "http://matte.test",
                                        "X-Matte-Token": token_for(SECRET, A)})
            refused = await read_reply(stream, conn)  # http:// is another origin than https://
            conn.start_next_cycle()
            await send_request(stream, conn, "GET", "/mail")
            reply = await read_reply(stream, conn)
    assert refused.status == 403
    assert reply.status == 200 and "over https" in reply.text
