"""Profiling a running instance for the PerfModel: drive load over HTTP, read its step timings.

The instance records the duration of every forward step with its batch size, token count,
the adapter rank of every row and its end time (`/step_samples`); the profiler sends requests
shaped to fill a grid (prefill: prompt length x rank; decode: batch size x rank mix) and turns
the matching samples into the profile `PerfModel.fit` reads.

What is fitted is a step as the instance's clients see it: a decode point is the median
*cycle* of back-to-back decode steps (end of one step to the end of the next: forward pass plus
the router loop, input preparation and output handling); a prefill point is its forward pass
plus the median of that per-step overhead (`step_overhead_ms` in the profile's metadata).
"""
from __future__ import annotations

import asyncio
import logging
import platform
import random
import statistics
import time
from dataclasses import dataclass
from typing import Optional

from caraserve_router.frontend.instance_client import InstanceClient
from caraserve_router.scheduling.perf_model import PerfModel

log = logging.getLogger("caraserve.profiler")
TOKEN_RANGE = (1000, 30000)  # ordinary BPE tokens, far from special ids


@dataclass(frozen=True)
class ProfileGrid:
    prefill_tokens: tuple = (16, 64, 128, 256)
    batch_sizes: tuple = (1, 2, 4, 8)
    decode_steps: int = 12
    repeats: int = 2
    # Prompt tokens of the decode requests. The PerfModel has no context-length term, so decode
    # is profiled at a typical serving context (attention and the KV gather grow with it).
    decode_context: int = 128


# The api_server's start-up profile: small, and short decode prompts to keep it near a minute.
QUICK_GRID = ProfileGrid(decode_context=32)
FULL_GRID = ProfileGrid(prefill_tokens=(16, 32, 64, 128, 256, 512), batch_sizes=(1, 2, 4, 8, 16, 32),
                        decode_steps=32, repeats=2)
# `profile_instance.py --sweep`: the full grid with three repeats, for a measured truth table
SWEEP_GRID = ProfileGrid(prefill_tokens=(16, 32, 64, 128, 256, 512), batch_sizes=(1, 2, 4, 8, 16, 32),
                         decode_steps=32, repeats=3)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(*TOKEN_RANGE) for _ in range(length)]


def _body(adapter: Optional[str], ids: list[int], new_tokens: int) -> dict:
    return {"input_ids": ids, "adapter": adapter,
            "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}


async def _run(client: InstanceClient, body: dict) -> None:
    async for _ in client.generate_stream(body):
        pass


def _rank_mixes(adapters: dict[str, int], batch: int, rng: random.Random) -> list[list[Optional[str]]]:
    """Adapter assignments for a batch: base only, each rank alone, and a random mix. Rows
    take distinct adapters of a rank where there are several, as real traffic does (rows that
    share one adapter are cheaper than the same ranks spread over many)."""
    by_rank: dict[int, list[str]] = {}
    for name in sorted(adapters):
        by_rank.setdefault(adapters[name], []).append(name)
    mixes = [[None] * batch]
    mixes += [[names[i % len(names)] for i in range(batch)] for _, names in sorted(by_rank.items())]
    if len(adapters) > 1 and batch > 1:
        pool = sorted(adapters)
        mixes.append([rng.choice(pool) for _ in range(batch)])
    return mixes


def _prefill_point(samples: list) -> Optional[dict]:
    """One prompt's prefill from the steps of that request alone: its tokens, rank and forward
    time summed over its chunk steps (None if no step of one request was recorded)."""
    steps = [s for s in samples if s["kind"] in ("prefill", "mixed") and s["batch"] == 1]
    if not steps:
        return None
    return {"tokens": sum(s["tokens"] for s in steps), "rank": steps[0]["ranks"][0],
            "forward_ms": sum(s["ms"] for s in steps), "steps": len(steps)}


def _back_to_back(samples: list[dict], batch: int) -> list[tuple[float, float]]:
    """(forward ms, cycle ms) of each decode step of `batch` rows that directly followed another
    one: the cycle (end of the previous step to the end of this one) adds the router loop, input
    preparation and output handling to the forward pass, as a client sees a step."""
    return [(cur["ms"], (cur["t"] - prev["t"]) * 1000.0) for prev, cur in zip(samples, samples[1:])
            if prev["kind"] == cur["kind"] == "decode" and prev["batch"] == cur["batch"] == batch]


async def collect_profile(client: InstanceClient, adapters: dict[str, int], grid: ProfileGrid = QUICK_GRID,
                          seed: int = 0, progress=print) -> dict:
    """Profile one instance; `adapters` maps loaded adapter names to their ranks."""
    rng = random.Random(seed)
    stats = await client.stats()
    kernel = stats["kernel"]
    ranks_for_prefill = [None] + ([max(adapters, key=adapters.get)] if adapters else [])
    prefill, decode = [], []
    # Warm up: first use of each adapter loads it; the profile wants steady-state steps.
    for name in [None, *adapters]:
        await _run(client, _body(name, _prompt(rng, 8), 2))
    await client.samples(clear=True)
    for tokens in grid.prefill_tokens:
        for adapter in ranks_for_prefill:
            for _ in range(grid.repeats):
                await _run(client, _body(adapter, _prompt(rng, tokens), 1))
                # One request at a time: its steps are its prefill, one step or (chunked prefill,
                # a prompt longer than a chunk) several "mixed" steps of its chunks only.
                point = _prefill_point(await client.samples(clear=True))
                if point is not None:
                    prefill.append(point)
        progress(f"  prefill {tokens} tokens done")
    overheads = []
    for batch in grid.batch_sizes:
        for mix in _rank_mixes(adapters, batch, rng):
            forward, cycle, ranks = [], [], None
            for _ in range(grid.repeats):
                await asyncio.gather(*[_run(client, _body(a, _prompt(rng, grid.decode_context), grid.decode_steps))
                                       for a in mix])
                samples = await client.samples(clear=True)
                pairs = _back_to_back(samples, batch)
                forward += [f for f, _ in pairs]
                cycle += [c for _, c in pairs]
                overheads += [c - f for f, c in pairs]
                steps = [s for s in samples if s["kind"] == "decode" and s["batch"] == batch]
                ranks = sorted(steps[-1]["ranks"]) if steps else ranks
            if cycle:
                decode.append({"kernel": kernel, "ranks": ranks, "ms": statistics.median(cycle),
                               "forward_ms": statistics.median(forward),
                               "ms_samples": [round(c, 3) for c in cycle]})  # the spread, for truth tables
        progress(f"  decode batch {batch} done")
    step_overhead_ms = statistics.median(overheads) if overheads else 0.0
    for p in prefill:
        p["ms"] = p["forward_ms"] + step_overhead_ms * p.pop("steps")
    lora = stats.get("lora") or {}
    profile = {
        "metadata": {"source": "profiled", "machine": platform.node() or "unknown", "device": stats.get("device", ""),
                     "date": time.strftime("%Y-%m-%d"), "kernel": kernel, "instance": stats.get("name"),
                     "emulated": {"device": not str(stats.get("device", "")).startswith("cuda"),
                                  "link": lora.get("link") == "emulated"},
                     "step_overhead_ms": round(step_overhead_ms, 3), "decode_context": grid.decode_context,
                     "tp": int(lora.get("tp", 1))},  # a PerfModel is per TP size (perf_bootstrap.check_tp)

        "prefill": prefill,
        "decode": decode,
    }
    profile.update(cold_start_inputs(lora))
    return profile


def cold_start_inputs(lora: dict) -> dict:
    """The profile's `link` and `cpu_assist` from an instance's LoRA stats: the link's rate as the
    instance measured it at start (emulated: its configured rate), bytes per rank of an adapter on
    all seven projections, the sidecar's profiled time per token and rank, its workers, the
    model's layers and auto's per-layer sync cost (0 outside auto mode)."""
    out: dict = {}
    rate = lora.get("link_bandwidth_mbps") or lora.get("link_measured_mb_s")
    if rate and lora.get("page_bytes"):
        out["link"] = {"bandwidth_gbps": rate / 1000.0, "bytes_per_rank": lora["page_bytes"],
                       "latency_ms": (lora.get("link_latency_us") or 0.0) / 1000.0,
                       "measured": lora.get("link") != "emulated"}
    sidecar = lora.get("sidecar") or {}
    prof = sidecar.get("profile") or {}
    if prof.get("per_token_us") and prof.get("rank"):
        out["cpu_assist"] = {"sidecar_ms_per_token_rank": prof["per_token_us"] / 1e3 / prof["rank"],
                             "sidecar_workers": int(sidecar.get("workers") or 1),
                             "layers": int(lora.get("num_layers") or 0),
                             "layer_sync_ms": ((lora.get("auto") or {}).get("layer_sync_us") or 0.0) / 1e3}
    return out


async def quick_profile(client: InstanceClient, tokenizer, adapters: dict[str, dict], kernel: str) -> PerfModel:
    """A small profile of `client`'s instance at start-up (the front end's fallback)."""
    ranks = {name: int(info["rank"]) for name, info in adapters.items()}
    profile = await collect_profile(client, ranks, QUICK_GRID, progress=lambda msg: log.info("quick profile:%s", msg))
    return PerfModel.fit(profile)
