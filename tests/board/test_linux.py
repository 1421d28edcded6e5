"""The linux board against a fake sysfs tree and a plain file standing in for /dev/watchdog."""

import os
from pathlib import Path

import pytest

from board import LED_STATES, LinuxBoard, open_board
from board.linux import LED_PATTERNS


def make_led(root: Path, name: str, max_brightness: int = 255) -> Path:
    led = root / "leds" / name
    led.mkdir(parents=True)
    (led / "brightness").write_text("0\n")
    (led / "max_brightness").write_text(f"{max_brightness}\n")
    (led / "trigger").write_text("[none] timer heartbeat\n")
    (led / "delay_on").write_text("500\n")
    (led / "delay_off").write_text("500\n")
    return led


def make_nic(root: Path, name: str, operstate: str, carrier: str | None) -> None:
    nic = root / "net" / name
    nic.mkdir(parents=True)
    (nic / "operstate").write_text(operstate + "\n")
    if carrier is not None:
        (nic / "carrier").write_text(carrier + "\n")


@pytest.fixture
def sysfs(tmp_path):
    make_led(tmp_path, "matte:status")
    make_led(tmp_path, "matte:fault", max_brightness=1)
    make_nic(tmp_path, "eth0", "up", "1")
    (tmp_path / "watchdog").write_bytes(b"")
    return tmp_path


def linux_board(root: Path, **kw) -> LinuxBoard:
    options = dict(led="matte:status", fault_led="matte:fault", leds_dir=root / "leds",
                   watchdog=root / "watchdog", interface="eth0", net_dir=root / "net")
    options.update(kw)
    return open_board("linux", **options)  # type: ignore[return-value]


def read(path: Path) -> str:
    return path.read_text().strip()


@pytest.mark.parametrize("state", sorted(LED_STATES))
def test_each_led_state_writes_its_pattern(sysfs, state):
    status, fault = sysfs / "leds" / "matte:status", sysfs / "leds" / "matte:fault"
    with linux_board(sysfs) as b:
        b.set_led(state)
    trigger, _on, timer = LED_PATTERNS[state]
    assert read(status / "trigger") == trigger
    if timer is not None:
        assert (read(status / "delay_on"), read(status / "delay_off")) == tuple(map(str, timer))
    if trigger == "none":
        assert read(status / "brightness") == "255"  # max_brightness, not a guessed 1
    assert read(fault / "trigger") == "none"
    assert read(fault / "brightness") == ("1" if state == "fault" else "0")


def test_patterns_tell_every_state_apart():
    assert set(LED_PATTERNS) == LED_STATES
    assert len(set(LED_PATTERNS.values())) == len(LED_PATTERNS)


def test_fault_led_is_optional(sysfs):
    with linux_board(sysfs, fault_led=None) as b:
        b.set_led("fault")
    assert read(sysfs / "leds" / "matte:fault" / "brightness") == "0"


def test_missing_led_is_an_error_at_open(sysfs):
    with pytest.raises(FileNotFoundError, match="no LED at"):
        linux_board(sysfs, led="nonesuch")


def test_watchdog_kicks_then_magic_close(sysfs):
    b = linux_board(sysfs)
    for _ in range(3):
        b.kick_watchdog()
    assert (sysfs / "watchdog").read_bytes() == b"\0\0\0"
    b.close()
    assert (sysfs / "watchdog").read_bytes() == b"\0\0\0V"
    b.close()  # idempotent: the magic character is written once
    assert (sysfs / "watchdog").read_bytes() == b"\0\0\0V"
    with pytest.raises(RuntimeError):
        b.kick_watchdog()


def test_watchdog_device_is_opened_at_start_and_never_read(sysfs):
    (sysfs / "watchdog").chmod(0o200)  # write-only, like the real device node's use
    b = linux_board(sysfs)
    try:
        fds = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}")}
        assert str(sysfs / "watchdog") in fds
    finally:
        b.close()


def test_missing_watchdog_device_fails_at_open(sysfs):
    with pytest.raises(FileNotFoundError):
        linux_board(sysfs, watchdog=sysfs / "nowatchdog")


def test_no_watchdog_configured(sysfs):
    with linux_board(sysfs, watchdog=None) as b:
        b.kick_watchdog()
    assert (sysfs / "watchdog").read_bytes() == b""


@pytest.mark.parametrize("operstate, carrier, online", [
    ("up", "1", True),
    ("unknown", "1", True),  # drivers that never report operstate
    ("down", "0", False),
    ("up", "0", False),
    ("dormant", "1", False),
    ("down", None, False),  # "carrier" is unreadable while the interface is down
])
def test_nic_online_from_operstate_and_carrier(tmp_path, operstate, carrier, online):
    make_led(tmp_path, "matte:status")
    make_nic(tmp_path, "eth1", operstate, carrier)
    with LinuxBoard(leds_dir=tmp_path / "leds", watchdog=None, interface="eth1",
                    net_dir=tmp_path / "net") as b:
        assert b.nic_online() is online


def test_nic_follows_link_changes_and_missing_interface(sysfs):
    with linux_board(sysfs) as b:
        assert b.nic_online()
        (sysfs / "net" / "eth0" / "carrier").write_text("0\n")
        assert not b.nic_online()
        (sysfs / "net" / "eth0" / "carrier").write_text("1\n")
        assert b.nic_online()
    with linux_board(sysfs, interface="wlan9") as b:
        assert not b.nic_online()
