"""ChildWatch, the instance HTTP process's supervision of its children, on real processes:
whichever child dies (router or detokenizer), requests in flight are failed with a 503 and
the server is told to stop, within a second; living children are left alone."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest

from lightllm_patches.instance_server import WATCH_PERIOD_S, ChildWatch


class FakeManager:
    def __init__(self):
        self.failed = []

    def fail_all(self, error) -> None:
        self.failed.append(error)


@pytest.mark.parametrize("victim", ["router", "detokenizer"])
def test_a_dead_child_fails_requests_and_stops_the_server(victim):
    ctx = mp.get_context("fork")
    procs = {name: ctx.Process(target=time.sleep, args=(60,), daemon=True) for name in ("router", "detokenizer")}
    for p in procs.values():
        p.start()
    deaths, manager = [], FakeManager()
    watch = ChildWatch(deaths.append)
    watch.procs, watch.manager = procs, manager

    async def scenario():
        watch.start(asyncio.get_running_loop())
        await asyncio.sleep(3 * WATCH_PERIOD_S)
        assert deaths == [] and watch.dead() is None, "living children must be left alone"
        assert set(watch.pids()) == {"http", "router", "detokenizer"}
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        while not deaths and time.monotonic() - killed < 5:
            await asyncio.sleep(0.01)
        return time.monotonic() - killed

    try:
        took = asyncio.run(scenario())
    finally:
        for p in procs.values():
            p.kill()
            p.join(5)
    assert took < 2 * WATCH_PERIOD_S + 0.5, f"noticed after {took:.2f}s"
    assert len(deaths) == 1 and victim in deaths[0] and "-9" in deaths[0]
    assert len(manager.failed) == 1 and manager.failed[0].status == 503 and victim in str(manager.failed[0])
