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


def _incarnation(handle) -> tuple:
    """Changes when the instance was restarted or went down (and so may be back since)."""
    return (getattr(handle, "restarts", 0), getattr(handle, "failures", 0))


async def _cancelled(task: asyncio.Future) -> None:
    """Cancel `task` and wait until it has ended (a stream cannot be closed while a read of it
    is still pending)."""
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - its outcome no longer matters
        pass


class DispatchError(RuntimeError):
    """A request the cluster cannot serve; `status` is the HTTP status to answer with
    (`retry_after_s`: when to try again, for a 429 or a 503)."""

    def __init__(self, message: str, status: int = 503, kind: str = "server_error",
                 retry_after_s: Optional[int] = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.retry_after_s = retry_after_s


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
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # set by Dispatcher.abort_all
    stop_reason: str = ""

    def info(self) -> RequestInfo:
        return RequestInfo(self.request_id, self.adapter, self.rank, len(self.prompt_ids),
                           self.parameters["max_new_tokens"])

    def body(self) -> dict:
        return {"input_ids": self.prompt_ids, "adapter": self.adapter, "parameters": self.parameters,
                "request_id": self.request_id}


class Dispatcher:
    def __init__(self, cluster, state: ClusterState, policy, perf_model, metrics, wait_timeout_s: float,
                 max_waiting: int = 0):
        self.cluster = cluster
        self.state = state
        self.policy = policy
        self.perf_model = perf_model
        self.metrics = metrics
        self.wait_timeout_s = wait_timeout_s
        self.max_waiting = max_waiting  # 0: no bound
        self.capacity = asyncio.Condition()
        self.jobs: dict[str, Job] = {}
        self.waiting = 0
        self.closing: Optional[str] = None  # set by abort_all: why no request is served any more

    def set_policy(self, policy, perf_model) -> None:
        """Switch policy (the start-up profile finished); requests in flight keep their instance."""
        self.policy, self.perf_model = policy, perf_model

    async def abort_all(self, reason: str) -> None:
        """End every request (waiting ones and running ones) with a 503 `reason`, and refuse new
        ones: shutdown."""
        self.closing = reason
        for job in list(self.jobs.values()):
            job.stop_reason = reason
            job.stopped.set()
        await self.notify_capacity()

    @property
    def clients(self) -> list[InstanceClient]:
        return self.cluster.clients

    async def notify_capacity(self) -> None:
        async with self.capacity:
            self.capacity.notify_all()

    def _refuse_if_closing(self) -> None:
        if self.closing is not None:
            raise DispatchError(self.closing, 503, retry_after_s=5)

    async def _choose(self, job: Job, excluded: set) -> int:
        self._refuse_if_closing()
        index = self._pick(job, excluded)
        if index is not None:
            return index
        if self.max_waiting and self.waiting >= self.max_waiting:
            raise DispatchError(f"{self.waiting} requests are already waiting for an instance; try again later",
                                429, "rate_limit_exceeded", retry_after_s=self._retry_after_s())
        deadline = time.monotonic() + self.wait_timeout_s
        self.waiting += 1
        self.metrics.frontend_queue.set(self.waiting)
        try:
            async with self.capacity:
                while True:
                    self._refuse_if_closing()
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

    def _retry_after_s(self) -> int:
        """A client's back-off for a 429: about the time the waiting requests need to be placed,
        guessed from the queue length (a second per batch of waiting requests), 1 to 60 s."""
        per_batch = max(1, max((i.max_batch for i in self.state.instances), default=1))
        return int(min(60, max(1, self.waiting // per_batch + 1)))

    def _hidden(self, excluded) -> list[int]:
        """The excluded instances still to hide: an instance that just failed this request is
        hidden until it has been restarted, or marked down and up again (with one instance,
        a request that waits out its restart must then go back to it)."""
        handles = self.cluster.handles
        if isinstance(excluded, set):
            return list(excluded)
        return [i for i, mark in excluded.items() if _incarnation(handles[i]) == mark]

    def _pick(self, job: Job, excluded) -> Optional[int]:
        instances = self.state.instances
        saved = [(i, instances[i].healthy) for i in self._hidden(excluded)]
        for i, _ in saved:
            instances[i].healthy = False  # hide instances that just failed this request
        try:
            return self.policy.choose(job.info(), instances, self.perf_model)
        finally:
            for i, healthy in saved:
                instances[i].healthy = healthy

    def _no_room_reason(self, excluded) -> str:
        hidden = self._hidden(excluded)
        healthy = [i for i, inst in enumerate(self.state.instances) if inst.healthy and i not in hidden]
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
            mark = _incarnation(self.cluster.handles[index])  # before the check, which may restart it
            await self.cluster.check_once()
            async for event in self._reroute(job, {index: mark}):
                yield event
        except InstanceError as e:
            raise DispatchError(str(e), e.status, e.body.get("error", {}).get("type", "server_error")) from e
        except InstanceFailed as e:
            raise DispatchError(str(e), 502, "instance_failed") from e
        finally:
            if not done:
                self._forget(job)

    async def _reroute(self, job: Job, excluded: dict) -> AsyncIterator[dict]:
        """Place `job` again, away from the instance(s) that just failed it (`excluded`:
        index -> its incarnation then; see `_hidden`)."""
        index = await self._choose(job, excluded)
        self.state.dispatch(index, job.info())
        self.metrics.decision(self.cluster.handles[index].name)
        async for event in self._stream(index, job):
            yield event

    async def _events_or_migration(self, client: InstanceClient, job: Job) -> AsyncIterator[dict]:
        """The instance's events; stops early (closing the stream, which aborts the request
        there) when the job is told to migrate before its first token, or raises when it is
        aborted (shutdown). A consumer that stops iterating (its client left) closes the stream
        the same way."""
        stream = client.generate_stream(job.body()).__aiter__()
        first = True
        next_event = None
        try:
            while True:
                next_event = asyncio.ensure_future(stream.__anext__())
                watches = [asyncio.ensure_future(job.stopped.wait())]
                if first:
                    watches.append(asyncio.ensure_future(job.moved.wait()))
                try:
                    done, _ = await asyncio.wait({next_event, *watches}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in watches:
                        w.cancel()
                if next_event not in done:
                    await _cancelled(next_event)
                    if job.stopped.is_set():
                        raise DispatchError(job.stop_reason, 503, retry_after_s=5)
                    job.moved.clear()
                    return
                try:
                    event = await next_event
                except StopAsyncIteration:
                    return
                first = False
                yield event
        except BaseException:
            if next_event is not None and not next_event.done():  # cancelled (client gone)
                await _cancelled(next_event)
            raise
        finally:
            await stream.aclose()  # closes the connection: the instance aborts the request

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
