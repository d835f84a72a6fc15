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
