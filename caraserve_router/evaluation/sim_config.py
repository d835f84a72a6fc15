"""Settings of one simulator run (`SimConfig`) and the error of a bad one (`SimulatorError`)."""
from __future__ import annotations

from dataclasses import dataclass

from caraserve_router.contracts.names import DecodeKernel, LoraMode, values


class SimulatorError(ValueError):
    """Bad simulator configuration."""


@dataclass(frozen=True)
class SimConfig:
    """Cluster and engine settings of one simulation run.

    num_instances: instances in the cluster.
    max_batch: running requests per instance (LightLLM running_max_req_size).
    max_wait_steps: decode steps between tries to prefill new requests (router_max_wait_tokens).
    max_prefill_tokens: prompt tokens per prefill batch (None: no limit; one prompt always fits).
    lora_mode: a LoraMode (or its string), every instance.
    kernel: the DecodeKernel (or its string).
    adapter_capacity_ranks: device memory for adapters per instance, in rank units (None: no limit).
    sync_interval_s: period of the router's stats reconciliation and of dlora's rebalance.
    drain_limit_s: simulated time allowed after the last arrival; requests unfinished by
        then count as SLO misses (None: run until every request finishes).
    slo_tpot_ms: per-token latency SLO for attainment; slo_ttft_ms: optional TTFT SLO as well.
    progress_s: wall seconds between progress lines (0: silent).
    instances_per_host: instances of one host: with a truth table their cpu-assisted prefills
        queue for the host's sidecar workers, and with `host_cores` their steps share its cores.
    host_cores: cores of one host that its instances' steps share (None: every instance has its
        own, the GPU case). A step that starts while k other instances of its host are mid-step
        runs max(1, (k + 1) x threads_per_instance / host_cores) times its measured time (a
        share taken at the step's start, not re-timed as others start and end). This is how a
        live CPU cluster of more instances than cores runs (the validation's 4 on 2 cores).
    threads_per_instance: torch threads of one instance (with `host_cores`).
    """

    num_instances: int = 8
    max_batch: int = 32
    max_wait_steps: int = 10
    max_prefill_tokens: int | None = None
    lora_mode: LoraMode = LoraMode.CACHED
    kernel: DecodeKernel = DecodeKernel.BGMV
    adapter_capacity_ranks: int | None = None
    sync_interval_s: float = 1.0
    drain_limit_s: float | None = 600.0
    slo_tpot_ms: float = 40.0
    slo_ttft_ms: float | None = None
    progress_s: float = 10.0
    instances_per_host: int = 1  # instances sharing one host's sidecar workers (and cores)
    host_cores: int | None = None
    threads_per_instance: int = 1

    def __post_init__(self) -> None:
        for name in ("num_instances", "max_batch", "max_wait_steps", "instances_per_host", "threads_per_instance"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SimulatorError(f"SimConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("max_prefill_tokens", "adapter_capacity_ranks", "host_cores"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise SimulatorError(f"SimConfig.{name} must be None or an integer >= 1, got {v!r}")
        for name, enum_cls in (("lora_mode", LoraMode), ("kernel", DecodeKernel)):
            try:  # accept the user-facing string too (frozen: set through object)
                object.__setattr__(self, name, enum_cls(getattr(self, name)))
            except ValueError:
                raise SimulatorError(f"SimConfig.{name} must be one of {list(values(enum_cls))}, "
                                     f"got {getattr(self, name)!r}") from None
        for name in ("sync_interval_s", "slo_tpot_ms"):
            if not getattr(self, name) > 0:
                raise SimulatorError(f"SimConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("drain_limit_s", "slo_ttft_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise SimulatorError(f"SimConfig.{name} must be None or > 0, got {v!r}")
        if self.progress_s < 0:
            raise SimulatorError("SimConfig.progress_s must be >= 0")
