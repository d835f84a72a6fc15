"""The cluster monitor's decisions (down, up, restart, back-off) with a fake launcher and
fake health probes: no processes."""
from __future__ import annotations

import asyncio

from caraserve_router.frontend import cluster as cluster_mod
from caraserve_router.frontend.cluster import Cluster, InstanceHandle
from caraserve_router.contracts.configs import InstanceConfig


class FakeLauncher:
    def __init__(self):
        self.alive_now = {}
        self.starts = []

    def alive(self, h):
        return self.alive_now.get(h.index, False)

    def start(self, h):
        self.starts.append(h.index)
        self.alive_now[h.index] = True
        h.started_at = cluster_mod.time.time()
        h.healthy = False

    def stop(self, h):
        self.alive_now[h.index] = False


class FakeClient:
    def __init__(self):
        self.ok = True

    async def health(self, timeout_s=5.0):
        return self.ok


def make_cluster():
    launcher, client = FakeLauncher(), FakeClient()
    h = InstanceHandle(index=0, url="http://127.0.0.1:1", config=InstanceConfig())
    c = Cluster([h], launcher, [client])
    events = []
    c.on_down = lambda i: events.append(("down", i))
    c.on_up = lambda i: events.append(("up", i))
    launcher.start(h)
    return c, h, launcher, client, events


def check(c):
    asyncio.run(c.check_once())


def test_probe_fails_before_the_process_is_reaped_and_the_instance_is_still_restarted():
    c, h, launcher, client, events = make_cluster()
    check(c)
    assert h.healthy and events == [("up", 0)]
    client.ok = False  # killed: the probe fails while poll() still says alive
    check(c)
    assert not h.healthy and events[-1] == ("down", 0) and launcher.starts == [0]
    launcher.alive_now[0] = False  # now reaped
    check(c)
    assert launcher.starts == [0, 0] and h.restarts == 1
    client.ok = True
    check(c)
    assert h.healthy and events[-1] == ("up", 0) and h.crash_loops == 0


def test_an_instance_that_dies_during_start_up_is_retried_with_back_off(monkeypatch):
    c, h, launcher, client, events = make_cluster()
    now = [1000.0]
    monkeypatch.setattr(cluster_mod.time, "time", lambda: now[0])
    client.ok = False
    h.started_at = now[0]
    for _ in range(3):
        launcher.alive_now[0] = False
        check(c)
    # first restart is immediate; the next waits 1 s after that start
    assert h.restarts == 1
    now[0] += 1.5
    launcher.alive_now[0] = False
    check(c)
    assert h.restarts == 2
    now[0] += 1.5  # back-off is now 3 s
    launcher.alive_now[0] = False
    check(c)
    assert h.restarts == 2
    now[0] += 2.0
    check(c)
    assert h.restarts == 3 and events == []


def test_remote_instances_are_never_restarted():
    launcher, client = FakeLauncher(), FakeClient()
    h = InstanceHandle(index=0, url="http://127.0.0.1:1")
    c = Cluster([h], launcher, [client])
    h.healthy = True
    client.ok = False
    check(c)
    assert not h.healthy and launcher.starts == []
