import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.smtp import (
    AUTH,
    CLIENT,
    CLOSED,
    DATA,
    GREETED,
    MAIL,
    NEED_DATA,
    PAUSED,
    RCPT,
    READY,
    TLS_PENDING,
    Auth,
    AuthResponse,
    Connection,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Hello,
    Help,
    LocalProtocolError,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
    parse_ehlo_reply,
)

from .helpers import drive, ready

EHLO_REPLY = (
    b"250-mx.example Hello\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-AUTH PLAIN  LOGIN\r\n250-AUTH=LOGIN\r\n250-STARTTLS\r\n250 pipelining\r\n"
)


def client() -> Connection:
    conn = Connection(CLIENT)
    conn.receive_data(b"220 mx.example ESMTP\r\n")
    assert conn.next_event() == Reply.of(220, "mx.example ESMTP")
    assert conn.state is GREETED
    return conn


def reply(conn, data: bytes):
    conn.receive_data(data)
    return conn.next_event()


@pytest.mark.parametrize(
    "event, wire",
    [
        (Hello("EHLO", "me.example"), b"EHLO me.example\r\n"),
        (Hello("HELO", "me"), b"HELO me\r\n"),
        (MailFrom("a@b"), b"MAIL FROM:<a@b>\r\n"),
        (MailFrom(""), b"MAIL FROM:<>\r\n"),
        (
            MailFrom("ä@b", size=12, body="8BITMIME", smtputf8=True, auth="<>"),
            "MAIL FROM:<ä@b> SIZE=12 BODY=8BITMIME SMTPUTF8 AUTH=<>\r\n".encode(),
        ),
        (RcptTo("c@d"), b"RCPT TO:<c@d>\r\n"),
        (Data(), b"DATA\r\n"),
        (Rset(), b"RSET\r\n"),
        (Noop(), b"NOOP\r\n"),
        (Quit(), b"QUIT\r\n"),
        (Vrfy("x"), b"VRFY x\r\n"),
        (Help(), b"HELP\r\n"),
        (Help("mail"), b"HELP mail\r\n"),
        (StartTLS(), b"STARTTLS\r\n"),
        (Auth("PLAIN"), b"AUTH PLAIN\r\n"),
        (Auth("PLAIN", b""), b"AUTH PLAIN =\r\n"),
        (Auth("PLAIN", b"\x00u\x00p"), b"AUTH PLAIN AHUAcA==\r\n"),
        (AuthResponse(b"user"), b"dXNlcg==\r\n"),
        (AuthResponse(b""), b"\r\n"),
    ],
)
def test_commands_render(event, wire):
    assert client().send(event) == wire


def test_rendered_commands_parse_back_on_server():
    conn = client()
    wire = b"".join(
        conn.send(e)
        for e in [
            Hello("EHLO", "me"),
            MailFrom("a@b", size=5, body="7BIT", auth="x+2By"),
            RcptTo("c@d"),
        ]
    )
    server = ready()
    events = drive(server, wire)
    assert events == [
        Hello("EHLO", "me"),
        MailFrom("a@b", size=5, body="7BIT", auth="x+2By"),
        RcptTo("c@d"),
    ]


def test_multiline_reply_and_ehlo_parse():
    conn = client()
    conn.send(Hello("EHLO", "me"))
    r = reply(conn, EHLO_REPLY)
    assert r.code == 250 and len(r.lines) == 7
    assert conn.state is READY and conn.hello == Hello("EHLO", "me")
    ext = parse_ehlo_reply(r)
    assert ext == {
        "SIZE": "1000",
        "8BITMIME": "",
        "AUTH": "PLAIN LOGIN",
        "STARTTLS": "",
        "PIPELINING": "",
    }
    assert parse_ehlo_reply(Reply.of(250, "mx")) == {}
    assert parse_ehlo_reply(Reply.of(502, "no")) == {}


def test_reply_one_byte_at_a_time_and_trailing():
    conn = Connection(CLIENT)
    data = b"220-hi\r\n220 there\r\n250 ok\r\n25"
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while (e := conn.next_event()) is not NEED_DATA:
            events.append(e)
    assert events == [Reply.of(220, "hi", "there"), Reply.of(250, "ok")]
    assert bytes(conn._buf) == b"25"


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"25 x\r\n",
        b"2500 x\r\n",
        b"150 x\r\n",
        b"250-a\r\n251 b\r\n",
        b"250x\r\n",
        b"250 " + b"x" * 600 + b"\r\n",
        b"250 a\rb\r\n",
        b"250 a\x00\r\n",
    ],
)
def test_bad_replies(data):
    conn = Connection(CLIENT)
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is CLOSED


def test_reply_variants_accepted():
    conn = Connection(CLIENT)
    conn.receive_data(b"220\r\n250 \xff\xfe\n")
    assert conn.next_event() == Reply.of(220, "")
    r = conn.next_event()
    assert r.code == 250 and "\ufffd" in r.text


def test_too_many_reply_lines():
    conn = Connection(CLIENT)
    conn.receive_data(b"250-x\r\n" * 200)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_client_tracks_state_through_pipelined_replies():
    conn = client()
    conn.send(Hello("EHLO", "me"))
    reply(conn, b"250 ok\r\n")
    for e in (MailFrom("a@b"), RcptTo("c@d"), RcptTo("e@f"), Data()):
        conn.send(e)
    conn.receive_data(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n")
    states = []
    while (e := conn.next_event()) is not NEED_DATA:
        states.append(conn.state)
    assert states == [MAIL, RCPT, RCPT, DATA]
    assert conn.send(DataChunk(b"hi\r\n")) == b"hi\r\n"
    assert conn.send(EndOfData()) == b".\r\n"
    with pytest.raises(LocalProtocolError):
        conn.send(DataChunk(b"late"))
    reply(conn, b"250 queued\r\n")
    assert conn.state is READY
    conn.send(Quit())
    reply(conn, b"221 bye\r\n")
    assert conn.state is CLOSED
    assert isinstance(conn.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_content_needs_354():
    conn = client()
    with pytest.raises(LocalProtocolError):
        conn.send(DataChunk(b"x"))
    conn.send(Data())
    with pytest.raises(LocalProtocolError):
        conn.send(DataChunk(b"x"))  # no 354 yet
    with pytest.raises(LocalProtocolError):
        conn.send(Reply.of(250, "servers only"))


def in_data_client() -> Connection:
    conn = client()
    for e in (Hello("EHLO", "me"), MailFrom("a@b"), RcptTo("c@d"), Data()):
        conn.send(e)
    conn.receive_data(b"250 a\r\n250 b\r\n250 c\r\n354 go\r\n")
    while conn.next_event() is not NEED_DATA:
        pass
    assert conn.state is DATA
    return conn


def send_all(conn, chunks) -> bytes:
    return b"".join(conn.send(DataChunk(c)) for c in chunks) + conn.send(EndOfData())


@pytest.mark.parametrize(
    "chunks, wire",
    [
        ([b""], b".\r\n"),
        ([b"a\r\n"], b"a\r\n.\r\n"),
        ([b"a"], b"a\r\n.\r\n"),
        ([b".a\r\n"], b"..a\r\n.\r\n"),
        ([b"a\r\n", b".\r\n"], b"a\r\n..\r\n.\r\n"),
        ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r\n.", b"b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"x\r\n.\r\n"], b"x\r\n..\r\n.\r\n"),
        # canonical CRLF upstream: bare LF and bare CR become CRLF
        ([b"a\nb\rc\r\n"], b"a\r\nb\r\nc\r\n.\r\n"),
        ([b"a\n.\n"], b"a\r\n..\r\n.\r\n"),
        ([b"a\r"], b"a\r\n.\r\n"),
        ([b"a\r", b"b"], b"a\r\nb\r\n.\r\n"),
    ],
)
def test_dot_stuffing(chunks, wire):
    assert send_all(in_data_client(), chunks) == wire


def test_second_message_stuffing_starts_fresh():
    conn = in_data_client()
    send_all(conn, [b"no newline"])
    reply(conn, b"250 ok\r\n")
    for e in (MailFrom("a@b"), RcptTo("c@d"), Data()):
        conn.send(e)
    conn.receive_data(b"250 a\r\n250 b\r\n354 go\r\n")
    while conn.next_event() is not NEED_DATA:
        pass
    assert send_all(conn, [b".x\r\n"]) == b"..x\r\n.\r\n"


def test_starttls_discards_injected_response():
    conn = client()
    conn.send(Hello("EHLO", "me"))
    reply(conn, b"250 ok\r\n")
    conn.send(StartTLS())
    conn.receive_data(b"220 go ahead\r\n250 injected\r\n")
    assert conn.next_event() == Reply.of(220, "go ahead")
    assert conn.state is TLS_PENDING
    assert conn.next_event() is PAUSED
    conn.receive_data(b"250 also injected\r\n")
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())
    conn.tls_started()
    assert conn.tls and conn.state is GREETED and conn.hello is None
    assert conn.next_event() is NEED_DATA
    conn.send(Hello("EHLO", "me"))
    assert reply(conn, b"250 fresh\r\n") == Reply.of(250, "fresh")


def test_starttls_refused_keeps_reading():
    conn = client()
    conn.send(StartTLS())
    conn.receive_data(b"454 no tls\r\n250 next\r\n")
    assert conn.next_event().code == 454
    assert conn.next_event() == Reply.of(250, "next")


def test_client_auth_flow():
    conn = client()
    conn.send(Hello("EHLO", "me"))
    reply(conn, b"250 ok\r\n")
    conn.send(Auth("LOGIN"))
    reply(conn, b"334 VXNlcm5hbWU6\r\n")
    assert conn.state is AUTH
    conn.send(AuthResponse(b"u"))
    reply(conn, b"235 2.7.0 ok\r\n")
    assert conn.state is READY and conn.authenticated


def test_421_closes_client():
    conn = client()
    assert reply(conn, b"421 4.4.2 timeout\r\n").code == 421
    assert conn.state is CLOSED


def test_eof_client():
    conn = client()
    conn.receive_data(b"250 par")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)


crlf_text = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@settings(max_examples=300, deadline=None)
@given(text=crlf_text, cuts=st.lists(st.integers(min_value=0, max_value=900), max_size=6))
def test_stuffing_round_trip(text, cuts):
    # client.send(DataChunk(x)) parsed by the server gives x back
    text = text.replace(b"\x00", b"")  # the server refuses NUL by design
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(points, points[1:])]
    wire = send_all(in_data_client(), chunks)
    server = ready()
    drive(server, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    events = drive(server, wire + b"QUIT\r\n")
    body = b"".join(e.data for e in events if isinstance(e, DataChunk))
    assert body == text
    assert events[-3:-1] == [EndOfData(), Quit()]
