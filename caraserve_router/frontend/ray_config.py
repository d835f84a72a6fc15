"""Settings of `--cluster ray` (its own module so the CLI can read them without importing Ray)."""
from __future__ import annotations

import importlib.util

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
    cpus_per_instance: float = option(1.0, "Ray CPUs reserved per instance; the instance runs on that many cores "
                                      "of its host (rounded up), disjoint from the other instances there, and its "
                                      "sidecar starts one worker per core of them (give more on real nodes)")
    gpus_per_instance: float = option(-1.0, "Ray GPUs per instance (-1: 1 where the cluster has GPUs, else 0)")
    max_restarts: int = option(3, "Times Ray restarts an instance actor whose process or node died (-1: no "
                               "limit); past it the front end starts a new actor with back-off")
    start_timeout_s: float = option(600.0, "Longest wait for all instances to become healthy at start")
    namespace: str = option("caraserve", "Ray namespace of this cluster's instance actors (detached, named): "
                            "front ends of one namespace share its instances and its instance key")
    attach: bool = option(False, "Serve the instances already running in --ray-namespace (started by another "
                          "front end) instead of starting --instances; they are left running at exit")
    keep_instances: bool = option(False, "Leave the instances this front end started running when it exits "
                                  "(for other front ends, or a restart with --ray-attach)")
    orphan_timeout_s: float = option(600.0, "An instance actor that no front end has checked for this long stops "
                                     "itself (0 = never: only scripts/ray_down.py reaps it)")
    bind_node_address: bool = option(False, "Instances always listen on their node's address (needed when front "
                                     "ends on other nodes attach); without it one on the creating front end's "
                                     "node listens on loopback")

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ray placement must be one of {tuple(PLACEMENTS)}")
        if self.cpus_per_instance < 0 or self.max_restarts < -1 or self.start_timeout_s <= 0:
            raise ValueError("ray cpus_per_instance must be >= 0, max_restarts >= -1, start_timeout_s > 0")
        if self.orphan_timeout_s < 0:
            raise ValueError("ray orphan_timeout_s must be >= 0 (0 = never)")
        if not self.namespace or not self.namespace.replace("-", "").replace("_", "").isalnum():
            raise ValueError("ray namespace may hold letters, digits, '_' and '-' only")
        if self.gpus_per_instance < 0 and self.gpus_per_instance != -1:
            raise ValueError("ray gpus_per_instance must be >= 0 or -1 (auto)")


def require_ray() -> None:
    """A one-line error (ValueError) instead of an ImportError traceback when Ray is missing."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--cluster ray needs Ray on the front end and every node: pip install 'ray[default]' "
                         "(see docs/DEPLOY.md)")
