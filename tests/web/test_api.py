import json

import pytest

from firmware.web import token_for

from .conftest import SECRET, request

A, B = "127.0.0.1", "127.0.0.2"


async def test_listing_scoped_by_ip(port, queue):
    mine = queue.add(A, "from A")
    theirs = queue.add(B, "from B")
    for ip, held in ((A, mine), (B, theirs)):
        reply = await request(port, "GET", "/api/held", source=ip)
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("application/json")
        data = reply.json()
        assert [h["id"] for h in data["held"]] == [held.id.hex()]
        assert data["token"] == token_for(SECRET, ip)
        assert data["store"] == queue.store_status()
    assert token_for(SECRET, A) != token_for(SECRET, B)


async def test_listing_fields(port, queue):
    held = queue.add(A, "件名 テスト", to=("x@a.example", "y@b.example"), cc=("z@c.example",), bcc_count=2)
    item = (await request(port, "GET", "/api/held")).json()["held"][0]
    assert item == {
        "id": held.id.hex(),
        "sender": held.sender,
        "from": held.from_,
        "to": ["x@a.example", "y@b.example"],
        "cc": ["z@c.example"],
        "bcc_count": 2,
        "subject": "件名 テスト",
        "size": held.size,
        "received_at": held.received_at,
        "release_at": held.release_at,
    }


async def test_forwarded_for_ignored(port, queue):
    queue.add(A, "from A")
    reply = await request(port, "GET", "/api/held", source=B, headers={"X-Forwarded-For": A})
    assert reply.json()["held"] == []
    assert reply.json()["token"] == token_for(SECRET, B)


@pytest.mark.parametrize("token", [None, "", "0" * 32, "other-ip"])
async def test_action_without_right_token_is_403_and_changes_nothing(port, queue, token):
    held = queue.add(A)
    headers = {}
    if token == "other-ip":
        headers["X-Matte-Token"] = token_for(SECRET, B)
    elif token is not None:
        headers["X-Matte-Token"] = token
    for action in ("cancel", "send", "extend"):
        body = b'{"seconds": 60}' if action == "extend" else b""
        reply = await request(port, "POST", f"/api/held/{held.id.hex()}/{action}", headers=headers, body=body)
        assert reply.status == 403
        assert reply.json()["ok"] is False
    assert queue.calls == []
    assert queue.items[held.id] == held


async def test_other_ips_message_is_404(port, queue):
    theirs = queue.add(B)
    headers = {"X-Matte-Token": token_for(SECRET, A)}
    for action in ("cancel", "send"):
        reply = await request(port, "POST", f"/api/held/{theirs.id.hex()}/{action}", headers=headers)
        assert reply.status == 404
    assert queue.items[theirs.id] == theirs


@pytest.mark.parametrize("bad_id", ["zz", "abc", "00" * 40, "0g" * 16])
async def test_malformed_id_is_404(port, queue, bad_id):
    reply = await request(
        port, "POST", f"/api/held/{bad_id}/cancel", headers={"X-Matte-Token": token_for(SECRET, A)}
    )
    assert reply.status == 404
    assert queue.calls == []


async def test_cancel_and_send(port, queue):
    one, two = queue.add(A), queue.add(A)
    headers = {"X-Matte-Token": token_for(SECRET, A)}
    reply = await request(port, "POST", f"/api/held/{one.id.hex()}/cancel", headers=headers)
    assert (reply.status, reply.json()) == (200, {"ok": True})
    reply = await request(port, "POST", f"/api/held/{two.id.hex()}/send", headers=headers)
    assert (reply.status, reply.json()) == (200, {"ok": True})
    assert queue.calls == [("cancel", one.id, A), ("send_now", two.id, A)]
    assert queue.items == {}
    # already gone
    reply = await request(port, "POST", f"/api/held/{one.id.hex()}/cancel", headers=headers)
    assert reply.status == 404


async def test_extend(port, queue):
    held = queue.add(B)
    headers = {"X-Matte-Token": token_for(SECRET, B), "Content-Type": "application/json"}
    reply = await request(
        port, "POST", f"/api/held/{held.id.hex()}/extend", headers=headers, body=b'{"seconds": 600}', source=B
    )
    assert (reply.status, reply.json()) == (200, {"ok": True})
    assert queue.items[held.id].release_at == held.release_at + 600


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"[]", b"not json", b'{"seconds": 0}', b'{"seconds": 86401}', b'{"seconds": -5}',
     b'{"seconds": "60"}', b'{"seconds": 60.5}', b'{"seconds": true}', b"\xff\xfe", b'"seconds"'],
)
async def test_extend_bad_body_is_400(port, queue, body):
    held = queue.add(A)
    headers = {"X-Matte-Token": token_for(SECRET, A)}
    reply = await request(port, "POST", f"/api/held/{held.id.hex()}/extend", headers=headers, body=body)
    assert reply.status == 400
    assert queue.calls == []
    assert queue.items[held.id] == held


async def test_extend_limits_accepted(port, queue):
    held = queue.add(A)
    headers = {"X-Matte-Token": token_for(SECRET, A)}
    for seconds in (1, 86400):
        body = json.dumps({"seconds": seconds}).encode()
        reply = await request(port, "POST", f"/api/held/{held.id.hex()}/extend", headers=headers, body=body)
        assert reply.status == 200
    assert queue.items[held.id].release_at == held.release_at + 86401


async def test_store_status(port, queue):
    queue.add(A, size=100)
    reply = await request(port, "GET", "/api/store")
    assert reply.json() == {"messages": 1, "bytes": 100, "max_messages": 500, "max_bytes": 200 * 1024 * 1024}


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/api/nothing", 404),
        ("GET", "/api/held/00/frobnicate", 404),
        ("GET", "/nowhere", 404),
        ("POST", "/api/held", 405),
        ("DELETE", "/api/held", 405),
        ("GET", "/api/held/" + "00" * 16 + "/cancel", 405),
        ("PUT", "/metrics", 405),
    ],
)
async def test_unknown_paths_and_methods(port, method, path, status):
    reply = await request(port, method, path)
    assert reply.status == status
    if status == 405:
        assert "allow" in reply.headers


async def test_security_headers_on_every_answer(port):
    for method, path in (("GET", "/api/held"), ("GET", "/nowhere"), ("POST", "/api/held"),
                         ("GET", "/mail"), ("GET", "/metrics"), ("GET", "/static/mail.js")):
        reply = await request(port, method, path)
        csp = dict(d.strip().split(" ", 1) for d in reply.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'"
        assert csp["script-src"] == "'self'"  # no 'unsafe-inline': inline script never runs
        assert csp["frame-ancestors"] == "'none'"
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["cache-control"] == "no-store"


async def test_handler_failure_is_500_and_server_survives(port, queue):
    queue.fail = True
    reply = await request(port, "GET", "/api/held")
    assert reply.status == 500
    assert b"queue broke" not in reply.body
    queue.fail = False
    assert (await request(port, "GET", "/api/held")).status == 200


def test_web_never_imports_store_or_smtp():
    import ast
    import pathlib

    import firmware.web

    forbidden = {"firmware.wal", "firmware.smtp", "firmware.smtpd", "firmware.qmgr", "firmware.relay"}
    for path in pathlib.Path(firmware.web.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path, name)
