"""Models, adapters (load / unload) and the operational routes: `/health`, `/stats`, `/metrics`."""
from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import Response

from caraserve_router.contracts.protocol import LoadAdapterRequest, UnloadAdapterRequest, error_response
from caraserve_router.frontend.instance_client import InstanceError
from caraserve_router.frontend.relay import fail


def router(front) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models():
        data = [{"id": front.base_name, "object": "model", "owned_by": "caraserve", "base_model": True,
                 "rank": None, "target_modules": []}]
        data += [{"id": n, "object": "model", "owned_by": "caraserve", "base_model": False,
                  "rank": a["rank"], "target_modules": a["target_modules"]} for n, a in sorted(front.adapters.items())]
        return {"object": "list", "data": data}

    @api.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        if body.lora_name in front.base_names:
            return fail(front, f"{body.lora_name!r} is the base model's name", 400)
        try:
            return await front.registry.load(body.lora_name, os.path.abspath(body.lora_path))
        except InstanceError as e:
            return fail(front, str(e), e.status)

    @api.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        try:
            return await front.registry.unload(body.lora_name, body.wait_s)
        except InstanceError as e:
            return fail(front, str(e), e.status)

    @api.get("/health")
    async def health():
        healthy = [h.healthy for h in front.cluster.handles]
        if not any(healthy):
            return error_response("no healthy instance", 503, "server_error")
        return {"status": "ok", "instances": len(healthy), "healthy": sum(healthy)}

    @api.get("/stats")
    async def stats():
        return {"policy": front.config.policy, "slo_tpot_ms": front.slo_tpot_ms,
                "perf_model": front.perf_model.describe() if front.perf_model else None,
                "instances": [{"url": h.url, "name": h.name, "healthy": h.healthy, "restarts": h.restarts,
                               "stats": front.stats.get(i, {})} for i, h in enumerate(front.cluster.handles)]}

    @api.get("/metrics")
    async def metrics():
        return Response(front.metrics.render(), media_type="text/plain; version=0.0.4")

    return api
