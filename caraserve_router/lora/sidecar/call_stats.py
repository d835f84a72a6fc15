"""Counters and a window of call latencies of the sidecar."""
from __future__ import annotations

import collections

LATENCY_WINDOW = 4096  # calls kept for the latency percentiles


class CallStats:
    """Counters and a window of call latencies."""

    def __init__(self):
        self.calls = 0
        self.rows = 0
        self.fallbacks: collections.Counter = collections.Counter()
        self.restarts = 0
        self.latencies: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)

    def success(self, rows: int, seconds: float) -> None:
        self.calls += 1
        self.rows += rows
        self.latencies.append(seconds)

    def as_dict(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "calls": self.calls,
            "rows": self.rows,
            "fallbacks": sum(self.fallbacks.values()),
            "fallback_reasons": dict(self.fallbacks),
            "restarts": self.restarts,
            "mean_ms": 1e3 * sum(lat) / len(lat) if lat else None,
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        }

