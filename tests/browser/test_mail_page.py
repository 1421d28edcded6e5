"""The /mail page in a real browser, against the whole gateway and an aiosmtpd upstream."""

from functools import partial

from tests.integration.conftest import in_thread, make_message, send_mail, wait_for

from .conftest import forward_from

ROW = "return document.querySelector('li.mail[id=\"m-' + arguments[0] + '\"]')"


async def _held_id(queue, subject: str) -> str:
    await wait_for(lambda: any(h.subject == subject for h in queue.held_for("127.0.0.1")))
    return next(h.id.hex() for h in queue.held_for("127.0.0.1") if h.subject == subject)


async def _open(browser, url: str, state: str) -> None:
    await browser.get(url)
    # A marker that a reload would wipe: every later check also proves "without reload".
    await browser.js("window.matteMarker = 'kept'")
    assert await browser.wait_for(
        "return document.getElementById('live').dataset.state === arguments[0]", state)


async def _still_same_page(browser) -> None:
    assert await browser.js("return window.matteMarker") == "kept"


async def test_live_page_cancel_send_now_extend_and_scope(start_gateway, upstream, browsers, nursery):
    running = await start_gateway(upstream.port)
    web, smtp = running.web[0][1], running.smtp[0][1]
    queue = running.queue
    page = await browsers("en")
    await _open(page, f"http://127.0.0.1:{web}/mail", "live")
    other_port = await nursery.start(forward_from, "127.0.0.2", web)
    other = await browsers("en")
    await _open(other, f"http://127.0.0.1:{other_port}/mail", "live")

    # A message sent with smtplib appears without reload.
    await in_thread(send_mail, smtp, make_message("Cancel me"))
    cancel_id = await _held_id(queue, "Cancel me")
    assert await page.wait_for(ROW, cancel_id)
    assert "Cancel me" in await page.js("return document.getElementById('held').textContent")
    assert await page.wait_for(
        "return /\\d+:\\d\\d left/.test(document.querySelector('#m-' + arguments[0] + ' .countdown').textContent)",
        cancel_id)

    # Cancel: it says so in place, then leaves; it never reaches the upstream.
    await page.click(f"#m-{cancel_id} button.cancel")
    assert await page.wait_for(
        "return document.querySelector('#m-' + arguments[0] + ' .status').textContent", cancel_id
    ) == "Cancelled: it will not be sent."
    assert await page.wait_for(f"return !({ROW[7:]})", cancel_id)
    assert queue.held_for("127.0.0.1") == []

    # Send now: delivered at once (the hold is 300 s).
    await in_thread(send_mail, smtp, make_message("Send me"))
    send_id = await _held_id(queue, "Send me")
    assert await page.wait_for(ROW, send_id)
    await page.click(f"#m-{send_id} button.send")
    await wait_for(lambda: any(b"Subject: Send me" in m.content for m in upstream.received()))
    assert not any(b"Cancel me" in m.content for m in upstream.received())
    assert len(upstream.received()) == 1

    # +5 min moves the countdown.
    await in_thread(send_mail, smtp, make_message("Extend me"))
    extend_id = await _held_id(queue, "Extend me")
    assert await page.wait_for(ROW, extend_id)
    before = float(await page.js("return document.getElementById('m-' + arguments[0]).dataset.releaseAt", extend_id))
    await page.click(f"#m-{extend_id} button.extend")
    after = await page.wait_for(
        "var v = parseFloat(document.getElementById('m-' + arguments[0]).dataset.releaseAt);"
        "return v > arguments[1] ? v : false", extend_id, before)
    assert 299 <= after - before <= 301
    assert await page.wait_for(
        "return /^(9|10):\\d\\d left$/.test(document.querySelector('#m-' + arguments[0] + ' .countdown').textContent)",
        extend_id)

    # The browser at 127.0.0.2 saw none of it, and sees its own mail only.
    assert await other.js("return document.querySelectorAll('li.mail').length") == 0
    await in_thread(send_mail, smtp, make_message("From two"), source="127.0.0.2")
    assert await other.wait_for(
        "return document.getElementById('held').textContent.includes('From two')")
    assert "Extend me" not in await other.js("return document.body.textContent")
    assert "From two" not in await page.js("return document.body.textContent")
    await _still_same_page(page)
    await _still_same_page(other)


async def test_page_polls_when_websockets_are_blocked(start_gateway, upstream, browsers, nursery):
    running = await start_gateway(upstream.port)
    web, smtp = running.web[0][1], running.smtp[0][1]
    blocked = await nursery.start(partial(forward_from, "127.0.0.1", web, block_websocket=True))
    page = await browsers("ja")
    await _open(page, f"http://127.0.0.1:{blocked}/mail", "polling")
    assert await page.js("return document.documentElement.lang") == "ja"
    await in_thread(send_mail, smtp, make_message("Polled"))
    held = await _held_id(running.queue, "Polled")
    assert await page.wait_for(ROW, held)
    assert "あと" in await page.js(
        "return document.querySelector('#m-' + arguments[0] + ' .countdown').textContent", held)
    await page.click(f"#m-{held} button.send")
    await wait_for(lambda: any(b"Subject: Polled" in m.content for m in upstream.received()))
    assert await page.wait_for(f"return !({ROW[7:]})", held)
    assert await page.js("return document.getElementById('live').dataset.state") == "polling"
    await _still_same_page(page)
