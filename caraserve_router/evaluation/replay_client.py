"""Replay a workload against a running CaraServe api_server over HTTP (loopback only).

Open loop: request i is sent at its workload arrival time, whatever the server's state;
each one streams (``POST /v1/completions`` with ``stream: true``) so the arrival of the first
token and of every later one is observed. Prompts are token-id lists of the workload's exact
lengths (ids drawn from ``token_id_range``, seeded by request), with ``ignore_eos`` so outputs
have the workload's lengths.

Per request (one entry per request sent): status ``ok`` | ``http_<code>`` | ``stream_error``
| ``timeout`` | ``connection_error``, TTFT, TPOT ((last token - first token) / (tokens - 1)),
E2E, tokens received. The summary counts every request that was not ``ok`` as an SLO miss.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from caraserve_router.evaluation.workload import Request

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class ReplayError(RuntimeError):
    """Replay cannot run (bad URL, server unreachable, adapters missing, ...)."""


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay.

    url: base URL of the api_server; loopback hosts only (127.0.0.0/8, ::1, localhost).
    request_timeout_s: a request not finished after this long (from its send) is a timeout.
    slo_tpot_ms / slo_ttft_ms: SLO for attainment (TTFT optional).
    token_id_range: prompt token ids are drawn uniformly from [lo, hi) (safe ids of the vocab).
    seed: seed of the prompt ids.
    use_base_model: send every request to the base model instead of adapters.
    progress_s: seconds between progress lines (0: silent).
    save_token_times: keep every token's arrival time (ms from send) per request.
    """

    url: str = "http://127.0.0.1:8000"
    request_timeout_s: float = 300.0
    slo_tpot_ms: float = 40.0
    slo_ttft_ms: float | None = None
    token_id_range: tuple[int, int] = (1000, 30000)
    seed: int = 0
    use_base_model: bool = False
    progress_s: float = 5.0
    save_token_times: bool = False

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if not self.request_timeout_s > 0:
            raise ReplayError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if not self.slo_tpot_ms > 0 or (self.slo_ttft_ms is not None and not self.slo_ttft_ms > 0):
            raise ReplayError("SLOs must be > 0 ms")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ReplayError(f"token_id_range must be 0 <= lo < hi, got {self.token_id_range!r}")


def check_loopback(url: str) -> str:
    """The URL's host if it is a loopback address or name; ReplayError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReplayError(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    host = parts.hostname
    if host.lower() in LOOPBACK_NAMES:
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ReplayError(f"refusing to replay against non-loopback host {host!r}: this tool only talks to "
                      "a server on this machine (127.0.0.1, ::1 or localhost)")


# ---------------------------------------------------------------------- adapters
def local_adapters(directory: Path) -> dict[str, tuple[int, Path]]:
    """PEFT adapters under ``directory`` (subdirectories with adapter_config.json): name -> (rank, path)."""
    out = {}
    for sub in sorted(p for p in directory.iterdir() if (p / "adapter_config.json").is_file()):
        try:
            rank = int(json.loads((sub / "adapter_config.json").read_text())["r"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplayError(f"{sub}/adapter_config.json has no valid 'r': {exc}") from None
        out[sub.name] = (rank, sub.resolve())
    return out


def make_adapters(directory: Path, ranks: Sequence[int], count: int, log: Callable[[str], None]) -> None:
    """Run scripts/make_adapters.py (another component's tool) to create demo adapters."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_adapters.py"
    if not script.is_file():
        raise ReplayError(f"{script} not found; cannot make adapters")
    cmd = [sys.executable, str(script), "--out", str(directory), "--ranks", ",".join(map(str, ranks)),
           "--count", str(count)]
    log(f"making adapters: {' '.join(cmd)}")
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise ReplayError(f"make_adapters.py failed with exit code {done.returncode}")


def map_adapters(served: dict[str, int | None], indices_ranks: dict[int, int],
                 notes: list[str]) -> dict[int, str]:
    """Workload adapter index -> served adapter name, preferring a served adapter of the same rank.

    Indices of one rank are spread round robin over the served adapters of that rank
    (the workload may name more adapters than the server has); a rank nobody serves falls
    back to the served adapters of the nearest rank (noted).
    """
    by_rank: dict[int, list[str]] = {}
    for name, rank in sorted(served.items()):
        by_rank.setdefault(rank or 0, []).append(name)
    if not by_rank:
        raise ReplayError("the server lists no adapters; load some (--adapters-dir) or use --base-model")
    mapping, counters = {}, {}
    for idx in sorted(indices_ranks):
        rank = indices_ranks[idx]
        pool_rank = rank if rank in by_rank else min(by_rank, key=lambda r: (abs(r - rank), r))
        if pool_rank != rank and f"rank {rank}" not in " ".join(notes):
            notes.append(f"rank {rank}: no served adapter of that rank, using rank {pool_rank} ones")
        pool = by_rank[pool_rank]
        k = counters.get(pool_rank, 0)
        counters[pool_rank] = k + 1
        mapping[idx] = pool[k % len(pool)]
    return mapping


# ---------------------------------------------------------------------- HTTP
async def fetch_models(session, url: str) -> tuple[dict[str, int | None], str | None]:
    """(served adapters: name -> rank, base model name) from GET /v1/models."""
    try:
        async with session.get(f"{url}/v1/models") as resp:
            if resp.status != 200:
                raise ReplayError(f"GET /v1/models answered HTTP {resp.status}: {(await resp.text())[:200]}")
            body = await resp.json()
    except (OSError, asyncio.TimeoutError) as exc:
        raise ReplayError(f"cannot reach {url}: {exc}") from None
    adapters, base = {}, None
    for m in body.get("data", []):
        if m.get("base_model"):
            base = m["id"]
        else:
            adapters[m["id"]] = m.get("rank")
    return adapters, base


async def load_adapter(session, url: str, name: str, path: Path) -> None:
    async with session.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}) as resp:
        if resp.status != 200:
            raise ReplayError(f"loading adapter {name} from {path}: HTTP {resp.status}: {(await resp.text())[:300]}")


def prompt_ids(req: Request, cfg: ReplayConfig) -> list[int]:
    rng = random.Random(cfg.seed * 1_000_003 + req.index)
    lo, hi = cfg.token_id_range
    return [rng.randrange(lo, hi) for _ in range(req.prompt_tokens)]


def _new_record(req: Request, model: str) -> dict[str, Any]:
    return {"index": req.index, "model": model, "adapter_index": req.adapter_index, "rank": req.rank,
            "prompt_tokens": req.prompt_tokens, "max_tokens": req.output_tokens, "arrival_s": req.arrival_s,
            "sent_s": None, "status": None, "http_status": None, "error": None, "tokens": 0,
            "finish_reason": None, "ttft_ms": None, "tpot_ms": None, "e2e_ms": None}


async def _read_stream(resp, rec: dict[str, Any], t_send: float, times: list[float]) -> None:
    """Consume the SSE stream; fills rec's status, finish_reason, tokens and token times."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if _handle_line(line.strip(), rec, t_send, times):
                return
    rec["status"] = "stream_error"
    rec["error"] = rec["error"] or "stream ended without [DONE]"


def _handle_line(line: bytes, rec: dict[str, Any], t_send: float, times: list[float]) -> bool:
    """One SSE line; True when the stream is over (done or error)."""
    if not line.startswith(b"data:"):
        return False
    data = line[5:].strip()
    if data == b"[DONE]":
        rec["status"] = "ok"
        return True
    try:
        event = json.loads(data)
    except ValueError:
        rec["status"], rec["error"] = "stream_error", f"bad event: {data[:100]!r}"
        return True
    if "error" in event:
        err = event["error"]
        rec["status"] = "stream_error"
        rec["error"] = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return True
    for choice in event.get("choices", []):
        times.append((time.perf_counter() - t_send) * 1000.0)
        if choice.get("finish_reason"):
            rec["finish_reason"] = choice["finish_reason"]
    return False


async def send_one(session, url: str, req: Request, model: str, cfg: ReplayConfig, t_start: float) -> dict[str, Any]:
    import aiohttp

    rec = _new_record(req, model)
    body = {"model": model, "prompt": prompt_ids(req, cfg), "max_tokens": req.output_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    times: list[float] = []
    t_send = time.perf_counter()
    rec["sent_s"] = t_send - t_start
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                rec["http_status"] = resp.status
                if resp.status != 200:
                    rec["status"] = f"http_{resp.status}"
                    rec["error"] = _error_message(await resp.text())
                else:
                    await _read_stream(resp, rec, t_send, times)
    except TimeoutError:
        rec["status"], rec["error"] = "timeout", f"no end of stream after {cfg.request_timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        rec["status"], rec["error"] = "connection_error", str(exc) or type(exc).__name__
    _timings(rec, times, t_send, cfg.save_token_times)
    return rec


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error", {})
        return err.get("message", text[:300]) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return text[:300]


def _timings(rec: dict[str, Any], times: list[float], t_send: float, keep: bool) -> None:
    rec["tokens"] = len(times)
    if times:
        rec["ttft_ms"] = times[0]
        if len(times) > 1:
            rec["tpot_ms"] = (times[-1] - times[0]) / (len(times) - 1)
    if rec["status"] == "ok":
        rec["e2e_ms"] = (time.perf_counter() - t_send) * 1000.0
    if keep:
        rec["token_times_ms"] = times


# ---------------------------------------------------------------------- the run
async def replay(requests: Sequence[Request], cfg: ReplayConfig, adapters_dir: Path | None = None,
                 make_missing: bool = False, log: Callable[[str], None] = print,
                 ranks: Sequence[int] | None = None) -> dict[str, Any]:
    """Replay ``requests`` (sorted by arrival); returns {"requests": [...], "summary": {...}, "notes": [...]}.

    ``adapters_dir``: PEFT adapters to load if the server lacks them; with ``make_missing``
    a missing directory is first created by scripts/make_adapters.py with ``ranks`` (default:
    the requests' ranks) and one adapter per workload adapter (at least one per rank, at most 16).
    """
    import aiohttp

    url = cfg.url.rstrip("/")
    notes: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models = await _models_for(session, url, requests, cfg, adapters_dir, make_missing, notes, log, ranks)
        for n in notes:
            log(f"note: {n}")
        t_start = time.perf_counter()
        records = await _send_all(session, url, requests, models, cfg, t_start, log)
        wall = time.perf_counter() - t_start
    return {"requests": records, "summary": summarize(records, cfg, wall), "notes": notes}


async def _models_for(session, url, requests, cfg, adapters_dir, make_missing, notes, log, ranks) -> list[str]:
    """The model name to send each request to."""
    served, base = await fetch_models(session, url)
    if cfg.use_base_model:
        if base is None:
            raise ReplayError("the server lists no base model in /v1/models")
        return [base] * len(requests)
    if adapters_dir is not None:
        served = await _ensure_adapters(session, url, served, adapters_dir, requests, make_missing, notes, log,
                                        ranks)
    mapping = map_adapters(served, {r.adapter_index: r.rank for r in requests}, notes)
    notes.append(f"{len(mapping)} workload adapters mapped onto {len(set(mapping.values()))} served adapters")
    return [mapping[r.adapter_index] for r in requests]


async def _ensure_adapters(session, url, served, directory: Path, requests, make_missing, notes, log, ranks):
    if not directory.is_dir():
        if not make_missing:
            raise ReplayError(f"adapters dir {directory} does not exist (pass --make-adapters to create it)")
        ranks = list(ranks or sorted({r.rank for r in requests}) or [8])
        make_adapters(directory, ranks, max(len(ranks), min(16, len({r.adapter_index for r in requests}))), log)
    local = local_adapters(directory)
    missing = {n: v for n, v in local.items() if n not in served}
    for name, (rank, path) in missing.items():
        log(f"loading adapter {name} (rank {rank}) from {path}")
        await load_adapter(session, url, name, path)
    if missing:
        notes.append(f"loaded {len(missing)} adapters from {directory}")
        served, _ = await fetch_models(session, url)
    return served


async def _send_all(session, url, requests, models, cfg, t_start, log) -> list[dict[str, Any]]:
    tasks: list[asyncio.Task] = []
    progress = asyncio.create_task(_progress(tasks, len(requests), cfg, t_start, log)) if cfg.progress_s else None
    try:
        for req, model in zip(requests, models):
            delay = req.arrival_s - (time.perf_counter() - t_start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(session, url, req, model, cfg, t_start)))
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        if progress:
            progress.cancel()


async def _progress(tasks, total, cfg, t_start, log) -> None:
    while True:
        await asyncio.sleep(cfg.progress_s)
        done = [t.result() for t in tasks if t.done() and not t.cancelled()]
        ok = sum(1 for r in done if r["status"] == "ok")
        log(f"  sent {len(tasks)}/{total}, done {len(done)} (ok {ok}, failed {len(done) - ok}), "
            f"in flight {len(tasks) - len(done)}, {time.perf_counter() - t_start:.1f} s")


# ---------------------------------------------------------------------- summary
def _pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    vals = sorted(vals)
    k = (len(vals) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def _stats(vals: list[float], prefix: str) -> dict[str, float | None]:
    return {f"{prefix}_mean": sum(vals) / len(vals) if vals else None, f"{prefix}_p50": _pct(vals, 50),
            f"{prefix}_p90": _pct(vals, 90), f"{prefix}_p99": _pct(vals, 99)}


def attains(rec: dict[str, Any], slo_tpot_ms: float, slo_ttft_ms: float | None) -> bool:
    if rec["status"] != "ok":
        return False
    if rec["tpot_ms"] is not None and rec["tpot_ms"] > slo_tpot_ms:
        return False
    return slo_ttft_ms is None or (rec["ttft_ms"] is not None and rec["ttft_ms"] <= slo_ttft_ms)


def summarize(records: list[dict[str, Any]], cfg: ReplayConfig, wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    n = len(records)
    out = {"requests": n, "ok": len(ok), "statuses": statuses, "slo_tpot_ms": cfg.slo_tpot_ms,
           "slo_ttft_ms": cfg.slo_ttft_ms,
           "slo_attainment": sum(attains(r, cfg.slo_tpot_ms, cfg.slo_ttft_ms) for r in records) / n if n else None,
           "wall_s": wall_s,
           "throughput_tokens_s": sum(r["tokens"] for r in ok) / wall_s if wall_s > 0 else None,
           "throughput_req_s": len(ok) / wall_s if wall_s > 0 else None}
    out.update(_stats([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None], "ttft_ms"))
    out.update(_stats([r["tpot_ms"] for r in ok if r["tpot_ms"] is not None], "tpot_ms"))
    out.update(_stats([r["e2e_ms"] for r in ok if r["e2e_ms"] is not None], "e2e_ms"))
    return out
