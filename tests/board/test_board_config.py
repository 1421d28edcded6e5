"""The [board] section of the config file."""

from pathlib import Path

import pytest

from firmware.config import ConfigError, loads


def test_default_is_the_simulated_board():
    b = loads("").board
    assert b.kind == "sim" and b.options() == {}
    assert b.kick_seconds < b.stall_seconds


def test_linux_board_options():
    b = loads('[board]\nkind = "linux"\nled = "green:status"\nfault_led = "red:fault"\n'
              'leds_dir = "/tmp/leds"\nwatchdog = "/dev/watchdog1"\ninterface = "lan0"\n'
              'stall_seconds = 30\nupstream_fault_seconds = 0.5\n').board
    assert b.options() == {"led": "green:status", "fault_led": "red:fault",
                           "leds_dir": Path("/tmp/leds"), "watchdog": Path("/dev/watchdog1"),
                           "interface": "lan0", "net_dir": Path("/sys/class/net")}
    assert (b.stall_seconds, b.upstream_fault_seconds) == (30.0, 0.5)


def test_empty_string_turns_watchdog_and_fault_led_off():
    b = loads('[board]\nkind = "linux"\nwatchdog = ""\nfault_led = ""\n').board
    assert b.watchdog is None and b.fault_led is None


@pytest.mark.parametrize("body, key", [
    ('kind = "rpi"', "board.kind"),
    ('led = "../../etc"', "board.led"),
    ('interface = "eth0/.."', "board.interface"),
    ("stall_seconds = 0", "board.stall_seconds"),
    ('kick_seconds = "1"', "board.kick_seconds"),
    ("kick_seconds = true", "board.kick_seconds"),
    ("kick_seconds = 10\nstall_seconds = 5", "board.kick_seconds"),
    ("watchdogs = 1", "board.watchdogs"),
])
def test_bad_board_settings_name_the_key(body, key):
    with pytest.raises(ConfigError) as e:
        loads(f"[board]\n{body}\n", source="x.toml")
    assert e.value.key == key
