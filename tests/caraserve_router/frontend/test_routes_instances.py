"""Instances added and removed at run time (`/admin/instances`) on a local cluster of a tiny llama.
(The same routes with `--cluster ray` are exercised in ray_cluster_cases.py.)"""
from __future__ import annotations

import time

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from caraserve_router.evaluation.server_process import RunningServer, port_free
from tests.testing import decisions, generate

pytestmark = pytest.mark.slow
PROMPT = [5, 6, 7, 8]
NEW_TOKENS = 5


def delta(before, after) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_add_then_remove_a_local_instance(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)[0, len(PROMPT):].tolist()
    with RunningServer("caraserve_router.api_server", [
            "--model-dir", str(tiny_llama_dir), "--instances", "1", "--policy", "round-robin",
            "--lora-mode", "pipeline", "--lora-pool-mb", "4", "--lora-max-rank", "8", "--sidecar-workers", "1",
            "--log-dir", str(tmp_path), "--health-interval-s", "0.5"], tmp_path / "server.log") as srv:
        admin = srv.url + "/admin/instances"
        assert requests.post(admin, json={"count": 0}, timeout=30).status_code == 400
        r = requests.post(admin, json={"count": 1}, timeout=60)
        assert r.status_code == 200, r.text
        [added] = r.json()["added"]
        assert added["index"] == 1 and added["name"] == "instance1" and not added["healthy"]
        deadline = time.time() + 300
        while not requests.get(admin, timeout=30).json()["instances"][1]["healthy"]:
            assert time.time() < deadline, "the added instance never became healthy"
            time.sleep(0.5)
        before = decisions(srv.url)
        assert [generate(srv.url, PROMPT, max_new_tokens=NEW_TOKENS)["token_ids"] for _ in range(4)] == [expected] * 4
        assert delta(before, decisions(srv.url)) == {"instance0": 2.0, "instance1": 2.0}

        first_url = requests.get(admin, timeout=30).json()["instances"][0]["url"]
        r = requests.delete(admin + "/0?drain_s=5", timeout=120)
        assert r.status_code == 200 and r.json()["removed"] and r.json()["requests_cut"] == 0, r.text
        assert port_free(int(first_url.rsplit(":", 1)[1])), "the removed instance still listens"
        before = decisions(srv.url)
        assert [generate(srv.url, PROMPT, max_new_tokens=NEW_TOKENS)["token_ids"] for _ in range(2)] == [expected] * 2
        assert delta(before, decisions(srv.url)) == {"instance1": 2.0}
        assert requests.delete(admin + "/0", timeout=30).status_code == 409  # removed already
        assert requests.delete(admin + "/1", timeout=30).status_code == 409  # the last one
        assert requests.delete(admin + "/7", timeout=30).status_code == 404
        time.sleep(2)  # a few health checks: the removed instance is not restarted
        listing = requests.get(admin, timeout=30).json()["instances"]
        assert [(i["removed"], i["healthy"]) for i in listing] == [(True, False), (False, True)]
    assert srv.leftover_procs == [] and srv.leftover_shm == set()
