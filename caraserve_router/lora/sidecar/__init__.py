"""The CPU LoRA sidecar, engine side: CaraServe's CPU-assisted prefill.

While a cold adapter is copied to the device, the engine asks the sidecar, layer by layer and
group by group, for the LoRA delta `x @ A^T @ B^T` (scale folded into B) of the rows whose
adapter layer is not resident yet, and adds it to the base projection's output. The work is
done by k worker processes (`caraserve_router/lora/sidecar/worker.py`), each pinned to a core,
which poll integer flags in one shared-memory segment (`caraserve_router/lora/sidecar/shm.py`);
no pipe, queue or lock is on the per-call path.

Per call (`compute`): pack the rows of the segments into the shared input buffer (CPU: a
memcpy; CUDA: an async device->host copy into the page-locked segment), write the job
descriptor, bump the job word of each participating worker (CUDA: a device->host copy of a
device-side sequence number queued on the same stream, so it lands after `x` with no host
synchronisation), wait for every participant's done word (bounded by the deadline), then add
the deltas to `out` (CUDA: one async host->device copy, then the adds). A dead, failing or
late worker makes the call return False with `out` untouched; the worker is replaced and the
engine falls back to waiting for the device copy.

How many workers a call uses comes from `c`, the tokens one core handles per layer within a
budget (`SidecarConfig.tokens_per_core`, or profiled at start): ceil(rows / c), at most the
ready workers, as in the paper.

Modules, one concern each:

| module | what |
|---|---|
| `engine.py` | `CpuLoraSidecar`: life cycle, adapter table, arming, `compute` / `submit` / `collect` |
| `workers.py` | `WorkerProcess` (one supervised worker slot, restart back-off), the row split |
| `jobs.py` | a packed call (`Job`), a posted call (`Ticket`), the host copies |
| `cuda_path.py` | the device half of a call when `x` lives on a CUDA device |
| `call_stats.py` | call counters and latency percentiles |
| `profiling.py` | measuring `c` (tokens per core) and the synchronisation round trip |
| `worker.py` | the worker process (`python -m caraserve_router.lora.sidecar.worker`): wait policy, adapter mappings, `lora_delta` |
| `shm.py` | the shared segment: layout, control words, descriptor, adapter table, buffers |

The benchmark CLI is `scripts/bench/sidecar.py`.
"""
from __future__ import annotations

__all__ = ["CpuLoraSidecar", "split_rows", "workers_for"]

# Resolved on first use (PEP 562) so that a worker process, started as
# `python -m caraserve_router.lora.sidecar.worker`, does not import the engine side with its package.
_EXPORTS = {"CpuLoraSidecar": "engine", "split_rows": "workers", "workers_for": "workers"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
