"""The server role against a peer nobody here wrote: smtplib."""

import smtplib

import pytest
import socket
import threading

from firmware.smtp import (
    NEED_DATA,
    PAUSED,
    SERVER,
    Connection,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Rset,
)

EHLO = ("mx.test", "PIPELINING", "SIZE 1000000", "8BITMIME", "SMTPUTF8")
ANSWERS = {
    Hello: Reply.of(250, *EHLO),
    MailFrom: Reply.of(250, "2.1.0 Ok"),
    RcptTo: Reply.of(250, "2.1.5 Ok"),
    Data: Reply.of(354, "End data with <CR><LF>.<CR><LF>"),
    EndOfData: Reply.of(250, "2.0.0 queued"),
    Quit: Reply.of(221, "2.0.0 Bye"),
    Rset: Reply.of(250, "2.0.0 Ok"),
}


def serve_one(listener, seen):
    sock, _ = listener.accept()
    with sock:
        conn = Connection(SERVER)
        sock.sendall(conn.send(Reply.of(220, "mx.test ESMTP")))
        body = b""
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as err:
                seen.append(err.reply.code)
                sock.sendall(conn.send(err.reply))
                continue
            if event is NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, ConnectionClosed):
                break
            elif isinstance(event, DataChunk):
                body += event.data
            elif event is not PAUSED:
                seen.append(event)
                sock.sendall(conn.send(ANSWERS[type(event)]))
        seen.append(body)


def session(msg):
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list = []
    thread = threading.Thread(target=serve_one, args=(listener, seen))
    thread.start()
    try:
        with smtplib.SMTP(*listener.getsockname(), timeout=10) as client:
            client.ehlo("client.test")
            assert client.has_extn("pipelining") and client.has_extn("size")
            client.sendmail("a@b.test", ["c@d.test", "e@f.test"], msg)
    finally:
        thread.join(10)
        listener.close()
    return seen


def test_smtplib_session():
    # a str message: smtplib makes the line endings CRLF itself
    msg = "Subject: hi\r\n\r\n.leading dot\r\nbare LF\nlast"
    seen = session(msg)
    assert seen[0] == Hello("EHLO", "client.test")
    # SIZE counts the message after smtplib fixed its line endings
    assert seen[1] == MailFrom("a@b.test", size=len(msg.encode()) + 1)
    assert seen[2:4] == [RcptTo("c@d.test"), RcptTo("e@f.test")]
    assert seen[4:6] == [Data(), EndOfData()]
    assert isinstance(seen[6], Quit)
    # smtplib stuffs dots; we undo that
    assert seen[-1] == b"Subject: hi\r\n\r\n.leading dot\r\nbare LF\r\nlast\r\n"


def test_smtplib_bytes_with_bare_lf_is_refused():
    # smtplib sends bytes as they are: the bare LF reaches us and is refused
    with pytest.raises(smtplib.SMTPDataError) as exc:
        session(b"Subject: hi\r\n\r\nbare LF\nlast\r\n")
    assert exc.value.smtp_code == 554
    assert b"CRLF" in exc.value.smtp_error
