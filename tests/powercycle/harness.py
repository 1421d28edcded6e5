"""Power-cycle harness (S7): start the gateway, drive concurrent senders, cut the power (SIGKILL)
at random moments, start it again, and check at the end:

- every message that got 250 was delivered upstream (held mail is sent at once on boot),
- no message that got a 4xx/5xx was delivered,
- duplicates (delivered twice: cut after the upstream's 250, before the gateway wrote it down)
  are counted and reported.

Some cycles stop the gateway with SIGTERM instead, which must exit cleanly (code 0).

The suite runs a short form (tests/powercycle/test_powercycle.py). The long form runs outside it:

    python -m tests.powercycle.harness --kills 300           # the image (built first)
    MATTE_IMAGE=dist/matte.pyz python -m tests.powercycle.harness --kills 300
    python -m tests.powercycle.harness --kills 300 --source  # python -m firmware instead
"""

from __future__ import annotations

import argparse
import random
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.image.build import ROOT, built_image, image_command
from tests.integration.conftest import UpstreamRecorder, free_port, make_message, start_upstream


@dataclass
class Outcome:
    kills: int = 0
    clean_stops: int = 0
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)  # the connection broke: nothing was promised
    delivered: Counter = field(default_factory=Counter)

    @property
    def lost(self) -> set[str]:
        return self.acked - set(self.delivered)

    @property
    def refused_delivered(self) -> set[str]:
        return self.refused & set(self.delivered)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.delivered.values() if n > 1)

    def summary(self) -> str:
        return (f"power cycles: {self.kills} SIGKILL + {self.clean_stops} SIGTERM; "
                f"acknowledged {len(self.acked)}, refused {len(self.refused)}, "
                f"broken off {len(self.unknown)}; delivered {len(self.delivered)} distinct; "
                f"lost {len(self.lost)}, refused but delivered {len(self.refused_delivered)}, "
                f"duplicates {self.duplicates}")


class Gateway:
    """One gateway process at a time, on fixed ports and one data directory."""

    def __init__(self, workdir: Path, upstream_port: int, *, use_image: bool) -> None:
        self.workdir = workdir
        self.smtp_port = free_port()
        self.log = workdir / "gateway.log"
        self.config = workdir / "config.toml"
        self.config.write_text(f"""
data_dir = "{workdir / 'data'}"
[smtp]
listen = ["127.0.0.1:{self.smtp_port}"]
listen_tls = []
[web]
listen = ["127.0.0.1:{free_port()}"]
[hold]
seconds = 3600
on_boot = "send"
[upstream]
host = "127.0.0.1"
port = {upstream_port}
""")
        if use_image:
            self.command = image_command(built_image(), self.config)
        else:
            self.command = [sys.executable, "-m", "firmware", "run", "--config", str(self.config)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as stderr:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                env={"MATTE_CACHE_DIR": str(self.workdir / "cache"), "PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"the gateway exited while starting:\n{self.tail()}"
            assert time.monotonic() < deadline, f"the gateway did not start:\n{self.tail()}"
            try:
                socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"SIGTERM did not stop the gateway:\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def subject_of(content: bytes) -> str:
    return content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


def run(workdir: Path, *, kills: int, senders: int = 8, seed: int | None = None,
        use_image: bool = True, max_uptime: float = 1.0, sigterm_every: int = 5,
        progress=None) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome()
    recorder = UpstreamRecorder()
    upstream = start_upstream(recorder)
    gateway = Gateway(workdir, recorder.port, use_image=use_image)
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            tag = f"s{n}-{i}"
            i += 1
            body = f"{tag}\r\n" * rng.choice((1, 50, 2000))
            try:
                with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=10) as s:
                    s.sendmail("sender@lan.example", ["rcpt@ext.example"],
                               make_message(tag, body=body))
            except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused):
                with lock:
                    outcome.refused.add(tag)  # a 4xx/5xx: must never be delivered
                continue
            except (OSError, smtplib.SMTPException):
                with lock:
                    outcome.unknown.add(tag)
                time.sleep(0.01)  # down: don't spin
                continue
            with lock:
                outcome.acked.add(tag)

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(senders)]
    try:
        gateway.start()
        for t in threads:
            t.start()
        for cycle in range(1, kills + 1):
            time.sleep(rng.uniform(0.0, max_uptime))
            if sigterm_every and cycle % sigterm_every == 0:
                code = gateway.stop()
                assert code == 0, f"SIGTERM: exit code {code}\n{gateway.tail()}"
                outcome.clean_stops += 1
            else:
                gateway.kill()  # the power cut
                outcome.kills += 1
            gateway.start()
            if progress:
                progress(cycle, outcome)
        stop.set()
        for t in threads:
            t.join(30)
        # One more boot sends everything still held (also what came in since the last one);
        # then wait for what was promised.
        code = gateway.stop()
        assert code == 0, f"SIGTERM: exit code {code}\n{gateway.tail()}"
        gateway.start()
        deadline = time.monotonic() + 120
        while True:
            delivered = Counter(subject_of(m.content) for m in recorder.received())
            if outcome.acked <= set(delivered) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        code = gateway.stop()
        assert code == 0, f"SIGTERM: exit code {code}\n{gateway.tail()}"
        outcome.delivered = Counter(subject_of(m.content) for m in recorder.received())
        return outcome
    finally:
        stop.set()
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.proc.kill()
            gateway.proc.wait()
        upstream.stop()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description="Power-cycle the gateway: SIGKILL under load.")
    parser.add_argument("--kills", type=int, default=300, help="power cycles (default 300)")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-uptime", type=float, default=1.0,
                        help="seconds of load before each cut, at most (default 1.0)")
    parser.add_argument("--source", action="store_true", help="python -m firmware, not the image")
    args = parser.parse_args(argv)

    def progress(cycle: int, outcome: Outcome) -> None:
        if cycle % 25 == 0:
            print(f"cycle {cycle}: acknowledged {len(outcome.acked)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="matte-powercycle-") as tmp:
        started = time.monotonic()
        outcome = run(Path(tmp), kills=args.kills, senders=args.senders, seed=args.seed,
                      use_image=not args.source, max_uptime=args.max_uptime, progress=progress)
        print(outcome.summary())
        print(f"took {time.monotonic() - started:.0f} s")
        if outcome.lost or outcome.refused_delivered:
            print(f"LOST: {sorted(outcome.lost)}\nREFUSED BUT DELIVERED: "
                  f"{sorted(outcome.refused_delivered)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
