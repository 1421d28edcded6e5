import pytest

import board
from board import LED_STATES, Board, SimBoard, open_board


def test_open_board_default_is_sim():
    b = open_board()
    assert isinstance(b, SimBoard) and isinstance(b, Board)
    assert b.nic_online() is True


def test_open_board_passes_options():
    assert open_board("sim", online=False).nic_online() is False


@pytest.mark.parametrize("kind", ["", "SIM", "Linux"])
def test_open_board_unknown_kind(kind):
    with pytest.raises(ValueError, match="expected one of sim, linux"):
        open_board(kind)


def test_led_states_recorded_in_order():
    b = SimBoard()
    assert b.led is None
    for state in ("booting", "ready", "holding", "queue-full", "fault", "ready"):
        b.set_led(state)
    assert b.led_states == ["booting", "ready", "holding", "queue-full", "fault", "ready"]
    assert b.led == "ready"
    assert set(b.led_states) == LED_STATES


def test_unknown_led_state_rejected_and_not_recorded():
    b = SimBoard()
    with pytest.raises(ValueError):
        b.set_led("blinking")
    assert b.led_states == []


def test_watchdog_kicks_counted():
    b = SimBoard()
    for _ in range(3):
        b.kick_watchdog()
    assert b.kicks == 3


def test_nic_online_settable():
    b = SimBoard()
    b.online = False
    assert b.nic_online() is False
    b.online = True
    assert b.nic_online() is True


def test_close_and_context_manager():
    with open_board() as b:
        b.set_led("ready")
    assert b.closed
    with pytest.raises(RuntimeError):
        b.kick_watchdog()


def test_board_imports_nothing_of_firmware():
    import ast
    import pathlib

    for path in pathlib.Path(board.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "firmware" for n in names), path
