import base64

import pytest

from firmware.smtp import (
    AUTH,
    CLOSED,
    DATA,
    Connection,
    GREETED,
    MAIL,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    NEED_DATA,
    PAUSED,
    RCPT,
    READY,
    SERVER,
    START,
    TLS_PENDING,
    Auth,
    AuthResponse,
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
)
from firmware.smtp._state import EVENT_TRIGGERED_TRANSITIONS

from .helpers import drive, greeted, kinds, ready

OK = Reply.of(250, "2.0.0 Ok")


def one(conn, line: bytes):
    """Feed one line, return the event (or the error) without replying."""
    conn.receive_data(line)
    try:
        return conn.next_event()
    except RemoteProtocolError as err:
        return err


def test_greeting_required_first():
    conn = Connection(SERVER)
    assert conn.state is START
    conn.receive_data(b"EHLO x\r\n")
    assert conn.next_event() is PAUSED  # nothing parsed before the greeting
    with pytest.raises(LocalProtocolError):
        conn.send(Hello("EHLO", "x"))
    conn.send(Reply.of(220, "hi"))
    assert conn.state is GREETED
    assert conn.next_event() == Hello("EHLO", "x")


@pytest.mark.parametrize("code, state", [(421, CLOSED), (554, CLOSED), (220, GREETED)])
def test_greeting_codes(code, state):
    conn = Connection(SERVER)
    conn.send(Reply.of(code, "x"))
    assert conn.state is state


def test_greeting_invalid_code():
    with pytest.raises(LocalProtocolError):
        Connection(SERVER).send(Reply.of(354, "x"))


@pytest.mark.parametrize(
    "line, event",
    [
        (b"EHLO client.example", Hello("EHLO", "client.example")),
        (b"helo [192.0.2.1]", Hello("HELO", "[192.0.2.1]")),
        (b"EHLO a extra words", Hello("EHLO", "a")),
        (b"NOOP", Noop()),
        (b"noop anything", Noop()),
        (b"RSET", Rset()),
        (b"VRFY postmaster", Vrfy("postmaster")),
        (b"HELP", Help("")),
        (b"HELP mail", Help("mail")),
        (b"QUIT", Quit()),
        (b"STARTTLS", StartTLS()),
        (b"starttls  ", StartTLS()),
        (b"MAIL FROM:<a@b.example>", MailFrom("a@b.example")),
        (b"mail from: <a@b.example>", MailFrom("a@b.example")),
        (b"MAIL FROM:<>", MailFrom("")),
        (b"MAIL FROM:<@r1,@r2:a@b>", MailFrom("a@b")),
        (b'MAIL FROM:<"x y>z"@b>', MailFrom('"x y>z"@b')),
        (
            b"MAIL FROM:<a@b> SIZE=123 BODY=8bitmime AUTH=<>",
            MailFrom("a@b", size=123, body="8BITMIME", auth="<>"),
        ),
        (
            "MAIL FROM:<jö@bä.example> SMTPUTF8".encode(),
            MailFrom("jö@bä.example", smtputf8=True),
        ),
        (b"AUTH PLAIN", Auth("PLAIN", None)),
        (b"AUTH login =", Auth("LOGIN", b"")),
        (b"AUTH PLAIN AHUAcA==", Auth("PLAIN", b"\x00u\x00p")),
    ],
)
def test_commands(line, event):
    conn = ready()
    assert one(conn, line + b"\r\n") == event


@pytest.mark.parametrize(
    "line, event",
    [
        (b"RCPT TO:<c@d>", RcptTo("c@d")),
        (b"rcpt to:<@x:c@d>", RcptTo("c@d")),
        (b"RCPT TO:<Postmaster>", RcptTo("Postmaster")),
        (b"RCPT TO:<a.b+c@[IPv6:2001:db8::1]>", RcptTo("a.b+c@[IPv6:2001:db8::1]")),
        (b"DATA", Data()),
        (b"data x", ("error", 501)),
    ],
)
def test_transaction_commands(line, event):
    conn = ready()
    drive(conn, b"MAIL FROM:<a@b>\r\n")
    if event in (Data(), ("error", 501)):
        drive(conn, b"RCPT TO:<x@y>\r\n")
    got = one(conn, line + b"\r\n")
    if isinstance(got, RemoteProtocolError):
        got = ("error", got.reply.code)
    assert got == event


@pytest.mark.parametrize(
    "line, code, enhanced",
    [
        (b"", 500, "5.5.2"),
        (b"FOO bar", 500, "5.5.2"),
        (b"BDAT 10 LAST", 500, "5.5.2"),
        (b"EHLO", 501, "5.5.4"),
        (b"HELO ", 501, "5.5.4"),
        (b"VRFY", 501, "5.5.4"),
        (b"QUIT now", 501, "5.5.4"),
        (b"RSET x", 501, "5.5.4"),
        (b"STARTTLS x", 501, "5.5.4"),
        (b"MAIL TO:<a@b>", 501, "5.5.4"),
        (b"MAIL FROM:a@b", 501, "5.1.7"),
        (b"MAIL FROM:<a@b", 501, "5.1.7"),
        (b"MAIL FROM:<a>", 501, "5.1.7"),
        (b"MAIL FROM:<a@b>x", 501, "5.1.7"),
        (b"MAIL FROM:<" + b"a" * 260 + b"@b>", 501, "5.1.7"),
        (b"MAIL FROM:<a@b> FOO=1", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=1 SIZE=2", 501, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=x", 501, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE", 501, "5.5.4"),
        (b"MAIL FROM:<a@b> BODY=BINARYMIME", 501, "5.5.4"),
        (b"MAIL FROM:<a@b> SMTPUTF8=yes", 501, "5.5.4"),
        (b"MAIL FROM:<a@b> AUTH", 501, "5.5.4"),
        ("MAIL FROM:<jö@b>".encode(), 501, "5.6.7"),
        (b"MAIL FROM:<\xff@b>", 501, "5.5.4"),
        (b"AUTH", 501, "5.5.4"),
        (b"AUTH PLAIN a b", 501, "5.5.4"),
        (b"AUTH PLAIN !!!", 501, "5.5.2"),
        (b"AUTH PLAIN AHVAc", 501, "5.5.2"),
        (b"NOOP\x00", 500, "5.5.2"),
        (b"NOOP\rRSET", 500, "5.5.2"),
    ],
)
def test_command_errors(line, code, enhanced):
    conn = ready()
    err = one(conn, line + b"\r\n")
    assert isinstance(err, RemoteProtocolError)
    assert err.reply.code == code and err.reply.enhanced == enhanced
    # the error is the pending command: reply, then the session goes on
    assert conn.next_event() is PAUSED
    conn.send(err.reply)
    assert conn.state is READY
    assert one(conn, b"NOOP\r\n") == Noop()


@pytest.mark.parametrize(
    "line, code, enhanced",
    [
        (b"RCPT TO:<>", 501, "5.1.3"),
        (b"RCPT TO:c@d", 501, "5.1.3"),
        (b"RCPT TO:<c>", 501, "5.1.3"),
        (b"RCPT TO:<c@d> NOTIFY=NEVER", 555, "5.5.4"),
        ("RCPT TO:<ü@d>".encode(), 501, "5.6.7"),
    ],
)
def test_rcpt_errors(line, code, enhanced):
    conn = ready()
    drive(conn, b"MAIL FROM:<a@b>\r\n")
    err = one(conn, line + b"\r\n")
    assert isinstance(err, RemoteProtocolError)
    assert (err.reply.code, err.reply.enhanced) == (code, enhanced)
    conn.send(err.reply)
    assert conn.state is MAIL


def test_rcpt_utf8_allowed_after_smtputf8_mail():
    conn = ready()
    drive(conn, "MAIL FROM:<a@b> SMTPUTF8\r\n".encode())
    assert one(conn, "RCPT TO:<ü@d>\r\n".encode()) == RcptTo("ü@d")


@pytest.mark.parametrize(
    "setup, line, text",
    [
        (b"", b"MAIL FROM:<a@b>", "EHLO or HELO first"),
        (b"", b"AUTH PLAIN", "EHLO or HELO first"),
        (b"", b"RCPT TO:<a@b>", "EHLO or HELO first"),
        (b"EHLO x\r\n", b"RCPT TO:<a@b>", "Need MAIL before RCPT"),
        (b"EHLO x\r\n", b"DATA", "Need MAIL and RCPT before DATA"),
        (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"DATA", "Need RCPT before DATA"),
        (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>", "Nested MAIL"),
        (b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", b"MAIL FROM:<a@b>", "Nested"),
        (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"AUTH PLAIN", "during a mail transaction"),
        (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"STARTTLS", "during a mail transaction"),
    ],
)
def test_sequence_errors(setup, line, text):
    conn = greeted()
    drive(conn, setup)
    before = conn.state
    err = one(conn, line + b"\r\n")
    assert isinstance(err, RemoteProtocolError)
    assert err.reply.code == 503 and err.reply.enhanced == "5.5.1"
    assert text in err.reply.text
    conn.send(err.reply)
    assert conn.state is before


def test_auth_when_authenticated_and_starttls_under_tls():
    conn = ready(tls=True)
    err = one(conn, b"STARTTLS\r\n")
    assert isinstance(err, RemoteProtocolError) and err.reply.code == 503
    assert "TLS already active" in err.reply.text
    conn.send(err.reply)
    drive(conn, b"AUTH PLAIN AHUAcA==\r\n", codes={Auth: 235})
    assert conn.authenticated and conn.state is READY
    err = one(conn, b"AUTH PLAIN\r\n")
    assert isinstance(err, RemoteProtocolError) and err.reply.code == 503
    assert "Already authenticated" in err.reply.text


def test_state_table_walk():
    conn = greeted()
    steps = [
        (b"HELO x\r\n", 250, READY),
        (b"MAIL FROM:<a@b>\r\n", 250, MAIL),
        (b"RCPT TO:<c@d>\r\n", 550, MAIL),  # refused recipient: no change
        (b"RCPT TO:<c@d>\r\n", 250, RCPT),
        (b"RCPT TO:<e@f>\r\n", 250, RCPT),
        (b"DATA\r\n", 451, RCPT),
        (b"DATA\r\n", 354, DATA),
    ]
    for line, code, state in steps:
        conn.receive_data(line)
        event = conn.next_event()
        assert conn.next_event() is PAUSED
        conn.send(Reply.of(code, "x"))
        assert conn.state is state, (line, code)
        if code == 250 and isinstance(event, MailFrom):
            assert conn.mail_from == event
    conn.receive_data(b".\r\n")
    assert conn.next_event() == EndOfData()
    conn.send(Reply.of(250, "queued"))
    assert conn.state is READY and conn.mail_from is None


@pytest.mark.parametrize(
    "setup",
    [b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"],
)
@pytest.mark.parametrize("reset", [b"RSET\r\n", b"EHLO again\r\n"])
def test_reset_and_ehlo_end_transaction(setup, reset):
    conn = ready()
    drive(conn, setup)
    assert conn.state in (MAIL, RCPT)
    drive(conn, reset)
    assert conn.state is READY and conn.mail_from is None


def test_rset_before_hello_stays_greeted():
    conn = greeted()
    drive(conn, b"RSET\r\nNOOP\r\nVRFY x\r\nHELP\r\n")
    assert conn.state is GREETED


def test_failed_hello_keeps_state():
    conn = greeted()
    drive(conn, b"EHLO bad\r\n", codes={Hello: 550})
    assert conn.state is GREETED and conn.hello is None
    drive(conn, b"EHLO good\r\n")
    assert conn.state is READY and conn.hello == Hello("EHLO", "good")


def test_quit_closes():
    conn = ready()
    assert kinds(drive(conn, b"QUIT\r\nNOOP\r\n")) == ["Quit", "ConnectionClosed"]
    assert conn.state is CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(OK)
    conn.receive_data(b"more")  # ignored after close
    assert isinstance(conn.next_event(), ConnectionClosed)


def test_421_closes_any_time():
    conn = ready()
    conn.send(Reply.of(421, "4.3.2 shutting down"))  # unsolicited
    assert conn.state is CLOSED
    conn = ready()
    one(conn, b"MAIL FROM:<a@b>\r\n")
    conn.send(Reply.of(421, "4.7.0 bye"))
    assert conn.state is CLOSED


def test_reply_rules():
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.send(OK)  # nothing is pending
    one(conn, b"MAIL FROM:<a@b>\r\n")
    with pytest.raises(LocalProtocolError):
        conn.send(Reply.of(354, "not for MAIL"))
    with pytest.raises(LocalProtocolError):
        conn.send(MailFrom("a@b"))
    conn.send(OK)
    assert conn.state is MAIL


def test_vrfy_and_help_no_transition():
    conn = ready()
    drive(conn, b"MAIL FROM:<a@b>\r\nVRFY x\r\nHELP\r\nNOOP\r\n")
    assert conn.state is MAIL


def test_pipelining_many_commands_in_one_receive():
    conn = greeted()
    data = (
        b"EHLO x\r\nMAIL FROM:<a@b> SIZE=10\r\n"
        + b"".join(b"RCPT TO:<r%d@d>\r\n" % i for i in range(50))
        + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n"
    )
    events = drive(conn, data)
    assert events[0] == Hello("EHLO", "x")
    assert events[1] == MailFrom("a@b", size=10)
    assert events[2:52] == [RcptTo(f"r{i}@d") for i in range(50)]
    assert events[52:] == [
        Data(),
        DataChunk(b"Subject: hi\r\n\r\nbody\r\n"),
        EndOfData(),
        Rset(),
        Quit(),
        ConnectionClosed(),
    ]


def test_pipelining_waits_for_each_reply():
    conn = ready()
    conn.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert conn.next_event() == MailFrom("a@b")
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    conn.send(OK)
    assert conn.next_event() == RcptTo("c@d")


def test_refused_data_leaves_content_as_commands():
    # RFC 2920 3.1: the client must wait for 354; if DATA fails what follows
    # is read as commands, never as content
    conn = ready()
    events = drive(
        conn, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nNOOP\r\n", codes={Data: 554}
    )
    assert kinds(events)[-2:] == ["Data", "Noop"]
    assert conn.state is RCPT


SESSION = (
    b"EHLO client\r\nMAIL FROM:<a@b> BODY=8BITMIME\r\nRCPT TO:<c@d>\r\n"
    b"RCPT TO:<e@f>\r\nDATA\r\nSubject: x\r\n\r\n..dot\r\nline\r\n.\r\n"
    b"MAIL FROM:<>\r\nRCPT TO:<g@h>\r\nDATA\r\n.\r\nVRFY a\r\nQUIT\r\n"
)


def test_one_byte_at_a_time_equivalence():
    whole = drive(greeted(), SESSION)
    split = drive(greeted(), [SESSION[i : i + 1] for i in range(len(SESSION))])
    assert split == whole
    assert whole[5] == DataChunk(b"Subject: x\r\n\r\n.dot\r\nline\r\n")
    assert kinds(whole)[-1] == "ConnectionClosed"


@pytest.mark.parametrize("size", [2, 3, 5, 7, 64])
def test_any_split_equivalence(size):
    whole = drive(greeted(), SESSION)
    pieces = [SESSION[i : i + size] for i in range(0, len(SESSION), size)]
    assert drive(greeted(), pieces) == whole


def test_trailing_data_stays_buffered():
    conn = ready()
    events = drive(conn, b"NOOP\r\nNOOP\r\nMAIL FROM:<a")
    assert kinds(events) == ["Noop", "Noop"]
    assert conn.next_event() is NEED_DATA
    assert drive(conn, b"@b>\r\n") == [MailFrom("a@b")]


def test_eof_mid_line_and_clean():
    conn = ready()
    conn.receive_data(b"NOO")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    conn = ready()
    conn.receive_data(b"NOOP\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Noop()
    conn.send(OK)
    assert isinstance(conn.next_event(), ConnectionClosed)


@pytest.mark.parametrize("ending", [b"\n", b"\r\r\n", b"\n\r\n"])
def test_bare_lf_or_cr_in_command(ending):
    conn = ready()
    events = drive(conn, b"NOOP" + ending + b"RSET\r\n")
    assert events[0][:2] == ("error", 500)
    assert "only CRLF line endings are accepted" in events[0][2]
    assert events[-1] == Rset()


def test_command_line_limit_exact():
    conn = ready()
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE
    assert drive(conn, line) == [Noop()]


def test_long_command_line_flat_memory():
    conn = ready()
    conn.receive_data(b"NOOP ")
    for _ in range(1000):
        conn.receive_data(b"x" * 1000)
        assert conn.next_event() is NEED_DATA
        assert len(conn._buf) <= MAX_COMMAND_LINE
    conn.receive_data(b"x\r\nNOOP\r\n")
    with pytest.raises(RemoteProtocolError) as exc:
        conn.next_event()
    assert exc.value.reply.code == 500 and exc.value.reply.enhanced == "5.5.6"
    assert "too long" in exc.value.reply.text
    conn.send(exc.value.reply)
    assert conn.next_event() == Noop()


def test_long_line_one_past_limit():
    conn = ready()
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n"
    events = drive(conn, line + b"RSET\r\n")
    assert events == [("error", 500, "5.5.6 Line too long"), Rset()]


def test_auth_exchange():
    conn = ready()
    events = drive(
        conn,
        b"AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\nMAIL FROM:<a@b>\r\n",
        codes={AuthResponse: 334},
    )
    assert events[:3] == [Auth("LOGIN"), AuthResponse(b"user"), AuthResponse(b"pass")]
    assert events[3][:2] == ("error", 501)  # "MAIL..." is not base64
    assert conn.state is READY


def test_auth_success_and_empty_response():
    conn = ready()
    conn.receive_data(b"AUTH PLAIN\r\n\r\n")
    assert conn.next_event() == Auth("PLAIN")
    conn.send(Reply.of(334, ""))
    assert conn.state is AUTH
    assert conn.next_event() == AuthResponse(b"")
    conn.send(Reply.of(235, "2.7.0 ok"))
    assert conn.state is READY and conn.authenticated


def test_auth_failure_back_to_ready():
    conn = ready()
    drive(conn, b"AUTH PLAIN AHUAcA==\r\n", codes={Auth: 535})
    assert conn.state is READY and not conn.authenticated


def test_auth_cancel():
    conn = ready()
    events = drive(conn, b"AUTH LOGIN\r\n*\r\nNOOP\r\n")
    assert events[1] == ("error", 501, "5.7.0 Authentication cancelled")
    assert events[2] == Noop()
    assert conn.state is READY and not conn.authenticated


def test_auth_line_limits():
    conn = ready()
    blob = base64.b64encode(b"x" * 9000)  # > 512, < 12288
    assert drive(conn, b"AUTH PLAIN " + blob + b"\r\n", codes={Auth: 535}) == [
        Auth("PLAIN", b"x" * 9000)
    ]
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.send(Reply.of(334, "VXNlcm5hbWU6"))
    conn.receive_data(blob + b"\r\n")
    assert conn.next_event() == AuthResponse(b"x" * 9000)
    conn.send(Reply.of(334, "UGFzc3dvcmQ6"))
    conn.receive_data(b"A" * MAX_AUTH_LINE)
    assert conn.next_event() is NEED_DATA
    assert len(conn._buf) <= MAX_AUTH_LINE
    conn.receive_data(b"\r\nNOOP\r\n")
    with pytest.raises(RemoteProtocolError) as exc:
        conn.next_event()
    assert exc.value.reply.enhanced == "5.5.6"
    conn.send(exc.value.reply)
    assert conn.state is READY
    assert conn.next_event() == Noop()


def test_starttls_discards_buffered_and_early_input():
    conn = ready()
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\n")
    assert conn.next_event() == StartTLS()
    conn.send(Reply.of(220, "2.0.0 go ahead"))
    assert conn.state is TLS_PENDING
    assert conn.next_event() is PAUSED
    conn.receive_data(b"RCPT TO:<also-injected@x>\r\n")  # before the handshake
    conn.tls_started()
    assert conn.state is GREETED and conn.tls and conn.hello is None
    assert conn.next_event() is NEED_DATA
    # EHLO again, then MAIL works; nothing injected shows up
    assert drive(conn, b"EHLO x\r\nMAIL FROM:<a@b>\r\n") == [
        Hello("EHLO", "x"),
        MailFrom("a@b"),
    ]


def test_starttls_refused_keeps_input():
    conn = ready()
    events = drive(conn, b"STARTTLS\r\nNOOP\r\n", codes={StartTLS: 454})
    assert events == [StartTLS(), Noop()]
    assert conn.state is READY


def test_tls_started_misuse():
    with pytest.raises(LocalProtocolError):
        ready().tls_started()


def test_starttls_forgets_auth():
    conn = ready()
    drive(conn, b"AUTH PLAIN AHUAcA==\r\n", codes={Auth: 235})
    drive(conn, b"STARTTLS\r\n")
    conn.tls_started()
    assert not conn.authenticated


def test_table_is_consistent():
    # every destination is a known state, every reply key a code or class
    states = set(EVENT_TRIGGERED_TRANSITIONS)
    for table in EVENT_TRIGGERED_TRANSITIONS.values():
        for by_code in table.values():
            for key, new in by_code.items():
                assert new in states
                assert 2 <= key <= 5 or 200 <= key <= 599


def test_bad_role():
    with pytest.raises(ValueError):
        Connection("server")
