"""vLLM's metric names on an instance's /metrics, for the routers that read them.

Kubernetes-side LLM routers (llm-d's inference scheduler, AIBrix, the Gateway API inference
extension) score vLLM pods by scraping these series; an instance that speaks them can sit behind
such a router unchanged (docs/DEPLOY.md). Same names, types and labels as vLLM's v1 engine:

- `vllm:num_requests_running`  gauge: requests in the running batch
- `vllm:num_requests_waiting`  gauge: requests waiting for admission
- `vllm:kv_cache_usage_perc`   gauge: KV-cache usage as a fraction (1 = full), as vLLM
- `vllm:lora_requests_info`    gauge whose labels carry the LoRA state: `max_lora` (adapters of
  the largest accepted rank the device pool holds at once), `running_lora_adapters` and
  `waiting_lora_adapters` (comma-separated names, sorted); the value is the time of the update
  (vLLM's convention: readers take the sample with the latest value). One extra label,
  `resident_lora_adapters`, lists the adapters resident on the device.

Resident adapters also get one series each, `caraserve_instance_adapter_resident{adapter, rank}`
(1 while resident). All of it is derived from the instance's stats (router_manager `_stats`).
"""
from __future__ import annotations

import time
from typing import Mapping

from prometheus_client import CollectorRegistry, Gauge

LORA_INFO_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters", "resident_lora_adapters")


def _names(requests: list) -> str:
    return ",".join(sorted({r["adapter"] for r in requests if r.get("adapter")}))


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, max_rank: int):
        self.model_name = model_name
        self.max_rank = max_rank
        labels = ("model_name",)
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             labels, registry=registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             labels, registry=registry)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              labels, registry=registry)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.", LORA_INFO_LABELS,
                               registry=registry)
        self.resident = Gauge("caraserve_instance_adapter_resident", "1 for each adapter resident in the device "
                              "pool", ("adapter", "rank"), registry=registry)

    def max_lora(self, stats: Mapping) -> int:
        """Adapters of rank `max_rank` that fit in the pool at once (it pages by rank row)."""
        pages = int(stats.get("lora", {}).get("pages_total", 0))
        return pages // self.max_rank if self.max_rank > 0 else 0

    def update(self, stats: Mapping) -> None:
        running, queued = stats.get("running", []), stats.get("queued", [])
        self.running.labels(self.model_name).set(len(running))
        self.waiting.labels(self.model_name).set(len(queued))
        total = stats.get("kv_tokens_total") or 0
        self.kv_usage.labels(self.model_name).set(stats.get("kv_tokens_used", 0) / total if total else 0.0)
        resident = stats.get("resident_adapters", [])
        self.lora_info.clear()  # one series: the current state
        self.lora_info.labels(str(self.max_lora(stats)), _names(running), _names(queued),
                              ",".join(sorted(e["name"] for e in resident))).set(time.time())
        self.resident.clear()
        for e in resident:
            self.resident.labels(e["name"], str(e["rank"])).set(1)
