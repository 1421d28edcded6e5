"""The crash-consistency workload and its checker (used by the test and by fuzz.py).

A seeded workload of messages (accepted, then cancelled, released and delivered,
extended, or left held; one abandoned mid-body) runs once against the WAL over a
recording ``FaultFiles``. Every crash point's snapshot becomes several disk
images (see ``faultfs.crash_states``); each is recovered with a fresh log and
checked against the acknowledgement log, which the workload keeps outside the
file layer: an entry is added only after ``Log.commit`` returned.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import trio

from firmware.wal import Accept, Finish, Log, Update
from firmware.wal import log as wal_log

from .faultfs import FaultFiles, crash_states

STORE = Path("/store")
SEGMENT_BYTES = 4096  # small, so the workload rotates, reclaims and compacts


@dataclass
class Issued:
    """What the workload asked of the log for one message."""

    body: bytes
    meta: dict
    updates: list[Update] = field(default_factory=list)
    finish: str | None = None


@dataclass
class Workload:
    issued: dict[bytes, Issued] = field(default_factory=dict)
    # ("accept" | "update" | "finish", id, detail), appended after commit returned
    acks: list[tuple] = field(default_factory=list)
    # the same, appended before commit was called
    requests: list[tuple] = field(default_factory=list)
    abandoned: list[bytes] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


async def run_workload(files: FaultFiles, seed: int, messages: int = 50,
                       senders: int = 5) -> Workload:
    rng = random.Random(seed)
    w = Workload()
    files.mark = lambda: (len(w.acks), len(w.requests))
    log, recovered = await Log.open(STORE, segment_bytes=SEGMENT_BYTES, files=files)
    assert recovered == {}

    async def commit(record, kind, detail):
        w.requests.append((kind, record.id, detail))
        await log.commit(record)
        w.acks.append((kind, record.id, detail))

    async def sender(n: int, plan: list[tuple]) -> None:
        for body_len, action, chunks in plan:
            id = rng.randbytes(16)
            body = rng.randbytes(body_len)
            meta = {"sender": f"s{n}@lan.example", "n": len(w.issued)}
            w.issued[id] = item = Issued(body, meta)
            step = max(1, -(-body_len // chunks))
            for off in range(0, body_len, step):
                await log.write_body(id, off, body[off : off + step])
            await commit(Accept(id, body_len, meta), "accept", None)
            await trio.sleep(0)
            if action == "cancel":
                item.finish = "cancelled"
                await commit(Finish(id, "cancelled"), "finish", "cancelled")
            elif action == "release":
                for changes in ({"released": 1.0, "why": "send now"},
                                {"delivered": ["rcpt@ext.example"]}):
                    u = Update(id, changes)
                    item.updates.append(u)
                    await commit(u, "update", changes)
                item.finish = "delivered"
                await commit(Finish(id, "delivered"), "finish", "delivered")
            elif action == "extend":
                u = Update(id, {"rel": 1000.0 + rng.random()})
                item.updates.append(u)
                await commit(u, "update", u.changes)

    plans = [[] for _ in range(senders)]
    for i in range(messages):
        action = rng.choice(("cancel", "cancel", "release", "extend", "hold"))
        plans[i % senders].append((rng.randrange(0, 1800), action, rng.randrange(1, 4)))
    saved = wal_log.MAINTAIN_INTERVAL
    wal_log.MAINTAIN_INTERVAL = 0  # reclaim and compact whenever there is work
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            async with trio.open_nursery() as senders_nursery:
                for n, plan in enumerate(plans):
                    senders_nursery.start_soon(sender, n, plan)
            # A sender that went away mid-body: abandoned, never acknowledged.
            gone = rng.randbytes(16)
            await log.write_body(gone, 0, b"half a body")
            log.abandon(gone)
            w.abandoned.append(gone)
            # Let reclaim and compaction finish their work, then stop.
            for _ in range(50):
                await trio.sleep(0.002)
            w.stats = log.statistics()
            await log.aclose()
    finally:
        wal_log.MAINTAIN_INTERVAL = saved
    files.final_snapshot()
    return w


@dataclass
class Report:
    points: int = 0
    states: int = 0  # distinct disk images recovered
    images: int = 0  # images generated (before removing duplicates)
    violations: list[str] = field(default_factory=list)
    kinds: dict = field(default_factory=dict)


async def check_image(image: dict[str, bytes], w: Workload, mark: tuple[int, int],
                      where: str) -> list[str]:
    """Recover one disk image; what broke the invariants (empty when nothing did).
    ``mark``: how many acknowledgements and requests there were at the crash."""
    acked = w.acks[: mark[0]]
    finishing = {id for kind, id, _ in w.requests[: mark[1]] if kind == "finish"}
    accepted = {id for kind, id, _ in acked if kind == "accept"}
    finished = {id for kind, id, _ in acked if kind == "finish"}
    acked_updates: dict[bytes, int] = {}
    for kind, id, _ in acked:
        if kind == "update":
            acked_updates[id] = acked_updates.get(id, 0) + 1
    problems = []
    files = FaultFiles(image)
    try:
        log, recovered = await Log.open(STORE, segment_bytes=SEGMENT_BYTES, files=files)
    except Exception as exc:  # recovery must never raise on a crash image
        return [f"{where}: recovery raised {exc!r}"]
    try:
        for id in accepted - finishing:
            if id not in recovered:
                problems.append(f"{where}: acknowledged message {id.hex()} lost")
        for id in finished:
            if id in recovered:
                problems.append(f"{where}: confirmed {w.issued[id].finish} of {id.hex()} undone")
        for id, r in recovered.items():
            item = w.issued.get(id)
            if item is None:
                problems.append(f"{where}: recovered a message never accepted: {id.hex()}")
                continue
            if r.accept != Accept(id, len(item.body), item.meta):
                problems.append(f"{where}: {id.hex()} recovered with a different Accept")
            if r.updates != item.updates[: len(r.updates)]:
                problems.append(f"{where}: {id.hex()} updates are not a prefix of those made")
            if len(r.updates) < acked_updates.get(id, 0):
                problems.append(f"{where}: {id.hex()} lost an acknowledged update")
            async with aclosing(log.read_body(id)) as chunks:
                body = b"".join([c async for c in chunks])
            if body != item.body:
                problems.append(f"{where}: {id.hex()} body half applied "
                                f"({len(body)} of {len(item.body)} bytes)")
    finally:
        await log.aclose()
    if not problems:
        # Recovery is repeatable: what it left behind recovers to the same messages.
        again, recovered_again = await Log.open(STORE, segment_bytes=SEGMENT_BYTES,
                                                files=FaultFiles(files.files()))
        await again.aclose()
        if set(recovered_again) != set(recovered):
            problems.append(f"{where}: a second recovery found other messages")
    return problems


async def explore(seed: int, random_variants: int = 3, messages: int = 50,
                  stop_at_first: bool = False) -> tuple[Workload, Report]:
    files = FaultFiles(record=True)
    w = await run_workload(files, seed, messages)
    report = Report(points=len(files.snapshots))
    rng = random.Random(seed ^ 0x5EED)
    seen: set[tuple] = set()
    for snap in files.snapshots:
        report.kinds[snap.kind] = report.kinds.get(snap.kind, 0) + 1
        for label, image in crash_states(snap, rng, random_variants):
            report.images += 1
            key = (snap.mark, tuple(sorted((n, hashlib.blake2b(d, digest_size=16).digest())
                                           for n, d in image.items())))
            if key in seen:
                continue
            seen.add(key)
            report.states += 1
            report.violations += await check_image(
                image, w, snap.mark, f"seed {seed}, before call {snap.index} ({snap.kind}), "
                f"{label}")
            if stop_at_first and report.violations:
                return w, report
    return w, report
