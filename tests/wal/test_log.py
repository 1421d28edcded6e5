import errno
import hashlib
import os
import shutil
import tracemalloc

import pytest
import trio

from firmware.wal import (
    Accept, Body, Finish, FrameDecoder, Log, StoreError, Update, encode_frame,
)

from .conftest import new_id, put, read_all, running, segment_files, wait_until


async def test_empty_open_creates_directory(tmp_path):
    d = tmp_path / "a" / "b"
    async with running(d) as (log, recovered):
        assert recovered == {}
        assert log.statistics()["segments"] == 1
    assert segment_files(d) == ["0000000000000001.wal"]


async def test_replay_after_reopen(tmp_path):
    async with running(tmp_path) as (log, _):
        kept = await put(log, b"kept body\r\n" * 100, {"from": "a@b"})
        await log.commit(Update(kept, {"extend": 300}))
        await log.commit(Update(kept, {"release": True}))
        done = await put(log, b"done")
        await log.commit(Finish(done, "delivered"))
        unaccepted = new_id()
        await log.write_body(unaccepted, 0, b"never accepted")
        empty = await put(log, b"")
        assert await read_all(log, kept) == b"kept body\r\n" * 100
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [kept, empty]
        r = recovered[kept]
        assert r.accept == Accept(kept, 1100, {"from": "a@b"})
        assert r.updates == [Update(kept, {"extend": 300}), Update(kept, {"release": True})]
        assert r.size == 1100 and r.id == kept
        assert await read_all(log, kept) == b"kept body\r\n" * 100
        assert await read_all(log, empty) == b""
        with pytest.raises(KeyError):
            await read_all(log, done)
        with pytest.raises(KeyError):
            await read_all(log, unaccepted)
        assert log.statistics()["live_ids"] == 2


def write_segment(path, records):
    path.mkdir(exist_ok=True)
    (path / "0000000000000001.wal").write_bytes(
        b"".join(encode_frame(r.to_payload()) for r in records))


async def test_replay_rules_on_handmade_log(tmp_path):
    a, b, c, d, e = (new_id() for _ in range(5))
    write_segment(tmp_path, [
        Body(a, 0, b"hello"),
        Body(a, 3, b"XX"),            # wrong offset: stale, ignored
        Body(b, 0, b"no accept"),
        Body(a, 5, b" world"),
        Accept(a, 11, {"k": "v"}),
        Update(a, {"u": 1}),
        Body(c, 0, b"cc"), Accept(c, 2, {}), Finish(c, "cancelled"),
        Update(c, {"late": 1}),       # after Finish: ignored
        Body(d, 0, b"ddd"), Accept(d, 4, {}),   # size mismatch: not accepted
        Update(e, {"orphan": 1}),     # never accepted
        Body(b, 0, b"restart"), Body(b, 7, b"ed"),  # b restarted, still unaccepted
    ])
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [a]
        assert recovered[a].updates == [Update(a, {"u": 1})]
        assert await read_all(log, a) == b"hello world"


async def test_replay_of_interrupted_and_finished_copies(tmp_path):
    a, b, c = new_id(), new_id(), new_id()
    u1, u2 = Update(a, {"n": 1}), Update(a, {"n": 2})
    write_segment(tmp_path, [
        Body(a, 0, b"original"), Accept(a, 8, {}), u1,
        Body(b, 0, b"bbbb"), Accept(b, 4, {"b": 1}),
        # a copied forward: body, Accept, then the updates as of the copy.
        Body(a, 0, b"orig"), Body(a, 4, b"inal"), Accept(a, 8, {}), u1,
        u2,
        # b's copy was interrupted by a power cut: b keeps its first body.
        Body(b, 0, b"bb"),
        # c was finished while its copy was under way: it stays finished.
        Body(c, 0, b"c"), Accept(c, 1, {}), Body(c, 0, b"c"), Finish(c, "sent"),
        Accept(c, 1, {}),
    ])
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [a, b]
        assert recovered[a].updates == [u1, u2]
        assert await read_all(log, a) == b"original"
        assert await read_all(log, b) == b"bbbb"


async def test_body_restart_from_offset_zero(tmp_path):
    async with running(tmp_path) as (log, _):
        id = new_id()
        await log.write_body(id, 0, b"first attempt")
        await log.write_body(id, 0, b"second")
        await log.write_body(id, 6, b" try")
        with pytest.raises(ValueError):
            await log.write_body(id, 99, b"gap")
        with pytest.raises(ValueError):
            await log.commit(Accept(id, 5, {}))
        await log.commit(Accept(id, 10, {}))
        assert await read_all(log, id) == b"second try"
        with pytest.raises(ValueError):
            await log.write_body(id, 0, b"accepted bodies are final")
    async with running(tmp_path) as (log, recovered):
        assert await read_all(log, id) == b"second try"


def frame_ends(data: bytes) -> list[int]:
    dec = FrameDecoder()
    dec.feed(data)
    ends = []
    while dec.next_frame() is not None:
        ends.append(dec.offset)
    assert dec.offset == len(data)
    return ends


async def test_torn_tail_at_every_byte(tmp_path):
    src = tmp_path / "src"
    ids = []
    async with running(src) as (log, _):
        for i in range(3):
            ids.append(await put(log, bytes([65 + i]) * 50, {"i": i}))
        await log.commit(Update(ids[2], {"x": 1}))
    seg = src / segment_files(src)[0]
    data = seg.read_bytes()
    ends = frame_ends(data)
    # Frames: (Body, Accept) x 3, Update. Cut anywhere in the last three messages' worth.
    first = ends[1]
    for cut in range(first, len(data) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(data[:cut])
        log, recovered = await Log.open(d)
        try:
            expect = [ids[0]]
            if cut >= ends[3]:
                expect.append(ids[1])
            if cut >= ends[5]:
                expect.append(ids[2])
            assert list(recovered) == expect, cut
            if ids[2] in recovered:
                assert recovered[ids[2]].updates == ([Update(ids[2], {"x": 1})]
                                                     if cut == len(data) else [])
            good = max(e for e in [0] + ends if e <= cut)
            assert (d / seg.name).stat().st_size == good
        finally:
            await log.aclose()


async def test_torn_tail_then_append(tmp_path):
    async with running(tmp_path) as (log, _):
        a = await put(log, b"a" * 100)
        b = await put(log, b"b" * 100)
    seg = tmp_path / segment_files(tmp_path)[0]
    data = seg.read_bytes()
    seg.write_bytes(data[:-3])
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [a]
        c = await put(log, b"c" * 100)
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [a, c]
        assert await read_all(log, c) == b"c" * 100


async def test_corrupt_crc_tail_dropped(tmp_path):
    async with running(tmp_path) as (log, _):
        a = await put(log, b"a" * 100)
        b = await put(log, b"b" * 100)
    seg = tmp_path / segment_files(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    ends = frame_ends(bytes(data))
    data[ends[1] + 20] ^= 0x55  # inside b's body frame
    seg.write_bytes(bytes(data))
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [a]
        assert seg.stat().st_size == ends[1]
        assert await read_all(log, a) == b"a" * 100


async def test_corruption_in_earlier_segment_raises(tmp_path):
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        for _ in range(9):
            await put(log, os.urandom(1500))
    files = segment_files(tmp_path)
    assert len(files) >= 3
    seg = tmp_path / files[0]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="not the last"):
        await Log.open(tmp_path, segment_bytes=4096)
    assert seg.stat().st_size == len(data)  # nothing truncated


async def test_unknown_record_with_good_crc_raises(tmp_path):
    (tmp_path / "0000000000000001.wal").write_bytes(encode_frame(b"\x92\xa1Z\x01"))
    with pytest.raises(StoreError, match="unknown record"):
        await Log.open(tmp_path)


async def test_second_open_refused(tmp_path):
    log, _ = await Log.open(tmp_path)
    try:
        with pytest.raises(StoreError, match="in use"):
            await Log.open(tmp_path)
    finally:
        await log.aclose()


async def test_group_commit(tmp_path):
    n = 200
    ids = []
    async with running(tmp_path) as (log, _):
        async def one():
            ids.append(await put(log, os.urandom(4000)))
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        stats = log.statistics()
        assert stats["commits"] == n
        assert 1 <= stats["fsyncs"] < n // 4
        assert stats["live_ids"] == n
    async with running(tmp_path) as (log, recovered):
        assert set(recovered) == set(ids)


async def test_fsync_failure_refuses_until_reopen(tmp_path, monkeypatch):
    async with running(tmp_path) as (log, _):
        good = await put(log, b"good")

        def broken_fdatasync(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
        results = []

        async def attempt():
            try:
                await put(log, b"doomed")
                results.append("ok")
            except StoreError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(attempt)
        assert len(results) == 5 and all(isinstance(r, StoreError) for r in results)
        monkeypatch.undo()
        with pytest.raises(StoreError, match="refuses"):
            await log.commit(Update(good, {"x": 1}))
        with pytest.raises(StoreError):
            await log.write_body(new_id(), 0, b"x")
        assert log.statistics()["broken"]
    async with running(tmp_path) as (log, recovered):
        assert good in recovered
        await log.commit(Update(good, {"after": "reopen"}))


async def test_write_failure_is_not_fatal(tmp_path, monkeypatch):
    async with running(tmp_path) as (log, _):
        id = new_id()
        real = os.writev
        monkeypatch.setattr(os, "writev", lambda fd, b: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        await log.write_body(id, 0, b"lost")
        with pytest.raises(StoreError):
            await log.commit(Accept(id, 4, {}))
        monkeypatch.setattr(os, "writev", real)
        ok = await put(log, b"fine")
        # A later Accept of a body that lost a piece is refused, too.
        late = new_id()
        await log.write_body(late, 0, b"part one")
        await log.commit(Update(ok, {"flush": 1}))
        monkeypatch.setattr(os, "writev", lambda fd, b: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        await log.write_body(late, 8, b"part two")
        with pytest.raises(StoreError):
            await log.commit(Update(ok, {"fails": 1}))
        monkeypatch.setattr(os, "writev", real)
        with pytest.raises(StoreError, match="lost"):
            await log.commit(Accept(late, 16, {}))
        assert log.statistics()["write_errors"] == 2
    async with running(tmp_path) as (log, recovered):
        assert list(recovered) == [ok]
        assert recovered[ok].updates == [Update(ok, {"flush": 1})]


async def test_reclaim_unlinks_finished_segments(tmp_path):
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        # Big enough that the files never exceed twice the live data: no compaction.
        live = await put(log, b"L" * 30000)
        first = segment_files(tmp_path)[0]
        live_files = set(segment_files(tmp_path))
        done = []
        for _ in range(12):
            i = await put(log, os.urandom(1500))
            done.append(i)
        for i in done:
            await log.commit(Finish(i, "delivered"))
        # Only the live message's segments and the active one remain. The files go in a worker
        # thread before the log counts them gone: wait for both.
        def reclaimed():
            files = segment_files(tmp_path)
            stats = log.statistics()
            return (len(set(files) - live_files) <= 1 and stats["reclaimed_segments"] >= 2
                    and stats["segments"] == len(files))
        await wait_until(reclaimed)
        files = segment_files(tmp_path)
        assert first in files
        assert log.statistics()["compactions"] == 0
        assert await read_all(log, live) == b"L" * 30000
        await log.commit(Finish(live, "cancelled"))
        await wait_until(lambda: first not in segment_files(tmp_path))
    async with running(tmp_path, segment_bytes=4096) as (log, recovered):
        assert recovered == {}


async def test_finish_outlives_accept_on_disk(tmp_path):
    # A Finish in a later segment keeps its segment while the Accept's segment exists.
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        pinned = await put(log, b"P" * 100)   # keeps segment 1 alive
        victim = await put(log, b"V" * 100)   # also in segment 1
        for _ in range(4):
            await log.commit(Finish(await put(log, os.urandom(1500)), "x"))
        await log.commit(Finish(victim, "cancelled"))  # lands in a later segment
        for _ in range(8):
            await log.commit(Finish(await put(log, os.urandom(1500)), "x"))
        await trio.sleep(0.6)
    async with running(tmp_path, segment_bytes=4096) as (log, recovered):
        assert list(recovered) == [pinned]


async def test_compaction_keeps_live_messages(tmp_path):
    body = os.urandom(3000)
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        live = await put(log, body, {"who": "live"}, chunk=700)
        await log.commit(Update(live, {"extend": 60}))
        first = segment_files(tmp_path)[0]
        for _ in range(20):
            await log.commit(Finish(await put(log, os.urandom(1500)), "delivered"))
        await wait_until(lambda: first not in segment_files(tmp_path))
        stats = log.statistics()
        assert stats["compactions"] >= 1 and stats["copied_messages"] >= 1
        assert await read_all(log, live) == body
        await log.commit(Update(live, {"release": True}))
        await wait_until(lambda: log.statistics()["bytes_on_disk"] <= 5 * 4096)
    async with running(tmp_path, segment_bytes=4096) as (log, recovered):
        assert list(recovered) == [live]
        assert recovered[live].accept.meta == {"who": "live"}
        assert recovered[live].updates == [Update(live, {"extend": 60}),
                                           Update(live, {"release": True})]
        assert await read_all(log, live) == body


async def test_read_body_survives_unlink(tmp_path):
    from firmware.wal.log import READ_CHUNK

    body = os.urandom(2 * READ_CHUNK + 88_000)
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        id = await put(log, body, chunk=65536)
        chunks = log.read_body(id)
        got = [await chunks.__anext__()]
        assert len(got[0]) == READ_CHUNK
        await log.commit(Finish(id, "delivered"))
        for _ in range(3):
            await log.commit(Finish(await put(log, b"x" * 2000), "delivered"))
        await wait_until(lambda: log.statistics()["reclaimed_segments"] >= 1)
        got += [c async for c in chunks]
        assert b"".join(got) == body


async def test_large_body_streams_in_bounded_memory(tmp_path):
    size = 20 * 1024 * 1024
    chunk = os.urandom(65536)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        async with running(tmp_path) as (log, _):
            id = new_id()
            for off in range(0, size, len(chunk)):
                await log.write_body(id, off, chunk)
                digest.update(chunk)
            await log.commit(Accept(id, size, {}))
            _, peak_write = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            back = hashlib.sha256()
            async for piece in log.read_body(id):
                assert len(piece) <= 512 * 1024
                back.update(piece)
            _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert back.digest() == digest.digest()
    assert peak_write < 12 * 1024 * 1024, peak_write
    assert peak_read < 2 * 1024 * 1024, peak_read


async def test_backpressure_limits_queued_bytes(tmp_path):
    async with running(tmp_path, max_queued_bytes=1024 * 1024) as (log, _):
        id = new_id()
        seen = 0
        for off in range(0, 8 * 1024 * 1024, 65536):
            await log.write_body(id, off, b"z" * 65536)
            seen = max(seen, log.statistics()["queued_body_bytes"])
        assert seen <= 1024 * 1024 + 2 * 65536 + 1024
        await log.commit(Accept(id, 8 * 1024 * 1024, {}))


async def test_commit_argument_checks(tmp_path):
    async with running(tmp_path) as (log, _):
        with pytest.raises(TypeError):
            await log.commit(Body(new_id(), 0, b""))
        with pytest.raises(ValueError):
            await log.commit(Accept(new_id(), 3, {}))
        with pytest.raises(KeyError):
            await log.commit(Update(new_id(), {}))
        await log.commit(Finish(new_id(), "unknown id: nothing to do"))
    with pytest.raises(StoreError, match="closed"):
        await log.commit(Finish(new_id(), "x"))


async def test_abandon(tmp_path):
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        id = new_id()
        await log.write_body(id, 0, b"q" * 3000)
        log.abandon(id)
        with pytest.raises(ValueError):
            await log.write_body(id, 3000, b"more")
        first = segment_files(tmp_path)[0]
        for _ in range(6):
            await log.commit(Finish(await put(log, os.urandom(1500)), "x"))
        await wait_until(lambda: first not in segment_files(tmp_path))


async def test_commit_returns_after_fdatasync(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync

    def counting(fd):
        real(fd)
        calls.append(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    async with running(tmp_path) as (log, _):
        id = new_id()
        await log.write_body(id, 0, b"body")
        await trio.sleep(0.05)
        assert calls == []  # body writes alone are not synced
        await log.commit(Accept(id, 4, {}))
        assert len(calls) == 1
        await log.commit(Update(id, {"x": 1}))
        assert len(calls) == 2


async def test_rotation_syncs_directory_and_old_segment(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (real_fsync(fd), synced.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))))[0])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (real_fdatasync(fd), synced.append(
        ("fdatasync", os.readlink(f"/proc/self/fd/{fd}"))))[0])
    async with running(tmp_path, segment_bytes=4096) as (log, _):
        id = new_id()
        await log.write_body(id, 0, b"a" * 5000)
        await trio.sleep(0.05)  # written, not synced
        synced.clear()
        await log.write_body(id, 5000, b"b" * 10)  # goes to a new segment
        await log.commit(Accept(id, 5010, {}))
    assert synced[:3] == [
        ("fdatasync", str(tmp_path / "0000000000000001.wal")),
        ("fsync", str(tmp_path)),
        ("fdatasync", str(tmp_path / "0000000000000002.wal")),
    ]


async def test_compaction_copy_torn_after_its_accept_keeps_the_updates(tmp_path):
    # Found by the crash tests: a crash tore a compaction batch after the copied Accept,
    # before the copied updates; the copy must not replace the updates already on disk,
    # and the older segment holding them must stay.
    a = new_id()
    u1, u2 = Update(a, {"n": 1}), Update(a, {"n": 2})
    (tmp_path / "0000000000000001.wal").write_bytes(b"".join(encode_frame(r.to_payload()) for r in [
        Body(a, 0, b"original"), Accept(a, 8, {}), u1, u2]))
    (tmp_path / "0000000000000002.wal").write_bytes(b"".join(encode_frame(r.to_payload()) for r in [
        Body(a, 0, b"original"), Accept(a, 8, {}), u1]))  # u2's copy torn off
    for _ in range(2):
        async with running(tmp_path, segment_bytes=4096) as (log, recovered):
            assert recovered[a].updates == [u1, u2]
            assert await read_all(log, a) == b"original"
            await trio.sleep(0.05)  # the writer's first maintenance pass has run
        assert segment_files(tmp_path)[:2] == ["0000000000000001.wal", "0000000000000002.wal"]
    # A whole copy makes the older records unnecessary.
    with open(tmp_path / "0000000000000002.wal", "ab") as f:
        f.write(encode_frame(u2.to_payload()))
    async with running(tmp_path, segment_bytes=4096) as (log, recovered):
        assert recovered[a].updates == [u1, u2]
        await wait_until(lambda: "0000000000000001.wal" not in segment_files(tmp_path))
    async with running(tmp_path, segment_bytes=4096) as (log, recovered):
        assert recovered[a].updates == [u1, u2]
        assert await read_all(log, a) == b"original"
