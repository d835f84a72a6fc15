"""The front end's configuration (`FrontendConfig`) and its command line.

The flags of the front end are the fields of `FrontendConfig`; the instance flags
(`InstanceConfig`, `LoRAConfig` as `--lora-*`, `SidecarConfig` as `--sidecar-*`) are passed
through to every local instance it starts.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from caraserve_router.contracts.configs import (
    InstanceConfig, LoRAConfig, SidecarConfig, add_arguments, check_shm_prefix, from_namespace, option,
)
from caraserve_router.frontend.ray_config import CLUSTER_KINDS, RayClusterConfig
from caraserve_router.scheduling.policies import POLICIES

API_KEY_ENV = "CARASERVE_API_KEY"
# Instance fields the front end sets itself for each local instance.
INSTANCE_FLAGS_SKIP = ("model_dir", "host", "port", "name", "shm_prefix", "host_store_prefix", "log_level",
                       "port_file", "cpu_cores", "adapter_roots")


@dataclass
class FrontendConfig:
    """The cluster front end: where it listens, which instances it routes to, and how."""

    host: str = option("127.0.0.1", "Address to serve on (loopback by default)")
    port: int = option(8000, "Port to serve on")
    model_dir: str = option("", "HF llama model directory (default: prepare and serve SmolLM2-135M-Instruct)")
    adapters: str = option("", "Directory of PEFT adapters (one per subdirectory) loaded on every instance at start")
    instances: int = option(1, "Local instances to start (0 with --instance-urls: attach only)")
    instance_urls: str = option("", "Comma-separated URLs of instances started elsewhere "
                                "(`python -m lightllm_patches.instance`) to route to as well")
    instance_base_port: int = option(0, "First port of the local instances (0 = any free ports)")
    policy: str = option("rank-aware", "Scheduling policy", choices=tuple(POLICIES))
    slo_tpot_ms: float = option(0.0, "Per-token latency SLO the rank-aware policies keep, in ms (0 = 3x the "
                                "profiled single-request decode step, since CPU steps are far slower than the "
                                "paper's 40 ms GPU SLO)")
    mean_output_len: float = option(60.0, "Expected output tokens per request (prefill cost is amortised over it)")
    perf_model: str = option("", "PerfModel JSON from scripts/profile_instance.py (default: a quick profile of "
                             "instance 0 at start, for the policies that need one)")
    wait_timeout_s: float = option(600.0, "How long a request may wait for an instance with room before a 503")
    request_timeout_s: float = option(900.0, "Longest time one request may take on an instance")
    stats_interval_s: float = option(1.0, "How often instances' stats are read (and rebalancing policies rebalance)")
    health_interval_s: float = option(1.0, "How often instances' health is checked")
    restart_dead: bool = option(True, "Restart local instances that die")
    hung_after_s: float = option(30.0, "An instance whose process lives but that missed every health check for "
                                 "this long (after it was up) is killed and restarted; its waiting requests go "
                                 "elsewhere (0 = never)")
    split_cores: bool = option(True, "Give the local instances of this host disjoint shares of its cores (each "
                               "instance's sidecar workers and pinning stay within its share)")
    log_dir: str = option(".cache/logs", "Where local instances write their logs")
    log_level: str = option("info", "Log level", choices=("debug", "info", "warning", "error"))
    seed: int = option(0, "Seed of the random policy")
    warmup_policy: str = option("most-idle", "Policy that serves while the profile a --policy needs is taken in "
                                "the background (one that needs no perf model)", choices=tuple(POLICIES))
    perf_model_cache: str = option(".cache/perf_models", "Directory where a finished start-up profile is saved "
                                   "per model and device, and reused by later starts ('' = never cache)")
    shutdown_timeout_s: float = option(30.0, "On SIGINT/SIGTERM: longest time until every process has ended "
                                       "(in-flight requests finish or get an error event first; a second signal "
                                       "ends at once)")
    max_body_bytes: int = option(1 << 20, "Largest request body accepted; larger ones get 413")
    max_waiting: int = option(0, "Requests that may wait in the front end for an instance with room; beyond it "
                              "new requests get 429 with Retry-After (0 = 4x the batch capacity of all instances)")
    tokenizer_threads: int = option(2, "Threads that tokenise prompts (off the event loop)")
    api_key: str = option("", "Key clients must send as `Authorization: Bearer KEY` on every route but /health "
                          "(default: the CARASERVE_API_KEY environment variable; none: no authentication, and "
                          "the adapter load/unload routes are refused unless --host is a loopback address)")
    adapter_roots: str = option("", "Comma-separated directories that /v1/load_lora_adapter may load from "
                                "(absolute paths under them only; default: the --adapters directory)")
    shm_prefix: str = option("caraserve", "Prefix of the /dev/shm names of the local instances "
                             "(<prefix>_i<index>_<random>)")
    cluster: str = option("local", "Who runs the --instances: local (processes of this host) or ray (Ray actors "
                          "over a Ray cluster's nodes: --ray-* flags, docs/DEPLOY.md)", choices=CLUSTER_KINDS)
    ray: RayClusterConfig = field(default_factory=RayClusterConfig)
    share_gpus: bool = option(False, "Allow more local instances than GPUs (instance i gets GPU i mod #GPUs); "
                              "without it, --instances N on a GPU host gives instance i GPU i and refuses N > #GPUs")
    perf_models_dir: str = option("", "Directory of PerfModel JSONs, one per device kind (metadata.device); each "
                                  "instance uses the one of its device, others the --perf-model")

    def validate(self) -> None:
        if self.instances < 0 or (self.instances == 0 and not self.instance_urls):
            raise ValueError("need --instances >= 1 or --instance-urls")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {tuple(POLICIES)}")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"instance URL {url!r} must start with http:// or https://")
        if self.slo_tpot_ms < 0 or self.mean_output_len <= 0:
            raise ValueError("slo_tpot_ms must be >= 0 and mean_output_len > 0")
        if self.perf_model and not os.path.isfile(self.perf_model):
            raise ValueError(f"perf model file {self.perf_model!r} does not exist")
        if POLICIES[self.warmup_policy].needs_perf_model:
            raise ValueError(f"--warmup-policy {self.warmup_policy} needs a perf model itself")
        if self.shutdown_timeout_s <= 0 or self.max_body_bytes < 1024 or self.max_waiting < 0:
            raise ValueError("shutdown_timeout_s must be > 0, max_body_bytes >= 1024, max_waiting >= 0")
        if self.hung_after_s < 0:
            raise ValueError("hung_after_s must be >= 0 (0 = never)")
        if self.tokenizer_threads < 1:
            raise ValueError("tokenizer_threads must be >= 1")
        for root in self.roots:
            if not os.path.isabs(root):
                raise ValueError(f"adapter root {root!r} must be an absolute path")
        check_shm_prefix("shm_prefix", self.shm_prefix)
        if self.cluster == "local":
            from caraserve_router.frontend.gpu_assignment import assign_gpus

            assign_gpus(self.instances, self.share_gpus)  # refuses more instances than GPUs, before anything starts
        else:
            from caraserve_router.frontend.ray_config import require_ray

            self.ray.validate()
            require_ray()

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.instance_urls.split(",") if u.strip()]

    @property
    def roots(self) -> list[str]:
        """Directories adapters may be loaded from at run time."""
        given = [r.strip() for r in self.adapter_roots.split(",") if r.strip()]
        return given or ([os.path.abspath(self.adapters)] if self.adapters else [])


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m caraserve_router.api_server", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, FrontendConfig)
    add_arguments(parser, InstanceConfig, skip=INSTANCE_FLAGS_SKIP)
    add_arguments(parser, LoRAConfig, prefix="lora_", skip=("adapters",))
    add_arguments(parser, SidecarConfig, prefix="sidecar_")
    add_arguments(parser, RayClusterConfig, prefix="ray_")
    return parser


def parse_configs(argv=None, description: str = "") -> tuple[FrontendConfig, InstanceConfig]:
    """(front end config, the template every local instance's config is copied from)."""
    ns = build_parser(description).parse_args(argv)
    front = from_namespace(FrontendConfig, ns, ray=from_namespace(RayClusterConfig, ns, prefix="ray_"))
    lora = from_namespace(LoRAConfig, ns, prefix="lora_", adapters=front.adapters or None)
    sidecar = from_namespace(SidecarConfig, ns, prefix="sidecar_")
    fields = {k: getattr(ns, k) for k in vars(InstanceConfig()) if hasattr(ns, k) and k not in ("lora", "sidecar")}
    template = InstanceConfig(**fields, lora=lora, sidecar=sidecar)
    template.log_level = front.log_level
    template.adapter_roots = ",".join(front.roots)  # the instances apply them too (a key may leak)
    if not front.api_key:
        # The one setting read from the environment: a secret is better kept off the command line.
        front.api_key = os.environ.get(API_KEY_ENV, "")
    return front, template
