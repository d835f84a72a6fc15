"""Settings of `--cluster ray` (its own module so the CLI can read them without importing Ray)."""
from __future__ import annotations

from dataclasses import dataclass

from caraserve_router.contracts.configs import option

PLACEMENTS = {"spread": "SPREAD", "pack": "DEFAULT"}  # --ray-placement -> Ray scheduling strategy
CLUSTER_KINDS = ("local", "ray")  # --cluster


@dataclass
class RayClusterConfig:
    """Ray cluster (`--cluster ray`): where it is and what each instance actor gets."""

    address: str = option("", "Ray cluster to join (HOST:PORT as `ray start --head` prints, or 'auto' for the "
                          "one started on this host); empty: start a private local Ray runtime")
    placement: str = option("spread", "Where instance actors go: spread (over nodes, Ray's SPREAD) or pack "
                            "(Ray's default: fill a node first)", choices=tuple(PLACEMENTS))
    cpus_per_instance: float = option(1.0, "Ray CPUs reserved per instance: its server plus its sidecar workers "
                                      "(give --sidecar-workers + 1 on real nodes)")
    gpus_per_instance: float = option(-1.0, "Ray GPUs per instance (-1: 1 where the cluster has GPUs, else 0)")
    max_restarts: int = option(3, "Times Ray restarts an instance actor whose process or node died (-1: no "
                               "limit); past it the front end starts a new actor with back-off")
    start_timeout_s: float = option(600.0, "Longest wait for all instances to become healthy at start")

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ray placement must be one of {tuple(PLACEMENTS)}")
        if self.cpus_per_instance < 0 or self.max_restarts < -1 or self.start_timeout_s <= 0:
            raise ValueError("ray cpus_per_instance must be >= 0, max_restarts >= -1, start_timeout_s > 0")
        if self.gpus_per_instance < 0 and self.gpus_per_instance != -1:
            raise ValueError("ray gpus_per_instance must be >= 0 or -1 (auto)")
