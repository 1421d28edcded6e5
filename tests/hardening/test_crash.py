"""Crash consistency of the store (issue items 1 and 2), with a fault-injecting file layer.

Figures are printed (run with -s to see them). Longer runs: MATTE_CRASH_SEEDS=200 and
MATTE_CRASH_VARIANTS=10, or ``python -m tests.hardening.fuzz crash``.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from firmware.wal import Accept, FrameDecoder, Log, StoreError, Update

from .crash import SEGMENT_BYTES, STORE, explore, run_workload
from .faultfs import FaultFiles

SEEDS = int(os.environ.get("MATTE_CRASH_SEEDS", "3"))
VARIANTS = int(os.environ.get("MATTE_CRASH_VARIANTS", "3"))
RANDOM_FLIPS = int(os.environ.get("MATTE_CRASH_FLIPS", "300"))


async def test_crash_at_every_call_loses_nothing_acknowledged():
    totals = {"points": 0, "images": 0, "states": 0, "violations": 0}
    kinds: dict[str, int] = {}
    compactions = 0
    for seed in range(1, SEEDS + 1):
        w, report = await explore(seed, VARIANTS)
        assert report.violations == [], "\n".join(report.violations[:20])
        totals["points"] += report.points
        totals["images"] += report.images
        totals["states"] += report.states
        for k, n in report.kinds.items():
            kinds[k] = kinds.get(k, 0) + n
        compactions += w.stats["compactions"]
        assert len([a for a in w.acks if a[0] == "accept"]) == 50
    # The workload reaches every kind of call the log makes (rename: the log never renames).
    assert {"write", "fdatasync", "fsync", "create", "unlink"} <= set(kinds), kinds
    assert compactions > 0
    print(f"\ncrash points {totals['points']} {kinds}; images {totals['images']}, "
          f"distinct states recovered {totals['states']}, violations {totals['violations']}")


async def recover(image: dict[str, bytes]):
    """(recovered messages, bodies, files after recovery); raises what Log.open raises."""
    files = FaultFiles(image)
    log, recovered = await Log.open(STORE, segment_bytes=SEGMENT_BYTES, files=files)
    await log.aclose()
    return {id: (r.accept, r.updates) for id, r in recovered.items()}, files.files()


async def final_image(seed: int = 7):
    files = FaultFiles()
    w = await run_workload(files, seed)
    image = files.files()
    segments = sorted(n for n in image if n.endswith(".wal"))
    assert len(segments) >= 3
    return image, segments


def frame_starts(data: bytes) -> list[int]:
    dec = FrameDecoder()
    dec.feed(data)
    starts = []
    while (frame := dec.next_frame()) is not None:
        starts.append(frame[0])
    assert dec.offset == len(data) and dec.error is None
    return starts


async def test_truncation_at_every_byte_of_the_last_three_records():
    image, segments = await final_image()
    last = segments[-1]
    data = image[last]
    starts = frame_starts(data)
    assert len(starts) >= 3
    boundaries = starts + [len(data)]
    expected = {}
    for b in boundaries[-4:]:
        expected[b], _ = await recover({**image, last: data[:b]})
    tried = 0
    for cut in range(starts[-3], len(data) + 1):
        good = max(b for b in boundaries if b <= cut)
        recovered, after = await recover({**image, last: data[:cut]})
        assert recovered == expected[good], cut
        assert after[last] == data[:good]  # the torn tail is cut off, nothing more
        tried += 1
    print(f"\ntruncation offsets tried {tried}")


async def test_bit_flips_in_the_last_record_drop_it():
    image, segments = await final_image()
    last = segments[-1]
    data = image[last]
    start = frame_starts(data)[-1]
    before, _ = await recover({**image, last: data[:start]})
    rng = random.Random(1)
    flips = 0
    for pos in range(start, len(data)):
        for bit in (rng.randrange(8),) if len(data) - start > 256 else range(8):
            damaged = bytearray(data)
            damaged[pos] ^= 1 << bit
            recovered, after = await recover({**image, last: bytes(damaged)})
            assert recovered == before, (pos, bit)
            assert after[last] == data[:start]
            flips += 1
    print(f"\nbit flips in the last record {flips}")


async def test_bit_flips_elsewhere_drop_the_tail_or_stop_recovery():
    image, segments = await final_image()
    rng = random.Random(2)
    stopped = dropped = 0
    for _ in range(RANDOM_FLIPS):
        name = rng.choice(segments)
        data = image[name]
        if not data:
            continue
        pos = rng.randrange(len(data))
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        damaged_image = {**image, name: bytes(damaged)}
        if name != segments[-1]:
            # Damage behind later records is not a torn write: refuse, never skip it.
            with pytest.raises(StoreError, match="not the last one"):
                await recover(damaged_image)
            stopped += 1
        else:
            start = max(s for s in frame_starts(data) if s <= pos)
            expected, _ = await recover({**image, name: data[:start]})
            recovered, after = await recover(damaged_image)
            assert recovered == expected and after[name] == data[:start]
            dropped += 1
    assert stopped and dropped
    print(f"\nrandom bit flips {stopped + dropped}: {stopped} stopped recovery with an error, "
          f"{dropped} dropped a tail")


async def test_failed_fdatasync_is_never_acknowledged_and_never_retried():
    files = FaultFiles()
    log, _ = await Log.open(STORE, segment_bytes=SEGMENT_BYTES, files=files)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        good = os.urandom(16)
        await log.write_body(good, 0, b"good")
        await log.commit(Accept(good, 4, {}))
        for code in (errno.EIO, errno.ENOSPC):
            files.faults["fdatasync"] = code
            with pytest.raises(StoreError):
                await log.commit(Update(good, {"x": code}))
            del files.faults["fdatasync"]
            syncs = files.calls
            # The log is no longer trusted: it refuses, and it does not try to sync again.
            with pytest.raises(StoreError, match="refuses"):
                await log.commit(Update(good, {"y": 1}))
            with pytest.raises(StoreError):
                await log.write_body(os.urandom(16), 0, b"x")
            assert files.calls == syncs
            await log.aclose()
            # Trusted again only through recovery.
            files = FaultFiles(files.files())
            log, recovered = await Log.open(STORE, segment_bytes=SEGMENT_BYTES, files=files)
            assert good in recovered
            await nursery.start(log.run)
        await log.commit(Update(good, {"after": "recovery"}))
        await log.aclose()
