"""The live counts in Log.statistics() are kept as records are applied (the queue asks for them
on every change); they must always equal a count from scratch."""

import os
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from firmware.wal import Finish, Update

from .conftest import new_id, put, running, wait_until


def assert_counts_exact(log):
    stats = log.statistics()
    assert (stats["live_ids"], stats["live_bytes"]) == log._recount()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["put", "update", "finish", "abandon", "restart"]),
                          st.integers(0, 6000)), max_size=25), st.randoms())
async def test_live_counts_match_a_recount(tmp_path_factory, steps, rnd):
    path = tmp_path_factory.mktemp("log")
    async with running(path, segment_bytes=4096) as (log, _):
        live: list[bytes] = []
        for action, size in steps:
            if action == "put" or not live:
                live.append(await put(log, os.urandom(size), chunk=rnd.choice([500, 4096])))
            elif action == "update":
                await log.commit(Update(rnd.choice(live), {"rel": size}))
            elif action == "finish":
                await log.commit(Finish(live.pop(rnd.randrange(len(live))), "delivered"))
            elif action == "abandon":
                id = new_id()
                await log.write_body(id, 0, b"x" * size)
                log.abandon(id)
            else:  # a body started again from offset 0, then accepted
                id = new_id()
                await log.write_body(id, 0, b"first try")
                live.append(await put(log, os.urandom(size + 1), id=id))
            assert_counts_exact(log)
        await wait_until(lambda: not log.statistics()["queued_records"])
        assert_counts_exact(log)
    async with running(path, segment_bytes=4096) as (log, recovered):
        assert set(recovered) == set(live)
        assert log.statistics()["live_ids"] == len(live)
        assert_counts_exact(log)
