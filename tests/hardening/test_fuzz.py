"""Property tests (fuzzing) for the WAL's replay of damaged segments and the HTTP handler.
The SMTP parsers' fuzz tests live in tests/smtp/test_fuzz.py. More examples:
MATTE_FUZZ_EXAMPLES=100000, or ``python -m tests.hardening.fuzz``."""

from __future__ import annotations

import os

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.wal import Accept, Body, Finish, Log, StoreError, Update, encode_frame
from firmware.web.http import Response, serve_connection

from .crash import STORE
from .faultfs import FaultFiles

EXAMPLES = int(os.environ.get("MATTE_FUZZ_EXAMPLES", "200"))
COUNT = {"wal": 0, "http": 0}
fuzz = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

ID = b"\x01" * 16
GOOD = [encode_frame(r.to_payload()) for r in (
    Body(ID, 0, b"hello"), Accept(ID, 5, {"k": "v"}), Update(ID, {"u": 1}), Finish(ID, "x"))]
segments = st.lists(st.one_of(st.sampled_from(GOOD), st.binary(max_size=40)), max_size=8).map(
    b"".join)


@fuzz
@given(first=segments, last=segments, flip=st.integers(min_value=0))
async def test_replay_of_any_bytes_recovers_or_raises_store_error(first, last, flip):
    COUNT["wal"] += 1
    if first and flip % 3 == 0:
        damaged = bytearray(first)
        damaged[flip % len(first)] ^= 1 << (flip % 8)
        first = bytes(damaged)
    image = {f"{STORE}/0000000000000001.wal": first, f"{STORE}/0000000000000002.wal": last}
    try:
        log, recovered = await Log.open(STORE, files=FaultFiles(image))
    except StoreError:
        return  # a clear refusal: damage where it cannot be a torn write
    await log.aclose()
    for id, r in recovered.items():
        assert r.accept.size == r.size


METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"G\x00T"]
PARTS = [b" ", b"/", b"/mail", b"/api/held", b"?x=1", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2",
         b"\r\n", b"\n", b"\r", b"Host: x", b"Content-Length: 5", b"Content-Length: -1",
         b"Transfer-Encoding: chunked", b"0\r\n\r\n", b"5\r\nhello\r\n", b": ", b"\x00",
         b"Connection: close", b"Expect: 100-continue", b"x" * 300]
requests = st.lists(st.one_of(st.sampled_from(METHODS), st.sampled_from(PARTS),
                              st.binary(max_size=20)), max_size=30).map(b"".join)


@fuzz
@given(data=requests)
async def test_http_handler_answers_any_bytes_with_a_response_or_silence(data):
    COUNT["http"] += 1
    seen = []

    async def handler(request):
        seen.append(request)
        return Response.text("ok")

    ours, theirs = trio.testing.memory_stream_pair()
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, ours, handler, "127.0.0.1")
            await theirs.send_all(data)
            await theirs.send_eof() if hasattr(theirs, "send_eof") else None
            with trio.move_on_after(1):
                while chunk := await theirs.receive_some(65536):
                    received += chunk
            await theirs.aclose()
    assert received == b"" or received.startswith(b"HTTP/1.1 "), received[:80]
    assert all(request.method for request in seen)  # only whole, parsed requests


def test_fuzz_figures():
    print(f"\nfuzz examples run: WAL replay {COUNT['wal']}, HTTP {COUNT['http']}")
    assert COUNT["wal"] and COUNT["http"]
