"""A PerfModel per instance kind: instances on different devices get their own model.

`--perf-models-dir DIR` holds PerfModel JSONs (scripts/profile_instance.py, one run per kind of
device); each names the device it was profiled on in `metadata.device` (e.g. "cpu",
"NVIDIA H100 80GB HBM3"). An instance's kind is what it runs on: for a Ray instance the
actor's `device_kind` ("cuda:<GPU product name>" or "cpu:<CPU model>"), else the `device` of
the instance's stats. The model whose device is the longest case-insensitive substring of the
kind is that instance's; an instance without a match uses the cluster's model (`--perf-model`,
or the quick profile of instance 0). The rank-aware policies read `InstanceState.perf_model`.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from caraserve_router.scheduling.perf_model import PerfModel, PerfModelError

log = logging.getLogger("caraserve.perf_models")


class PerfModelCatalog:
    """PerfModels by the device they were profiled on."""

    def __init__(self, models: dict[str, PerfModel]):
        self.models = models  # device (lower case) -> model

    @classmethod
    def load_dir(cls, directory: str) -> "PerfModelCatalog":
        if not os.path.isdir(directory):
            raise ValueError(f"perf models directory {directory!r} does not exist")
        models = {}
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".json") or name.endswith(".profile.json"):
                continue
            path = os.path.join(directory, name)
            try:
                model = PerfModel.load(path)
            except (PerfModelError, ValueError, OSError) as e:
                raise ValueError(f"{path}: not a PerfModel: {e}") from e
            device = str(model.metadata.get("device") or "").strip().lower()
            if not device:
                raise ValueError(f"{path}: metadata.device is empty; it must name the device it was profiled on")
            if device in models:
                raise ValueError(f"{path}: a second model for device {device!r}")
            models[device] = model
        if not models:
            raise ValueError(f"no PerfModel JSON in {directory!r}")
        return cls(models)

    def for_kind(self, kind: str) -> Optional[PerfModel]:
        kind = (kind or "").lower()
        matches = [d for d in self.models if d in kind]
        return self.models[max(matches, key=len)] if matches else None


def instance_kind(handle, stats: dict) -> str:
    return getattr(handle, "device_kind", "") or str(stats.get("device") or "")


def assign(catalog: Optional[PerfModelCatalog], handles, states, stats_by_index: dict) -> dict[int, str]:
    """Give each instance state the model of its kind (None: the cluster's); returns index -> device."""
    chosen = {}
    for i, (handle, state) in enumerate(zip(handles, states)):
        kind = instance_kind(handle, stats_by_index.get(i) or {})
        model = catalog.for_kind(kind) if catalog is not None else None
        state.perf_model = model
        chosen[i] = model.metadata.get("device") if model is not None else ""
        log.info("instance %d (%s): %s", i, kind or "unknown kind",
                 f"perf model of {chosen[i]!r}" if model is not None else "the cluster's perf model")
    return chosen


async def assign_from_cluster(catalog: PerfModelCatalog, cluster, states) -> dict[int, str]:
    """`assign` with each healthy instance's kind read from its stats (Ray: from its actor)."""
    stats = {}
    for i, (handle, client) in enumerate(zip(cluster.handles, cluster.clients)):
        if handle.healthy and not getattr(handle, "device_kind", ""):
            try:
                stats[i] = await client.stats()
            except Exception as e:  # noqa: BLE001 - unknown kind: the cluster's model
                log.warning("instance %d: no stats for its device kind (%s)", i, e)
    return assign(catalog, cluster.handles, states, stats)
