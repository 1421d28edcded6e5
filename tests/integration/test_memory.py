"""S8: bodies stream through; the gateway's peak memory does not grow with the message."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.integration.test_power_cut import free_port, wait_listening

MB = 1024 * 1024
LIMIT = 40 * MB
# What a body may add to the peak: receive buffers plus the store's bounded write queue.
HEADROOM = 24 * MB


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def body_of(size: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


def test_peak_memory_does_not_grow_with_the_body(tmp_path):
    port = free_port()
    config = tmp_path / "matte.toml"
    config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:{port}"]
listen_tls = []
max_message_size = {LIMIT}
[web]
listen = ["127.0.0.1:0"]
[hold]
seconds = 3600
""")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "firmware", "run", "--config", str(config)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.sendmail("a@lan.example", ["b@ext.example"], body_of(1000))
        baseline = peak_rss(proc.pid)

        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            s.ehlo()
            assert s.mail("a@lan.example", [f"SIZE={LIMIT + 1}"])[0] == 552
            s.rset()
            s.mail("a@lan.example")
            s.rcpt("b@ext.example")
            code, text = s.data(body_of(2 * LIMIT))  # undeclared and twice too big
            assert (code, text[:5]) == (552, b"5.3.4")
            accepted = body_of(LIMIT - MB)
            assert s.mail("a@lan.example")[0] == 250
            assert s.rcpt("b@ext.example")[0] == 250
            assert s.data(accepted)[0] == 250
        grown = peak_rss(proc.pid) - baseline
        print(f"baseline peak RSS {baseline / MB:.1f} MB; after an 80 MB refused body and a "
              f"{len(accepted) / MB:.0f} MB accepted one: +{grown / MB:.1f} MB")
        assert grown < HEADROOM
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
