"""A simulated board for development and tests: it records what it is told."""

from __future__ import annotations

from .base import Board

__all__ = ["SimBoard"]


class SimBoard(Board):
    def __init__(self, *, online: bool = True) -> None:
        self.led_states: list[str] = []
        self.kicks = 0
        self.online = online
        self.closed = False

    @property
    def led(self) -> str | None:
        """The state the LED shows now (None before the first set_led)."""
        return self.led_states[-1] if self.led_states else None

    def _set_led(self, state: str) -> None:
        self._check_open()
        self.led_states.append(state)

    def kick_watchdog(self) -> None:
        self._check_open()
        self.kicks += 1

    def nic_online(self) -> bool:
        self._check_open()
        return self.online

    def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("board is closed")
