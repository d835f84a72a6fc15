"""scripts/replay.py against a fake streaming server on 127.0.0.1 (port 0), started and stopped here.

The fake server serves four adapters whose behaviour is set by their rank, so the workload's
round-robin ranks decide every request's fate:
    rank 8  "ok-8":    30 ms, then 3 tokens 20 ms apart, then [DONE]         -> ok
    rank 16 "bad-16":  HTTP 404 with an OpenAI error body                     -> http_404
    rank 32 "mid-32":  2 tokens, then a mid-stream error event               -> stream_error
    rank 64 "hang-64": 1 token, then nothing until the client gives up (1 s)  -> timeout
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from pathlib import Path

import pytest
from aiohttp import web

from caraserve_router.evaluation.replay_client import ReplayError, check_loopback, map_adapters

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("replay_script", REPO / "scripts" / "replay.py")
replay_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replay_script)

ADAPTERS = {"ok-8": 8, "bad-16": 16, "mid-32": 32, "hang-64": 64}
EXPECTED_STATUS = {8: "ok", 16: "http_404", 32: "stream_error", 64: "timeout"}
EXPECTED_TOKENS = {8: 3, 16: 0, 32: 2, 64: 1}


def event(text, finish=None):
    return ("data: " + json.dumps({"id": "x", "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
            + "\n\n").encode()


class FakeServer:
    """aiohttp app in its own thread and loop."""

    def __init__(self, adapters):
        self.adapters = dict(adapters)
        self.bodies, self.loads = [], []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        self.stop_event = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _stop(self):
        self.stop_event.set()
        await self.runner.cleanup()

    async def models(self, request):
        data = [{"id": "base", "object": "model", "rank": None, "target_modules": [], "base_model": True}]
        data += [{"id": n, "object": "model", "rank": r, "target_modules": ["q_proj"], "base_model": False}
                 for n, r in self.adapters.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request):
        body = await request.json()
        self.loads.append(body)
        rank = json.loads((Path(body["lora_path"]) / "adapter_config.json").read_text())["r"]
        self.adapters[body["lora_name"]] = rank
        return web.json_response({"ok": True})

    async def completions(self, request):
        body = await request.json()
        self.bodies.append(body)
        model = body["model"]
        if model.startswith("bad"):
            return web.json_response({"error": {"message": "no such adapter", "type": "not_found", "code": 404}},
                                     status=404)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.03)
        n = body["max_tokens"]
        for i in range(n):
            if model.startswith("mid") and i == 2:
                await resp.write(b'data: {"error": {"message": "boom", "type": "server_error", "code": 500}}\n\n')
                return resp
            if model.startswith("hang") and i == 1:
                try:
                    await asyncio.wait_for(self.stop_event.wait(), 30)
                except asyncio.TimeoutError:
                    pass
                return resp
            await resp.write(event("t", "length" if i == n - 1 else None))
            if i < n - 1:
                await asyncio.sleep(0.02)
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
def server():
    with FakeServer(ADAPTERS) as s:
        yield s


def run_replay(url, tmp_path, *extra):
    out = tmp_path / "r.json"
    rc = replay_script.main(["--url", url, "--arrival", "poisson", "--rate", "40", "--max-requests", "16",
                             "--duration", "30", "--length-source", "fixed", "--prompt-len", "7",
                             "--output-len", "3", "--num-adapters", "4", "--popularity", "uniform",
                             "--request-timeout", "1.0", "--progress-s", "0", "--out", str(out), *extra])
    return rc, out


def test_replay_records_every_request_with_its_status(server, tmp_path):
    rc, out = run_replay(server.url, tmp_path, "--slo-tpot-ms", "1000")
    assert rc == 0
    res = json.loads(out.read_text())
    reqs = res["requests"]
    assert len(reqs) == 16 and sorted(r["index"] for r in reqs) == list(range(16))
    assert len(server.bodies) == 16
    for r in reqs:
        assert r["model"] == {8: "ok-8", 16: "bad-16", 32: "mid-32", 64: "hang-64"}[r["rank"]]
        assert r["status"] == EXPECTED_STATUS[r["rank"]], r
        assert r["tokens"] == EXPECTED_TOKENS[r["rank"]], r
    ok = [r for r in reqs if r["status"] == "ok"]
    assert ok, "the seeded workload has rank-8 requests"
    for r in ok:
        assert r["ttft_ms"] >= 25                    # the server waits 30 ms before the first token
        assert 15 <= r["tpot_ms"] <= 200             # 20 ms between tokens
        assert r["e2e_ms"] >= r["ttft_ms"] + 2 * r["tpot_ms"] - 1
    for r in reqs:
        if r["status"] == "http_404":
            assert r["http_status"] == 404 and r["error"] == "no such adapter" and r["ttft_ms"] is None
        if r["status"] == "stream_error":
            assert r["error"] == "boom"
        if r["status"] == "timeout":
            assert r["ttft_ms"] is not None and r["e2e_ms"] is None
    s = res["summary"]
    assert s["requests"] == 16 and s["ok"] == len(ok)
    assert s["statuses"] == {st: sum(1 for r in reqs if r["status"] == st) for st in s["statuses"]}
    assert s["slo_attainment"] == pytest.approx(len(ok) / 16)      # failures are misses
    assert (tmp_path / "r_cdf.png").stat().st_size > 0
    # the wire format: token-id prompts of the exact length in the safe range, streaming, ignore_eos
    for body in server.bodies:
        assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0
        assert body["max_tokens"] == 3 and len(body["prompt"]) == 7
        assert all(isinstance(t, int) and 1000 <= t < 30000 for t in body["prompt"])


def test_tight_slo_and_ttft_slo(server, tmp_path):
    rc, out = run_replay(server.url, tmp_path, "--slo-tpot-ms", "5")
    assert rc == 0
    assert json.loads(out.read_text())["summary"]["slo_attainment"] == 0.0      # TPOT ~20 ms > 5 ms
    rc, out = run_replay(server.url, tmp_path, "--slo-tpot-ms", "1000", "--slo-ttft-ms", "10")
    assert json.loads(out.read_text())["summary"]["slo_attainment"] == 0.0      # TTFT >= 30 ms > 10 ms


def test_base_model_mode(server, tmp_path):
    rc, out = run_replay(server.url, tmp_path, "--base-model", "--max-requests", "3")
    res = json.loads(out.read_text())
    assert rc == 0 and [r["status"] for r in res["requests"]] == ["ok"] * 3
    assert {b["model"] for b in server.bodies} == {"base"}


def test_loads_missing_adapters_from_dir(tmp_path):
    adir = tmp_path / "adapters"
    for name, rank in (("demo-r8-0", 8), ("demo-r16-1", 16)):
        (adir / name).mkdir(parents=True)
        (adir / name / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
    with FakeServer({}) as srv:
        rc, out = run_replay(srv.url, tmp_path, "--adapters-dir", str(adir), "--ranks", "8,16",
                             "--max-requests", "4")
        assert rc == 0
        assert sorted(l["lora_name"] for l in srv.loads) == ["demo-r16-1", "demo-r8-0"]
        assert all(Path(l["lora_path"]).is_absolute() for l in srv.loads)
        res = json.loads(out.read_text())
        assert {r["model"] for r in res["requests"]} <= {"demo-r8-0", "demo-r16-1"}
        for r in res["requests"]:
            assert r["model"] == ("demo-r8-0" if r["rank"] == 8 else "demo-r16-1")


def test_missing_adapters_dir_without_make_flag(server, tmp_path, capsys):
    rc, _ = run_replay(server.url, tmp_path, "--adapters-dir", str(tmp_path / "nope"))
    assert rc == 2
    assert "--make-adapters" in capsys.readouterr().err


def test_refuses_non_loopback_hosts(capsys):
    for url in ("http://10.1.2.3:8000", "http://example.com:8000", "http://0.0.0.0:8000"):
        assert replay_script.main(["--url", url, "--max-requests", "1"]) == 2
        assert "non-loopback" in capsys.readouterr().err
    for url in ("http://127.0.0.1:1", "http://127.0.0.2:1", "http://[::1]:1", "http://localhost:1"):
        check_loopback(url)
    with pytest.raises(ReplayError, match="must look like"):
        check_loopback("ftp://127.0.0.1/")


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    import socket
    with socket.socket() as s:                       # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _ = run_replay(f"http://127.0.0.1:{port}", tmp_path)
    assert rc == 2 and "cannot reach" in capsys.readouterr().err


def test_map_adapters_same_rank_then_nearest():
    notes = []
    served = {"a8": 8, "b8": 8, "c32": 32}
    m = map_adapters(served, {0: 8, 4: 8, 8: 8, 2: 32, 1: 16}, notes)
    # indices in order 0, 1, 2, 4, 8; rank 16 has no adapter: nearest rank 8 (a tie would go to the lower);
    # the rank-8 pool is shared round robin: 0 -> a8, 1 -> b8, 4 -> a8, 8 -> b8
    assert m == {0: "a8", 1: "b8", 2: "c32", 4: "a8", 8: "b8"}
    assert any("rank 16" in n for n in notes)
    with pytest.raises(ReplayError, match="lists no adapters"):
        map_adapters({}, {0: 8}, [])


def test_compare_mode(server, tmp_path):
    rc, a = run_replay(server.url, tmp_path, "--label", "policy-a")
    b = tmp_path / "b.json"
    b.write_text(a.read_text().replace('"policy-a"', '"policy-b"'))
    png = tmp_path / "cmp.png"
    assert replay_script.main(["--compare", str(a), str(b), "--out", str(png)]) == 0
    assert png.stat().st_size > 0 and (tmp_path / "cmp_cdf.png").stat().st_size > 0
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert replay_script.main(["--compare", str(bad), "--out", str(png)]) == 2


def test_make_adapters_flag_creates_the_dir_first(tmp_path, monkeypatch):
    import caraserve_router.evaluation.replay_client as rc_mod

    calls = []

    def fake_make(directory, ranks, count, log):          # stands in for scripts/make_adapters.py
        calls.append((Path(directory), list(ranks), count))
        for i, r in enumerate(ranks):
            d = Path(directory) / f"demo-r{r}-{i}"
            d.mkdir(parents=True)
            (d / "adapter_config.json").write_text(json.dumps({"r": r}))

    monkeypatch.setattr(rc_mod, "make_adapters", fake_make)
    adir = tmp_path / "made"
    with FakeServer({}) as srv:
        rc, out = run_replay(srv.url, tmp_path, "--adapters-dir", str(adir), "--make-adapters",
                             "--ranks", "8,16", "--num-adapters", "2", "--max-requests", "3")
        assert rc == 0
        # ranks from --ranks; one adapter per rank at least (the 3 requests may use fewer)
        assert calls[0][:2] == (adir, [8, 16]) and calls[0][2] >= 2 and len(calls) == 1
        assert sorted(l["lora_name"] for l in srv.loads) == ["demo-r16-1", "demo-r8-0"]
        assert all(r["status"] == "ok" for r in json.loads(out.read_text())["requests"])
