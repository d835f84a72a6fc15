"""The profiler turns an instance's step samples into PerfModel points: a decode point is the
cycle of back-to-back steps (forward + per-step overhead), a prefill point its forward pass
plus the median overhead. A fake instance produces samples with known timings."""
from __future__ import annotations

import asyncio

import pytest

from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.frontend.profiler import ProfileGrid, collect_profile

OVERHEAD_MS = 5.0
ADAPTERS = {"a8": 8, "b8": 8, "c32": 32}


def forward_ms(kind: str, batch: int, tokens: int, ranks: list[int]) -> float:
    if kind in ("prefill", "mixed"):  # a chunk step of one prompt costs as a prefill of its tokens
        return 20.0 + 0.5 * tokens + (10.0 if ranks[0] else 0.0)
    return 30.0 + 2.0 * batch + 0.1 * sum(ranks) + (8.0 if max(ranks) else 0.0)


class FakeInstance:
    """Requests sent together form one batch: a prefill per request, then decode steps, one
    after the other on a clock where each step costs its forward time plus OVERHEAD_MS."""

    def __init__(self, chunk: int = 0):
        self.chunk = chunk  # chunked prefill: a longer prompt runs as "mixed" steps of its chunks
        self.clock = 1000.0
        self.pending: list[dict] = []
        self.samples_out: list[dict] = []

    async def stats(self):
        return {"kernel": "mbgmv", "device": "cpu", "name": "fake", "lora": {"link": "emulated"}}

    async def generate_stream(self, body):
        self.pending.append(body)
        await asyncio.sleep(0)  # let the rest of a gather join the batch
        if self.pending:
            self._run_batch(self.pending)
            self.pending = []
        yield {"token": 1}

    def _step(self, kind, ranks, tokens):
        ms = forward_ms(kind, len(ranks), tokens, ranks)
        self.clock += (ms + OVERHEAD_MS) / 1000.0
        self.samples_out.append({"kind": kind, "batch": len(ranks), "tokens": tokens, "ranks": ranks,
                                 "ms": ms, "t": self.clock})

    def _run_batch(self, bodies):
        ranks = [ADAPTERS.get(b["adapter"], 0) for b in bodies]
        for b, r in zip(bodies, ranks):
            tokens = len(b["input_ids"])
            if self.chunk and tokens > self.chunk:
                for start in range(0, tokens, self.chunk):
                    self._step("mixed", [r], min(self.chunk, tokens - start))
            else:
                self._step("prefill", [r], tokens)
        self.clock += 0.5  # idle before the decode steps: must not count as overhead
        for _ in range(bodies[0]["parameters"]["max_new_tokens"] - 1):
            self._step("decode", ranks, len(bodies))

    async def samples(self, clear=False):
        out = list(self.samples_out)
        if clear:
            self.samples_out.clear()
        return out


@pytest.fixture(scope="module")
def profile():
    grid = ProfileGrid(prefill_tokens=(16, 64, 128), batch_sizes=(1, 2, 4), decode_steps=6, repeats=2)
    return asyncio.run(collect_profile(FakeInstance(), ADAPTERS, grid, progress=lambda m: None))


def test_decode_points_are_step_cycles_and_keep_the_forward_time(profile):
    assert profile["decode"], "no decode points"
    for p in profile["decode"]:
        expected = forward_ms("decode", len(p["ranks"]), 0, p["ranks"])
        assert p["forward_ms"] == pytest.approx(expected)
        assert p["ms"] == pytest.approx(expected + OVERHEAD_MS)


def test_prefill_points_add_the_measured_step_overhead(profile):
    assert profile["metadata"]["step_overhead_ms"] == pytest.approx(OVERHEAD_MS)
    assert {p["rank"] for p in profile["prefill"]} == {0, 32}
    for p in profile["prefill"]:
        expected = forward_ms("prefill", 1, p["tokens"], [p["rank"]])
        assert p["ms"] == pytest.approx(expected + OVERHEAD_MS)


def test_a_chunked_prompt_is_one_prefill_point_of_all_its_chunk_steps():
    grid = ProfileGrid(prefill_tokens=(16, 64, 128), batch_sizes=(1, 2), decode_steps=6, repeats=2)
    profile = asyncio.run(collect_profile(FakeInstance(chunk=48), ADAPTERS, grid, progress=lambda m: None))
    assert sorted({p["tokens"] for p in profile["prefill"]}) == [16, 64, 128]
    for p in profile["prefill"]:
        chunks = [min(48, p["tokens"] - s) for s in range(0, p["tokens"], 48)]
        expected = sum(forward_ms("prefill", 1, c, [p["rank"]]) for c in chunks)
        assert p["forward_ms"] == pytest.approx(expected)
        assert p["ms"] == pytest.approx(expected + OVERHEAD_MS * len(chunks))


def test_the_fitted_model_predicts_what_a_client_sees(profile):
    model = PerfModel.fit(profile)
    ranks = [8, 32, 0, 8]
    assert model.predict_decode_step_ms(ranks, "mbgmv") == pytest.approx(
        forward_ms("decode", 4, 0, ranks) + OVERHEAD_MS, rel=1e-6)
    assert model.metadata["step_overhead_ms"] == pytest.approx(OVERHEAD_MS)
