"""Where the PerfModel of a policy that needs one comes from, without delaying the first answer.

In order: `--perf-model FILE`; a model cached by an earlier start for the same model, device,
decode kernel and LoRA mode (`--perf-model-cache`, default `.cache/perf_models/`); else a
quick profile of instance 0 taken in the background while `--warmup-policy` (one that needs
no model) serves, fitted with only the terms its points support, saved to the cache, and then
swapped in. A profile that fails leaves the warm-up policy serving (logged), never a crash.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

from caraserve_router.scheduling.perf_model import PerfModel, PerfModelError

log = logging.getLogger("caraserve.perf")


def cache_path(cache_dir: str, model_dir: str, device: str, kernel: str, lora_mode: str, tp: int = 1) -> Path:
    """One file per model (its name and a hash of its config), device, decode kernel, mode and
    tensor-parallel size (an instance of N ranks has other step times than one of 1)."""
    config = Path(model_dir, "config.json")
    digest = hashlib.sha1(config.read_bytes() if config.exists() else model_dir.encode()).hexdigest()[:10]
    tp_part = f"-tp{tp}" if tp > 1 else ""  # tp = 1 keeps the names of earlier caches
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(model_dir).name}-{digest}-{device}-{kernel}-{lora_mode}{tp_part}")
    return Path(cache_dir) / f"{slug}.json"


def check_tp(model: PerfModel, tp: int, source: str) -> PerfModel:
    """A perf model is profiled per TP size: refuse one whose metadata names another (none: 1)."""
    profiled = int(model.metadata.get("tp", 1))
    if profiled != tp:
        raise PerfModelError(f"{source} was profiled with tp={profiled}; these instances run tp={tp}: profile "
                             f"them (scripts/profile_instance.py, or no --perf-model for a start-up profile)")
    return model



def load_cached(path: Optional[Path]) -> Optional[PerfModel]:
    if path is None or not path.exists():
        return None
    try:
        model = PerfModel.load(path)
    except PerfModelError as e:
        log.warning("ignoring the cached perf model %s: %s", path, e)
        return None
    log.info("perf model from the cache %s", path)
    return model


def save_cached(model: PerfModel, path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        model.save(tmp)
        os.replace(tmp, path)  # atomic: a concurrent start never reads half a file
        log.info("perf model saved to %s (reused by later starts)", path)
    except OSError as e:
        log.warning("could not cache the perf model at %s: %s", path, e)


async def profile_instance(client, tokenizer, adapters: dict, kernel: str) -> PerfModel:
    """The quick start-up profile of one instance, with progress in the log."""
    from caraserve_router.frontend.profiler import quick_profile

    start = time.monotonic()
    log.info("taking a quick profile of instance 0 in the background (about a minute; "
             "scripts/profile_instance.py makes a better one)")
    model = await quick_profile(client, tokenizer, adapters, kernel)
    log.info("quick profile done in %.0f s: %s", time.monotonic() - start, model.describe())
    return model
