import re
import time
import urllib.parse

from firmware.web import token_for
from firmware.web.pages import render_mail_page

from .conftest import SECRET, request

A, B = "127.0.0.1", "127.0.0.2"
HOSTILE_SUBJECT = '<script>alert("x")</script> & <b>bold</b>'
HOSTILE_FROM = '"><img src=x onerror=alert(1)>'


def _form(token: str) -> dict:
    return {
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        "body": urllib.parse.urlencode({"token": token}).encode(),
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


async def test_page_escapes_everything_from_mail(port, queue):
    queue.add(A, HOSTILE_SUBJECT, from_=HOSTILE_FROM, to=("<x@y>",), cc=('"q" <c@d>',))
    reply = await request(port, "GET", "/mail")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    page = reply.text
    assert "<script" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;x@y&gt;" in page


async def test_page_shows_release_time_and_forms(port, queue):
    now = time.time()
    held = queue.add(A, "Report", received_at=now, release_at=now + 250)
    page = (await request(port, "GET", "/mail")).text
    expected = time.strftime("%H:%M:%S", time.localtime(held.release_at))
    assert f"releases at <time>{expected}</time>" in page
    assert re.search(r"あと 4:(0\d|1\d) ", page)
    token = token_for(SECRET, A)
    for action in ("cancel", "send", "extend"):
        assert f'<form method="post" action="/mail/{held.id.hex()}/{action}">' in page
    assert page.count(f'<input type="hidden" name="token" value="{token}">') == 3
    assert "<table>" in page and "件名" in page and "Subject" in page


async def test_empty_page_and_store_line(port, queue):
    page = (await request(port, "GET", "/mail")).text
    assert "No held mail." in page and "<table>" not in page
    assert "0 / 500" in page


async def test_page_needs_no_script_and_links_stylesheet(port, queue):
    queue.add(A)
    page = (await request(port, "GET", "/mail")).text
    assert "<script" not in page and "style=" not in page and "<style" not in page
    assert '<link rel="stylesheet" href="/static/mail.css">' in page
    css = await request(port, "GET", "/static/mail.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")
    assert b"table" in css.body


async def test_form_cancel_redirects(port, queue):
    held = queue.add(A)
    reply = await request(port, "POST", f"/mail/{held.id.hex()}/cancel", **_form(token_for(SECRET, A)))
    assert reply.status == 303 and reply.headers["location"] == "/mail?done=cancelled"
    assert held.id not in queue.items
    page = (await request(port, "GET", "/mail?done=cancelled")).text
    assert "Cancelled" in page


async def test_form_send_and_extend(port, queue):
    one, two = queue.add(A), queue.add(A)
    form = _form(token_for(SECRET, A))
    reply = await request(port, "POST", f"/mail/{one.id.hex()}/send", **form)
    assert reply.headers["location"] == "/mail?done=sent"
    reply = await request(port, "POST", f"/mail/{two.id.hex()}/extend", **form)
    assert reply.headers["location"] == "/mail?done=extended"
    assert queue.calls == [("send_now", one.id, A), ("extend", two.id, A, 300)]


async def test_form_bad_token_is_403_and_no_change(port, queue):
    held = queue.add(A)
    for form in (_form(""), _form(token_for(SECRET, B)), {"body": b""}):
        reply = await request(port, "POST", f"/mail/{held.id.hex()}/cancel", **form)
        assert reply.status == 403
        assert "<form" not in reply.text
    assert queue.calls == [] and held.id in queue.items


async def test_form_others_message_untouched(port, queue):
    theirs = queue.add(B)
    reply = await request(port, "POST", f"/mail/{theirs.id.hex()}/cancel", **_form(token_for(SECRET, A)))
    assert reply.status == 303 and reply.headers["location"] == "/mail?done=gone"
    assert theirs.id in queue.items


async def test_notice_is_not_reflected(port):
    page = (await request(port, "GET", "/mail?done=%3Cscript%3E")).text
    assert "script" not in page


async def test_get_on_form_action_is_405(port, queue):
    held = queue.add(A)
    reply = await request(port, "GET", f"/mail/{held.id.hex()}/cancel")
    assert reply.status == 405 and reply.headers["allow"] == "POST"
    assert held.id in queue.items


def test_render_truncates_long_recipient_lists(queue):
    held = queue.add(A, to=tuple(f"r{i}@example.com" for i in range(10)), bcc_count=4)
    page = render_mail_page([held], ip=A, token="t", store={}, now=held.received_at)
    assert "r2@example.com" in page and "r3@example.com" not in page
    assert "+7 more" in page
    assert "Bcc</span> 4" in page


def test_render_overdue_and_blank_fields(queue):
    held = queue.add(A, "", from_="", sender="")
    page = render_mail_page([held], ip=A, token="t", store={}, now=held.release_at + 5)
    assert "sending" in page
    assert "no subject" in page
