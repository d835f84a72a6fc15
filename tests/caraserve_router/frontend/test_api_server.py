"""The real server on the default model: answers like HF transformers, serves concurrent and
malformed requests, and shuts down leaving nothing behind."""
from __future__ import annotations

import concurrent.futures as cf
import json

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caraserve_router.evaluation.server_process import RunningServer, port_free
from tests.testing import generate

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = RunningServer("caraserve_router.api_server",
                        ["--model-dir", str(default_model_dir), "--policy", "round-robin", "--lora-mode", "pipeline",
                         # the other server tests run LightLLM's layout; this one the nn.Linear copies
                         "--cpu-weight-layout", "both", "--log-dir", str(log.parent)], log)
    with srv:
        yield srv
    # Shutdown checks (after the module's tests): nothing left behind.
    assert srv.leftover_procs == [], f"processes left: {srv.leftover_procs}"
    assert srv.leftover_shm == set(), f"/dev/shm left: {srv.leftover_shm}"
    assert port_free(srv.port)


def hf_greedy(model_dir, prompt, n):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_tokens_match_hf(server, default_model_dir):
    for prompt in PROMPTS:
        reply = generate(server.url, prompt, max_new_tokens=NEW_TOKENS, timeout_s=120)
        assert reply["token_ids"] == hf_greedy(default_model_dir, prompt, NEW_TOKENS), prompt


def _complete(url, i):
    body = {"model": "base", "prompt": PROMPTS[i % 3], "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0}
    r = requests.post(url + "/v1/completions", json=body, timeout=300, stream=body["stream"])
    assert r.status_code == 200, r.text
    if not body["stream"]:
        return r.json()["choices"][0]["text"]
    chunks = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1])


def test_eight_concurrent_requests(server):
    with cf.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda i: _complete(server.url, i), range(8)))
    # Same prompt, greedy: streaming and non-streaming give the same text.
    for i in range(3):
        same = {texts[j] for j in range(8) if j % 3 == i}
        assert len(same) == 1, same
        assert same.pop().strip()


def test_chat_completion(server):
    r = requests.post(server.url + "/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_stop_and_seed(server):
    r = requests.post(server.url + "/v1/completions", json={
        "model": "base", "prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7"]}, timeout=120)
    text = r.json()["choices"][0]["text"]
    assert " 7" not in text and r.json()["choices"][0]["finish_reason"] == "stop", text
    sampled = [requests.post(server.url + "/v1/completions", json={
        "model": "base", "prompt": "My favourite animal is", "max_tokens": 12, "temperature": 1.0,
        "seed": seed}, timeout=120).json()["choices"][0]["text"] for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2], sampled


@pytest.mark.parametrize("path,body,status", [
    ("/v1/completions", {"prompt": "hi"}, 400),  # no model
    ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "no-such-adapter", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": "base", "prompt": "hi", "n": 2}, 400),
    ("/v1/completions", {"model": "base", "prompt": "x " * 5000}, 400),
    ("/v1/completions", {"model": "base", "prompt": [-1, 5]}, 400),
    ("/v1/chat/completions", {"model": "base", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4, "bogus": 1}}, 400),
    ("/generate", {"parameters": {"max_new_tokens": 4}}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/does/not/exist"}, 400),
])
def test_malformed_requests_get_4xx(server, path, body, status):
    r = requests.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_invalid_json_is_400(server):
    r = requests.post(server.url + "/v1/completions", data=b"{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == 400
