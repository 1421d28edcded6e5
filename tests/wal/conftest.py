import os
from contextlib import asynccontextmanager

import trio

from firmware.wal import Accept, Log


def new_id() -> bytes:
    return os.urandom(16)


@asynccontextmanager
async def running(path, **kw):
    """An open log with its writer running; closed on exit."""
    log, recovered = await Log.open(path, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        try:
            yield log, recovered
        finally:
            await log.aclose()


async def put(log, body: bytes, meta=None, chunk=4096, id=None) -> bytes:
    id = id or new_id()
    for off in range(0, len(body), chunk):
        await log.write_body(id, off, body[off : off + chunk])
    await log.commit(Accept(id, len(body), meta or {"n": 1}))
    return id


async def read_all(log, id) -> bytes:
    return b"".join([c async for c in log.read_body(id)])


async def wait_until(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def segment_files(path):
    return sorted(p.name for p in path.iterdir() if p.suffix == ".wal")
