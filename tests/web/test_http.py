import http.client

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

import firmware.web.http as web_http
from firmware.web.http import MAX_BODY_BYTES, MAX_HEADER_BYTES, Request, Response, serve_connection

from .conftest import connect, raw_exchange, read_reply, request, send_request


def _status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:80]
    return int(raw[9:12])


async def test_keep_alive_serves_several_requests(port, queue):
    queue.add("127.0.0.1", "kept")
    stream = await connect(port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        for _ in range(3):
            await send_request(stream, conn, "GET", "/api/held")
            reply = await read_reply(stream, conn)
            assert reply.status == 200 and reply.json()["held"][0]["subject"] == "kept"
            conn.start_next_cycle()


async def test_http_client_from_stdlib(port, queue):
    queue.add("127.0.0.1", "stdlib")

    def fetch():
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            client.request("GET", "/mail")
            first = client.getresponse()
            page = first.read()
            client.request("HEAD", "/mail")
            head = client.getresponse()
            return first.status, page, head.status, head.getheader("Content-Length"), head.read()
        finally:
            client.close()

    status, page, head_status, head_length, head_body = await trio.to_thread.run_sync(fetch)
    assert status == 200 and b"stdlib" in page
    assert head_status == 200 and int(head_length) == len(page) and head_body == b""


async def test_header_block_too_large_is_431(port):
    big = b"X-Filler: " + b"a" * MAX_HEADER_BYTES + b"\r\n"
    raw = await raw_exchange(port, b"GET /mail HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert _status(raw) == 431


async def test_many_headers_just_under_limit_ok(port):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(100))
    raw = await raw_exchange(port, b"GET /api/held HTTP/1.1\r\nHost: matte.test\r\nConnection: close\r\n" + headers + b"\r\n")
    assert _status(raw) == 200


async def test_declared_body_too_large_is_413(port, queue):
    head = b"POST /api/held/00/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    raw = await raw_exchange(port, head + b"a" * (MAX_BODY_BYTES + 1))
    assert _status(raw) == 413
    assert queue.calls == []


async def test_chunked_body_too_large_is_413(port, queue):
    chunk = b"%x\r\n%s\r\n" % (4096, b"a" * 4096)
    data = b"POST /api/held/00/extend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = await raw_exchange(port, data + chunk * 5 + b"0\r\n\r\n")
    assert _status(raw) == 413
    assert queue.calls == []


async def test_body_at_limit_accepted(port):
    reply = await request(port, "POST", "/api/held/00/cancel", body=b"a" * MAX_BODY_BYTES)
    assert reply.status == 403  # read whole, then refused for the missing token


@pytest.mark.parametrize(
    "data",
    [
        b"NONSENSE\r\n\r\n",
        b"GET /mail HTTP/1.1\r\n\r\n",  # no Host
        b"GET /mail HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /mail HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
)
async def test_malformed_request_is_400(port, data):
    assert _status(await raw_exchange(port, data)) == 400


async def test_slow_request_gets_408(port, monkeypatch):
    monkeypatch.setattr(web_http, "REQUEST_DEADLINE", 0.3)
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /mail HTTP/1.1\r\nHost: x\r\n")  # never finished
        got = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                got += chunk
    assert _status(bytes(got)) == 408


async def test_idle_connection_closed_silently(port, monkeypatch):
    monkeypatch.setattr(web_http, "REQUEST_DEADLINE", 0.3)
    stream = await connect(port)
    async with stream:
        with trio.fail_after(5):
            assert await stream.receive_some(4096) == b""


async def test_serves_ipv6_loopback_too(nursery, queue):
    from firmware.web import serve_web

    from .conftest import make_app

    try:
        bound = await nursery.start(serve_web, [("::1", 0)], make_app(queue))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    queue.add("::1", "over v6")
    stream = await trio.open_tcp_stream("::1", bound[0][1])
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await send_request(stream, conn, "GET", "/api/held")
        reply = await read_reply(stream, conn)
    assert [h["subject"] for h in reply.json()["held"]] == ["over v6"]


async def _echo(request: Request) -> Response:
    return Response.text(f"{request.method} {request.path} {len(request.body)}")


def _run_connection(data: bytes) -> bytes:
    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        out = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server, _echo, "192.0.2.1")
            await client.send_all(data)
            await client.send_eof()
            with trio.fail_after(5):
                while chunk := await client.receive_some(65536):
                    out += chunk
        return bytes(out)

    return trio.run(main)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400) | st.builds(lambda a, b: a + b, st.sampled_from([
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
]), st.binary(max_size=200)))
def test_connection_loop_fuzz(data):
    # Whatever arrives: the loop ends without raising, and says only well-formed HTTP.
    out = _run_connection(data)
    if out:
        assert out.startswith(b"HTTP/1.1 ")
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(out)
        assert isinstance(client.next_event(), h11.Response)


def test_connection_loop_pipelined():
    out = _run_connection(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhiGET /c HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert out.count(b"HTTP/1.1 200 ") == 3
    assert b"GET /a 0" in out and b"POST /b 2" in out and b"GET /c 0" in out


@pytest.mark.parametrize("filler", [MAX_HEADER_BYTES, 4 * MAX_HEADER_BYTES])
def test_header_limit_whole_or_in_pieces(filler):
    out = _run_connection(b"GET / HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * filler + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    assert b"\r\nConnection: close\r\n" in out
    assert out.count(b"HTTP/1.1") == 1
