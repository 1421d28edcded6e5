"""Drive a server Connection with scripted replies."""

from __future__ import annotations

from firmware.smtp import (
    NEED_DATA,
    PAUSED,
    SERVER,
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

DEFAULT_CODES = {
    Hello: 250,
    MailFrom: 250,
    RcptTo: 250,
    Data: 354,
    EndOfData: 250,
    Rset: 250,
    Noop: 250,
    Quit: 221,
    Vrfy: 252,
    Help: 214,
    StartTLS: 220,
    Auth: 334,
    AuthResponse: 235,
}


def greeted(**kwargs) -> Connection:
    conn = Connection(SERVER, **kwargs)
    assert conn.send(Reply.of(220, "mx ESMTP")) == b"220 mx ESMTP\r\n"
    return conn


def ready(**kwargs) -> Connection:
    conn = greeted(**kwargs)
    drive(conn, b"EHLO client.example\r\n")
    return conn


def drive(conn, data=b"", codes=None, chunks=None):
    """Feed ``data`` (one piece, or a list of pieces), answer every command.

    Returns the events, with errors as ("error", code, first line) and
    consecutive DataChunks merged into one DataChunk.
    """
    codes = {**DEFAULT_CODES, **(codes or {})}
    pieces = data if isinstance(data, list) else [data]
    out: list = []
    for piece in pieces:
        if piece:
            conn.receive_data(piece)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as err:
                assert err.reply is not None
                out.append(("error", err.reply.code, err.reply.lines[0]))
                conn.send(err.reply)
                continue
            if event is NEED_DATA:
                break
            if isinstance(event, ConnectionClosed):
                out.append(event)
                return out
            if event is PAUSED and conn.state is TLS_PENDING:
                break
            assert event is not PAUSED, "drive answers every command"
            if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
                out[-1] = DataChunk(out[-1].data + event.data)
            else:
                out.append(event)
            if not isinstance(event, DataChunk):
                assert conn.next_event() is PAUSED
                code = codes[type(event)]
                conn.send(Reply.of(code, "ok"))
    return out


def kinds(events):
    return [e[:2] if isinstance(e, tuple) else type(e).__name__ for e in events]
