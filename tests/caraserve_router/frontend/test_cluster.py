"""A two-instance cluster on a tiny model: routing by policy, correct outputs, Prometheus
metrics, and an instance killed mid-run (no lost request, clear errors, restart)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import fixtures
from caraserve_router.contracts.processes import bind_listening
from caraserve_router.evaluation.server_process import RunningServer
from tests.testing import decisions, generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.tiny_llama_with_adapters(tmp_path_factory.mktemp("cluster"), ranks=(2, 4, 8))


def start(tiny, tmp_path, policy, *extra):
    model_dir = tiny[0]
    return RunningServer("caraserve_router.api_server", [
        "--model-dir", str(model_dir), "--instances", "2", "--policy", policy, "--lora-mode", "pipeline",
        "--lora-pool-mb", "4", "--lora-max-rank", "8", "--log-dir", str(tmp_path), "--stats-interval-s", "0.3",
        "--health-interval-s", "0.5", *extra], tmp_path / "server.log", instance_key="test-cluster-key")


def lora_adapters_dir_flag(tiny):
    return ["--adapters", str(tiny[1][0].parent)]


def logprobs(url, adapter, prompt_ids, n=4):
    """(token id, logprob) of each streamed token."""
    body = {"input_ids": prompt_ids, "adapter": adapter, "parameters": {"max_new_tokens": n, "ignore_eos": True}}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        return [(e["token"]["id"], round(e["token"]["logprob"], 4)) for e in
                (json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:"))]


def test_round_robin_spreads_and_outputs_agree(tiny, tmp_path):
    adapter_names = [a.name for a in tiny[1]]
    # The base port is taken (as any outgoing connection may take a port chosen early): the
    # instances bind the next free ones themselves, and the server starts.
    taken = bind_listening("127.0.0.1", 0)
    base = taken.getsockname()[1]
    with taken, start(tiny, tmp_path, "round-robin", *lora_adapters_dir_flag(tiny),
                      "--instance-base-port", str(base)) as srv:
        ports = [int(h["url"].rsplit(":", 1)[1])
                 for h in requests.get(srv.url + "/stats", timeout=30).json()["instances"]]
        assert len(set(ports)) == 2 and all(base < p < base + 64 for p in ports), (base, ports)
        outputs = [logprobs(srv.url, adapter_names[i % 3], [5, 6, 7, 8]) for i in range(6)]
        assert decisions(srv.url) == {"instance0": 3.0, "instance1": 3.0}
        # The same (adapter, prompt) served by either instance gives the same tokens.
        assert outputs[0] == outputs[3] and outputs[1] == outputs[4] and outputs[2] == outputs[5]
        assert len({tuple(o) for o in outputs[:3]}) == 3, "different adapters must differ"
        # One host copy of each adapter: each instance is asked for all three directly (the
        # round robin may skip an instance whose load looked full), and they map three segments.
        urls = [h["url"] for h in requests.get(srv.url + "/stats", timeout=30).json()["instances"]]
        for url in urls:
            for name in adapter_names:
                r = requests.post(url + "/generate", json={"input_ids": [5, 6, 7, 8], "adapter": name,
                                                           "parameters": {"max_new_tokens": 1}}, timeout=300,
                                  headers=srv.instance_headers)
                assert r.status_code == 200, r.text
        # The instances are closed to all but the front end: no key or a wrong one is a 401;
        # /health and /metrics stay open (probes). Each runs on its own share of the cores.
        for url in urls:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = requests.post(url + "/generate", json={"input_ids": [5], "parameters": {"max_new_tokens": 1}},
                                  headers=headers, timeout=30)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
                assert requests.get(url + "/v1/models", headers=headers, timeout=30).status_code == 401
            assert requests.get(url + "/metrics", timeout=30).status_code == 200
        pids = [requests.get(url + "/health", timeout=30).json()["processes"] for url in urls]
        cores = [set().union(*(os.sched_getaffinity(p) for p in procs.values())) for procs in pids]
        assert not cores[0] & cores[1], cores
        if len(os.sched_getaffinity(0)) >= 2:
            assert cores[0] | cores[1] == os.sched_getaffinity(0), cores
        segments = [n for n in os.listdir("/dev/shm") if n.startswith(srv.shm_prefix + "_hs")]
        assert len(segments) == 3, segments
        lora = [requests.get(url + "/stats", headers=srv.instance_headers, timeout=30).json()["lora"]["residency"]
                for url in urls]
        assert [s["mapped_on_host"] for s in lora] == [3, 3], json.dumps(lora)
        assert sum(s["host_reads"] for s in lora) == 3 and sum(s["host_shared_hits"] for s in lora) == 3, json.dumps(lora)
        families = {f.name for f in text_string_to_metric_families(requests.get(srv.url + "/metrics").text)}
        for name in ("caraserve_ttft_seconds", "caraserve_tpot_seconds", "caraserve_e2e_seconds",
                     "caraserve_instance_queue_depth", "caraserve_instance_running_batch_size",
                     "caraserve_instance_resident_adapters", "caraserve_adapter_loads", "caraserve_errors"):
            assert name in families, name


def test_rank_aware_with_quick_profile(tiny, tmp_path):
    # The server answers at once (a warm-up policy) while the profile runs in the background;
    # a fresh cache directory makes sure this run profiles instead of reusing an earlier fit.
    with start(tiny, tmp_path, "rank-aware", *lora_adapters_dir_flag(tiny),
               "--perf-model-cache", str(tmp_path / "perf_cache")) as srv:
        deadline = time.monotonic() + 600
        while True:
            stats = requests.get(srv.url + "/stats", timeout=30).json()
            if not stats["profiling"] or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert stats["perf_model"] and stats["slo_tpot_ms"] > 0
        assert list((tmp_path / "perf_cache").iterdir()), "the finished profile is cached"
        with cf.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda i: generate(srv.url, [9, 10, 11], tiny[1][i % 3].name, 12)["token_ids"], range(6)))
        assert all(len(o) == 12 for o in outs)
        assert sum(decisions(srv.url).values()) == 6


def stream_tokens(url, n, results, i):
    body = {"input_ids": [20 + i, 21, 22], "parameters": {"max_new_tokens": n, "ignore_eos": True}}
    try:
        with requests.post(url + "/generate_stream", json=body, stream=True, timeout=600) as r:
            if r.status_code != 200:
                results[i] = ("http", r.status_code)
                return
            tokens, error = 0, None
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        error = event["error"]["message"]
                    else:
                        tokens += 1
            results[i] = ("error", error) if error else ("ok", tokens)
    except requests.RequestException as e:
        results[i] = ("exception", str(e))


def test_killing_an_instance_loses_no_waiting_request(tiny, tmp_path):
    """Each instance runs at most 2 requests; the rest wait at the front end. Instance 1 is
    killed while it streams: its requests end with a clear error, every other request
    completes, and instance 1 comes back."""
    with start(tiny, tmp_path, "round-robin", "--running-max-req-size", "2") as srv:
        stats = requests.get(srv.url + "/stats", timeout=30).json()
        pids = {}
        for line in open(tmp_path / "server.log").read().splitlines():
            if "started instance" in line:
                index = int(line.split("started instance ")[1].split()[0])
                pids[index] = int(line.split("(pid ")[1].split(")")[0])
        results = {}
        n_requests, new_tokens = 8, 160  # long enough to kill instance 1 mid-stream
        with cf.ThreadPoolExecutor(n_requests) as pool:
            futures = [pool.submit(stream_tokens, srv.url, new_tokens, results, i) for i in range(n_requests)]
            deadline = time.time() + 120
            while time.time() < deadline:  # wait until instance 1 is streaming
                running = requests.get(srv.url + "/stats", timeout=30).json()["instances"][1]["stats"].get("running")
                if running and any(r["generated"] > 2 for r in running):
                    break
                time.sleep(0.2)
            os.killpg(pids[1], signal.SIGKILL)
            for f in futures:
                f.result()
        outcomes = [results[i][0] for i in range(n_requests)]
        assert outcomes.count("ok") >= n_requests - 2, results
        assert "error" in outcomes, f"instance 1 was killed after its streams ended: {results}"
        for i in range(n_requests):
            kind, detail = results[i]
            if kind == "ok":
                assert detail == new_tokens
            else:
                assert kind == "error" and "instance" in detail, results[i]
        deadline = time.time() + 180
        while time.time() < deadline:
            health = requests.get(srv.url + "/health", timeout=30).json()
            if health.get("healthy") == 2:
                break
            time.sleep(1)
        assert health.get("healthy") == 2, "the killed local instance must be restarted"
        assert stats["instances"][1]["restarts"] == 0
        assert requests.get(srv.url + "/stats", timeout=30).json()["instances"][1]["restarts"] == 1
        assert len(generate(srv.url, [1, 2, 3])["token_ids"]) == 6
