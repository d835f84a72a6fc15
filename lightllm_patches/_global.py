"""Global patches applied before any LightLLM module is imported.

Only what cannot be done by subclassing lives here: LightLLM evaluates these at import or
class-definition time, so they must be replaced before its modules load.

| upstream | why |
|---|---|
| `torch.cuda.get_device_name` (CPU-only torch) | `lightllm.models.llama.triton_kernel.context_flashattention_nopad` calls it at import time; without CUDA it raises. We return "cpu" so the module imports; its kernels are never called on the CPU. |
| `lightllm.utils.infer_utils.mark_cost_time`, `calculate_time`, `mark_start`, `mark_end` | decorators applied at class definition to the llama layer and backend methods; they call `torch.cuda.synchronize()` and `dist.get_rank()` unconditionally, which fail without CUDA or without a process group. Ours synchronise only when CUDA is in use and time only on request. |
| `lightllm.server.router.dynamic_prompt.shared_arr.SharedArray.__init__` | the KV counter and `TokenLoad` segments are created (or attached) through it, and Python (before 3.13) registers every such segment with the process's resource tracker. The instance removes its `/dev/shm` names itself when it stops (by its prefix, in the process that made them), so at every exit the tracker warned of "leaked" segments already gone; ours untracks them after upstream's `__init__`. |
| logger `lightllm` level | LightLLM defaults to DEBUG through an environment variable; CaraServe sets the level from its own config (`set_log_level`), and gives the `caraserve` logger a stderr handler in processes with no root handler (an instance's children). |
"""
from __future__ import annotations

import functools
import logging
import time

import torch

_APPLIED = False
_log = logging.getLogger("caraserve.patches")


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync() -> None:
    if _cuda_in_use():
        torch.cuda.synchronize()


def _mark_cost_time(func_name):
    """Replaces `lightllm.utils.infer_utils.mark_cost_time`: no timing, sync only on CUDA."""

    def inner(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            return func(*args, **kwargs)

        return wrapped

    return inner


def _calculate_time(show=False, min_cost_ms=0.0):
    """Replaces `lightllm.utils.infer_utils.calculate_time`: times only when `show` is set."""

    def wrapper(func):
        if not show:
            return func

        @functools.wraps(func)
        def inner(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            result = func(*args, **kwargs)
            _sync()
            cost_ms = (time.perf_counter() - start) * 1000
            if cost_ms > min_cost_ms:
                _log.debug("%s took %.2f ms", func.__name__, cost_ms)
            return result

        return inner

    return wrapper


_time_marks: dict[str, float] = {}


def _mark_start(key):
    _sync()
    _time_marks[key] = time.perf_counter()


def _mark_end(key, print_min_cost=0.0):
    _sync()
    cost_ms = (time.perf_counter() - _time_marks.pop(key, time.perf_counter())) * 1000
    if cost_ms > print_min_cost:
        _log.debug("cost %s: %.2f ms", key, cost_ms)


def _patch_cuda_device_name() -> None:
    if torch.cuda.is_available():
        return
    original = torch.cuda.get_device_name

    def get_device_name(device=None):
        return "cpu (no CUDA)"

    get_device_name.__wrapped__ = original
    torch.cuda.get_device_name = get_device_name


def _patch_infer_utils() -> None:
    from lightllm.utils import infer_utils

    infer_utils.mark_cost_time = _mark_cost_time
    infer_utils.calculate_time = _calculate_time
    infer_utils.mark_start = _mark_start
    infer_utils.mark_end = _mark_end


def _patch_shared_array() -> None:
    from multiprocessing import resource_tracker

    from lightllm.server.router.dynamic_prompt import shared_arr

    upstream = shared_arr.SharedArray.__init__

    @functools.wraps(upstream)
    def __init__(self, name, shape, dtype):
        upstream(self, name, shape, dtype)
        try:  # the instance's own clean-up unlinks the name (remove_shm by prefix)
            resource_tracker.unregister(self.shm._name, "shared_memory")
        except Exception:  # noqa: BLE001 - no tracker process (it starts lazily): nothing tracked
            pass

    shared_arr.SharedArray.__init__ = __init__


def set_log_level(level: str) -> None:
    """Set the level of LightLLM's and CaraServe's loggers (e.g. "info", "debug")."""
    value = getattr(logging, level.upper())
    caraserve = logging.getLogger("caraserve")
    if not caraserve.handlers and not logging.getLogger().handlers:
        # An instance's processes configure no root logger (the front end's `basicConfig` is in
        # another process), so without a handler of its own every caraserve INFO line there
        # (auto's choices, the sidecar's health) fell to logging's last resort: WARNING and up.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        caraserve.addHandler(handler)
    for name in ("lightllm", "caraserve"):
        logger = logging.getLogger(name)
        logger.setLevel(value)
        for handler in logger.handlers:
            handler.setLevel(value)


def apply_global_patches() -> None:
    """Apply every global patch once; safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_cuda_device_name()
    _patch_infer_utils()
    _patch_shared_array()
    # LightLLM's logger is created on import of lightllm.utils.log_utils (DEBUG by default).
    import lightllm.utils.log_utils  # noqa: F401

    set_log_level("info")
    _APPLIED = True
