"""A request whose only instance failed it waits for that instance's restart and then goes
back to it (it used to stay excluded from the instance for good and wait out its timeout)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from caraserve_router.frontend.dispatcher import Dispatcher, Job
from caraserve_router.frontend.metrics import ClusterMetrics
from caraserve_router.scheduling.policies import make_policy
from caraserve_router.scheduling.scheduler_state import ClusterState, InstanceState


def test_failed_instance_is_hidden_until_it_restarts():
    async def run():
        handle = SimpleNamespace(restarts=0, failures=0, name="i0")
        cluster = SimpleNamespace(handles=[handle], clients=[None])
        state = ClusterState([InstanceState("i0", max_batch=4)])
        d = Dispatcher(cluster, state, make_policy("round-robin"), None, ClusterMetrics("round-robin"), 5.0)
        job = Job("r1", None, 0, [1, 2, 3], {"max_new_tokens": 4})
        excluded = {0: (0, 0)}                      # it failed r1 in incarnation (0 restarts, 0 failures)
        assert d._pick(job, excluded) is None       # hidden while it is the same incarnation
        waiting = asyncio.ensure_future(d._choose(job, excluded))
        await asyncio.sleep(0.2)
        assert not waiting.done() and d.waiting == 1
        handle.restarts += 1                        # the monitor restarted it
        await d.notify_capacity()
        assert await asyncio.wait_for(waiting, 3.0) == 0
        assert state.instances[0].healthy           # hiding never changes the view itself

    asyncio.run(run())
