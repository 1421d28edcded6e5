"""Whose fault it was: ours (LocalProtocolError) or the peer's (RemoteProtocolError)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._events import Reply

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class; never raised directly.

    ``reply`` is the SMTP reply that fits the error: for a RemoteProtocolError
    in the server role it is what the application must send (the error counts
    as the pending command); otherwise it is a hint and may be None.
    """

    def __init__(self, msg: str, reply: Reply | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract")
        super().__init__(msg)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """This side tried to do something SMTP (or this state machine) forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something SMTP forbids."""
