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
        # Residency of adapters (LoraRuntime.residency_stats): where they are, their bytes, churn.
        self.adapters = Gauge("caraserve_instance_adapters", "Adapters by place: registered, mapped on host, "
                              "resident on device", ("instance", "place"), registry=self.registry)
        self.adapter_bytes = Gauge("caraserve_instance_adapter_bytes", "Adapter bytes by place (host, device) and "
                                   "their budgets (host_budget, device_budget)", ("instance", "place"),
                                   registry=self.registry)
        self.evictions = Gauge("caraserve_instance_adapter_evictions", "Adapter evictions since start by place "
                               "(host cache, device pool)", ("instance", "place"), registry=self.registry)
        self.host_maps = Gauge("caraserve_instance_adapter_host_maps", "Adapters mapped into host memory since start, "
                               "by source: 'file' (read from the adapter's file) or 'shared' (the copy another "
                               "instance of this host had mapped)", ("instance", "source"),
                               registry=self.registry)
        self.hit_rate = Gauge("caraserve_instance_adapter_device_hit_rate", "Share of adapter requests that found "
                              "their adapter resident on the device", ("instance",), registry=self.registry)
        self.load_seconds = Gauge("caraserve_instance_adapter_load_seconds", "Seconds spent loading adapters "
                                  "host -> device since start (link: 'emulated' or 'cuda')", ("instance", "link"),
                                  registry=self.registry)
        self.load_bytes = Gauge("caraserve_instance_adapter_load_bytes", "Bytes moved host -> device by adapter "
                                "loads since start", ("instance", "link"), registry=self.registry)
        self.auto_choices = Gauge("caraserve_instance_auto_choices", "--lora-mode auto: cold loads since start by the "
                                  "mode chosen and the reason (contracts/auto_choice.py)",
                                  ("instance", "mode", "reason"), registry=self.registry)
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
        self._residency(lora.get("residency") or {})
        for choice in (lora.get("auto") or {}).get("choices", []):
            self.auto_choices.labels(self.instance, choice["mode"], choice["reason"]).set(choice["loads"])
        self.vllm.update(stats)

    def _residency(self, r: dict) -> None:
        if not r:
            return
        i = self.instance
        for place, key in (("registered", "registered"), ("host", "mapped_on_host"), ("device", "resident_on_device")):
            self.adapters.labels(i, place).set(r.get(key, 0))
        for place, key in (("host", "host_bytes"), ("host_budget", "host_budget_bytes"), ("device", "device_bytes"),
                           ("device_budget", "device_budget_bytes")):
            self.adapter_bytes.labels(i, place).set(r.get(key) or 0)
        self.evictions.labels(i, "host").set(r.get("host_evictions", 0))
        self.evictions.labels(i, "device").set(r.get("device_evictions", 0))
        self.host_maps.labels(i, "file").set(r.get("host_reads", 0))
        self.host_maps.labels(i, "shared").set(r.get("host_shared_hits", 0))
        if r.get("device_hit_rate") is not None:
            self.hit_rate.labels(i).set(r["device_hit_rate"])
        self.load_seconds.labels(i, self.link).set(r.get("load_s", 0.0))
        self.load_bytes.labels(i, self.link).set(r.get("device_load_bytes", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
