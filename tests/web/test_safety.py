"""The page is a LAN page without login: each defence here is tested to fail when removed."""

import pytest
import trio

from firmware.web import token_for

from .conftest import SECRET, connect, make_app, request

A, B = "127.0.0.1", "127.0.0.2"


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:8080", "127.0.0.2", "[::1]", "matte.test.evil.example",
    "127.0.0.1.nip.io",
])
@pytest.mark.parametrize("path", ["/mail", "/api/held", "/metrics", "/api/store"])
async def test_foreign_host_gets_no_data(port, queue, host, path):
    queue.add(A, "secret subject")
    reply = await request(port, "GET", path, headers={"Host": host})
    assert reply.status == 421
    assert b"secret subject" not in reply.body and b"matte_" not in reply.body
    assert b"token" not in reply.body


async def test_missing_host_is_400(port, queue):
    queue.add(A, "secret subject")
    from .conftest import raw_exchange

    raw = await raw_exchange(port, b"GET /api/held HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ") and b"secret subject" not in raw


@pytest.mark.parametrize("host", ["matte.test", "MATTE.TEST:80", "matte.test.", "127.0.0.1",
                                  "127.0.0.1:1234", "localhost:8080"])
async def test_own_names_and_address_are_served(port, queue, host):
    queue.add(A, "mine")
    reply = await request(port, "GET", "/api/held", headers={"Host": host})
    assert reply.status == 200 and reply.json()["held"][0]["subject"] == "mine"


async def test_host_check_on_action_changes_nothing(port, queue):
    held = queue.add(A, "x")
    reply = await request(port, "POST", f"/api/held/{held.id.hex()}/cancel",
                          headers={"Host": "evil.example", "X-Matte-Token": token_for(SECRET, A)})
    assert reply.status == 421 and held.id in queue.items and queue.calls == []


CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "https://matte.test"},  # another scheme is another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://matte.test", "Sec-Fetch-Site": "cross-site"},
]


@pytest.mark.parametrize("headers", CROSS_SITE)
async def test_cross_site_posts_change_nothing(port, queue, headers):
    held = queue.add(A, "x")
    token = token_for(SECRET, A)
    api = await request(port, "POST", f"/api/held/{held.id.hex()}/cancel",
                        headers={**headers, "X-Matte-Token": token})
    form = await request(port, "POST", f"/mail/{held.id.hex()}/send",
                         headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
                         body=f"token={token}".encode())
    bulk = await request(port, "POST", "/mail/all/cancel", headers=headers,
                         body=f"token={token}".encode())
    assert (api.status, form.status, bulk.status) == (403, 403, 403)
    assert held.id in queue.items and queue.calls == []


@pytest.mark.parametrize("headers", [
    {}, {"Origin": "http://matte.test"}, {"Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"}, {"Origin": "http://matte.test", "Sec-Fetch-Site": "same-origin"},
])
async def test_same_site_posts_work(port, queue, headers):
    held = queue.add(A, "x")
    reply = await request(port, "POST", f"/api/held/{held.id.hex()}/cancel",
                          headers={**headers, "X-Matte-Token": token_for(SECRET, A)})
    assert reply.status == 200 and held.id not in queue.items


async def test_no_state_change_on_get(port, queue):
    held = queue.add(A, "x")
    token = token_for(SECRET, A)
    for path in (f"/mail/{held.id.hex()}/cancel?token={token}", f"/api/held/{held.id.hex()}/send",
                 "/mail/all/cancel", "/api/held/all/cancel", "/mail?done=cancelled"):
        reply = await request(port, "GET", path, headers={"X-Matte-Token": token})
        assert reply.status in (200, 405)
    assert held.id in queue.items and queue.calls == []


async def test_api_cancel_all_and_send_all(port, queue):
    mine = [queue.add(A, f"m{i}") for i in range(2)]
    theirs = queue.add(B, "t")
    token = token_for(SECRET, A)
    refused = await request(port, "POST", "/api/held/all/cancel", headers={"X-Matte-Token": "x"})
    assert refused.status == 403 and len(queue.items) == 3
    reply = await request(port, "POST", "/api/held/all/send", headers={"X-Matte-Token": token})
    assert reply.json() == {"ok": True, "count": 2}
    assert list(queue.items) == [theirs.id] and all(m.id not in queue.items for m in mine)


async def test_per_ip_rate_limit_is_429_and_ignores_forwarded_headers(nursery, queue):
    from firmware.web import serve_web

    app = make_app(queue, rate=0.001, burst=5)
    port = (await nursery.start(serve_web, [("127.0.0.1", 0)], app))[0][1]
    statuses = []
    for i in range(8):
        reply = await request(port, "GET", "/api/held", headers={
            "X-Forwarded-For": f"10.0.0.{i}", "Forwarded": f"for=10.0.1.{i}",
            "X-Real-IP": f"10.0.2.{i}"})
        statuses.append(reply.status)
        if reply.status == 429:
            assert reply.headers["retry-after"] == "1" and b"token" not in reply.body
    assert statuses == [200] * 5 + [429] * 3
    # Another address has its own budget.
    assert (await request(port, "GET", "/api/held", source=B)).status == 200
    assert app.statistics()["rate_limited"] == 3


def test_rate_limiter_refills_and_stays_bounded():
    from firmware.web.routes import RateLimiter

    limiter = RateLimiter(rate=2.0, burst=2)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)
    limiter.MAX_TRACKED = 10
    for i in range(100):
        limiter.allow(f"10.0.0.{i}", 1000.0 + i)
    assert len(limiter._buckets) <= 10


async def test_forwarded_headers_never_change_scope(port, queue):
    queue.add(B, "theirs")
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        value = "for=127.0.0.2" if header == "Forwarded" else B
        reply = await request(port, "GET", "/api/held", headers={header: value})
        assert reply.json()["held"] == []


async def test_one_address_cannot_take_every_connection(port):
    from firmware.web.routes import MAX_CONNECTIONS_PER_IP

    idle = [await connect(port) for _ in range(MAX_CONNECTIONS_PER_IP)]
    try:
        with trio.fail_after(10):
            over = await connect(port)
            assert await over.receive_some(100) == b""  # closed at once, nothing served
            await over.aclose()
        reply = await request(port, "GET", "/api/held", source="127.0.0.2")
        assert reply.status == 200  # another host still gets its page
    finally:
        for stream in idle:
            await stream.aclose()
    assert (await request(port, "GET", "/api/held")).status == 200  # and ours again after
