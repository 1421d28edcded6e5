import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "matte.toml"


def matte(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "firmware", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=60)


def test_check_config_ok(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[hold]\nseconds = 120\n[upstream]\nhost = "smtp.example.com"\n'
                    'tls = "starttls"\nusername = "u"\npassword = "s3cret-pw"\n')
    result = matte("check-config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: ok"
    assert "hold: 120 s" in result.stdout
    assert "smtp.example.com:25 tls=starttls" in result.stdout
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert result.stderr == ""


def test_check_config_example():
    result = matte("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: ok\n")


def test_check_config_unknown_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[hold]\nsecods = 10\n")
    result = matte("check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == f"{path}: hold.secods: unknown key (did you mean 'seconds'?)"


def test_check_config_bad_value(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[smtp]\nlisten = ["127.0.0.1:2525", "[::1]:99999"]\n')
    result = matte("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: smtp.listen[1]: ")
    assert "0..65535" in result.stderr


def test_check_config_missing_file(tmp_path):
    path = tmp_path / "missing.toml"
    result = matte("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"{path}: cannot read: No such file or directory"


def test_check_config_needs_a_file():
    result = matte("check-config")
    assert result.returncode == 2
    assert "FILE" in result.stderr


def test_version():
    result = matte("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"matte {cli.version()}"
    assert cli.version()[0].isdigit()


def test_no_command_is_a_usage_error():
    result = matte()
    assert result.returncode == 2
    assert "usage: matte" in result.stderr


def test_run_with_bad_config_does_not_start(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[hold]\non_boot = "never"\n')
    result = matte("run", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: hold.on_boot: " in result.stderr


def test_run_bad_log_level():
    result = matte("run", "--log-level", "LOUD")
    assert result.returncode == 2
    assert "--log-level" in result.stderr


# --- run, in process, with a stand-in for firmware.app ---------------------------------------


class FakeApp:
    def __init__(self, outcome=None):
        self.configs = []
        self.outcome = outcome

    def run(self, config):
        self.configs.append(config)
        logging.getLogger("firmware.app").debug("debug line\nforged line")
        if self.outcome is not None:
            raise self.outcome


@pytest.fixture
def fake_app(monkeypatch):
    app = FakeApp()
    monkeypatch.setitem(sys.modules, "firmware.app", app)
    import firmware

    monkeypatch.setattr(firmware, "app", app, raising=False)
    yield app
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "matte-stderr"]:
        root.removeHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)


def test_run_default_config(fake_app, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 0
    (cfg,) = fake_app.configs
    assert cfg.source == "<embedded default>"
    assert cfg.data_dir == tmp_path / "var"
    err = capsys.readouterr().err
    assert "INFO matte: matte" in err and "<embedded default>" in err
    assert "debug line" not in err  # INFO by default


def test_run_with_config_and_log_level(fake_app, tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text("[hold]\nseconds = 7\n")
    assert cli.main(["run", "--config", str(path), "--log-level", "debug"]) == 0
    assert fake_app.configs[0].hold.seconds == 7
    err = capsys.readouterr().err
    # one line per event: the embedded line break is escaped
    assert "DEBUG firmware.app: debug line\\nforged line" in err
    assert not any(line.startswith("forged") for line in err.splitlines())


def test_run_interrupted(fake_app, capsys):
    fake_app.outcome = KeyboardInterrupt()
    assert cli.main(["run"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_run_crash_is_logged(fake_app, capsys):
    fake_app.outcome = RuntimeError("boom")
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err
    assert "CRITICAL matte: stopped on an error" in err
    assert "RuntimeError: boom" in err


def test_run_app_that_cannot_be_imported(monkeypatch, capsys):
    import firmware

    monkeypatch.setitem(sys.modules, "firmware.app", None)  # makes the import fail
    monkeypatch.delattr(firmware, "app", raising=False)
    try:
        assert cli.main(["run"]) == 1
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "matte-stderr"]:
            root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "stopped on an error" in err and "ModuleNotFoundError" in err
