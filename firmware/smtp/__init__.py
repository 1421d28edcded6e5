"""Sans-IO SMTP (RFC 5321, 3207, 4954, 6531, 1870, 6152) for both roles.

No sockets, no clock: feed bytes with ``receive_data``, take events with
``next_event``, turn events into bytes with ``send``.
"""

from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_PATH,
    MAX_REPLY_LINE,
    MAX_TEXT_LINE,
    Auth,
    AuthResponse,
    ConnectionClosed,
    Data,
    DataChunk,
    EndOfData,
    Event,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
    is_mailbox,
)
from ._state import (
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
    SERVER,
    START,
    TLS_PENDING,
    Sentinel,
)
from .connection import Connection
from ._readers import parse_ehlo_reply

__all__ = [
    "Connection", "SERVER", "CLIENT", "NEED_DATA", "PAUSED", "Sentinel",
    "START", "GREETED", "READY", "MAIL", "RCPT", "DATA", "AUTH", "TLS_PENDING", "CLOSED",
    "Event", "Hello", "MailFrom", "RcptTo", "Data", "DataChunk", "EndOfData", "Rset",
    "Noop", "Quit", "Vrfy", "Help", "StartTLS", "Auth", "AuthResponse", "Reply",
    "ConnectionClosed",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "MAX_COMMAND_LINE", "MAX_TEXT_LINE", "MAX_AUTH_LINE", "MAX_REPLY_LINE", "MAX_PATH",
    "parse_ehlo_reply", "is_mailbox",
]
