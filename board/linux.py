"""A real gateway running Linux: sysfs LEDs, /dev/watchdog, /sys/class/net.

Every path is a constructor argument, so tests point the board at a fake sysfs tree and a
plain file standing in for the watchdog device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .base import Board

__all__ = ["LinuxBoard", "LED_PATTERNS"]

log = logging.getLogger("matte.board")

# What each state looks like on the status LED: (trigger, brightness, (on ms, off ms) for "timer").
# "fault" also lights the fault LED when the board has one.
LED_PATTERNS: dict[str, tuple[str, bool, tuple[int, int] | None]] = {
    "booting": ("heartbeat", True, None),
    "ready": ("none", True, None),
    "holding": ("timer", True, (1000, 1000)),
    "queue-full": ("timer", True, (150, 150)),
    "fault": ("timer", True, (50, 950)),
}

# Closing /dev/watchdog after writing "V" disarms it (the "magic close" of the Linux watchdog
# API); closing without it (a crash, SIGKILL) leaves it armed, so the hardware reboots.
WATCHDOG_KICK = b"\0"
WATCHDOG_MAGIC_CLOSE = b"V"


class LinuxBoard(Board):
    def __init__(
        self,
        *,
        led: str = "matte:status",
        fault_led: str | None = None,
        leds_dir: Path | str = "/sys/class/leds",
        watchdog: Path | str | None = "/dev/watchdog",
        interface: str = "eth0",
        net_dir: Path | str = "/sys/class/net",
    ) -> None:
        self._led = Path(leds_dir) / led
        self._fault_led = Path(leds_dir) / fault_led if fault_led else None
        self._net = Path(net_dir) / interface
        for d in filter(None, (self._led, self._fault_led)):
            if not (d / "brightness").exists():
                raise FileNotFoundError(f"no LED at {d} (expected {d / 'brightness'})")
        self._watchdog_fd = -1
        if watchdog is not None:
            # Opening the device arms the watchdog: from here on, no kicks means a reboot.
            self._watchdog_fd = os.open(watchdog, os.O_WRONLY | os.O_CLOEXEC)
        self.closed = False

    # -- LED ---------------------------------------------------------------------------------

    def _set_led(self, state: str) -> None:
        self._check_open()
        trigger, on, timer = LED_PATTERNS[state]
        self._show(self._led, trigger, on, timer)
        if self._fault_led is not None:
            self._show(self._fault_led, "none", state == "fault", None)

    @staticmethod
    def _show(led: Path, trigger: str, on: bool, timer: tuple[int, int] | None) -> None:
        _write(led / "trigger", trigger)
        if timer is not None:
            # The kernel creates delay_on/delay_off when the timer trigger is chosen.
            for name, ms in zip(("delay_on", "delay_off"), timer):
                if (led / name).exists():
                    _write(led / name, str(ms))
        if trigger == "none":
            _write(led / "brightness", str(_max_brightness(led) if on else 0))

    # -- watchdog ----------------------------------------------------------------------------

    def kick_watchdog(self) -> None:
        self._check_open()
        if self._watchdog_fd >= 0:
            os.write(self._watchdog_fd, WATCHDOG_KICK)

    # -- NIC ---------------------------------------------------------------------------------

    def nic_online(self) -> bool:
        self._check_open()
        try:
            operstate = (self._net / "operstate").read_text().strip()
            carrier = (self._net / "carrier").read_text().strip()
        except OSError:  # no such interface, or "carrier" unreadable while it is down
            return False
        # Some drivers never report operstate ("unknown"); the carrier still tells.
        return carrier == "1" and operstate in ("up", "unknown")

    def close(self) -> None:
        """Disarm the watchdog (a clean stop must not reboot the gateway)."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog_fd >= 0:
            try:
                os.write(self._watchdog_fd, WATCHDOG_MAGIC_CLOSE)
            finally:
                os.close(self._watchdog_fd)
                self._watchdog_fd = -1

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("board is closed")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _max_brightness(led: Path) -> int:
    try:
        return int((led / "max_brightness").read_text().strip())
    except (OSError, ValueError):
        return 1
