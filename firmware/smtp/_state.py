"""The SMTP state machine as data.

A command is accepted only in the states of ``COMMANDS_ALLOWED``; the state
changes when the application sends the reply to it, as the table
``EVENT_TRIGGERED_TRANSITIONS`` says: state -> event type -> reply key ->
new state, where a reply key is an exact code (354) or a class digit (2 for
any 2xx). A reply with no entry leaves the state as it is; an intermediate
(3xx) reply with no exact entry is a local error. Two rules hold everywhere:
421 closes the session, and 2xx to QUIT closes it.
"""

from __future__ import annotations

__all__ = [
    "Sentinel",
    "SERVER",
    "CLIENT",
    "NEED_DATA",
    "PAUSED",
    "START",
    "GREETED",
    "READY",
    "MAIL",
    "RCPT",
    "DATA",
    "AUTH",
    "TLS_PENDING",
    "CLOSED",
    "GREETING",
    "EVENT_TRIGGERED_TRANSITIONS",
    "COMMANDS_ALLOWED",
    "lookup_transition",
]

from ._events import (
    Auth,
    AuthResponse,
    Data,
    EndOfData,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Vrfy,
)


class Sentinel:
    """A unique named value, compared with ``is``."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        # pickling/copying yields the same object
        return self._name


SERVER = Sentinel("SERVER")
CLIENT = Sentinel("CLIENT")
NEED_DATA = Sentinel("NEED_DATA")
PAUSED = Sentinel("PAUSED")

START = Sentinel("START")  # connected, greeting not yet sent/received
GREETED = Sentinel("GREETED")  # greeting done, no (valid) EHLO/HELO yet
READY = Sentinel("READY")  # hello done, no transaction
MAIL = Sentinel("MAIL")  # MAIL accepted
RCPT = Sentinel("RCPT")  # at least one RCPT accepted
DATA = Sentinel("DATA")  # receiving message content
AUTH = Sentinel("AUTH")  # inside an AUTH exchange
TLS_PENDING = Sentinel("TLS_PENDING")  # STARTTLS accepted, handshake not done
CLOSED = Sentinel("CLOSED")

# the pseudo-command answered by the greeting
GREETING = Sentinel("GREETING")

_ANYTIME = {Hello: {2: READY}, Noop: {}, Vrfy: {}, Help: {}}

EVENT_TRIGGERED_TRANSITIONS: dict[Sentinel, dict[object, dict[int, Sentinel]]] = {
    # 554 at greeting: this server will not talk; the application closes
    START: {GREETING: {220: GREETED, 2: GREETED, 554: CLOSED}},
    GREETED: {
        **_ANYTIME,
        Rset: {},
        StartTLS: {220: TLS_PENDING},
    },
    READY: {
        **_ANYTIME,
        Rset: {2: READY},
        MailFrom: {2: MAIL},
        StartTLS: {220: TLS_PENDING},
        Auth: {334: AUTH, 2: READY},
    },
    MAIL: {**_ANYTIME, Rset: {2: READY}, RcptTo: {2: RCPT}},
    RCPT: {**_ANYTIME, Rset: {2: READY}, RcptTo: {2: RCPT}, Data: {354: DATA}},
    DATA: {EndOfData: {2: READY, 4: READY, 5: READY}},
    AUTH: {AuthResponse: {334: AUTH, 2: READY, 4: READY, 5: READY}},
    TLS_PENDING: {},
    CLOSED: {},
}

# Quit is accepted in every state that reads commands
for _state in (GREETED, READY, MAIL, RCPT):
    EVENT_TRIGGERED_TRANSITIONS[_state][Quit] = {2: CLOSED}

COMMANDS_ALLOWED: dict[Sentinel, frozenset[type]] = {
    state: frozenset(k for k in table if isinstance(k, type))
    for state, table in EVENT_TRIGGERED_TRANSITIONS.items()
    if state in (GREETED, READY, MAIL, RCPT)
}


def lookup_transition(state: Sentinel, key: object, code: int) -> Sentinel | None:
    """New state for reply ``code`` to ``key`` in ``state``; None: unchanged.

    Raises KeyError if ``key`` is not a command of ``state``, ValueError for an
    intermediate reply the table does not expect.
    """
    if code == 421:
        return CLOSED
    by_code = EVENT_TRIGGERED_TRANSITIONS[state][key]
    new = by_code.get(code)
    if new is None:
        if code // 100 == 3:
            raise ValueError(code)
        new = by_code.get(code // 100)
    return new
