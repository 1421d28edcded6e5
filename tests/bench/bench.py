#!/usr/bin/env python3
"""Side-by-side benchmark: Matte, Postfix's hold queue and aiosmtpd with an fsync'd spool.

Not part of the test suite (it needs root, a Postfix instance and minutes of heavy load).
Public tools only: Postfix's smtp-source drives every target with the same load, smtp-sink is
the upstream for released mail and the no-disk ceiling. Every figure is measured in one run,
targets interleaved, each cell repeated (median and spread reported), and written as a table
between the markers in docs/PERFORMANCE.md, with the machine it ran on.

    sudo python3 tests/bench/bench.py                 # everything (about 10 minutes)
    sudo python3 tests/bench/bench.py --quick         # 4 KB only, fewer messages
    sudo python3 tests/bench/bench.py --only release  # one part: accept, memory, wa, release

Ports: 2600 smtp-sink, 2601 aiosmtpd spool, 2602 Postfix (hold), 2603 Matte, 2680 Matte web.
Python for Matte: --python (default: the interpreter running this script); it must have
Matte's dependencies, and aiosmtpd for the aiosmtpd target (skipped without it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

SINK, AIO, POSTFIX, MATTE, MATTE_WEB = 2600, 2601, 2602, 2603, 2680
SENDER, RCPT = "a@lan.example", "b@ext.example"
MB = 1_000_000
# (label, bytes, messages per run, sessions); 100 MB stays under both servers' size limit.
ACCEPT_CELLS = [
    ("4 KB", 4096, 3000, [1, 10, 80]),
    ("1 MB", 1 * MB, 200, [1, 10, 80]),
    ("100 MB", 100 * MB, 2, [1]),
]
RELEASE_COUNT, RELEASE_SIZE = 500, 400_000  # 500 held, 200 MB


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, text=True, capture_output=True, **kw)


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def proc_write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise KeyError("write_bytes")


def smtp_source(port: int, sessions: int, size: int, count: int) -> float:
    """Seconds for `count` messages of `size` bytes over `sessions` parallel sessions."""
    t0 = time.monotonic()
    r = sh("smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(count),
           "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}", check=False)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"smtp-source to {port} failed: {r.stderr.strip()[:300]}")
    return elapsed


# -- Postfix (hold queue) ----------------------------------------------------------------------

def postfix_setup() -> None:
    if sh("postfix", "status", check=False).returncode == 0:
        return
    sh("postconf", "-e", "inet_interfaces = loopback-only", "mydestination =",
       f"relayhost = [127.0.0.1]:{SINK}", "mynetworks = 127.0.0.0/8",
       "smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject",
       "default_process_limit = 200", "smtpd_client_connection_count_limit = 0",
       "smtpd_client_connection_rate_limit = 0", "message_size_limit = 104857600",
       "smtpd_peername_lookup = no", "compatibility_level = 3.6",
       "maillog_file = /var/log/postfix.log")
    master = Path("/etc/postfix/master.cf")
    if not re.search(rf"^{POSTFIX}\s", master.read_text(), re.M):
        with master.open("a") as f:
            f.write(f"{POSTFIX}      inet  n       -       y       -       -       smtpd\n")
    sh("postfix", "start")
    time.sleep(2)


def postfix_spool() -> Path:
    return Path(sh("postconf", "-h", "queue_directory").stdout.strip())


def postfix_count(queue: str) -> int:
    return sum(len(files) for _, _, files in os.walk(postfix_spool() / queue))


def postfix_purge() -> None:
    sh("postsuper", "-d", "ALL", check=False)


# -- the peers ---------------------------------------------------------------------------------

class Process:
    def __init__(self, args: list[str], **kw) -> None:
        self.log = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, **kw)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


class Matte:
    """The gateway from this repository, with its own data_dir and config."""

    def __init__(self, python: str, workdir: Path, name: str, *, on_boot: str = "resume",
                 fresh: bool = True) -> None:
        self.python = python
        self.data = workdir / name
        if fresh and self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = self.data.with_suffix(".toml")
        self.config.write_text(
            f'data_dir = "{self.data}"\n'
            f'[smtp]\nlisten = ["127.0.0.1:{MATTE}"]\nlisten_tls = []\n'
            f'[hold]\nseconds = 3600\nmax_messages = 1000000\nmax_bytes = 1000000000000\n'
            f'on_boot = "{on_boot}"\n'
            f'[upstream]\nhost = "127.0.0.1"\nport = {SINK}\n'
            f'[web]\nlisten = ["127.0.0.1:{MATTE_WEB}"]\n')
        self.started = time.monotonic()
        self.proc = Process([python, "-m", "firmware", "run", "--config", str(self.config)],
                            cwd=REPO)
        try:
            wait_port(MATTE)
        except RuntimeError:
            self.proc.stop()
            raise RuntimeError(f"Matte did not start:\n{self.proc.output()[-2000:]}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{MATTE_WEB}/metrics", timeout=10).read()
        out = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        self.proc.stop()


def start_peers(python: str, workdir: Path) -> list[Process]:
    peers = [Process(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{SINK}", "1000"])]
    wait_port(SINK)
    if sh(python, "-c", "import aiosmtpd", check=False).returncode == 0:
        spool = workdir / "aiosmtpd-spool"
        peers.append(Process([python, str(HERE / "aiosmtpd_spool.py"), str(AIO), str(spool)]))
        wait_port(AIO)
    return peers


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    m, lo, hi = median_spread(values)
    r = (lambda x: f"{x:.{digits}f}")
    return f"{r(m)} ({r(lo)}–{r(hi)})"


# -- the parts ---------------------------------------------------------------------------------

def part_accept(args, workdir: Path, results: dict) -> None:
    """msgs/s for each size and session count; Matte's CPU per message alongside."""
    have_aio = socket.socket().connect_ex(("127.0.0.1", AIO)) == 0
    rows = []
    for label, size, count, sessions_list in ACCEPT_CELLS:
        if args.quick and size != 4096:
            continue
        if args.quick:
            count = 1000
        matte = Matte(args.python, workdir, "accept")  # fresh store per size class
        try:
            for sessions in sessions_list:
                cell = {"postfix": [], "aiosmtpd": [], "matte": [], "matte_cpu_us": []}
                for rep in range(args.repeat):
                    order = ["postfix", "aiosmtpd", "matte"]
                    order = order[rep % 3:] + order[:rep % 3]  # interleaved, rotating
                    for target in order:
                        if target == "aiosmtpd" and not have_aio:
                            continue
                        port = {"postfix": POSTFIX, "aiosmtpd": AIO, "matte": MATTE}[target]
                        before = matte.metrics()["matte_accepted_total"] if target == "matte" else 0
                        held_before = postfix_count("hold") if target == "postfix" else 0
                        cpu0 = proc_cpu(matte.pid)
                        seconds = smtp_source(port, sessions, size, count)
                        if target == "matte":
                            got = matte.metrics()["matte_accepted_total"] - before
                            cell["matte_cpu_us"].append((proc_cpu(matte.pid) - cpu0) / count * 1e6)
                        elif target == "postfix":
                            got = postfix_count("hold") - held_before
                            postfix_purge()
                        else:
                            got = count  # aiosmtpd: smtp-source fails the run on an error
                        if got != count:
                            raise RuntimeError(f"{target}: {got} of {count} messages accepted")
                        cell[target].append(count / seconds)
                        print(f"accept {label} s={sessions} {target}: {count / seconds:.1f} msg/s",
                              flush=True)
                rows.append({"size": label, "bytes": size, "messages": count,
                             "sessions": sessions, **cell})
        finally:
            matte.stop()
    results["accept"] = rows


def part_memory(args, workdir: Path, results: dict) -> None:
    """Peak RSS with a 100 MB message; RSS of 1,000 open connections; of 500 held summaries."""
    out = {}
    matte = Matte(args.python, workdir, "memory")
    try:
        out["rss_idle"] = proc_status(matte.pid, "VmRSS")
        t_matte = smtp_source(MATTE, 1, 100 * MB, 1)
        out["hwm_100mb"] = proc_status(matte.pid, "VmHWM")
        t_pf = smtp_source(POSTFIX, 1, 100 * MB, 1)
        postfix_purge()
        out["seconds_100mb"] = {"matte": t_matte, "postfix": t_pf}
        socks = []
        rss0 = proc_status(matte.pid, "VmRSS")
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", MATTE), 10)
                socks.append(s)
            for s in socks:
                s.recv(512)  # the greeting: the session exists
            time.sleep(0.5)
            out["rss_per_connection"] = (proc_status(matte.pid, "VmRSS") - rss0) / 1000
            out["rss_1000_connections"] = proc_status(matte.pid, "VmRSS")
        finally:
            for s in socks:
                s.close()
    finally:
        matte.stop()
    held = 100 if args.quick else RELEASE_COUNT
    matte = Matte(args.python, workdir, "held")
    try:
        smtp_source(MATTE, 10, RELEASE_SIZE, held)
        out["held"] = held
        out["rss_held"] = proc_status(matte.pid, "VmRSS")
        out["hwm_held"] = proc_status(matte.pid, "VmHWM")
    finally:
        matte.stop()
    results["memory"] = out


def part_wa(args, workdir: Path, results: dict) -> None:
    """Write amplification for 4 KB at 80 sessions: bytes the gateway wrote per accepted byte,
    after a warm-up (steady state), from /proc/PID/io and from the store's own counter."""
    matte = Matte(args.python, workdir, "wa")
    try:
        smtp_source(MATTE, 80, 4096, 1000)  # warm-up
        m0, w0 = matte.metrics(), proc_write_bytes(matte.pid)
        count = 1000 if args.quick else 5000
        smtp_source(MATTE, 80, 4096, count)
        time.sleep(0.5)
        m1, w1 = matte.metrics(), proc_write_bytes(matte.pid)
        accepted = m1["matte_held_bytes"] - m0["matte_held_bytes"]
        results["wa"] = {
            "messages": count,
            "accepted_bytes": accepted,
            "proc_write_bytes": w1 - w0,
            "store_bytes_written": m1["matte_store_bytes_written"] - m0["matte_store_bytes_written"],
            "fsyncs": m1["matte_store_fsyncs"] - m0["matte_store_fsyncs"],
        }
    finally:
        matte.stop()


def part_release(args, workdir: Path, results: dict) -> None:
    """500 held messages (200 MB) drained to smtp-sink, by tests/bench/drain.sh: a running Matte
    released through its JSON API (POST /api/held/all/send) against a running private Postfix
    instance flushing its hold queue (postsuper -H ALL; postqueue -f) to the same sink, both
    timed from the release; and Matte restarted with on_boot = "send" (boot included).
    Completions are counted where each sender records the 250."""
    count = 100 if args.quick else RELEASE_COUNT
    out = {"messages": count, "bytes": count * RELEASE_SIZE, "matte": [], "postfix": [],
           "matte_boot": []}
    env = {**os.environ, "N": str(count), "SIZE": str(RELEASE_SIZE), "PYTHON": args.python}
    for _ in range(args.repeat):
        r = sh("bash", str(HERE / "drain.sh"), env=env, check=False)
        m = re.search(r"matte ([\d.]+) s .*postfix ([\d.]+) s", r.stdout)
        boot = re.search(r"with boot: matte ([\d.]+) s", r.stdout)
        if r.returncode != 0 or m is None or boot is None:
            raise RuntimeError(f"drain.sh failed:\n{r.stdout[-1000:]}\n{r.stderr[-2000:]}")
        out["matte"].append(float(m[1]))
        out["postfix"].append(float(m[2]))
        out["matte_boot"].append(float(boot[1]))
        print(f"release: matte {m[1]} s (running), postfix {m[2]} s; "
              f"matte with boot {boot[1]} s", flush=True)
    results["release"] = out


# -- the report --------------------------------------------------------------------------------

def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = proc_status_total()
    fs = sh("findmnt", "-T", str(postfix_spool()), "-no", "FSTYPE", check=False).stdout.strip()
    pf = sh("postconf", "-h", "mail_version", check=False).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem / 2**30:.0f} GiB RAM, Linux "
            f"{platform.release()}, {fs or '?'} filesystem; Python {platform.python_version()}, "
            f"Postfix {pf}")


def proc_status_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.2f}×"


def report(results: dict, args) -> str:
    lines = [f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on: {machine()}.",
             f"Each cell: median (min–max) of {args.repeat} interleaved runs. "
             "Every 250 is durable: Matte fsyncs its log, Postfix fsyncs the queue file, "
             "aiosmtpd fsyncs a spool file.", ""]
    if "accept" in results:
        lines += ["### Accepting (messages/s, smtp-source)", "",
                  "| size | sessions | messages | Matte | Postfix hold | aiosmtpd+fsync "
                  "| Matte/Postfix | Matte CPU µs/msg |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["accept"]:
            d = 0 if r["bytes"] < MB else 2
            lines.append(f"| {r['size']} | {r['sessions']} | {r['messages']} | "
                         f"{fmt(r['matte'], d)} | {fmt(r['postfix'], d)} | "
                         f"{fmt(r['aiosmtpd'], d)} | {ratio(r['matte'], r['postfix'])} | "
                         f"{fmt(r['matte_cpu_us'])} |")
        lines.append("")
    if "memory" in results:
        m = results["memory"]
        s = m["seconds_100mb"]
        lines += ["### Memory", "",
                  f"- 100 MB message: Matte {s['matte']:.2f} s, Postfix {s['postfix']:.2f} s "
                  f"(Matte/Postfix time {s['matte'] / s['postfix']:.2f}×); Matte's peak RSS "
                  f"(VmHWM) {m['hwm_100mb'] / 2**20:.1f} MiB (idle {m['rss_idle'] / 2**20:.1f} MiB).",
                  f"- 1,000 open connections: {m['rss_per_connection'] / 1024:.1f} KiB each, "
                  f"RSS {m['rss_1000_connections'] / 2**20:.1f} MiB in all.",
                  f"- {m['held']} held messages of {RELEASE_SIZE // 1000} KB: RSS "
                  f"{m['rss_held'] / 2**20:.1f} MiB (peak {m['hwm_held'] / 2**20:.1f} MiB while "
                  "receiving them).", ""]
    if "wa" in results:
        w = results["wa"]
        lines += ["### Write amplification (4 KB, 80 sessions, steady state)", "",
                  f"- {w['messages']} messages, {w['accepted_bytes'] / MB:.1f} MB accepted: "
                  f"the process wrote {w['proc_write_bytes'] / w['accepted_bytes']:.3f} bytes per "
                  f"accepted byte (/proc/PID/io write_bytes, audit log included); the store "
                  f"{w['store_bytes_written'] / w['accepted_bytes']:.3f} (its own counter); "
                  f"{w['fsyncs']:.0f} fsyncs ({w['messages'] / max(w['fsyncs'], 1):.1f} "
                  "messages per fsync).", ""]
    if "release" in results:
        r = results["release"]
        lines += ["### Release (held mail drained to smtp-sink, tests/bench/drain.sh)", "",
                  f"- {r['messages']} messages ({r['bytes'] / MB:.0f} MB), like for like: Matte "
                  f"{fmt(r['matte'], 2)} s (running, POST /api/held/all/send), "
                  f"Postfix {fmt(r['postfix'], 2)} s (running, postsuper -H ALL; postqueue -f); "
                  f"Matte/Postfix time {ratio(r['matte'], r['postfix'])}.",
                  f"- With boot: Matte {fmt(r['matte_boot'], 2)} s (restart with "
                  f"on_boot = \"send\", from process start); Matte/Postfix time "
                  f"{ratio(r['matte_boot'], r['postfix'])}.", ""]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc:
        doc += f"\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", choices=["accept", "memory", "wa", "release"])
    ap.add_argument("--no-doc", action="store_true", help="print the table, leave the doc")
    args = ap.parse_args()
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is needed (Debian: apt-get install postfix)")
    os.environ["PATH"] += ":/usr/sbin"
    postfix_setup()
    postfix_purge()
    workdir = Path(tempfile.mkdtemp(prefix="matte-bench-"))
    peers = start_peers(args.python, workdir)
    results: dict = {}
    parts = args.only or ["accept", "memory", "wa", "release"]
    try:
        for name in parts:
            globals()[f"part_{name}"](args, workdir, results)
    finally:
        for p in peers:
            p.stop()
        postfix_purge()
        shutil.rmtree(workdir, ignore_errors=True)
        (workdir.parent / "matte-bench-results.json").write_text(json.dumps(results, indent=1))
    text = report(results, args)
    print(text)
    if not args.no_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
