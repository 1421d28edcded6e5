import time

import pytest
from hypothesis import given, settings, strategies as st

from firmware.smtp import (
    DATA,
    MAX_TEXT_LINE,
    NEED_DATA,
    PAUSED,
    READY,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    MailFrom,
    RcptTo,
    RemoteProtocolError,
    Reply,
)

from firmware.smtp._writers import DotStuffer

from .helpers import drive, kinds, ready

OPEN = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
SECOND = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsecond\r\n.\r\n"


def in_data():
    conn = ready()
    drive(conn, OPEN)
    assert conn.state is DATA
    return conn


def content(events):
    return b"".join(e.data for e in events if isinstance(e, DataChunk))


@pytest.mark.parametrize(
    "body, expected",
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..x\r\n.\r\n", b".x\r\n"),
        (b"a\r\n..\r\n...\r\n.\r\n", b"a\r\n.\r\n..\r\n"),
        (b"\r\n.\r\n", b"\r\n"),
        (b"a.\r\n.b\r\n.\r\n", b"a.\r\nb\r\n"),
        (b"\x7f\xff\r\n.\r\n", b"\x7f\xff\r\n"),
    ],
)
def test_unstuffing(body, expected):
    conn = in_data()
    events = drive(conn, body)
    assert content(events) == expected
    assert kinds(events)[-1] == "EndOfData"
    assert conn.state is READY


LINES = st.lists(st.sampled_from([b"", b".", b"..", b".a", b"a.", b"a", b"x" * 50]), max_size=20)


@settings(max_examples=1000)
@given(LINES, st.lists(st.integers(1, 60), max_size=8))
def test_end_of_data_tells_whether_a_line_starts_with_a_dot(lines, cuts):
    """What the relay relies on to send a stored body as it is: the content read is empty or
    ends with CRLF, and EndOfData.dot_lines is true exactly when a line of it starts with "."
    (a stuffed dot on the wire), wherever the reads are cut."""
    body = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer()
    wire = stuffer.feed(body) + stuffer.end()
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(wire[pos:pos + cut])
        pos += cut
    pieces.append(wire[pos:])
    conn = in_data()
    events = drive(conn, [p for p in pieces if p])
    got = content(events)
    [end] = [e for e in events if isinstance(e, EndOfData)]
    assert got == body
    assert got == b"" or got.endswith(b"\r\n")
    assert end.dot_lines == any(line.startswith(b".") for line in lines)


# Each variant sits inside a message; none of them may end it.
SMUGGLE = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]


@pytest.mark.parametrize("variant", SMUGGLE)
@pytest.mark.parametrize("split", [None, 1, 3])
def test_smuggling_variants_never_end_data(variant, split):
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nevil\r\n"
    stream = (
        OPEN + b"Subject: t\r\n\r\nbody" + variant + smuggled + b"tail\r\n.\r\n" + SECOND
    )
    if split:
        stream = [stream[i : i + split] for i in range(0, len(stream), split)]
    conn = ready()
    events = drive(conn, stream)
    ends = [e for e in events if isinstance(e, EndOfData)]
    assert len(ends) <= 1
    # the smuggled MAIL never shows up as a command
    assert MailFrom("evil@x") not in events and RcptTo("victim@y") not in events
    assert MailFrom("x@y") in events  # the pipelined second transaction runs
    first = events.index(Data())
    end_of_first = next(
        i for i, e in enumerate(events) if i > first and not isinstance(e, DataChunk)
    )
    bad = events[end_of_first]
    assert bad[:2] == ("error", 554)
    if b"\x00" in variant:
        assert "NUL" in bad[2]
    else:
        assert "only CRLF" in bad[2]
    assert not any(isinstance(e, DataChunk) and b"evil" in e.data for e in events)
    assert ends == [EndOfData()]  # only the second message ends
    assert content(events[end_of_first:]) == b"second\r\n"
    assert events[-1] == EndOfData()
    assert conn.state is READY


@pytest.mark.parametrize(
    "body", [b"a\nb\r\n", b"a\rb\r\n", b"\n", b"\r\r\n", b"x\r", b"a\x00\r\n"]
)
def test_bare_eol_rejected_at_end(body):
    conn = in_data()
    conn.receive_data(body + b"more\r\n")
    assert conn.next_event() is NEED_DATA  # rejected content is not emitted
    events = drive(conn, b"ok\r\n.\r\nNOOP\r\n")
    assert ("error", 554) in kinds(events)
    assert not any(isinstance(e, EndOfData) for e in events)
    assert kinds(events)[-1] == "Noop"
    assert conn.state is READY


def test_error_counts_as_pending_and_returns_to_ready():
    conn = in_data()
    conn.receive_data(b"a\nb\r\n.\r\n")
    with pytest.raises(RemoteProtocolError) as exc:
        while conn.next_event() is not NEED_DATA:
            pass
    assert exc.value.reply.code == 554 and exc.value.reply.enhanced == "5.6.0"
    assert conn.next_event() is PAUSED
    conn.send(exc.value.reply)
    assert conn.state is READY and conn.mail_from is None


def test_text_line_limit():
    ok = b"x" * (MAX_TEXT_LINE - 2) + b"\r\n"
    conn = in_data()
    assert content(drive(conn, ok + b".\r\n")) == ok
    long = b"x" * (MAX_TEXT_LINE - 1) + b"\r\n"
    conn = in_data()
    events = drive(conn, long + b".\r\n")
    assert events[-1][:2] == ("error", 554)
    assert str(MAX_TEXT_LINE) in events[-1][2]


def test_line_limit_counts_stuffed_dot_and_splits():
    # a stuffed line is measured as sent; lines split over many receives
    line = b"." + b"y" * (MAX_TEXT_LINE - 3) + b"\r\n"
    conn = in_data()
    events = drive(conn, [line[i : i + 7] for i in range(0, len(line), 7)] + [b".\r\n"])
    assert content(events) == line[1:]
    long = b"." + line
    conn = in_data()
    events = drive(conn, [long[i : i + 7] for i in range(0, len(long), 7)] + [b".\r\n"])
    assert events[-1][:2] == ("error", 554)


def test_long_line_flat_memory_and_no_chunks_after_error():
    conn = in_data()
    conn.receive_data(b"head\r\n")
    assert conn.next_event() == DataChunk(b"head")  # CRLF held until next bytes
    for _ in range(2000):
        conn.receive_data(b"z" * 4096)
        assert conn.next_event() is NEED_DATA
        assert len(conn._buf) <= 4
    events = drive(conn, b"\r\nstill discarded\r\n.\r\n")
    assert events == [("error", 554, events[0][2])]
    assert conn.state is READY


def test_content_streams_without_buffering():
    conn = in_data()
    total = 0
    for i in range(1000):
        conn.receive_data(b"line %d\r\n" % i * 10)
        event = conn.next_event()
        assert isinstance(event, DataChunk)
        total += len(event.data)
        assert len(conn._buf) <= 4
    conn.receive_data(b".\r\n")
    assert conn.next_event() == DataChunk(b"\r\n")
    assert conn.next_event() == EndOfData()


def test_eof_inside_data():
    conn = in_data()
    conn.receive_data(b"partial\r\n")
    conn.receive_data(b"")
    events = []
    while not isinstance(event := conn.next_event(), ConnectionClosed):
        events.append(event)
    assert EndOfData() not in events


def test_data_reply_any_code_returns_to_ready():
    for code in (250, 452, 552, 554):
        conn = in_data()
        conn.receive_data(b"x\r\n.\r\n")
        assert conn.next_event() == DataChunk(b"x\r\n")
        assert conn.next_event() == EndOfData()
        conn.send(Reply.of(code, "x"))
        assert conn.state is READY


def test_throughput_large_message():
    # 64 MiB in 64 KiB receives must stream far faster than the wire
    block = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit sed do.\r\n" * 1000)[
        :65536
    ]
    conn = in_data()
    start = time.perf_counter()
    got = 0
    for _ in range(1024):
        conn.receive_data(block)
        event = conn.next_event()
        got += len(event.data)
    elapsed = time.perf_counter() - start
    assert got > 60 * 1024 * 1024
    assert elapsed < 3.0, elapsed
