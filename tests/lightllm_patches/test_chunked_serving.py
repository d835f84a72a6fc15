"""Chunked prefill through a real instance (HTTP server, router step loop, admission every
step, detokenizer): prompts of several chunks that arrive together, with adapters, seeded
sampling and a stop sequence, give exactly the replies each gets when it runs alone."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from caraserve_router.evaluation.server_process import RunningServer, port_free
from tests import fixtures
from tests.testing import generate

pytestmark = pytest.mark.slow

CHUNK = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked-serving")
    model_dir, dirs = fixtures.tiny_llama_with_adapters(root, ranks=(4, 8))
    ads = root / "adapters"
    ads.mkdir()
    for d in dirs:
        d.rename(ads / d.name)
    log = root / "instance.log"
    srv = RunningServer("caraserve_router.api_server",
                        ["--model-dir", str(model_dir), "--adapters", str(ads), "--lora-mode", "pipeline",
                         "--policy", "round-robin", "--prefill-chunk-tokens", str(CHUNK), "--torch-threads", "1",
                         "--max-req-input-len", "200", "--max-req-total-len", "256", "--max-total-token-num", "4096",
                         "--log-dir", str(root)], log, instance_key="test-chunked-key")
    with srv:
        yield srv, sorted(p.name for p in ads.iterdir()), model_dir
    assert srv.leftover_procs == [], f"processes left: {srv.leftover_procs}"
    assert srv.leftover_shm == set(), f"/dev/shm left: {srv.leftover_shm}"
    assert port_free(srv.port)


def jobs_of(adapters) -> list[dict]:
    """Keyword arguments of `tests.testing.generate` (ignore_eos: each runs its max_new_tokens)."""
    long_ids = [100 + (7 * k) % 900 for k in range(45)]  # 6 chunks of 8
    return [
        {"prompt": long_ids, "adapter": adapters[0], "max_new_tokens": 10, "do_sample": True, "temperature": 1.2,
         "seed": 11},
        {"prompt": long_ids[::-1][:30], "adapter": adapters[1], "max_new_tokens": 12},
        {"prompt": [5, 6, 7], "max_new_tokens": 16, "do_sample": True, "temperature": 1.0, "seed": 3},
        {"prompt": long_ids[:20], "adapter": adapters[0], "max_new_tokens": 14, "do_sample": True,
         "temperature": 1.5, "seed": 5},
    ]


def run(url, job: dict) -> tuple[list, str]:
    reply = generate(url, **job)
    return reply["token_ids"], reply["finish_reason"]


def test_concurrent_chunked_requests_match_running_alone(server):
    srv, adapters, _ = server
    jobs = jobs_of(adapters)
    alone = [run(srv.url, job) for job in jobs]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: run(srv.url, job), jobs))
    assert [t[0] for t in together] == [a[0] for a in alone]
    instance = requests.get(srv.url + "/stats", timeout=30).json()["instances"][0]["url"]
    steps = requests.get(instance + "/step_samples", headers=srv.instance_headers, timeout=30).json()
    assert any(s["kind"] == "mixed" and s["tokens"] > s["batch"] for s in steps), "chunks must share steps"
    assert all(s["tokens"] <= CHUNK + s["batch"] for s in steps), "at most one chunk of prompt tokens per step"


def test_stop_sequence_with_chunked_prompt(server):
    from transformers import AutoTokenizer

    srv, adapters, model_dir = server
    tok = AutoTokenizer.from_pretrained(model_dir)
    job = jobs_of(adapters)[0]  # a 45-token prompt: 6 chunks
    tokens, _ = run(srv.url, job)
    texts = [tok.decode([t]) for t in tokens]
    # the first token that is a word of its own, encodes back to itself and did not occur before
    k = next(i for i in range(2, len(texts)) if texts[i].strip().isalnum() and tokens[i] not in tokens[:i]
             and tok.encode(texts[i], add_special_tokens=False) == [tokens[i]])
    tokens2, reason = run(srv.url, {**job, "stop_sequences": [texts[k]]})
    assert reason == "stop" and tokens2 == tokens[: k + 1]
