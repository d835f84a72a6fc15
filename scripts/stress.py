"""Fault and abuse suite against a live CaraServe server it starts (issue 11).

    python scripts/stress.py --out stress.json [--model-dir D] [--keep-log server.log]

Runs, in order, against one server (default model, one local instance):
1. a burst of 4x the server's capacity (batch + waiting queue): every request is answered or
   refused with 429; p50/p99 latency of the answered ones; peak RSS of every process;
2. disconnects mid-stream and mid-wait: the instance must be idle again shortly after;
3. bad input: a fixed list of kinds (>= 40) plus JSON bodies fuzzed with hypothesis: every one
   must get a 4xx in OpenAI's error shape, and the server must keep serving;
4. a kill -9 of each process of the instance (its HTTP server, then each child) under load:
   time until a new request succeeds again (capped; then the whole instance is killed so the
   front end restarts it, and that is reported);
5. SIGTERM under load: time until every process has ended; what the clients saw.
A request is *lost* when its client got no answer within its timeout, a connection reset, a
stream cut without an error event, or a 500 (the server's fault). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
LONG = 400


class Server:
    def __init__(self, args, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"caraserve_stress_{uuid.uuid4().hex[:6]}"
        self.args, self.log = args, log

    def start(self) -> float:
        cmd = [sys.executable, "-m", "caraserve_router.api_server", "--port", str(self.port),
               "--shm-prefix", self.prefix, *self.args]
        self.out = open(self.log, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_until(lambda: health(self.url), 600):
            raise RuntimeError(f"server did not start; see {self.log}")
        return time.monotonic() - t0

    def instance_procs(self) -> list[psutil.Process]:
        """The local instance's processes: its main process (found by its shm prefix) and children."""
        mains = [p for p in psutil.process_iter(["cmdline"]) if p.pid != self.proc.pid
                 and any(self.prefix in part for part in (p.info["cmdline"] or []))
                 and "lightllm_patches.instance" in " ".join(p.info["cmdline"] or [])]
        out = []
        for m in mains:
            out += [m, *m.children(recursive=True)]
        return out

    def all_procs(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *self.instance_procs()]
        except psutil.NoSuchProcess:
            return self.instance_procs()

    def kill_all(self) -> None:
        for p in self.all_procs():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for name in os.listdir("/dev/shm"):
            if name.startswith(self.prefix):
                os.unlink(os.path.join("/dev/shm", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url) -> bool:
    try:
        return requests.get(url + "/health", timeout=3).status_code == 200
    except requests.RequestException:
        return False


def wait_until(predicate, timeout_s, step=0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def request(url, i, max_tokens=LONG, timeout=600) -> dict:
    """One completion; its outcome as the client saw it."""
    stream = i % 2 == 0
    body = {"model": "base", "prompt": f"Request {i}: tell me a story", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    t0 = time.monotonic()
    try:
        r = requests.post(url + "/v1/completions", json=body, stream=stream, timeout=timeout)
        if r.status_code != 200:
            kind = r.json().get("error", {}).get("type", "?") if "json" in r.headers.get("content-type", "") else "text"
            outcome = f"http {r.status_code}" if r.status_code < 500 or kind != "text" else "lost: text 500"
            if r.status_code == 500:
                outcome = "lost: 500"
        elif not stream:
            outcome = "ok"
        else:
            lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
            last = lines[-1] if lines else ""
            outcome = "ok" if last == "data: [DONE]" else ("error event" if '"error"' in last else "lost: stream cut")
    except requests.Timeout:
        outcome = "lost: timeout"
    except requests.ConnectionError as e:
        outcome = "refused" if "refused" in str(e).lower() else "lost: connection reset"
    return {"i": i, "outcome": outcome, "s": time.monotonic() - t0}


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def rss_mb(server: Server) -> float:
    total = 0
    for p in server.all_procs():
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def burst(server: Server, capacity: int) -> dict:
    n = 4 * capacity
    peak = [rss_mb(server)]
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(request, server.url, i, 64) for i in range(n)]
        while not all(f.done() for f in futures):
            peak.append(rss_mb(server))
            time.sleep(0.5)
        results = [f.result() for f in futures]
    ok = [r["s"] for r in results if r["outcome"] == "ok"]
    return {"requests": n, "ok": len(ok), "429": sum(r["outcome"] == "http 429" for r in results),
            "lost": sum(r["outcome"].startswith("lost") for r in results),
            "other": sorted({r["outcome"] for r in results} - {"ok", "http 429"}),
            "p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99), "peak_rss_mb": max(peak)}


def _busy(server: Server) -> int:
    s = requests.get(server.url + "/stats", timeout=10).json()
    inst = s["instances"][0]["stats"] or {}
    return len(inst.get("running", [])) + len(inst.get("queued", [])) + s["waiting"]


def _raw_request(server: Server, stream: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": "base", "prompt": "disconnect me", "max_tokens": LONG, "ignore_eos": True,
                       "stream": stream}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                 + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def disconnects(server: Server, capacity: int) -> dict:
    socks = [_raw_request(server, True) for _ in range(capacity)]      # fill the batch, mid-stream
    time.sleep(3)
    socks += [_raw_request(server, False) for _ in range(4)]           # these wait for room
    wait_until(lambda: requests.get(server.url + "/stats", timeout=10).json()["waiting"] >= 1, 30)
    t0 = time.monotonic()
    for s in socks:
        s.close()
    idle = wait_until(lambda: _busy(server) == 0, 60)
    return {"clients": len(socks), "idle_after_s": time.monotonic() - t0 if idle else None}


BAD = [  # (kind, method, path, body bytes or JSON, headers)
    ("unknown route", "GET", "/v1/nothing", None, {}),
    ("wrong method", "GET", "/v1/completions", None, {}),
    ("wrong method on generate", "PUT", "/generate", b"{}", {}),
    ("not JSON", "POST", "/v1/completions", b"{oops", {}),
    ("invalid UTF-8", "POST", "/v1/completions", b"\xff\xfe\xfd", {}),
    ("empty body", "POST", "/v1/completions", b"", {}),
    ("JSON array body", "POST", "/v1/completions", b"[1, 2]", {}),
    ("JSON string body", "POST", "/v1/completions", b'"hi"', {}),
    ("null body", "POST", "/v1/completions", b"null", {}),
    ("lone surrogate in prompt", "POST", "/v1/completions", b'{"model": "base", "prompt": "abc \\ud800"}', {}),
    ("lone low surrogate in chat", "POST", "/v1/chat/completions",
     b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}]}', {}),
    ("surrogate in model name", "POST", "/v1/completions", b'{"model": "\\ud83d", "prompt": "x"}', {}),
    ("no model", "POST", "/v1/completions", {"prompt": "hi"}, {}),
    ("unknown model", "POST", "/v1/completions", {"model": "nope", "prompt": "hi"}, {}),
    ("prompt wrong type", "POST", "/v1/completions", {"model": "base", "prompt": 5}, {}),
    ("prompt object", "POST", "/v1/completions", {"model": "base", "prompt": {"a": 1}}, {}),
    ("empty prompt list", "POST", "/v1/completions", {"model": "base", "prompt": []}, {}),
    ("two prompts", "POST", "/v1/completions", {"model": "base", "prompt": ["a", "b"]}, {}),
    ("negative token id", "POST", "/v1/completions", {"model": "base", "prompt": [-1, 5]}, {}),
    ("token id past vocab", "POST", "/v1/completions", {"model": "base", "prompt": [10**9]}, {}),
    ("max_tokens 0", "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 0}, {}),
    ("max_tokens string", "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": "x"}, {}),
    ("max_tokens huge", "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 10**9}, {}),
    ("temperature 5", "POST", "/v1/completions", {"model": "base", "prompt": "x", "temperature": 5}, {}),
    ("top_p 0", "POST", "/v1/completions", {"model": "base", "prompt": "x", "top_p": 0}, {}),
    ("n 2", "POST", "/v1/completions", {"model": "base", "prompt": "x", "n": 2}, {}),
    ("best_of 3", "POST", "/v1/completions", {"model": "base", "prompt": "x", "best_of": 3}, {}),
    ("logprobs", "POST", "/v1/completions", {"model": "base", "prompt": "x", "logprobs": 2}, {}),
    ("echo", "POST", "/v1/completions", {"model": "base", "prompt": "x", "echo": True}, {}),
    ("suffix", "POST", "/v1/completions", {"model": "base", "prompt": "x", "suffix": "y"}, {}),
    ("logit_bias", "POST", "/v1/completions", {"model": "base", "prompt": "x", "logit_bias": {"1": 5}}, {}),
    ("unknown parameter", "POST", "/v1/completions", {"model": "base", "prompt": "x", "frobnicate": 1}, {}),
    ("five stop strings", "POST", "/v1/completions", {"model": "base", "prompt": "x", "stop": list("abcde")}, {}),
    ("empty stop string", "POST", "/v1/completions", {"model": "base", "prompt": "x", "stop": [""]}, {}),
    ("stream_options without stream", "POST", "/v1/completions",
     {"model": "base", "prompt": "x", "stream_options": {"include_usage": True}}, {}),
    ("seed negative", "POST", "/v1/completions", {"model": "base", "prompt": "x", "seed": -1}, {}),
    ("prompt too long", "POST", "/v1/completions", {"model": "base", "prompt": "x " * 5000}, {}),
    ("body over the limit", "POST", "/v1/completions", {"model": "base", "prompt": "x" * (2 << 20)}, {}),
    ("empty messages", "POST", "/v1/chat/completions", {"model": "base", "messages": []}, {}),
    ("unknown role", "POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "x"}]},
     {}),
    ("tool role", "POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "tool", "content": "x"}]}, {}),
    ("image content part", "POST", "/v1/chat/completions",
     {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {}),
    ("content wrong type", "POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": 5}]},
     {}),
    ("tools", "POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                 "tools": [{"type": "function", "function": {"name": "f"}}]}, {}),
    ("response_format json", "POST", "/v1/chat/completions",
     {"model": "base", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, {}),
    ("top_logprobs", "POST", "/v1/chat/completions",
     {"model": "base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, {}),
    ("generate without prompt", "POST", "/generate", {"parameters": {"max_new_tokens": 4}}, {}),
    ("generate both prompts", "POST", "/generate", {"inputs": "x", "input_ids": [1], "parameters": {}}, {}),
    ("generate unknown parameter", "POST", "/generate", {"inputs": "x", "parameters": {"bogus": 1}}, {}),
    ("generate top_k 0", "POST", "/generate", {"inputs": "x", "parameters": {"top_k": 0}}, {}),
    ("generate unknown adapter", "POST", "/generate_stream", {"inputs": "x", "adapter": "nope"}, {}),
    ("load relative path", "POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "../etc"}, {}),
    ("load outside roots", "POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/etc"}, {}),
    ("load base name", "POST", "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "/tmp"}, {}),
    ("load missing fields", "POST", "/v1/load_lora_adapter", {"lora_name": "a"}, {}),
    ("unload unknown", "POST", "/v1/unload_lora_adapter", {"lora_name": "nope"}, {}),
    ("unload wait negative", "POST", "/v1/unload_lora_adapter", {"lora_name": "x", "wait_s": -1}, {}),
    ("models retrieve unknown", "GET", "/v1/models/nope", None, {}),
]


def bad_inputs(server: Server, fuzz_examples: int) -> dict:
    failures, statuses = [], {}
    for kind, method, path, body, headers in BAD:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        r = requests.request(method, server.url + path, data=data, timeout=60,
                             headers={"content-type": "application/json", **headers})
        statuses[kind] = r.status_code
        shaped = "json" in r.headers.get("content-type", "") and "message" in r.json().get("error", {})
        if not (400 <= r.status_code < 500 and shaped):
            failures.append({"kind": kind, "status": r.status_code, "body": r.text[:200]})
    fuzzed = fuzz(server, fuzz_examples, failures)
    return {"kinds": len(BAD), "fuzzed": fuzzed, "failures": failures, "statuses": statuses,
            "serving_after": health(server.url)}


def fuzz(server: Server, examples: int, failures: list) -> int:
    """JSON bodies from hypothesis for the OpenAI routes: never a 5xx."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                                inner, max_size=4),
                          max_leaves=10)
    fields = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed",
                              "stream", "n", "stream_options", "presence_penalty", "top_k"])
    bodies = st.dictionaries(fields, values, max_size=6).map(lambda d: {"model": "base", **d})
    count = [0]

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def one(body, path):
        if isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = max(1, min(body["max_tokens"], 4))  # a valid one must end fast
        count[0] += 1
        try:
            r = requests.post(server.url + path, json=body, timeout=120)
        except requests.RequestException as e:
            failures.append({"kind": "fuzz", "body": str(body)[:200], "status": type(e).__name__})
            return
        if r.status_code >= 500:
            failures.append({"kind": "fuzz", "body": str(body)[:200], "status": r.status_code, "text": r.text[:200]})

    one()
    return count[0]


def kills(server: Server, recover_cap_s: float) -> list:
    out = []
    procs = server.instance_procs()
    roles = ["instance HTTP (main)"] + [f"child {i} ({' '.join(p.cmdline()[-2:])[:40]})"
                                       for i, p in enumerate(procs[1:])]
    for role_index, role in enumerate(roles):
        procs = server.instance_procs()
        if role_index >= len(procs):
            break
        victim = procs[role_index]
        with cf.ThreadPoolExecutor(6) as pool:
            load = [pool.submit(request, server.url, i, 48, 240) for i in range(6)]
            time.sleep(2)
            t0 = time.monotonic()
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
            ok = wait_until(lambda: request(server.url, 1, 2, 60)["outcome"] == "ok", recover_cap_s, step=1)
            recovered = time.monotonic() - t0 if ok else None
            note = ""
            if not ok:  # the instance did not notice: kill all of it so the front end restarts it
                for p in server.instance_procs():
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                ok = wait_until(lambda: request(server.url, 1, 2, 60)["outcome"] == "ok", 180, step=1)
                note = "recovered only after the whole instance was killed" if ok else "not recovered"
            results = [f.result() for f in load]
        out.append({"fault": f"kill -9 {role}", "recovered_s": recovered, "note": note,
                    "lost": sum(r["outcome"].startswith("lost") for r in results),
                    "outcomes": sorted({r["outcome"] for r in results})})
        wait_until(lambda: health(server.url), 120)
    return out


def sigterm(server: Server, timeout_s: float) -> dict:
    with cf.ThreadPoolExecutor(12) as pool:
        load = [pool.submit(request, server.url, i, LONG, 120) for i in range(12)]
        time.sleep(3)
        procs = server.all_procs()
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        gone = wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs),
                          timeout_s + 30, step=0.2)
        took = time.monotonic() - t0
        results = [f.result() for f in load]
    server.proc.wait(10)
    shm = [n for n in os.listdir("/dev/shm") if n.startswith(server.prefix)]
    return {"all_ended_s": took if gone else None, "limit_s": timeout_s, "shm_left": shm,
            "lost": sum(r["outcome"].startswith("lost") for r in results),
            "outcomes": {o: sum(r["outcome"] == o for r in results) for o in sorted({r["outcome"] for r in results})}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="stress.json", help="JSON report (default stress.json)")
    parser.add_argument("--model-dir", default="", help="model (default: the default model)")
    parser.add_argument("--batch", type=int, default=8, help="instance batch limit (--running-max-req-size)")
    parser.add_argument("--max-waiting", type=int, default=8, help="front-end waiting queue bound")
    parser.add_argument("--shutdown-timeout-s", type=float, default=20.0)
    parser.add_argument("--fuzz-examples", type=int, default=60, help="hypothesis-generated bodies")
    parser.add_argument("--recover-cap-s", type=float, default=60.0, help="longest wait for recovery after a kill")
    parser.add_argument("--skip-kills", action="store_true", help="skip the process kills (fastest run)")
    parser.add_argument("--keep-log", default="", help="server log path (default: a temporary file)")
    args = parser.parse_args(argv)
    log = Path(args.keep_log or tempfile.mkstemp(prefix="stress-", suffix=".log")[1])
    flags = ["--lora-mode", "pipeline", "--policy", "round-robin", "--running-max-req-size", str(args.batch),
             "--max-waiting", str(args.max_waiting), "--shutdown-timeout-s", str(args.shutdown_timeout_s),
             "--health-interval-s", "0.5", "--log-dir", str(log.parent / f"{log.stem}-instances")]
    if args.model_dir:
        flags += ["--model-dir", args.model_dir]
    server = Server(flags, log)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
              "flags": flags, "log": str(log)}
    try:
        report["start_s"] = server.start()
        capacity = args.batch + args.max_waiting
        print(f"server up in {report['start_s']:.0f} s; capacity {capacity}", flush=True)
        report["burst"] = burst(server, capacity)
        print("burst:", report["burst"], flush=True)
        report["disconnects"] = disconnects(server, args.batch)
        print("disconnects:", report["disconnects"], flush=True)
        report["bad_input"] = bad_inputs(server, args.fuzz_examples)
        print("bad input:", {k: v for k, v in report["bad_input"].items() if k != "statuses"}, flush=True)
        report["kills"] = [] if args.skip_kills else kills(server, args.recover_cap_s)
        for k in report["kills"]:
            print("fault:", k, flush=True)
        report["sigterm"] = sigterm(server, args.shutdown_timeout_s)
        print("sigterm:", report["sigterm"], flush=True)
    finally:
        server.kill_all()
    lost = report["burst"]["lost"] + sum(k["lost"] for k in report["kills"]) + report["sigterm"]["lost"]
    faults = report["kills"] + [{"fault": "SIGTERM under load", "recovered_s": report["sigterm"]["all_ended_s"]}]
    report["summary"] = {
        "requests_lost": lost,
        "faults": len(faults),
        "faults_survived": sum(1 for k in report["kills"] if k["recovered_s"] is not None)
        + (report["sigterm"]["all_ended_s"] is not None),
        "bad_inputs_tried": report["bad_input"]["kinds"] + report["bad_input"]["fuzzed"],
        "bad_input_kinds": report["bad_input"]["kinds"],
        "bad_inputs_failed": len(report["bad_input"]["failures"]),
        "max_recover_s": max((k["recovered_s"] for k in report["kills"] if k["recovered_s"] is not None), default=None),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("\n| measure | value |\n|---|---|")
    for k, v in report["summary"].items():
        print(f"| {k} | {v} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
