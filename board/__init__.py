"""Hardware behind one interface (imports nothing of the firmware)."""

from __future__ import annotations

from .base import LED_STATES, Board
from .linux import LinuxBoard
from .sim import SimBoard

__all__ = ["Board", "SimBoard", "LinuxBoard", "LED_STATES", "open_board", "BOARD_KINDS"]

BOARD_KINDS = ("sim", "linux")


def open_board(kind: str = "sim", **options: object) -> Board:
    """The board named `kind`; options are passed to its constructor."""
    if kind == "sim":
        return SimBoard(**options)  # type: ignore[arg-type]
    if kind == "linux":
        return LinuxBoard(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown board {kind!r}: expected one of {', '.join(BOARD_KINDS)}")
