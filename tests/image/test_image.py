"""The single-file image on a Python with nothing installed: hold, cancel, release upstream."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from tests.image.build import ROOT, bare_python, built_image, image_command
from tests.integration.conftest import (
    UpstreamRecorder,
    api,
    free_port,
    make_message,
    start_upstream,
)


def test_bare_python_really_has_nothing_installed():
    probe = subprocess.run([*bare_python(), "-c", "import trio"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'trio'" in probe.stderr


def test_the_same_sources_build_the_same_bytes(tmp_path):
    image = built_image()
    again = tmp_path / "again.pyz"
    subprocess.run([sys.executable, str(ROOT / "build" / "zipapp.py"), "--output", str(again)],
                   check=True, stdout=subprocess.DEVNULL)
    assert again.read_bytes() == image.read_bytes()


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "INFO matte: ready:" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_image_runs_the_whole_flow_on_a_bare_python(tmp_path):
    image = built_image()
    print(f"\nimage {image.name}: {image.stat().st_size} bytes "
          f"({image.stat().st_size / 2**20:.1f} MiB)")
    recorder = UpstreamRecorder()
    upstream = start_upstream(recorder)
    smtp_port, web_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
listen_tls = []
[web]
listen = ["127.0.0.1:{web_port}"]
[hold]
seconds = 3600
[upstream]
host = "127.0.0.1"
port = {recorder.port}
""")
    log = tmp_path / "gateway.log"
    cache = tmp_path / "cache"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(image_command(image, config), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                env={"MATTE_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"})
    try:
        wait_ready(proc, log)
        assert sorted(p.name for p in cache.iterdir()) != []  # native code was extracted
        for subject in ("keep me", "cancel me", "send me now"):
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
                s.sendmail("sender@lan.example", ["rcpt@ext.example"], make_message(subject))
        status, listing = api(web_port, "GET", "/api/held")
        assert status == 200
        by_subject = {m["subject"]: m for m in listing["held"]}
        assert sorted(by_subject) == ["cancel me", "keep me", "send me now"]
        token = listing["token"]
        status, _ = api(web_port, "POST", f"/api/held/{by_subject['cancel me']['id']}/cancel",
                        token=token)
        assert status == 200
        status, _ = api(web_port, "POST", f"/api/held/{by_subject['send me now']['id']}/send",
                        token=token)
        assert status == 200
        deadline = time.monotonic() + 30
        while not recorder.received() and time.monotonic() < deadline:
            time.sleep(0.05)
        [got] = recorder.received()
        assert got.content == make_message("send me now")
        status, listing = api(web_port, "GET", "/api/held")
        assert [m["subject"] for m in listing["held"]] == ["keep me"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            upstream.stop()
    text = log.read_text()
    assert code == 0, text
    assert "SIGTERM: shutting down" in text and "Traceback" not in text
    assert [r.content for r in recorder.received()] == [make_message("send me now")]
    json.dumps  # the API answers JSON: parsed by api()
