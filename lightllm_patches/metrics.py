"""Prometheus metrics of one instance (its own registry, served at the instance's /metrics).

Every request that reached the router is observed once, when it ends, whatever way it ends
(`outcome`: finished, aborted, error): E2E always, TTFT once it had a token, TPOT once it had
two."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lightllm_patches.vllm_metrics import VllmMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 60.0)


class InstanceMetrics:
    def __init__(self, instance: str, emulated_link: bool, model_name: str = "", max_lora_rank: int = 64):
        self.instance = instance
        self.registry = CollectorRegistry()
        labels = ("instance", "adapter")
        self.ttft = Histogram("caraserve_instance_ttft_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("caraserve_instance_tpot_seconds", "Time per output token after the first", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("caraserve_instance_e2e_seconds", "End-to-end request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("caraserve_instance_requests_total", "Requests ended, by outcome "
                                "(finished, aborted, error)", ("instance", "adapter", "outcome"),
                                registry=self.registry)
        self.errors = Counter("caraserve_instance_errors_total", "Requests ended by an error", ("instance", "kind"),
                              registry=self.registry)
        self.gauges = {
            name: Gauge(f"caraserve_instance_{name}", doc, ("instance",), registry=self.registry)
            for name, doc in {
                "running_requests": "Requests in the running batch",
                "queued_requests": "Requests waiting for admission",
                "kv_tokens_used": "KV-cache tokens in use",
                "resident_adapters": "Adapters resident in the device pool",
                "pool_pages_used": "Adapter pool pages in use",
            }.items()
        }
        self.loads = Gauge("caraserve_instance_adapter_loads", "Adapter loads by kind since start (link: "
                           "'emulated' or 'cuda')", ("instance", "kind", "link"), registry=self.registry)
        self.link = "emulated" if emulated_link else "cuda"
        self.vllm = VllmMetrics(self.registry, model_name, max_lora_rank)  # what cluster routers read

    def observe_request(self, adapter, outcome, e2e: float, ttft=None, tpot=None) -> None:
        label = (self.instance, adapter or "")
        self.requests.labels(*label, str(outcome)).inc()
        self.e2e.labels(*label).observe(e2e)
        if ttft is not None:
            self.ttft.labels(*label).observe(ttft)
        if tpot is not None:
            self.tpot.labels(*label).observe(tpot)

    def error(self, kind: str) -> None:
        self.errors.labels(self.instance, kind).inc()

    def update_from_stats(self, stats: dict) -> None:
        lora = stats.get("lora", {})
        values = {
            "running_requests": len(stats.get("running", [])),
            "queued_requests": len(stats.get("queued", [])),
            "kv_tokens_used": stats.get("kv_tokens_used", 0),
            "resident_adapters": len(lora.get("resident", [])),
            "pool_pages_used": lora.get("pages_used", 0),
        }
        for name, value in values.items():
            self.gauges[name].labels(self.instance).set(value)
        for kind, count in lora.get("loads", {}).items():
            self.loads.labels(self.instance, kind, self.link).set(count)
        self.vllm.update(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
