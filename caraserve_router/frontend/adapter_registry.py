"""The adapters the cluster serves: what the front end knows of each, and loading / unloading
them on every healthy instance (all or nothing)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from caraserve_router.frontend.instance_client import InstanceClient, InstanceError

log = logging.getLogger("caraserve.adapters")


@dataclass
class AdapterInfo:
    """One adapter as the front end routes to it."""

    rank: int
    target_modules: list = field(default_factory=list)
    path: Optional[str] = None  # where it was loaded from (to load it again on a restarted instance)
    on_use: bool = False  # shipped to an instance on its first request there (Ray: ray_adapters.py), not restored

    def as_dict(self) -> dict:
        return {"rank": self.rank, "target_modules": self.target_modules, "path": self.path}


class AdapterRegistry:
    def __init__(self, cluster):
        self.cluster = cluster
        self.adapters: dict[str, AdapterInfo] = {}

    def healthy_clients(self) -> list[InstanceClient]:
        return [c for c, h in zip(self.cluster.clients, self.cluster.handles) if h.healthy]

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def rank(self, name: str) -> int:
        return int(self.adapters[name].rank)

    async def collect(self) -> None:
        """Learn the adapters the instances loaded at start (`--adapters`)."""
        found = {}
        for client in self.healthy_clients():
            for m in (await client.models())["data"]:
                if not m.get("base_model"):
                    found[m["id"]] = AdapterInfo(int(m.get("rank") or 0), list(m.get("target_modules") or []),
                                                 m.get("path"))
        on_use = getattr(self.cluster, "on_use", None)  # registered at the front end, on no instance yet
        self.adapters = {**found, **(on_use.adapters if on_use is not None else {})}

    async def load(self, name: str, path: str) -> dict:
        done = []
        info = None
        try:
            for client in self.healthy_clients():
                info = await client.load_adapter(name, path)
                done.append(client)
        except InstanceError:
            for client in done:  # all or nothing
                try:
                    await client.unload_adapter(name)
                except Exception:  # noqa: BLE001 - best effort; the first error is the one reported
                    pass
            raise
        if info is None:
            raise InstanceError(503, {"error": {"message": "no healthy instance to load the adapter on",
                                                "type": "server_error"}})
        self.adapters[name] = AdapterInfo(int(info["rank"]), list(info["target_modules"]), path)
        return {"lora_name": name, **self.adapters[name].as_dict()}

    async def unload(self, name: str, wait_s: float) -> dict:
        if name not in self.adapters:
            raise InstanceError(404, {"error": {"message": f"adapter {name!r} is not loaded", "type": "not_found"}})
        for client in self.healthy_clients():
            await client.unload_adapter(name, wait_s)
        self.adapters.pop(name, None)
        return {"lora_name": name, "unloaded": True}

    async def restore(self, client: InstanceClient) -> None:
        """A (re)started instance gets the adapters loaded at run time on the others."""
        present = {m["id"] for m in (await client.models())["data"]}
        for name, info in list(self.adapters.items()):
            if name not in present and info.path and not info.on_use:
                await client.load_adapter(name, info.path)
