"""`python -m caraserve_router.api_server --tp 2` on the CPU (gloo): one instance of two ranks
serves PEFT's greedy tokens for adapters on all seven projections, given at start and loaded at
run time (registered on both ranks); SIGKILL of rank 1 takes the instance down (exit 1, nothing
left behind) and the front end's launcher restarts it, with the same outputs after. One front
end, two instance starts (about a minute each on 2 busy cores)."""
from __future__ import annotations

import os
import signal
import time

import pytest
import requests
import torch

from caraserve_router.evaluation.server_process import RunningServer
from tests import fixtures
from tests.testing import wait_until

pytestmark = pytest.mark.slow

PROMPTS = [[11, 12, 13], [20, 21, 22, 23]]
NEW_TOKENS = 4
STRENGTH = 1.0  # adapters strong enough to change the tiny llama's greedy tokens (checked)


def peft_greedy(model_dir, adapter_dir, prompt, n) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def generate(url, adapter, prompt) -> list[int]:
    body = {"input_ids": prompt, "adapter": adapter, "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_tp2_instance_serves_peft_tokens_and_restarts_after_a_rank_dies(tmp_path):
    model_dir, dirs = fixtures.tiny_llama_with_adapters(tmp_path / "fx", ranks=(2, 4), strength=STRENGTH)
    ads = tmp_path / "adapters"
    ads.mkdir()
    for d in dirs:
        d.rename(ads / d.name)
    late = fixtures.make_tiny_adapter(model_dir, tmp_path / "late-root" / "late-r6", rank=6, seed=21,
                                      rank_pattern={"down_proj": 3}, strength=STRENGTH)
    paths = {**{p.name: p for p in ads.iterdir()}, late.name: late}
    expected = {(n, i): peft_greedy(model_dir, d, p, NEW_TOKENS)
                for n, d in paths.items() for i, p in enumerate(PROMPTS)}
    base = [peft_greedy(model_dir, None, p, NEW_TOKENS) for p in PROMPTS]
    for n in paths:  # every adapter changes some greedy token: the token checks below have teeth
        assert any(expected[(n, i)] != base[i] for i in range(len(PROMPTS))), n
    srv = RunningServer("caraserve_router.api_server", [
        "--model-dir", str(model_dir), "--adapters", str(ads), "--tp", "2", "--lora-mode", "pipeline",
        "--policy", "round-robin",
        "--torch-threads", "1", "--max-req-input-len", "64", "--max-req-total-len", "128",
        "--max-total-token-num", "2048", "--log-dir", str(tmp_path), "--health-interval-s", "0.5",
        "--adapter-roots", f"{ads},{late.parent}"],
        tmp_path / "server.log", startup_s=300)
    with srv:
        r = requests.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": late.name, "lora_path": str(late)},
                          timeout=120)
        assert r.status_code == 200, r.text
        for (n, i), tokens in expected.items():
            assert generate(srv.url, n, PROMPTS[i]) == tokens, (n, i)
        instance = requests.get(srv.url + "/stats", timeout=30).json()["instances"][0]
        router = requests.get(instance["url"] + "/health", timeout=30).json()["processes"]["router"]
        ranks = children(router)  # pipeline mode: no sidecar, so the router's one child is rank 1
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        assert wait_until(lambda: not os.path.exists(f"/proc/{router}"), 30), "the instance must go down"

        def restarted():
            view = requests.get(srv.url + "/stats", timeout=30).json()["instances"][0]
            return view["restarts"] == 1 and requests.get(srv.url + "/health", timeout=30).json().get("healthy") == 1

        assert wait_until(restarted, 300, interval_s=1.0), "the launcher must restart the instance"
        for (n, i), tokens in expected.items():
            assert generate(srv.url, n, PROMPTS[i]) == tokens, (n, i, "after the restart")
    assert srv.leftover_procs == [], f"processes left: {srv.leftover_procs}"
    assert srv.leftover_shm == set(), f"/dev/shm left: {srv.leftover_shm}"
