"""One instance (`python -m lightllm_patches.instance`) on the tiny llama, as clients and faults
meet it: typed adapters (aliases share one host copy), bad adapter configs and prompts (4xx,
no server paths in messages), OpenAI-shaped errors, client disconnects (running requests freed,
queued ones dropped), latency metrics however a request ends, liveness apart from the router
loop, and the death of its processes (clear error events, the instance exits, nothing left
behind). Two instance starts in all (about 10 s each on an idle 2-core machine).

Every check looks only at this test's own processes (its process group) and `/dev/shm` names
(the instance's prefix holds its port).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from caraserve_router.evaluation.server_process import RunningServer, group_alive
from tests.testing import generate

pytestmark = pytest.mark.slow
FLAGS = ["--lora-mode", "pipeline", "--max-total-token-num", "4096", "--max-req-input-len", "512",
         "--max-req-total-len", "2048", "--running-max-req-size", "2", "--sidecar-workers", "1"]
LONG = {"max_new_tokens": 1500, "ignore_eos": True}  # a request that outlives the test's checks


def start(model_dir, adapters_root, log: Path) -> RunningServer:
    return RunningServer("lightllm_patches.instance",
                         ["--model-dir", str(model_dir), "--lora-adapters", str(adapters_root), *FLAGS], log,
                         startup_s=180)


def own_shm(port: int) -> list:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve_{port}_")]


def wait_for(predicate, timeout: float, period: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


@pytest.fixture(scope="module")
def instance(tiny_llama_adapters, tmp_path_factory):
    model_dir, adapters = tiny_llama_adapters
    srv = start(model_dir, adapters[0].parent, tmp_path_factory.mktemp("instance") / "instance.log")
    with srv:
        yield srv
    assert own_shm(srv.port) == []


def stats(srv) -> dict:
    return requests.get(srv.url + "/stats", timeout=30).json()


def token_ids(srv, adapter, n=6) -> list:
    """The instance's greedy tokens for one prompt (an instance names them in `tokens`, with details)."""
    reply = generate(srv.url, "hello there", adapter, n, timeout_s=120, return_details=True)
    return [t["id"] for t in reply["tokens"]]


def load(srv, name, path) -> requests.Response:
    return requests.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                         timeout=120)


def unload(srv, name) -> requests.Response:
    return requests.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def metric(srv, name: str, **labels) -> float:
    """Sum of a Prometheus sample over the series whose labels include `labels`."""
    total = 0.0
    for line in requests.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------------- adapters


def test_one_directory_under_several_names_is_held_once(instance, tiny_llama_adapters, tmp_path):
    _, adapters = tiny_llama_adapters
    copies = stats(instance)["lora"]["host_copies"]
    src = tmp_path / "copy"
    shutil.copytree(adapters[1], src)
    (tmp_path / "link").symlink_to(src)
    assert load(instance, "x1", src).status_code == 200
    assert stats(instance)["lora"]["host_copies"] == copies + 1
    second = load(instance, "x2", tmp_path / "link")  # another name, and another spelling of the path
    assert second.status_code == 200 and second.json()["rank"] == 4, second.text
    assert stats(instance)["lora"]["host_copies"] == copies + 1
    assert load(instance, "x1", src).status_code == 409
    expected = token_ids(instance, adapters[1].name)
    assert token_ids(instance, "x1") == expected and token_ids(instance, "x2") == expected
    assert token_ids(instance, None) != expected
    assert {"x1", "x2"} <= {r["name"] for r in stats(instance)["resident_adapters"]}
    assert unload(instance, "x1").status_code == 200
    assert token_ids(instance, "x2") == expected  # the copy stays while a name holds it
    assert unload(instance, "x2").status_code == 200
    assert stats(instance)["lora"]["host_copies"] == copies
    assert requests.post(instance.url + "/generate", json={"inputs": "hi", "adapter": "x2"}, timeout=60).status_code == 404


BAD_CONFIGS = {
    "target_modules of numbers": {"target_modules": [1, 2]},
    "lora_alpha a string": {"lora_alpha": "x"},
    "r a string": {"r": "8"},
    "rank_pattern of strings": {"rank_pattern": {"q_proj": "4"}},
    "use_rslora a string": {"use_rslora": "yes"},
    "not an object": [1, 2, 3],
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_adapter_config_is_a_4xx_naming_the_field(instance, tiny_llama_adapters, tmp_path, case):
    _, adapters = tiny_llama_adapters
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    edit = BAD_CONFIGS[case]
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **edit} if isinstance(edit, dict) else edit))
    r = load(instance, "bad", bad)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "'bad'" in message and str(tmp_path) not in message
    if isinstance(edit, dict):
        assert next(iter(edit)) in message
    assert token_ids(instance, adapters[0].name)  # still serving


def test_loader_errors_name_the_adapter_not_the_path(instance, tiny_llama_adapters, tmp_path):
    """Errors found while reading the tensors (past the config checks) are scrubbed too."""
    _, adapters = tiny_llama_adapters
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = load(instance, "broken", bad)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "'broken'" in message and "safetensors" in message and str(tmp_path) not in message


def test_adapter_path_messages_reveal_nothing(instance, tmp_path):
    """Relative paths are refused; a missing directory and an existing non-adapter one get the
    same message; no message holds the server's working directory or the path."""
    relative = load(instance, "rel", "some/relative/dir")
    assert relative.status_code == 400 and "absolute" in relative.json()["error"]["message"]
    missing = load(instance, "p", tmp_path / "does-not-exist")
    existing = load(instance, "p", tmp_path)
    assert missing.status_code == existing.status_code == 400
    assert missing.json()["error"]["message"] == existing.json()["error"]["message"]
    for r in (relative, missing, existing):
        message = r.json()["error"]["message"]
        assert os.getcwd() not in message and str(tmp_path) not in message and "relative" not in message


# ------------------------------------------------------------------------------ bad requests


def test_lone_surrogate_is_a_400(instance):
    for body in ('{"inputs": "abc \\ud800", "parameters": {"max_new_tokens": 2}}',
                 '{"inputs": "abc", "parameters": {"max_new_tokens": 2, "stop_sequences": ["x\\udfff"]}}'):
        for path in ("/generate", "/generate_stream"):
            r = requests.post(instance.url + path, data=body, headers={"content-type": "application/json"},
                              timeout=30)
            assert r.status_code == 400, r.text
            assert "surrogate" in r.json()["error"]["message"]


def test_every_error_has_the_openai_shape(instance):
    for method, path, status in (("GET", "/no-such-route", 404), ("GET", "/generate", 405),
                                 ("POST", "/generate", 400)):
        r = requests.request(method, instance.url + path, data=b"\xff\xfe" if method == "POST" else None,
                             headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == status and error["message"] and error["type"] != "server_error"


# ------------------------------------------------------------------------ abandoned requests


def _raw_request(port: int, path: str, body: dict) -> socket.socket:
    """An HTTP request on a socket of our own, so the test decides when the client leaves."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


@pytest.mark.parametrize("path", ["/generate_stream", "/generate"])
def test_departed_clients_free_their_slots(instance, path):
    """Two running requests fill the batch (running_max_req_size 2), a third waits; its client
    leaves -> dropped from the queue while the batch is still full; the others leave -> the
    batch empties within a moment. Every one is recorded as aborted."""
    aborted = metric(instance, "caraserve_instance_requests_total", outcome="aborted")
    e2e = metric(instance, "caraserve_instance_e2e_seconds_count")
    body = {"inputs": "hello there", "parameters": LONG}
    running = [_raw_request(instance.port, path, body) for _ in range(2)]
    assert wait_for(lambda: len(stats(instance)["running"]) == 2, 60)
    queued = _raw_request(instance.port, path, body)
    assert wait_for(lambda: len(stats(instance)["queued"]) == 1, 30)
    queued.close()
    assert wait_for(lambda: len(stats(instance)["queued"]) == 0, 3), "a departed client's queued request stays"
    assert len(stats(instance)["running"]) == 2
    for s in running:
        s.close()
    assert wait_for(lambda: not stats(instance)["running"], 3), "departed clients keep generating"
    assert wait_for(lambda: metric(instance, "caraserve_instance_requests_total", outcome="aborted") == aborted + 3, 5)
    assert metric(instance, "caraserve_instance_e2e_seconds_count") == e2e + 3


def test_finished_requests_fill_the_latency_histograms(instance):
    before = {m: metric(instance, f"caraserve_instance_{m}_count") for m in ("ttft_seconds", "tpot_seconds",
                                                                           "e2e_seconds")}
    finished = metric(instance, "caraserve_instance_requests_total", outcome="finished")
    token_ids(instance, None, n=4)
    with requests.post(instance.url + "/generate_stream", json={"inputs": "hi", "parameters": {
            "max_new_tokens": 3, "ignore_eos": True}}, stream=True, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["finished"] and len(events) == 3
    for m, value in before.items():
        assert metric(instance, f"caraserve_instance_{m}_count") == value + 2, m
    assert metric(instance, "caraserve_instance_requests_total", outcome="finished") == finished + 2


# ------------------------------------------------------------------------- health and faults


def test_health_answers_while_the_router_loop_is_stuck(instance):
    """A router that cannot answer (stopped here, as a very long step would hold it): /health,
    liveness, still answers at once; /ready says not ready; both recover."""
    router = requests.get(instance.url + "/health", timeout=10).json()["processes"]["router"]
    os.kill(router, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert requests.get(instance.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 1.0
        assert requests.get(instance.url + "/ready", timeout=30).status_code == 503
    finally:
        os.kill(router, signal.SIGCONT)
    assert requests.get(instance.url + "/ready", timeout=30).status_code == 200


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_dead_router_ends_requests_and_the_instance(instance):
    """Keep it the last test on the module's instance, which does not survive it: the model
    process (the router, with the model worker inside) is SIGKILLed under a streaming request.
    (Any child's death takes the same path: tests/lightllm_patches/test_child_watch.py.)"""
    pid = requests.get(instance.url + "/health", timeout=10).json()["processes"]["router"]
    with requests.post(instance.url + "/generate_stream", json={"inputs": "hi", "parameters": LONG}, stream=True,
                       timeout=60) as r:
        lines = (line for line in r.iter_lines() if line.startswith(b"data:"))
        assert "token" in json.loads(next(lines)[5:])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        last = json.loads(list(lines)[-1][5:])
    assert time.monotonic() - killed < 5, "the stream did not end promptly"
    assert last["error"]["code"] == 503 and "router" in last["error"]["message"]
    assert instance.proc.wait(15) == 1, "the instance must exit (status 1) for its supervisor to restart it"
    assert wait_for(lambda: group_alive(instance.proc.pid) == [], 10), group_alive(instance.proc.pid)
    assert own_shm(instance.port) == []


def test_killed_http_process_takes_its_children(tiny_llama_adapters, tmp_path):
    model_dir, adapters = tiny_llama_adapters
    with start(model_dir, adapters[0].parent, tmp_path / "instance.log") as srv:
        children = requests.get(srv.url + "/health", timeout=10).json()["processes"]
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        assert wait_for(lambda: all(_gone(children[k]) for k in ("router", "detokenizer")), 15)
        assert wait_for(lambda: own_shm(srv.port) == [], 10), own_shm(srv.port)
