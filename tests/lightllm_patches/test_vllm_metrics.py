"""The vLLM-named series of an instance's /metrics, from a scripted stats snapshot, read back
with prometheus_client's own parser (what a scraping router sees)."""
from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from lightllm_patches.metrics import InstanceMetrics


def scrape(metrics: InstanceMetrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def req(adapter, rid):
    return {"request_id": rid, "adapter": adapter, "rank": 8 if adapter else 0, "prompt_tokens": 4,
            "max_new_tokens": 8, "generated": 1}


def test_vllm_names_labels_and_values():
    m = InstanceMetrics("i0", emulated_link=True, model_name="SmolLM2-135M-Instruct", max_lora_rank=16)
    stats = {"running": [req("b", 1), req("a", 2), req(None, 3), req("a", 4)], "queued": [req("c", 5)],
             "kv_tokens_used": 96, "kv_tokens_total": 1024,
             "resident_adapters": [{"name": "a", "rank": 8}, {"name": "b", "rank": 4}],
             "lora": {"pages_total": 100, "resident": [], "loads": {}}}
    before = time.time()
    m.update_from_stats(stats)
    got = scrape(m)
    model = {"model_name": "SmolLM2-135M-Instruct"}
    assert got["vllm:num_requests_running"] == [(model, 4.0)]
    assert got["vllm:num_requests_waiting"] == [(model, 1.0)]
    assert got["vllm:kv_cache_usage_perc"] == [(model, 96 / 1024)]
    [(labels, value)] = got["vllm:lora_requests_info"]
    # 100 rank-row pages hold 6 adapters of rank 16; names sorted, de-duplicated, base excluded
    assert labels == {"max_lora": "6", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c",
                      "resident_lora_adapters": "a,b"}
    assert before <= value <= time.time()
    assert sorted((s["adapter"], s["rank"], v) for s, v in got["caraserve_instance_adapter_resident"]) == [
        ("a", "8", 1.0), ("b", "4", 1.0)]
    # the CaraServe series stay
    assert got["caraserve_instance_running_requests"] == [({"instance": "i0"}, 4.0)]

    # idle: one info series (the current one), empty adapter lists, nothing resident
    m.update_from_stats({"running": [], "queued": [], "kv_tokens_used": 0, "kv_tokens_total": 1024,
                         "resident_adapters": [], "lora": {"pages_total": 100}})
    got = scrape(m)
    assert [labels for labels, _ in got["vllm:lora_requests_info"]] == [
        {"max_lora": "6", "running_lora_adapters": "", "waiting_lora_adapters": "", "resident_lora_adapters": ""}]
    assert got["vllm:kv_cache_usage_perc"] == [(model, 0.0)]
    assert "caraserve_instance_adapter_resident" not in got


def test_residency_series():
    m = InstanceMetrics("i0", emulated_link=True)
    residency = {"registered": 4096, "mapped_on_host": 12, "resident_on_device": 5, "host_bytes": 3_000_000,
                 "host_budget_bytes": 8_000_000, "device_bytes": 1_500_000, "device_budget_bytes": 4_000_000,
                 "host_evictions": 7, "device_evictions": 3, "device_hit_rate": 0.75, "load_s": 1.25,
                 "device_load_bytes": 9_000_000, "host_reads": 20, "host_shared_hits": 6}
    m.update_from_stats({"running": [], "queued": [], "lora": {"pages_total": 10, "resident": [], "loads": {},
                                                               "residency": residency}})
    got = {name: {tuple(sorted(labels.items())): value for labels, value in samples}
           for name, samples in scrape(m).items()}
    place = lambda p: (("instance", "i0"), ("place", p))  # noqa: E731
    assert got["caraserve_instance_adapters"] == {place("registered"): 4096, place("host"): 12, place("device"): 5}
    assert got["caraserve_instance_adapter_bytes"] == {place("host"): 3e6, place("host_budget"): 8e6,
                                                       place("device"): 1.5e6, place("device_budget"): 4e6}
    assert got["caraserve_instance_adapter_evictions"] == {place("host"): 7, place("device"): 3}
    assert got["caraserve_instance_adapter_device_hit_rate"] == {(("instance", "i0"),): 0.75}
    source = lambda s: (("instance", "i0"), ("source", s))  # noqa: E731
    assert got["caraserve_instance_adapter_host_maps"] == {source("file"): 20, source("shared"): 6}
    link = (("instance", "i0"), ("link", "emulated"))
    assert got["caraserve_instance_adapter_load_seconds"] == {link: 1.25}
    assert got["caraserve_instance_adapter_load_bytes"] == {link: 9e6}


def test_auto_choices_series():
    """auto's choices (runtime stats lora.auto) reach /metrics by mode and reason."""
    m = InstanceMetrics("i0", emulated_link=True)
    m.update_from_stats({"lora": {"auto": {"choices": [
        {"mode": "on-demand", "reason": "load-shorter-than-overlap", "loads": 3},
        {"mode": "cpu-assist", "reason": "sidecar-hides-load", "loads": 5}]}}})
    got = {(s["mode"], s["reason"]): v for s, v in scrape(m)["caraserve_instance_auto_choices"]}
    assert got == {("on-demand", "load-shorter-than-overlap"): 3, ("cpu-assist", "sidecar-hides-load"): 5}
