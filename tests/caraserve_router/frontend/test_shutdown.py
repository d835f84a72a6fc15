"""Bare launch and shutdown of the front end (issue 11), on a live tiny-model server.

- With a policy that needs a perf model and none cached, the server answers at once with the
  warm-up policy while the profile runs in the background.
- SIGTERM with requests in flight: every process ends within --shutdown-timeout-s, every
  client gets its completion or a clean error (an error event inside a stream, or a 503),
  none hangs; nothing is left in /dev/shm. A second signal ends everything at once.
"""
from __future__ import annotations

import concurrent.futures as cf
import signal
import subprocess
import time

import pytest
import requests

from caraserve_router.evaluation.server_process import RunningServer, group_alive, groups_of
from tests import fixtures

pytestmark = pytest.mark.slow
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.tiny_llama_with_adapters(tmp_path_factory.mktemp("shutdown"), ranks=(4,))


def start(tiny, tmp_path, *extra) -> RunningServer:
    model_dir, adapters = tiny
    return RunningServer("caraserve_router.api_server", [
        "--model-dir", str(model_dir), "--adapters", str(adapters[0].parent), "--lora-mode", "pipeline",
        "--lora-pool-mb", "4", "--lora-max-rank", "8", "--running-max-req-size", "4", "--max-req-total-len", "2048",
        "--max-req-input-len", "256", "--shutdown-timeout-s", str(TIMEOUT_S), "--perf-model-cache",
        str(tmp_path / "perf_cache"), "--log-dir", str(tmp_path), *extra], tmp_path / "server.log")


def one(url, i):
    """A long request; what its client saw: 'done', 'error event', 'http <status>' or an exception."""
    stream = i % 2 == 0
    body = {"model": "base", "prompt": "Tell me a story", "max_tokens": 1500, "ignore_eos": True, "stream": stream}
    try:
        r = requests.post(url + "/v1/completions", json=body, stream=stream, timeout=60)
        if r.status_code != 200:
            return f"http {r.status_code} {r.json()['error']['type']}"
        if not stream:
            return "done"
        last = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")][-1]
        return "done" if last == "data: [DONE]" else ("error event" if '"error"' in last else f"cut: {last[:80]}")
    except requests.exceptions.ChunkedEncodingError:
        return "cut: connection closed mid-stream"
    except requests.ConnectionError as e:
        return f"refused: {type(e).__name__}"


def test_sigterm_under_load_ends_everything_in_time(tiny, tmp_path):
    srv = start(tiny, tmp_path, "--policy", "rank-aware")
    with srv:
        # Bare launch: no cached perf model, so a simple policy serves while the profile runs.
        s = requests.get(srv.url + "/stats", timeout=30).json()
        assert s["configured_policy"] == "rank-aware"
        assert s["profiling"] or s["policy"] == "rank-aware"
        if s["profiling"]:
            assert s["policy"] == "most-idle"
        assert requests.post(srv.url + "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2},
                             timeout=60).status_code == 200
        with cf.ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(one, srv.url, i) for i in range(10)]
            time.sleep(3)  # in flight: 4 running, the rest waiting for room
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            srv.proc.wait(TIMEOUT_S + 5)
            took = time.monotonic() - t0
            outcomes = [f.result(timeout=30) for f in futures]  # none hangs
        assert took <= TIMEOUT_S + 2, took
        for outcome in outcomes:
            assert outcome in ("done", "error event", "http 503 server_error") or outcome.startswith("refused"), \
                outcomes
        assert any(o in ("error event", "http 503 server_error") for o in outcomes), outcomes
    assert srv.leftover_procs == [] and srv.leftover_shm == set()


def test_second_signal_ends_at_once(tiny, tmp_path):
    srv = start(tiny, tmp_path, "--policy", "round-robin")
    with srv:
        groups = groups_of(srv.shm_prefix)  # the front end's and its instance's process groups
        assert len(groups) >= 2, groups
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, srv.url, i) for i in range(4)]
            time.sleep(2)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGINT)
            srv.proc.wait(10)
            assert time.monotonic() - t0 < 4.0
            for f in futures:
                f.result(timeout=30)
        deadline = time.monotonic() + 3.0  # killed processes are reaped by init within moments
        while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for g in groups for p in group_alive(g)]
        assert left == [], subprocess.run(["ps", "-ww", "-o", "pid,pgid,stat,args", "-p",
                                           ",".join(map(str, left))], capture_output=True, text=True).stdout
    assert srv.leftover_procs == [] and srv.leftover_shm == set()
