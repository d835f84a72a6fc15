"""Adding and removing instances at run time: `/admin/instances`.

    GET    /admin/instances                    every instance: index, name, url, healthy, removed
    POST   /admin/instances      {"count": 1}  start more instances (local processes, or Ray actors
                                               with `--cluster ray`); they join routing once healthy
    DELETE /admin/instances/{i}?drain_s=30     stop routing to instance i, let what runs there finish
                                               (at most drain_s), then stop it for good

A new instance gets the `--adapters` set at start (like the others) and the adapters loaded at
run time (the front end's restore on its first healthy check). Indices are never reused: a
removed instance keeps its slot, marked removed, so request and metric bookkeeping by index
stays valid. Like adapter loading, these routes need `--api-key` on a server that listens
beyond loopback.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from fastapi import APIRouter
from pydantic import BaseModel, Field

from caraserve_router.frontend.relay import fail
from caraserve_router.contracts.instance_auth import is_loopback

log = logging.getLogger("caraserve.instances")


class AddInstances(BaseModel):
    count: int = Field(1, ge=1, le=64, description="instances to start")


def _describe(i: int, h) -> dict:
    return {"index": i, "name": h.name, "url": h.url, "healthy": h.healthy, "restarts": h.restarts,
            "removed": h.removed, "managed": h.local, "node_id": getattr(h, "node_id", "") or None,
            "device_kind": getattr(h, "device_kind", "") or None}


def _new_local(front, index: int):
    """(handle, client) of one more local instance (the port it binds itself, the next GPU if any,
    the last share of the host's cores split one more way: the running ones keep theirs)."""
    from caraserve_router.contracts.configs import InstanceConfig
    from caraserve_router.frontend.cluster import HandleClient, InstanceHandle, host_core_shares
    from caraserve_router.frontend.gpu_assignment import assign_gpus

    local = sum(1 for h in front.cluster.handles if h.local and not h.removed)
    template = front.template
    gpu = assign_gpus(local + 1, front.config.share_gpus, per_instance=template.tp)[-1]  # ValueError: none left
    cores = template.cpu_cores or (host_core_shares(local + 1)[-1] if front.config.split_cores else "")
    config = dataclasses.replace(template, port=0, host="127.0.0.1", name=f"instance{index}", cpu_cores=cores,
                                 lora=dataclasses.replace(template.lora),
                                 sidecar=dataclasses.replace(template.sidecar))
    assert isinstance(config, InstanceConfig)
    handle = InstanceHandle(index=index, url="", config=config, gpu=gpu)
    return handle, HandleClient(handle, front.session, front.config.request_timeout_s)


async def add_instances(front, count: int) -> list[dict]:
    from caraserve_router.scheduling.scheduler_state import InstanceState

    added = []
    for _ in range(count):
        index = len(front.cluster.handles)
        if front.config.cluster == "ray":
            handle, client = front.cluster.new_instance(front.template, index, front.session,
                                                        front.config.request_timeout_s)
        else:
            handle, client = _new_local(front, index)
        cfg = handle.config
        # Unhealthy until its first good health check (then the front end restores the
        # run-time adapters on it and marks it healthy).
        front.dispatcher.state.instances.append(InstanceState(
            handle.name, max_batch=cfg.running_max_req_size, lora_mode=cfg.lora.mode, kernel=cfg.lora.decode_kernel,
            healthy=False))
        front.cluster.clients.append(client)
        front.cluster.handles.append(handle)
        front.cluster.launcher.start(handle)
        log.info("instance %d added", index)
        added.append(_describe(index, handle))
    return added


async def remove_instance(front, index: int, drain_s: float) -> dict:
    cluster, state = front.cluster, front.dispatcher.state
    handle = cluster.handles[index]
    handle.removed = True  # the health monitor neither restarts it nor brings it back
    state.instances[index].healthy = False  # no new request goes there
    deadline = time.monotonic() + drain_s
    while state.instances[index].load and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    left = state.instances[index].load
    if handle.local:
        await asyncio.get_running_loop().run_in_executor(None, cluster.launcher.stop, handle)
    handle.healthy = False
    await front.dispatcher.notify_capacity()
    log.info("instance %d removed (%d request(s) were still running)", index, left)
    return {**_describe(index, handle), "requests_cut": left}


def router(front) -> APIRouter:
    api = APIRouter()

    def refused():
        if front.config.api_key or is_loopback(front.config.host):
            return None
        return fail(front, "instance administration needs --api-key on a server that listens beyond loopback",
                    403, "permission_error")

    @api.get("/admin/instances")
    async def list_instances():
        return {"instances": [_describe(i, h) for i, h in enumerate(front.cluster.handles)]}

    @api.post("/admin/instances")
    async def add(body: AddInstances | None = None):
        if (r := refused()) is not None:
            return r
        try:
            return {"added": await add_instances(front, (body or AddInstances()).count)}
        except ValueError as e:  # e.g. no GPU left for a local instance
            return fail(front, str(e), 409, "conflict")

    @api.delete("/admin/instances/{index}")
    async def remove(index: int, drain_s: float = 30.0):
        if (r := refused()) is not None:
            return r
        if not 0 <= index < len(front.cluster.handles):
            return fail(front, f"no instance {index}", 404, "not_found")
        if front.cluster.handles[index].removed:
            return fail(front, f"instance {index} was removed already", 409, "conflict")
        if sum(1 for h in front.cluster.handles if not h.removed) <= 1:
            return fail(front, "the last instance cannot be removed", 409, "conflict")
        if not 0 <= drain_s <= 3600:
            return fail(front, "drain_s must be in [0, 3600]", 400)
        return await remove_instance(front, index, drain_s)

    return api
