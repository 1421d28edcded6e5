"""The hardware interface: status LED, watchdog, network link.

The firmware reaches hardware only through a Board, so it runs unchanged on
the simulated board in tests and on a real gateway.
"""

from __future__ import annotations

import abc

__all__ = ["Board", "LED_STATES"]

# What the LED can say; a board maps each to a colour or blink pattern.
LED_STATES = frozenset({"booting", "ready", "holding", "queue-full", "fault"})


class Board(abc.ABC):
    def set_led(self, state: str) -> None:
        """Show `state` (one of LED_STATES) on the status LED."""
        if state not in LED_STATES:
            raise ValueError(f"unknown LED state {state!r}; expected one of {sorted(LED_STATES)}")
        self._set_led(state)

    @abc.abstractmethod
    def _set_led(self, state: str) -> None: ...

    @abc.abstractmethod
    def kick_watchdog(self) -> None:
        """Tell the watchdog the firmware is healthy (call regularly)."""

    @abc.abstractmethod
    def nic_online(self) -> bool:
        """Whether the network link is up (bounces wait while it is not)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the hardware; the board is unusable afterwards."""

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
