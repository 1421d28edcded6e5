"""S7: a gateway killed with SIGKILL under load delivers, after restart, every message it took."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.integration.conftest import (
    UpstreamRecorder,
    free_port,
    make_message,
    start_upstream,
)

SENDERS = 8
KILL_AFTER_ACKS = 60


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway exited while starting"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the gateway did not start listening")


def start(config: Path, log: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    with open(log, "ab") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "firmware", "run", "--config", str(config)],
            cwd=root, stdout=subprocess.DEVNULL, stderr=stderr)


def test_every_acknowledged_message_survives_sigkill(tmp_path):
    recorder = UpstreamRecorder()
    upstream = start_upstream(recorder)
    try:
        up_port = recorder.port
        smtp_port = free_port()
        config = tmp_path / "matte.toml"
        config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
listen_tls = ["127.0.0.1:{free_port()}"]
[web]
listen = ["127.0.0.1:{free_port()}"]
[hold]
seconds = 3600
on_boot = "send"
[upstream]
host = "127.0.0.1"
port = {up_port}
""")
        log = tmp_path / "gateway.log"
        proc = start(config, log)
        wait_listening(smtp_port, proc)

        acked: list[bytes] = []
        lock = threading.Lock()
        stop = threading.Event()

        def sender(n: int) -> None:
            i = 0
            while not stop.is_set():
                tag = f"m{n}-{i}"
                i += 1
                try:
                    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as s:
                        s.sendmail("sender@lan.example", ["rcpt@ext.example"],
                                   make_message(tag, body=f"{tag}\r\n" * 50))
                except (OSError, smtplib.SMTPException):
                    continue  # not acknowledged: the gateway owes nothing for it
                with lock:
                    acked.append(tag.encode())

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < KILL_AFTER_ACKS and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # the power cut, in the middle of the load
        proc.wait()
        with lock:
            taken = list(acked)
        stop.set()
        for t in threads:
            t.join(30)
        assert len(taken) >= KILL_AFTER_ACKS, log.read_text()
        assert recorder.received() == []  # everything was still held

        proc = start(config, log)
        try:
            wait_listening(smtp_port, proc)
            def delivered_tags():
                return [m.content.split(b"Subject: ")[1].split(b"\r\n")[0]
                        for m in recorder.received()]
            deadline = time.monotonic() + 60
            while not set(taken) <= set(delivered_tags()) and time.monotonic() < deadline:
                time.sleep(0.1)
            tags = delivered_tags()
            missing = set(taken) - set(tags)
            assert not missing, f"lost {len(missing)} acknowledged message(s): {sorted(missing)}"
            duplicates = len(tags) - len(set(tags))
            print(f"acknowledged {len(taken)}, delivered {len(set(tags))}, "
                  f"duplicates {duplicates}")
            assert duplicates == 0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    finally:
        upstream.stop()
