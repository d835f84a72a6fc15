#!/usr/bin/env python
"""`--cluster local` vs `--cluster ray`, two instances each, the same replayed workload, side by side.

For each cluster kind, one api_server with two instances of the same model and adapters:

1. front-end overhead: `--probes` tiny requests (1 output token, base model), one at a time,
   each sent through the front end and straight to an instance (alternating); the added
   latency of a request is its front-end time minus the paired direct time (p50/p90);
2. the replayed workload (Azure-trace arrivals, ShareGPT lengths, power-law adapter
   popularity; `caraserve_router.evaluation`): TTFT / TPOT / E2E, throughput, and how many
   requests the policy sent to each instance (its spread).

Ray binds the machine's interface address, so the whole run happens inside a private network
namespace with only loopback (the script re-executes itself under `unshare -n`; root needed).
With `--cluster ray` and no `--ray-address` the front end starts its own local Ray runtime:
one node, so this measures Ray's control path and the front end, not a network.

    python scripts/bench/cluster.py --out results/cluster/bench_cluster.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import write_result

REPO = Path(__file__).resolve().parents[2]
NETNS_ENV = "CARASERVE_BENCH_NETNS"
KINDS = ("local", "ray")
PATH_ARGS = ("out", "model_dir", "perf_model", "trace", "lengths")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/cluster/bench_cluster.json"), help="JSON result; PNG beside it")
    p.add_argument("--model-dir", default="", help="HF llama directory (default: SmolLM2-135M-Instruct, prepared once)")
    p.add_argument("--perf-model", default=str(REPO / "docs/results/perf_model_smollm2_cpu.json"),
                   help="PerfModel JSON for the rank-aware policy ('' = the quick start-up profile)")
    p.add_argument("--policy", default="rank-aware", help="scheduling policy of both runs")
    p.add_argument("--instances", type=int, default=2, help="instances per cluster")
    p.add_argument("--ranks", default="8,16,32,64", help="ranks of the demo adapters served (one adapter each)")
    p.add_argument("--probes", type=int, default=40, help="front-end overhead probes per cluster kind")
    p.add_argument("--rate", type=float, default=1.0, help="replayed requests per second")
    p.add_argument("--requests", type=int, default=40, help="replayed requests per cluster kind")
    p.add_argument("--max-prompt", type=int, default=256, help="prompt lengths clipped to this")
    p.add_argument("--max-output", type=int, default=48, help="output lengths clipped to this")
    p.add_argument("--trace", default=None, help="Azure trace CSV (default: the workload module's)")
    p.add_argument("--lengths", default=None, help="ShareGPT lengths CSV (default: the workload module's)")
    p.add_argument("--slo-tpot-ms", type=float, default=300.0, help="TPOT SLO for attainment (CPU-sized)")
    p.add_argument("--server-args", default="--lora-mode cpu-assist --sidecar-workers 1",
                   help="extra api_server flags for both runs")
    return p


def reexec_in_netns() -> int:
    """Run this script again inside a private network namespace with only loopback up."""
    cmd = " ".join(map(_quote, [sys.executable, *sys.argv]))
    env = {**os.environ, NETNS_ENV: "1"}
    return subprocess.call(["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {cmd}"], env=env)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def instance_url(front_url: str) -> str:
    """Instance 0's URL as the front end knows it now (it changes when an instance restarts)."""
    import requests

    return requests.get(front_url + "/stats", timeout=30).json()["instances"][0]["url"]


def probe_overhead(front_url: str, count: int, instance_headers: dict) -> dict:
    """Added latency of the front end: paired (front end, direct) tiny requests, alternating order.
    A pair that fails (an instance restarting) is dropped and counted, and instance 0's URL re-read."""
    import requests

    body_front = {"input_ids": [11, 12, 13, 14], "parameters": {"max_new_tokens": 1}}
    session = requests.Session()
    session.headers.update(instance_headers)  # the instance key (the front end here has no API key)
    direct_url = instance_url(front_url)

    def timed(url):
        t = time.perf_counter()
        r = session.post(url + "/generate", json=body_front, timeout=120)
        r.raise_for_status()
        return (time.perf_counter() - t) * 1000.0

    for _ in range(3):  # warm both paths
        timed(front_url), timed(direct_url)
    added, front, direct, failed = [], [], [], 0
    for i in range(count):
        try:
            if i % 2:
                d, f = timed(direct_url), timed(front_url)
            else:
                f, d = timed(front_url), timed(direct_url)
        except requests.RequestException as e:
            failed += 1
            print(f"probe {i} failed ({type(e).__name__}); instance 0 at {instance_url(front_url)}", flush=True)
            time.sleep(2.0)
            direct_url = instance_url(front_url)
            continue
        front.append(f)
        direct.append(d)
        added.append(f - d)
    count = len(added)
    return {"probes": count, "failed_pairs": failed, "added_ms_p50": pct(added, 50), "added_ms_p90": pct(added, 90),
            "added_ms_mean": statistics.fmean(added), "added_ms_stdev": statistics.stdev(added) if count > 1 else 0.0,
            "front_ms_p50": pct(front, 50), "direct_ms_p50": pct(direct, 50)}


def decisions(url: str) -> dict:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=30).text):
        if family.name == "caraserve_scheduler_decisions":
            out.update({s.labels["instance"]: s.value for s in family.samples if s.name.endswith("_total")})
    return out


def run_kind(kind: str, args, model_dir: str, adapters_dir: Path, workload, logs: Path) -> dict:
    import requests

    from caraserve_router.evaluation.replay_client import ReplayConfig, replay
    from caraserve_router.contracts.instance_auth import new_key
    from caraserve_router.evaluation.server_process import RunningServer

    flags = ["--cluster", kind, "--instances", str(args.instances), "--model-dir", model_dir,
             "--adapters", str(adapters_dir), "--policy", args.policy, "--log-dir", str(logs / kind),
             *args.server_args.split()]
    if args.perf_model:
        flags += ["--perf-model", args.perf_model]
    t0 = time.perf_counter()
    with RunningServer("caraserve_router.api_server", flags, logs / f"{kind}.log", startup_s=900,
                       instance_key=new_key()) as srv:
        start_s = time.perf_counter() - t0
        overhead = probe_overhead(srv.url, args.probes, srv.instance_headers)
        before = decisions(srv.url)
        cfg = ReplayConfig(url=srv.url, slo_tpot_ms=args.slo_tpot_ms, progress_s=0.0)
        result = asyncio.run(replay(workload.requests, cfg, log=lambda m: None))
        after = decisions(srv.url)
        restarts = {h["name"]: h["restarts"] for h in requests.get(srv.url + "/stats", timeout=30).json()["instances"]}
    spread = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    summary = result["summary"]
    print(f"[{kind}] start {start_s:.1f}s, added p50 {overhead['added_ms_p50']:.2f} ms, "
          f"ok {summary['ok']}/{summary['requests']}, spread {spread}", flush=True)
    return {"start_s": start_s, "overhead": overhead, "replay": summary, "spread": spread, "restarts": restarts,
            "requests": result["requests"], "leftover_procs": srv.leftover_procs,
            "leftover_shm": sorted(srv.leftover_shm)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in KINDS:
        recs = [r for r in result["runs"][kind]["requests"] if r.get("ttft_ms") is not None]
        for ax, key in ((axes[0], "ttft_ms"), (axes[1], "e2e_ms")):
            vals = sorted(r[key] for r in recs)
            ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=kind)
    axes[0].set(title="TTFT CDF (replayed workload)", xlabel="ms", ylabel="fraction")
    axes[1].set(title="E2E CDF", xlabel="ms")
    names = sorted({n for k in KINDS for n in result["runs"][k]["spread"]})
    width = 0.38
    for j, kind in enumerate(KINDS):
        spread = result["runs"][kind]["spread"]
        axes[2].bar([i + (j - 0.5) * width for i in range(len(names))], [spread.get(n, 0) for n in names], width,
                    label=kind)
    axes[2].set_xticks(range(len(names)), names)
    axes[2].set(title="requests per instance (policy spread)")
    for ax in axes:
        ax.legend()
    o = {k: result["runs"][k]["overhead"]["added_ms_p50"] for k in KINDS}
    fig.suptitle(f"--cluster local vs ray, {result['config']['instances']} instances (CPU, one host): front-end "
                 f"added latency p50 local {o['local']:.2f} ms, ray {o['ray']:.2f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get(NETNS_ENV) != "1":
        return reexec_in_netns()
    from caraserve_router.assets.model_prep import prepare_default_model

    model_dir = args.model_dir or str(prepare_default_model())
    ranks = tuple(int(r) for r in args.ranks.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    os.environ["RAY_TMPDIR"] = str(work)  # Ray's session files (logs, sockets) go there, removed at the end
    try:
        return run(args, model_dir, ranks, work)
    finally:
        # keep the server and instance logs beside the result, Ray's session files go
        logs = args.out.parent / (args.out.stem + "_logs")
        shutil.rmtree(logs, ignore_errors=True)
        if (work / "logs").is_dir():
            shutil.copytree(work / "logs", logs, ignore_dangling_symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def run(args, model_dir: str, ranks: tuple, work: Path) -> int:
    from caraserve_router.assets.demo_adapters import make_random_adapter
    from caraserve_router.evaluation.workload import WorkloadConfig, generate

    (work / "logs").mkdir()
    adapters_dir = work / "adapters"
    for i, rank in enumerate(ranks):
        make_random_adapter(model_dir, adapters_dir / f"demo-r{rank}-{i}", rank=rank, seed=100 + i)
    workload = generate(WorkloadConfig(arrival="trace", rate=args.rate, duration_s=None, num_requests=args.requests,
                                       trace_path=args.trace, lengths_path=args.lengths, ranks=ranks,
                                       num_adapters=len(ranks), max_prompt_tokens=args.max_prompt,
                                       max_output_tokens=args.max_output, seed=0))
    runs = {kind: run_kind(kind, args, model_dir, adapters_dir, workload, work / "logs") for kind in KINDS}
    result = {
        "what": "--cluster local vs --cluster ray, same replayed workload, run side by side in one process",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        # file names only: no paths of the machine in the result
        "config": {k: (os.path.basename(str(v)) if k in PATH_ARGS and v else v) for k, v in vars(args).items()},
        "workload_notes": list(workload.notes),
        "runs": runs,
        "ray_minus_local": {
            "added_ms_p50": runs["ray"]["overhead"]["added_ms_p50"] - runs["local"]["overhead"]["added_ms_p50"],
            "ttft_ms_p50": (runs["ray"]["replay"].get("ttft_ms_p50") or 0) - (runs["local"]["replay"].get("ttft_ms_p50") or 0),
            "throughput_tokens_s": (runs["ray"]["replay"]["throughput_tokens_s"] or 0)
            - (runs["local"]["replay"]["throughput_tokens_s"] or 0)},
    }
    write_result(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"{'':24}{'local':>12}{'ray':>12}")
    rows = [("added p50 (ms)", lambda r: r["overhead"]["added_ms_p50"]),
            ("added p90 (ms)", lambda r: r["overhead"]["added_ms_p90"]),
            ("added stdev (ms)", lambda r: r["overhead"]["added_ms_stdev"]),
            ("TTFT p50 (ms)", lambda r: r["replay"].get("ttft_ms_p50")),
            ("E2E p50 (ms)", lambda r: r["replay"].get("e2e_ms_p50")),
            ("tokens/s", lambda r: r["replay"]["throughput_tokens_s"]),
            ("ok / requests", lambda r: f"{r['replay']['ok']}/{r['replay']['requests']}"),
            ("spread", lambda r: ",".join(f"{int(v)}" for _, v in sorted(r["spread"].items()))),
            ("instance restarts", lambda r: sum(r["restarts"].values())),
            ("failed probe pairs", lambda r: r["overhead"]["failed_pairs"]),
            ("start-up (s)", lambda r: r["start_s"])]
    for name, get in rows:
        cells = [get(runs[k]) for k in KINDS]
        print(f"{name:24}" + "".join(f"{c:>12.2f}" if isinstance(c, float) else f"{str(c):>12}" for c in cells))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
