"""Routes each request to an instance with the scheduling policy and streams its tokens back.

The dispatcher owns the front end's `ClusterState` (what it sent where, what is running,
what is resident) and keeps it current from the streams it relays and from the instances'
stats. A request that cannot be placed yet waits here (late binding); a request whose
instance is unreachable before its first token is re-routed; one whose instance dies after
it ends with a clear error. dLoRA's migration of queued requests is done by re-routing them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from caraserve_router.frontend.instance_client import InstanceClient, InstanceError, InstanceFailed, InstanceUnavailable
from caraserve_router.scheduling.scheduler_state import ClusterState, RequestInfo, SchedulerStateError

log = logging.getLogger("caraserve.dispatch")


class DispatchError(RuntimeError):
    """A request the cluster cannot serve; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 503, kind: str = "server_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Job:
    """One request as the dispatcher carries it."""

    request_id: str
    adapter: Optional[str]
    rank: int
    prompt_ids: list
    parameters: dict
    created: float = field(default_factory=time.perf_counter)
    migrate_to: Optional[int] = None
    moved: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> RequestInfo:
        return RequestInfo(self.request_id, self.adapter, self.rank, len(self.prompt_ids),
                           self.parameters["max_new_tokens"])

    def body(self) -> dict:
        return {"input_ids": self.prompt_ids, "adapter": self.adapter, "parameters": self.parameters,
                "request_id": self.request_id}


class Dispatcher:
    def __init__(self, cluster, state: ClusterState, policy, perf_model, metrics, wait_timeout_s: float):
        self.cluster = cluster
        self.state = state
        self.policy = policy
        self.perf_model = perf_model
        self.metrics = metrics
        self.wait_timeout_s = wait_timeout_s
        self.capacity = asyncio.Condition()
        self.jobs: dict[str, Job] = {}
        self.waiting = 0

    @property
    def clients(self) -> list[InstanceClient]:
        return self.cluster.clients

    async def notify_capacity(self) -> None:
        async with self.capacity:
            self.capacity.notify_all()

    async def _choose(self, job: Job, excluded: set) -> int:
        deadline = time.monotonic() + self.wait_timeout_s
        self.waiting += 1
        self.metrics.frontend_queue.set(self.waiting)
        try:
            async with self.capacity:
                while True:
                    index = self._pick(job, excluded)
                    if index is not None:
                        return index
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DispatchError(self._no_room_reason(excluded), 503)
                    try:
                        await asyncio.wait_for(self.capacity.wait(), min(remaining, 1.0))
                    except asyncio.TimeoutError:
                        pass
        finally:
            self.waiting -= 1
            self.metrics.frontend_queue.set(self.waiting)

    def _pick(self, job: Job, excluded: set) -> Optional[int]:
        instances = self.state.instances
        saved = [(i, instances[i].healthy) for i in excluded]
        for i, _ in saved:
            instances[i].healthy = False  # hide instances that just failed this request
        try:
            return self.policy.choose(job.info(), instances, self.perf_model)
        finally:
            for i, healthy in saved:
                instances[i].healthy = healthy

    def _no_room_reason(self, excluded: set) -> str:
        healthy = [i for i, inst in enumerate(self.state.instances) if inst.healthy and i not in excluded]
        if not healthy:
            return "no healthy instance is available"
        return f"no instance had room for the request within {self.wait_timeout_s:.0f}s"

    async def run(self, job: Job) -> AsyncIterator[dict]:
        """Route `job` and yield the instance's stream events (re-routing where allowed)."""
        excluded: set = set()
        self.jobs[job.request_id] = job
        try:
            index = await self._choose(job, excluded)
            while True:
                self.state.dispatch(index, job.info())
                self.metrics.decision(self.cluster.handles[index].name)
                async for event in self._stream(index, job):
                    yield event
                if job.migrate_to is None:
                    return
                index, job.migrate_to = job.migrate_to, None  # dLoRA moved it before its first token
        finally:
            self.jobs.pop(job.request_id, None)
            await self.notify_capacity()

    async def _stream(self, index: int, job: Job) -> AsyncIterator[dict]:
        client = self.clients[index]
        started = False
        done = False
        try:
            async for event in self._events_or_migration(client, job):
                if "error" in event:
                    err = event["error"]
                    raise DispatchError(err.get("message", "instance error"), int(err.get("code", 500)),
                                        err.get("type", "server_error"))
                if not started:
                    started = True
                    self._note(self.state.first_token, job.request_id)
                else:
                    self._note(self.state.token, job.request_id)
                yield event
                if event.get("finished"):
                    done = True
                    self._note(self.state.finish, job.request_id)
                    return
            if job.migrate_to is not None:
                self._forget(job)
                self.metrics.migrations.labels(self.policy_name).inc()
                done = True
                return
        except InstanceUnavailable as e:
            self._forget(job)
            done = True
            log.warning("instance %d unreachable for %s (%s); re-routing", index, job.request_id, e)
            await self.cluster.check_once()
            async for event in self._reroute(job, index):
                yield event
        except InstanceError as e:
            raise DispatchError(str(e), e.status, e.body.get("error", {}).get("type", "server_error")) from e
        except InstanceFailed as e:
            raise DispatchError(str(e), 502, "instance_failed") from e
        finally:
            if not done:
                self._forget(job)

    async def _reroute(self, job: Job, failed: int) -> AsyncIterator[dict]:
        excluded = {failed}
        index = await self._choose(job, excluded)
        self.state.dispatch(index, job.info())
        self.metrics.decision(self.cluster.handles[index].name)
        async for event in self._stream(index, job):
            yield event

    async def _events_or_migration(self, client: InstanceClient, job: Job) -> AsyncIterator[dict]:
        """The instance's events; stops early (closing the stream, which aborts the request
        there) when the job is told to migrate before its first token."""
        stream = client.generate_stream(job.body()).__aiter__()
        first = True
        try:
            while True:
                next_event = asyncio.ensure_future(stream.__anext__())
                if first:
                    moved = asyncio.ensure_future(job.moved.wait())
                    done, _ = await asyncio.wait({next_event, moved}, return_when=asyncio.FIRST_COMPLETED)
                    if next_event not in done:
                        next_event.cancel()
                        job.moved.clear()
                        return
                    moved.cancel()
                try:
                    event = await next_event
                except StopAsyncIteration:
                    return
                first = False
                yield event
        finally:
            await stream.aclose()

    def _forget(self, job: Job) -> None:
        self._note(self.state.fail, job.request_id)

    @staticmethod
    def _note(event, request_id) -> None:
        """Update the view; the stats poll may have got there first (it reconciles the view
        with what the instance reports), which is not an error."""
        try:
            event(request_id)
        except SchedulerStateError:
            pass

    @property
    def policy_name(self) -> str:
        return self.metrics.policy

    def rebalance(self) -> int:
        """dLoRA: move queued requests (no token yet) to less loaded instances."""
        moves = self.policy.rebalance(self.state.instances, self.perf_model)
        for move in moves:
            job = self.jobs.get(move.request_id)
            if job is None or job.migrate_to is not None:
                continue
            job.migrate_to = move.dst
            job.moved.set()
        return len(moves)
