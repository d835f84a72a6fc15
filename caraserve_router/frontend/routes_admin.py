"""Models, adapters (load / unload) and the operational routes: `/health`, `/stats`, `/metrics`."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from caraserve_router.contracts.instance_auth import confined_path, is_loopback
from caraserve_router.contracts.protocol import LoadAdapterRequest, UnloadAdapterRequest, error_response
from caraserve_router.frontend.instance_client import InstanceError
from caraserve_router.frontend.relay import fail


def router(front) -> APIRouter:
    api = APIRouter()

    def model_card(name: str, info: dict | None) -> dict:
        base = info is None
        return {"id": name, "object": "model", "created": front.started_at, "owned_by": "caraserve",
                "base_model": base, "rank": None if base else info["rank"],
                "target_modules": [] if base else info["target_modules"]}

    def admin_refused():
        """Adapter loading reads server files: without an API key only a loopback server allows it."""
        if front.config.api_key or is_loopback(front.config.host):
            return None
        return fail(front, "adapter loading needs --api-key on a server that listens beyond loopback", 403,
                    "permission_error")

    @api.get("/v1/models")
    async def models():
        data = [model_card(front.base_name, None)]
        data += [model_card(n, a) for n, a in sorted(front.adapters.items())]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id in front.base_names and model_id:
            return model_card(front.base_name if model_id == "base" else model_id, None)
        info = front.adapters.get(model_id)
        if info is None:
            return fail(front, f"model {model_id!r} does not exist", 404, "not_found")
        return model_card(model_id, info)

    @api.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        refused = admin_refused()
        if refused is not None:
            return refused
        if body.lora_name in front.base_names:
            return fail(front, f"{body.lora_name!r} is the base model's name", 400)
        try:
            path = confined_path(body.lora_path, front.config.roots)
        except ValueError as e:
            return fail(front, str(e), 400)
        try:
            return await front.registry.load(body.lora_name, path)
        except InstanceError as e:
            return fail(front, str(e), e.status)

    @api.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        refused = admin_refused()
        if refused is not None:
            return refused
        try:
            return await front.registry.unload(body.lora_name, body.wait_s)
        except InstanceError as e:
            return fail(front, str(e), e.status)

    @api.get("/health")
    async def health():
        if front.closing:
            return error_response("shutting down", 503, "server_error")
        healthy = [h.healthy for h in front.cluster.handles]
        if not any(healthy):
            return error_response("no healthy instance", 503, "server_error")
        return {"status": "ok", "instances": len(healthy), "healthy": sum(healthy)}

    @api.get("/stats")
    async def stats():
        return {"policy": front.active_policy, "configured_policy": front.config.policy,
                "profiling": front.profiling, "slo_tpot_ms": front.slo_tpot_ms,
                "perf_model": front.perf_model.describe() if front.perf_model else None,
                "waiting": front.dispatcher.waiting, "max_waiting": front.dispatcher.max_waiting,
                "instances": [{"url": h.url, "name": h.name, "healthy": h.healthy, "restarts": h.restarts,
                               "view": front.dispatcher.state.instances[i].snapshot(),  # what the router believes
                               "stats": front.stats.get(i, {})} for i, h in enumerate(front.cluster.handles)]}

    @api.get("/metrics")
    async def metrics():
        return Response(front.metrics.render(), media_type="text/plain; version=0.0.4")

    return api
