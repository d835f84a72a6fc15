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


class KillingLauncher(FakeLauncher):
    def __init__(self):
        super().__init__()
        self.killed = []
        self.codes = {}

    def kill(self, handles, wait_s=2.0):
        for h in handles:
            self.killed.append(h.index)
            self.alive_now[h.index] = False

    def exit_code(self, h):
        return self.codes.get(h.index)


def test_a_hung_instance_is_killed_and_restarted_a_starting_one_is_not(monkeypatch):
    launcher, client = KillingLauncher(), FakeClient()
    h = InstanceHandle(index=0, url="http://127.0.0.1:1", config=InstanceConfig())
    c = Cluster([h], launcher, [client], hung_after_s=10.0)
    events = []
    c.on_down = lambda i: events.append(("down", i))
    c.on_up = lambda i: events.append(("up", i))
    now = [1000.0]
    monkeypatch.setattr(cluster_mod.time, "time", lambda: now[0])
    launcher.start(h)
    client.ok = False
    for _ in range(5):  # still starting (never up): however long it takes, it is not hung
        now[0] += 20.0
        check(c)
    assert launcher.killed == [] and launcher.starts == [0]
    client.ok = True
    check(c)
    assert h.healthy and events == [("up", 0)]
    client.ok = False  # SIGSTOP: the process lives, every probe times out
    check(c)
    assert not h.healthy and events[-1] == ("down", 0) and launcher.killed == []
    now[0] += 9.0
    check(c)
    assert launcher.killed == []
    now[0] += 1.5
    check(c)
    assert launcher.killed == [0] and launcher.starts == [0, 0] and h.restarts == 1
    now[0] += 60.0  # the new process is starting: not hung either
    check(c)
    assert launcher.killed == [0]


def test_start_up_failures_are_retried_and_the_cluster_starts_if_one_instance_does(monkeypatch):
    real_sleep = asyncio.sleep
    monkeypatch.setattr(cluster_mod.asyncio, "sleep", lambda s: real_sleep(0))
    launcher = KillingLauncher()
    launcher.stop = lambda h, grace_s=15.0: None
    clients = [FakeClient(), FakeClient()]
    handles = [InstanceHandle(index=i, url=f"http://127.0.0.1:{i + 1}", config=InstanceConfig()) for i in range(2)]
    c = Cluster(handles, launcher, clients)
    for h in handles:
        launcher.start(h)
    launcher.alive_now[1] = False  # instance 1 keeps exiting (a port taken, a flaky device...)
    launcher.codes[1] = 1
    real_start = launcher.start

    def start(h):  # each retry dies again at once
        real_start(h)
        launcher.alive_now[h.index] = h.index != 1

    launcher.start = start
    asyncio.run(c.wait_ready(30))
    assert handles[0].healthy and not handles[1].healthy
    assert launcher.starts.count(1) == 1 + cluster_mod.START_RETRIES
    assert "instance 1 exited during start-up" in handles[1].start_failure

    # a bad config (exit 2) is not retried, and with no instance up the start fails with its reason
    launcher2 = KillingLauncher()
    h = InstanceHandle(index=0, url="http://127.0.0.1:1", config=InstanceConfig())
    c2 = Cluster([h], launcher2, [FakeClient()])
    launcher2.start(h)
    launcher2.alive_now[0] = False
    launcher2.codes[0] = cluster_mod.CONFIG_ERROR_EXIT
    try:
        asyncio.run(c2.wait_ready(30))
        raise AssertionError("wait_ready must fail when no instance starts")
    except RuntimeError as e:
        assert "instance 0 exited during start-up" in str(e)
    assert launcher2.starts == [0]
