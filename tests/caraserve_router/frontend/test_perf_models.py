"""A PerfModel per device kind: loaded from a directory, matched to instances, used by the policy."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from caraserve_router.frontend.perf_models import PerfModelCatalog, assign
from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import PolicyConfig, make_policy
from caraserve_router.scheduling.scheduler_state import InstanceState, RequestInfo


def model(device: str, step_ms: float, per_req_ms: float) -> PerfModel:
    # prefill: const + tokens; decode mbgmv: const + batch + sum_ranks (+ whatever features it takes)
    from caraserve_router.scheduling.perf_model import DECODE_FEATURES

    def decode(kernel):
        return [step_ms, per_req_ms] + [0.0] * (len(DECODE_FEATURES[kernel]) - 2)
    return PerfModel.from_coefficients([10.0, 0.1], decode("bgmv"), decode("mbgmv"), metadata={"device": device})


@pytest.fixture()
def catalog_dir(tmp_path):
    model("cpu", 100.0, 20.0).save(tmp_path / "cpu.json")
    model("NVIDIA H100", 10.0, 1.0).save(tmp_path / "h100.json")
    model("NVIDIA H100 NVL", 8.0, 1.0).save(tmp_path / "h100nvl.json")
    (tmp_path / "h100.profile.json").write_text("{}")  # raw profiles beside models are skipped
    return tmp_path


def test_catalog_matches_the_most_specific_device(catalog_dir):
    catalog = PerfModelCatalog.load_dir(str(catalog_dir))
    assert catalog.for_kind("cuda:NVIDIA H100 80GB HBM3").metadata["device"] == "NVIDIA H100"
    assert catalog.for_kind("cuda:NVIDIA H100 NVL").metadata["device"] == "NVIDIA H100 NVL"
    assert catalog.for_kind("cpu:AMD EPYC 7B13").metadata["device"] == "cpu"
    assert catalog.for_kind("cuda:NVIDIA A10G") is None


def test_catalog_refuses_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PerfModelCatalog.load_dir(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no PerfModel"):
        PerfModelCatalog.load_dir(str(tmp_path))
    model("", 1.0, 1.0).save(tmp_path / "x.json")
    with pytest.raises(ValueError, match="metadata.device"):
        PerfModelCatalog.load_dir(str(tmp_path))


def test_rank_aware_uses_each_instances_own_model(catalog_dir):
    catalog = PerfModelCatalog.load_dir(str(catalog_dir))
    states = [InstanceState("cpu-box", max_batch=8), InstanceState("gpu-box", max_batch=8)]
    handles = [SimpleNamespace(device_kind="cpu:AMD EPYC"), SimpleNamespace(device_kind="")]
    chosen = assign(catalog, handles, states, {1: {"device": "cuda:NVIDIA H100 PCIe"}})
    assert chosen == {0: "cpu", 1: "NVIDIA H100"}
    # same load on both; the cluster-wide model says they are alike, their own models do not
    for i, s in enumerate(states):
        s.dispatched(RequestInfo(f"r{i}", None, 0, 16, 32))
    policy = make_policy("rank-aware", PolicyConfig(slo_tpot_ms=1000.0, mean_output_len=32, max_batch=8))
    shared = model("any", 50.0, 5.0)
    req = RequestInfo("new", None, 0, 16, 32)
    est = {e.index: e for e in policy.estimates(req, states, shared)}
    assert est[0].d_decode_ms == pytest.approx(20.0) and est[1].d_decode_ms == pytest.approx(1.0)
    assert policy.choose(req, states, shared) == 1
    for s in states:
        s.perf_model = None  # without per-kind models both predict the shared model's cost: tie -> index 0
    assert policy.choose(req, states, shared) == 0
