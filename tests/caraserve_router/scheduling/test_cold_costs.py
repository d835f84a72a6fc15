"""Cold-start costs come from the profile (link rate, bytes per rank, sidecar time per token and
rank, layers), reach the policies through the PerfModel JSON, and device kinds are named so that
`--perf-models-dir` tells two GPU kinds and a CPU apart."""
from __future__ import annotations

import pytest

from caraserve_router.contracts.device_kind import cpu_model, kind_name
from caraserve_router.contracts.names import LoraMode
from caraserve_router.frontend.perf_models import PerfModelCatalog
from caraserve_router.scheduling.cold_costs import auto_choice, cold_extra_ms
from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import COLD_START_COST
from caraserve_router.frontend.profiler import cold_start_inputs

# An instance's LoRA stats as /stats gives them (runtime.stats): a measured CUDA link of 40 GB/s,
# 1 MB per rank on all projections, a sidecar profiled at 2 us per token per layer at rank 16.
LORA_STATS = {"link": "cuda", "link_measured_mb_s": 40000.0, "page_bytes": 1_000_000, "num_layers": 32,
              "sidecar": {"workers": 4, "profile": {"per_token_us": 2.0, "rank": 16}},
              "auto": {"layer_sync_us": 100.0}}


def profiled_model() -> PerfModel:
    profile = {"metadata": {"source": "profiled", "device": "cuda:NVIDIA H200"},
               "prefill": [{"tokens": t, "rank": 0, "ms": 5.0 + 0.05 * t} for t in (16, 64, 256, 512)],
               "decode": [{"kernel": "mbgmv", "ranks": [0] * b, "ms": 10.0 + b} for b in (1, 2, 4, 8)],
               **cold_start_inputs(LORA_STATS)}
    return PerfModel.fit(profile)


def test_profile_carries_the_measured_link_and_sidecar(tmp_path):
    pm = profiled_model()
    # 64 ranks x 1 MB over 40 GB/s = 1.6 ms
    assert pm.predict_load_ms(64) == pytest.approx(1.6)
    assert pm.sidecar_ms_per_token_rank == pytest.approx(2.0 / 1e3 / 16)
    assert (pm.sidecar_workers, pm.layers, pm.layer_sync_ms) == (4, 32, pytest.approx(0.1))
    pm.save(tmp_path / "m.json")
    back = PerfModel.load(tmp_path / "m.json")
    assert back.sidecar_ms_per_token_rank == pm.sidecar_ms_per_token_rank and back.layers == 32


def test_policy_costs_follow_the_profile_not_a_constant():
    pm = profiled_model()
    prefill = pm.predict_prefill_ms(256)  # 17.8 ms
    # on-demand: the load; pipeline: hidden (1.6 ms < 17.8 ms) but for layer 0's copy (1.6 / 32)
    # and 32 x 0.1 ms of waits
    assert cold_extra_ms(pm, LoraMode.ON_DEMAND, 256, 64, prefill) == pytest.approx(1.6)
    assert cold_extra_ms(pm, LoraMode.PIPELINE, 256, 64, prefill) == pytest.approx(1.6 / 32 + 3.2)
    # cpu-assist: 1 covered layer; sidecar 256 x 64 x 1.25e-4 / 4 = 0.512 ms < 17.8/32: free; + waits
    assert cold_extra_ms(pm, LoraMode.CPU_ASSIST, 256, 64, prefill) == pytest.approx(3.2)
    assert cold_extra_ms(pm, LoraMode.AUTO, 256, 64, prefill) == pytest.approx(1.6)
    assert auto_choice(pm, 256, 64, prefill).mode is LoraMode.ON_DEMAND
    from caraserve_router.evaluation.sim_instance import PREFILL_WITH_COLD
    from caraserve_router.lora.modes import MODES

    assert set(COLD_START_COST) == set(MODES) == set(PREFILL_WITH_COLD) == set(LoraMode)
    # a 100x slower link: 160 ms of load; the sidecar hides it for 32 x max(0, 0.512 - 0.556) + 3.2
    slow = PerfModel.fit({**profiled_model().to_json()["grid"], "metadata": {},
                          **cold_start_inputs({**LORA_STATS, "link_measured_mb_s": 400.0})})
    assert auto_choice(slow, 256, 64, prefill).mode is LoraMode.CPU_ASSIST
    assert cold_extra_ms(slow, LoraMode.CPU_ASSIST, 256, 64, prefill) == pytest.approx(3.2)


def test_without_a_profiled_sidecar_the_assumed_fraction_is_used():
    pm = PerfModel.from_coefficients((10, 0.1), (1, 1, 1), (1, 1, 1), cpu_assist_overhead=0.06)
    assert cold_extra_ms(pm, LoraMode.CPU_ASSIST, 100, 8, 20.0) == pytest.approx(1.2)


def test_device_kinds_are_named_and_told_apart(tmp_path):
    assert kind_name("cuda:0", "NVIDIA H200") == "cuda:NVIDIA H200"
    assert kind_name("cpu") == f"cpu:{cpu_model()}" and cpu_model()
    for device in ("cuda:NVIDIA H200", "cuda:NVIDIA H100", kind_name("cpu")):
        PerfModel.from_coefficients((10, 0.1), (1, 1, 1), (1, 1, 1), metadata={"device": device}).save(
            tmp_path / f"{device.replace(':', '_').replace(' ', '_')}.json")
    catalog = PerfModelCatalog.load_dir(str(tmp_path))
    assert catalog.for_kind("cuda:NVIDIA H200").metadata["device"] == "cuda:NVIDIA H200"
    assert catalog.for_kind("cuda:NVIDIA H100 80GB HBM3").metadata["device"] == "cuda:NVIDIA H100"
    assert catalog.for_kind(kind_name("cpu")).metadata["device"] == kind_name("cpu")
    assert catalog.for_kind("cuda:NVIDIA A10G") is None
