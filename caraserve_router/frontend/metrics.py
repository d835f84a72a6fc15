"""Prometheus metrics of the cluster front end (served at its /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 60.0, 120.0)


class ClusterMetrics:
    def __init__(self, policy: str):
        self.policy = policy
        r = self.registry = CollectorRegistry()
        labels = ("instance", "adapter")
        self.ttft = Histogram("caraserve_ttft_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("caraserve_tpot_seconds", "Time per output token after the first (per request)",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("caraserve_e2e_seconds", "End-to-end request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("caraserve_scheduler_decisions_total", "Requests routed, by policy and instance",
                                 ("policy", "instance"), registry=r)
        self.migrations = Counter("caraserve_scheduler_migrations_total", "Queued requests moved (dlora)",
                                  ("policy",), registry=r)
        self.requests = Counter("caraserve_requests_total", "Requests ended, by outcome (ok, error, cancelled: "
                                "the client left)", ("outcome",), registry=r)
        self.errors = Counter("caraserve_errors_total", "Requests that ended in an error, by kind", ("kind",),
                              registry=r)
        self.frontend_queue = Gauge("caraserve_frontend_waiting_requests", "Requests waiting for an instance "
                                    "with room", registry=r)
        per_instance = {
            "queue_depth": "Requests queued on the instance",
            "running_batch_size": "Requests in the instance's running batch",
            "resident_adapters": "Adapters resident in the instance's device pool",
            "healthy": "1 if the instance answers its health check",
            "restarts": "Times the front end restarted this local instance",
        }
        self.instance = {name: Gauge(f"caraserve_instance_{name}", doc, ("instance",), registry=r)
                         for name, doc in per_instance.items()}
        self.adapter_loads = Gauge("caraserve_adapter_loads", "Adapter loads and requests by kind since the "
                                   "instance started (cold/warm/cpu_assisted); link says if the link is emulated",
                                   ("instance", "kind", "link"), registry=r)

    def request_done(self, instance: str, adapter, ttft, e2e: float, tpot, outcome: str = "ok") -> None:
        """Record one request when it ends, however it ends (`outcome`: ok, error, cancelled);
        `ttft` None: it never got a token; `tpot` None: fewer than two tokens."""
        labels = (instance, adapter or "")
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
        self.e2e.labels(*labels).observe(e2e)
        if tpot is not None:
            self.tpot.labels(*labels).observe(tpot)
        self.requests.labels(outcome).inc()

    def decision(self, instance: str) -> None:
        self.decisions.labels(self.policy, instance).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def instance_stats(self, instance: str, stats: dict, healthy: bool, restarts: int) -> None:
        g = self.instance
        g["healthy"].labels(instance).set(1 if healthy else 0)
        g["restarts"].labels(instance).set(restarts)
        if not stats:
            return
        g["queue_depth"].labels(instance).set(len(stats.get("queued", [])))
        g["running_batch_size"].labels(instance).set(len(stats.get("running", [])))
        g["resident_adapters"].labels(instance).set(len(stats.get("resident_adapters", [])))
        lora = stats.get("lora") or {}
        link = lora.get("link", "unknown")
        loads = lora.get("loads", {})
        for kind, key in (("cold", "cold_requests"), ("warm", "warm_requests"), ("cpu_assisted", "cpu_assisted_steps"),
                          ("adapter_loads", "cold")):
            if key in loads:
                self.adapter_loads.labels(instance, kind, link).set(loads[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)
