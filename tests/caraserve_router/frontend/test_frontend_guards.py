"""The front end against careless and hostile clients (issue 11), on a live tiny-model server:
API key, body limit, bounded waiting queue (429), errors in OpenAI's shape for every route,
adapter paths confined to their roots, disconnects that cancel work, latency metrics, the
OpenAI Python client, and a perf model reused from the cache."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from caraserve_router.evaluation.server_process import RunningServer
from caraserve_router.contracts.device_kind import kind_name
from caraserve_router.frontend.perf_bootstrap import cache_path
from caraserve_router.scheduling.perf_model import PerfModel
from tests import fixtures
from tests.testing import wait_until

pytestmark = pytest.mark.slow
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 6000  # output tokens of a request that stays in flight for many seconds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fixtures.tiny_llama_with_adapters(tmp_path_factory.mktemp("guards"), ranks=(4,))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    model_dir, adapters = tiny
    logs = tmp_path_factory.mktemp("guards-server")
    cache = logs / "perf_cache"
    # A perf model cached by an "earlier start" of this model on this device: reused, no profile.
    path = cache_path(str(cache), str(model_dir), kind_name("cpu"), "mbgmv", "pipeline")
    path.parent.mkdir(parents=True)
    PerfModel.load(fixtures_perf_model()).save(path)
    srv = RunningServer("caraserve_router.api_server", [
        "--model-dir", str(model_dir), "--adapters", str(adapters[0].parent), "--policy", "rank-aware",
        "--perf-model-cache", str(cache), "--lora-mode", "pipeline", "--lora-pool-mb", "4", "--lora-max-rank", "8",
        "--api-key", KEY, "--max-body-bytes", "65536", "--max-waiting", "2", "--running-max-req-size", "2",
        "--max-req-total-len", "8192", "--max-req-input-len", "256", "--max-total-token-num", "32768",
        "--stats-interval-s", "0.3",
        "--log-dir", str(logs)], logs / "server.log")
    with srv:
        yield srv
    assert srv.leftover_procs == [] and srv.leftover_shm == set()


def fixtures_perf_model():
    from pathlib import Path
    return Path(__file__).resolve().parents[3] / "data" / "perf_models" / "paper_a100_llama2_7b.json"


def post(server, path, body=None, headers=AUTH, **kw):
    return requests.post(server.url + path, json=body, headers=headers, timeout=kw.pop("timeout", 120), **kw)


def assert_openai_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status, err


def stats(server):
    return requests.get(server.url + "/stats", headers=AUTH, timeout=30).json()


def metric(server, name, **labels) -> float:
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_cached_perf_model_is_reused(server):
    s = stats(server)
    assert s["policy"] == "rank-aware" and not s["profiling"], s
    assert "assumed, from paper figures" in s["perf_model"]


def test_api_key_on_every_route_but_health(server):
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/stats"), ("POST", "/v1/completions"),
                         ("POST", "/generate"), ("POST", "/v1/load_lora_adapter"), ("GET", "/no/such/route")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = requests.request(method, server.url + path, json={}, headers=headers, timeout=30)
            assert_openai_error(r, 401)
    assert requests.get(server.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200


@pytest.mark.parametrize("path,raw,status", [
    ("/v1/nope", b"{}", 404),
    ("/v1/completions", b"\xff\xfe{", 400),                                   # not UTF-8
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b'{"model": "base", "prompt": "abc \\ud800"}', 400),  # lone surrogate
    ("/v1/load_lora_adapter", b'{"lora_name": "\\udc00", "lora_path": "/x"}', 400),
    ("/v1/completions", b'{"model": "base", "prompt": 5}', 400),
    ("/v1/completions", b'{"model": "base", "prompt": "hi", "max_tokens": "x"}', 400),
    ("/v1/completions", b'{"model": "base", "prompt": "hi", "bogus_option": 1}', 400),  # never silently ignored
    ("/v1/completions", b'{"model": "base", "prompt": ["a", "b"]}', 400),     # several prompts: clear 400
    ("/v1/completions", b'{"model": "base", "prompt": "hi", "logit_bias": {"5": 1}}', 400),
    ("/v1/completions", b'{"model": "base", "prompt": "hi", "suffix": "x"}', 400),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "x"}], '
                             b'"response_format": {"type": "json_object"}}', 400),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "x"}], '
                             b'"top_logprobs": 2}', 400),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "tool", "content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     400),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": "many"}}', 400),
    ("/v1/unload_lora_adapter", b'{"lora_name": 5}', 400),
])
def test_bad_input_gets_a_4xx_in_openai_shape(server, path, raw, status):
    r = requests.post(server.url + path, data=raw, headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert_openai_error(r, status)


def test_wrong_method_is_405_in_openai_shape(server):
    assert_openai_error(requests.get(server.url + "/v1/completions", headers=AUTH, timeout=30), 405)


def test_body_limit(server):
    big = {"model": "base", "prompt": "x " * 40000}
    assert_openai_error(post(server, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: the limit must hold on the bytes read
        for _ in range(100):
            yield b" " * 1024
    r = requests.post(server.url + "/v1/completions", data=chunks(), headers={**AUTH, "content-type": "application/json"},
                      timeout=60)
    assert_openai_error(r, 413)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_adapter_paths_are_confined_to_roots(server, tiny, tmp_path):
    model_dir, adapters = tiny
    root = adapters[0].parent
    assert_openai_error(post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "lora-r4-0"}), 400)
    outside = [post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": p}) for p in
               (str(tmp_path), "/nonexistent/adapter", str(root / ".." / root.name / ".." / "x"))]
    for r in outside:
        assert_openai_error(r, 400)
    # The same words whether the path exists or not, and nothing about the server's directories.
    assert len({r.json()["error"]["message"] for r in outside}) == 1
    assert os.getcwd() not in outside[0].text and str(tmp_path) not in outside[0].text
    # A symlink inside the root that points outside is outside.
    link = root / "escape"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        assert_openai_error(post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(link)}), 400)
    finally:
        link.unlink()
    copy = root / "copy-r4"
    shutil.copytree(adapters[0], copy)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "copy", "lora_path": str(copy)})
    assert r.status_code == 200 and r.json()["rank"] == 4, r.text
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "copy"}).status_code == 200


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    ids = {m.id: m for m in client.models.list().data}
    assert "lora-r4-0" in ids and all(m.created > 0 for m in ids.values())
    assert client.models.retrieve("lora-r4-0").id == "lora-r4-0"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    done = client.completions.create(model="lora-r4-0", prompt=["Hello"], max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(
        model="base", max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
                  {"role": "user", "content": "Hi"}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert sum(1 for c in chunks[:-1] if c.choices) == 6
    for bad in ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                {"response_format": {"type": "json_object"}}, {"logit_bias": {"5": 1}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], **bad)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def _long(server, stream=False, **kw):
    body = {"model": "base", "prompt": "Tell me a story", "max_tokens": LONG, "ignore_eos": True, "stream": stream}
    return requests.post(server.url + "/v1/completions", json=body, headers=AUTH, stream=stream, **kw)


class Held:
    """A client with a long request that reads everything it is sent (so the request keeps
    running at the instance) until it leaves: `close()` is its disconnect. (requests' own
    streams close when their line iterator is dropped, which is a disconnect already.)"""

    def __init__(self, server, stream=True):
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"model": "base", "prompt": "Tell me a story", "max_tokens": LONG, "ignore_eos": True,
                           "stream": stream}).encode()
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          + f"Authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        self.received = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk[:64] if len(self.received) < 64 else b""
        except OSError:
            pass

    def started(self) -> bool:
        return self.received.startswith(b"HTTP/1.1 200")

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(5)


def _held(server, stream=True) -> Held:
    return Held(server, stream)


def _running(server) -> int:
    inst = stats(server)["instances"][0]["stats"]
    return len(inst.get("running", [])) + len(inst.get("queued", []))


def test_waiting_queue_is_bounded_429(server):
    # batch limit 2 (running-max-req-size) + 2 waiting: beyond that, 429 with Retry-After.
    held = [_held(server) for _ in range(2)]
    assert wait_until(lambda: all(h.started() for h in held), 60, interval_s=0.1)  # running
    held += [_held(server) for _ in range(2)]
    try:
        assert wait_until(lambda: stats(server)["waiting"] == 2, 60, interval_s=0.1), \
            json.dumps(stats(server))[:2000]
        for _ in range(3):
            r = _long(server, timeout=60)
            assert_openai_error(r, 429)
            assert 1 <= int(r.headers["Retry-After"]) <= 60
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: _running(server) == 0 and stats(server)["waiting"] == 0, 20, interval_s=0.1)


def test_disconnects_cancel_running_and_waiting_requests(server):
    cancelled = metric(server, "caraserve_requests_total", outcome="cancelled")
    # Two streams fill the batch, a third request waits in the front end; then all leave.
    streams = [_held(server) for _ in range(2)]
    assert wait_until(lambda: all(h.started() for h in streams), 60, interval_s=0.1)
    waiting = _held(server, stream=False)
    assert wait_until(lambda: stats(server)["waiting"] == 1, 30, interval_s=0.1)
    waiting.close()
    assert wait_until(lambda: stats(server)["waiting"] == 0, 10, interval_s=0.1), "a departed client's queued request was not dropped"
    assert wait_until(lambda: _running(server) == 2, 10, interval_s=0.1), "the two streams run on"  # stats lag a poll
    t0 = time.time()
    for sock in streams:
        sock.close()
    # Each would run for LONG tokens; the instance must free their slots within a few steps.
    assert wait_until(lambda: _running(server) == 0, 15, interval_s=0.1), "departed streams still run at the instance"
    assert time.time() - t0 < 15
    # A non-streaming client that leaves mid-generation frees its slot too.
    sock = _held(server, stream=False)
    assert wait_until(lambda: _running(server) == 1, 30, interval_s=0.1)
    sock.close()
    assert wait_until(lambda: _running(server) == 0, 15, interval_s=0.1), "a departed non-streaming request still runs"
    assert wait_until(lambda: metric(server, "caraserve_requests_total", outcome="cancelled") >= cancelled + 4, 10, interval_s=0.1)


def test_latency_histograms_filled_however_requests_end(server):
    before = metric(server, "caraserve_e2e_seconds_count")
    ok = post(server, "/v1/completions", {"model": "base", "prompt": "1, 2, 3,", "max_tokens": 8, "stop": [","]})
    assert ok.status_code == 200
    assert metric(server, "caraserve_e2e_seconds_count") >= before + 1
    assert metric(server, "caraserve_ttft_seconds_count") >= 1 and metric(server, "caraserve_tpot_seconds_count") >= 1
