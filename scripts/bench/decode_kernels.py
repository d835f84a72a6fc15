#!/usr/bin/env python3
"""Benchmark the LoRA decode kernels and profile them for the scheduler's performance model.

Two parts, measured side by side in one run (medians of interleaved repeats; the machine is
shared and noisy):

1. decode table: shrink + expand of the qkv group (default model: 576 -> 576 / 192 / 192)
   for batch sizes 1..64 and rank mixes from {8, 16, 32, 64}, every row its own adapter (and
   a zipf-popular mix where rows share adapters), for
     loop        a naive per-request loop (gather the request's pages, matmuls per slice),
     cpu_mbgmv   the fast CPU path, paged pool, RowPlan built once per step (amortised),
     cpu_mbgmv_noplan   the same without a plan (the plan is rebuilt by every call),
     cpu_bgmv    the fast CPU path over padded descriptors (Punica: every row computes the
                 batch's max rank, padded rows read a zero row),
   and on CUDA also triton_mbgmv / triton_bgmv (triton.testing.do_bench), with the
   speed-up of each path over the loop and the plan's build cost.
2. profile: one layer's LoRA work (shrink + expand of qkv, o, gate_up, down) for random rank
   mixes: latency vs batch x max rank for bgmv and vs sum of ranks for mbgmv, with the
   least-squares line, R^2, and the PerfModel's 3-feature fit (const, batch, feature).

Results go to --out (JSON) and a PNG plot beside it. Progress goes to stderr.
Pools hold random values. Two timings per call (see Timer): "cold" (weights come from memory,
as in a serving step, where a layer's LoRA weights were last read a step ago; the primary
number) and "warm" (a repeated call, weights cached).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path


import torch

import kernels

# The default model, SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, MLP 1536.
GROUPS: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (576, (576, 192, 192)),
    "o": (576, (576,)),
    "gate_up": (576, (1536, 1536)),
    "down": (1536, (576,)),
}
RANKS = (8, 16, 32, 64)
BATCHES = (1, 2, 4, 8, 16, 32, 64)
MIXES = ("r8", "r16", "r32", "r64", "mixed", "mixed-zipf")
I32 = torch.int32


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- pools and batches -------------------------------------------------------------------------

@dataclass
class GroupPool:
    """One group's pools of two layers (the kernels' W [U, UNIT]): P = max_rows * RS "pages" of one
    rank row of every slice; lora_A rows first ([P, S, IN], so aligned to IN), then the lora_B^T
    rows ([P, OUT_TOTAL]), then a zero row for padded (bgmv) rows. A and B are views of W."""
    name: str
    in_features: int
    out_features: tuple[int, ...]
    W: list[torch.Tensor]
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    slot_rank: int
    unit: int

    def rows(self, page_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_rows, b_rows [N, S, R] (int32 units) of a page table [N, R]."""
        pages = page_table.long()[:, None, :]                                      # [N, 1, R]
        s = torch.arange(self.slices, device=pages.device)[None, :, None]
        offsets = self.slice_offsets(pages.device).long()[:-1][None, :, None]
        a_start = (pages * self.slices + s) * self.in_features
        b_start = self.A[0].numel() + pages * self.out_total + offsets
        live = pages >= 0
        a_rows = torch.where(live, a_start // self.unit, -1).to(I32)
        b_rows = torch.where(live, b_start // self.unit, -1).to(I32)
        return a_rows.contiguous(), b_rows.contiguous()

    @property
    def zero_unit(self) -> int:
        return (self.A[0].numel() + self.B[0].numel()) // self.unit

    @property
    def slices(self) -> int:
        return len(self.out_features)

    @property
    def out_total(self) -> int:
        return sum(self.out_features)

    def slice_offsets(self, device) -> torch.Tensor:
        offsets = [0]
        for n in self.out_features:
            offsets.append(offsets[-1] + n)
        return torch.tensor(offsets, dtype=I32, device=device)


def make_pools(names, max_rows: int, dtype, device, gen) -> dict[str, GroupPool]:
    slot_rank = max(RANKS)
    pages = max_rows * slot_rank
    pools = {}
    for name in names:
        in_features, outs = GROUPS[name]
        unit = math.gcd(in_features, *outs)
        widest = max(in_features, *outs)
        W, A, B = [], [], []
        for _layer in range(2):
            a = torch.randn(pages, len(outs), in_features, generator=gen) / in_features ** 0.5
            b = 0.1 * torch.randn(pages, sum(outs), generator=gen)
            w = torch.cat([a.view(-1), b.view(-1), torch.zeros(-(-widest // unit) * unit)]).to(device, dtype)
            W.append(w.view(-1, unit))
            A.append(w[: a.numel()].view(a.shape))
            B.append(w[a.numel() : a.numel() + b.numel()].view(b.shape))
        pools[name] = GroupPool(name, in_features, outs, W, A, B, slot_rank, unit)
    return pools


@dataclass
class Batch:
    """Descriptors of one decode batch: rows use adapters (one slot of RS pages each)."""
    ranks: list[int]              # rank of row i's adapter
    users: list[int]              # adapter of row i
    slot_of: list[int]            # adapter -> slot (its pages: slot * RS + j in slot mode)
    page_table: torch.Tensor      # [N, R] int32, paged mode (pages scattered in the pool)
    slots: torch.Tensor           # [N] int32, slot mode
    rank_tensor: torch.Tensor     # [N] int32

    @property
    def rows(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def sum_ranks(self) -> int:
        return sum(self.ranks)


def draw_batch(mix: str, rows: int, pages: int, slot_rank: int, device, gen, scattered: bool = False) -> Batch:
    """`mix`: rN (every row rank N), mixed (ranks from RANKS), mixed-zipf (rows share adapters).

    Paged mode: an adapter's pages are its slot's first pages (one contiguous run, as a pool
    allocates them when it can) or, with `scattered`, random pages anywhere in the pool."""
    pick = lambda n: torch.randint(0, len(RANKS), (n,), generator=gen).tolist()  # noqa: E731
    users = list(range(rows))
    if mix == "mixed-zipf":
        weights = torch.tensor([1.0 / (k + 1) ** 1.2 for k in range(max(1, rows // 2))])
        users = torch.multinomial(weights, rows, replacement=True, generator=gen).tolist()
    adapters = max(users) + 1
    adapter_rank = [int(mix[1:])] * adapters if mix.startswith("r") else [RANKS[k] for k in pick(adapters)]
    slot_of = torch.randperm(pages // slot_rank, generator=gen)[:adapters].tolist()
    order = torch.randperm(pages, generator=gen) if scattered else torch.arange(pages)
    ranks = [adapter_rank[u] for u in users]
    width = max(ranks)
    adapter_pages = [order[slot_of[a] * slot_rank:slot_of[a] * slot_rank + width] for a in range(adapters)]
    page_table = torch.stack([torch.where(torch.arange(width) < adapter_rank[u], adapter_pages[u], -1)
                              for u in users]).to(I32)
    return Batch(ranks, users, slot_of, page_table.to(device),
                 torch.tensor([slot_of[u] for u in users], dtype=I32, device=device),
                 torch.tensor(ranks, dtype=I32, device=device))


# -- the paths ---------------------------------------------------------------------------------

class Case:
    """Everything the paths need for one batch on one group: inputs, outputs, plans."""

    def __init__(self, pool: GroupPool, batch: Batch, dtype, device, gen):
        self.pool, self.batch = pool, batch
        n, s = batch.rows, pool.slices
        self.ranks = batch.rank_tensor[:, None].expand(n, s).contiguous()          # [N, S]
        self.scales = torch.ones(n, s, device=device)
        self.offsets = pool.slice_offsets(device)
        self.x = torch.randn(n, pool.in_features, generator=gen).to(device, dtype)
        self.y = torch.zeros(n, s, batch.max_rank, device=device)
        self.out = torch.zeros(n, pool.out_total, device=device, dtype=dtype)
        self.a_rows, self.b_rows = pool.rows(batch.page_table)
        self.plan = kernels.plan_rows(self.a_rows, self.b_rows, self.ranks)
        self.padded = kernels.pad_to_max_rank(self.a_rows, self.b_rows, self.ranks, pool.zero_unit)
        self.pad_plan = kernels.plan_rows(*self.padded)
        self.rows = [(batch.page_table[i, :r].long(), r) for i, r in enumerate(batch.ranks)]

    def mbgmv(self, layer: int, backend: str, plan: bool = True) -> None:
        p = self.pool
        use = self.plan if plan else None
        kernels.mbgmv_shrink(self.x, p.W[layer], self.a_rows, self.ranks, self.y, plan=use, backend=backend)
        kernels.mbgmv_expand(self.y, p.W[layer], self.b_rows, self.ranks, self.scales, self.offsets, self.out,
                             plan=use, backend=backend)

    def bgmv(self, layer: int, backend: str) -> None:
        """Punica: mbgmv over descriptors padded to the batch's max rank."""
        p = self.pool
        a_rows, b_rows, ranks = self.padded
        kernels.mbgmv_shrink(self.x, p.W[layer], a_rows, ranks, self.y, plan=self.pad_plan, backend=backend)
        kernels.mbgmv_expand(self.y, p.W[layer], b_rows, ranks, self.scales, self.offsets, self.out,
                             plan=self.pad_plan, backend=backend)

    def loop(self, layer: int) -> None:
        """Naive per-request loop: gather the request's pages, one matmul per slice."""
        p = self.pool
        A, B, offsets = p.A[layer], p.B[layer], self.offsets.tolist()
        for i, (pages, rank) in enumerate(self.rows):
            a = A.index_select(0, pages)                                            # [r, S, IN]
            b = B.index_select(0, pages)                                            # [r, OUT_TOTAL]
            for s in range(p.slices):
                y = a[:, s] @ self.x[i]                                             # [r]
                self.out[i, offsets[s]:offsets[s + 1]] += self.scales[i, s] * (y @ b[:, offsets[s]:offsets[s + 1]])


def cpu_paths() -> dict:
    return {
        "loop": lambda case, layer: case.loop(layer),
        "cpu_mbgmv": lambda case, layer: case.mbgmv(layer, "cpu"),
        "cpu_mbgmv_noplan": lambda case, layer: case.mbgmv(layer, "cpu", plan=False),
        "cpu_bgmv": lambda case, layer: case.bgmv(layer, "cpu"),
    }


def cuda_paths() -> dict:
    return {
        "loop": lambda case, layer: case.loop(layer),
        "triton_mbgmv": lambda case, layer: case.mbgmv(layer, "triton"),
        "triton_bgmv": lambda case, layer: case.bgmv(layer, "triton"),
    }


PATHS = {"cpu": cpu_paths, "cuda": cuda_paths}


# -- timing ------------------------------------------------------------------------------------

class Timer:
    """Median wall time of a call, two ways, side by side (interleaved repeats on the CPU).

    cold: the caches are flushed (a write over more than the last-level cache), the same call
          runs once on the other layer's pool (so code and the plan's index tensors are cached,
          as they would be in a serving step), then the call is timed on layer 0: its weights come
          from memory, as in a step where every layer's LoRA weights were last read a step ago.
    warm: the same call timed again at once (weights in cache; the best case).
    On CUDA both are triton.testing.do_bench medians (it clears the L2 cache itself).
    """

    FLUSH_BYTES = 48 << 20

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats
        self.scratch = torch.zeros(self.FLUSH_BYTES // 4) if device.type == "cpu" else None

    def side_by_side(self, calls: dict) -> dict[str, dict[str, float]]:
        """calls: name -> fn(layer). Returns name -> {"cold": ms, "warm": ms} (medians)."""
        if self.device.type == "cuda":
            import triton.testing
            ms = {name: triton.testing.do_bench(lambda f=fn: f(0), return_mode="median") for name, fn in calls.items()}
            return {name: {"cold": v, "warm": v} for name, v in ms.items()}
        samples = {name: {"cold": [], "warm": []} for name in calls}
        for fn in calls.values():
            fn(0), fn(1)                                                            # warm-up
        for _ in range(self.repeats):
            for name, fn in calls.items():
                self.scratch.add_(1.0)                                              # evict the caches
                fn(1)                                                               # code, plan: cached again
                for kind in ("cold", "warm"):
                    start = time.perf_counter()
                    fn(0)
                    samples[name][kind].append((time.perf_counter() - start) * 1e3)
        return {name: {kind: statistics.median(v) for kind, v in s.items()} for name, s in samples.items()}


def plan_cost_ms(case: Case, repeats: int) -> float:
    """Build a plan and its shrink / expand index (what the first layer of a step pays)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = kernels.plan_rows(case.a_rows, case.b_rows, case.ranks)
        plan.shrink_index(case.pool.unit, case.pool.in_features, case.x.dtype in (torch.float16, torch.bfloat16))
        plan.expand_index(case.pool.unit, tuple(case.offsets.tolist()))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# -- the two parts -----------------------------------------------------------------------------

def decode_table(args, pools, device, gen, timer) -> list[dict]:
    paths = PATHS[device.type]()
    pool = pools["qkv"]
    rows_out = []
    for mix in args.mixes:
        for batch_size in args.batches:
            batch = draw_batch(mix, batch_size, pool.A[0].shape[0], pool.slot_rank, device, gen, args.scattered)
            case = Case(pool, batch, args.dtype, device, gen)
            timed = timer.side_by_side({name: (lambda layer, f=f: f(case, layer)) for name, f in paths.items()})
            ms = {name: t["cold"] for name, t in timed.items()}
            warm = {name: t["warm"] for name, t in timed.items()}
            row = {"group": "qkv", "mix": mix, "batch": batch_size, "adapters": len(set(batch.users)),
                   "sum_ranks": batch.sum_ranks, "max_rank": batch.max_rank, "ms": ms, "ms_warm": warm,
                   "speedup_vs_loop": {k: ms["loop"] / v for k, v in ms.items() if k != "loop"},
                   "speedup_vs_loop_warm": {k: warm["loop"] / v for k, v in warm.items() if k != "loop"}}
            if device.type == "cpu":
                row["plan_ms"] = plan_cost_ms(case, 5)
            rows_out.append(row)
            log(f"decode qkv {mix:>10} batch {batch_size:>2} (cold / warm us): " +
                "  ".join(f"{k} {ms[k] * 1e3:.0f} / {warm[k] * 1e3:.0f}" for k in ms))
    return rows_out


def profile(args, pools, device, gen, timer) -> dict:
    """One layer's LoRA work (all groups) per kernel vs its scheduler feature."""
    backend = {"cpu": "cpu", "cuda": "triton"}[device.type]
    points = []
    for batch_size in args.batches:
        for _ in range(args.profile_draws):
            batch = draw_batch("mixed", batch_size, pools["qkv"].A[0].shape[0], pools["qkv"].slot_rank, device, gen,
                               args.scattered)
            cases = [Case(pool, batch, args.dtype, device, gen) for pool in pools.values()]
            timed = timer.side_by_side({
                "bgmv": lambda layer: [c.bgmv(layer, backend) for c in cases],
                "mbgmv": lambda layer: [c.mbgmv(layer, backend) for c in cases],
            })
            ms = {kernel: t["cold"] for kernel, t in timed.items()}
            for kernel, t in timed.items():
                points.append({"kernel": kernel, "batch": batch_size, "ranks": batch.ranks, "ms": t["cold"],
                               "ms_warm": t["warm"]})
            log(f"profile batch {batch_size:>2} sum {batch.sum_ranks:>4} max {batch.max_rank:>2}: "
                f"bgmv {ms['bgmv']:.3f} ms  mbgmv {ms['mbgmv']:.3f} ms")
    return {"points": points, "fits": {k: fits(points, k) for k in ("bgmv", "mbgmv")}}


FEATURE = {
    "bgmv": ("batch_x_max_rank", lambda p: p["batch"] * max(p["ranks"])),
    "mbgmv": ("sum_ranks", lambda p: sum(p["ranks"])),
}


def least_squares(columns: list[list[float]], target: list[float]) -> tuple[list[float], float]:
    """Coefficients and R^2 of target ~ columns (each a list over the points)."""
    X = torch.tensor(columns, dtype=torch.float64).T
    t = torch.tensor(target, dtype=torch.float64)
    coef = torch.linalg.lstsq(X, t[:, None]).solution[:, 0]
    residual = float(((X @ coef - t) ** 2).sum())
    total = float(((t - t.mean()) ** 2).sum())
    return coef.tolist(), (1.0 - residual / total) if total > 0 else float("nan")


def fits(points: list[dict], kernel: str) -> dict:
    name, feature = FEATURE[kernel]
    mine = [p for p in points if p["kernel"] == kernel]
    xs, ms = [float(feature(p)) for p in mine], [p["ms"] for p in mine]
    ones = [1.0] * len(xs)
    (intercept, slope), r2 = least_squares([ones, xs], ms)
    coef3, r2_3 = least_squares([ones, [float(p["batch"]) for p in mine], xs], ms)
    log(f"fit {kernel}: ms = {intercept:.4f} + {slope:.3e} * {name}   R^2 = {r2:.4f}   "
        f"(const, batch, {name}) = ({', '.join(f'{c:.3e}' for c in coef3)})  R^2 = {r2_3:.4f}")
    return {"feature": name, "intercept_ms": intercept, "slope_ms": slope, "r2": r2,
            "perf_model_fit": {"features": ["const", "batch", name], "coef": coef3, "r2": r2_3}}


# -- output ------------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {torch.get_num_threads()} torch thread(s) of {torch.multiprocessing.cpu_count()} cores"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    rows = [r for r in result["decode"] if r["mix"] == "mixed"] or result["decode"]
    for name in rows[0]["ms"]:
        axes[0].plot([r["batch"] for r in rows], [r["ms"][name] * 1e3 for r in rows], marker="o", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="batch size", ylabel="qkv shrink+expand, cold weights (us)",
                title=f"decode, ranks mixed from {list(RANKS)}, one adapter per row")
    axes[0].legend()
    for ax, kernel in zip(axes[1:], ("bgmv", "mbgmv")):
        fit = result["profile"]["fits"][kernel]
        pts = [p for p in result["profile"]["points"] if p["kernel"] == kernel]
        xs = [FEATURE[kernel][1](p) for p in pts]
        ax.scatter(xs, [p["ms"] for p in pts], s=12)
        line = [min(xs), max(xs)]
        ax.plot(line, [fit["intercept_ms"] + fit["slope_ms"] * v for v in line], color="k",
                label=f"{fit['intercept_ms']:.3f} + {fit['slope_ms']:.2e} x, R^2 {fit['r2']:.3f}")
        ax.set(xlabel=fit["feature"], ylabel="one layer's LoRA, cold weights (ms)", title=f"{kernel} profile")
        ax.legend()
    fig.suptitle(f"{result['meta']['machine']} ({result['meta']['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def metadata(args, device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(device),
        "device": device.type,
        "dtype": str(args.dtype),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "statistic": "median ms per call of shrink + expand",
        "caches": "ms: cold weights (caches flushed, code and plan re-cached); ms_warm: the call repeated",
        "pages": "scattered at random" if args.scattered else "one contiguous run per adapter",
        "groups": {k: {"in": v[0], "out": list(v[1])} for k, v in GROUPS.items()},
        "note": "profile = one layer's LoRA work (qkv, o, gate_up, down shrink + expand), not a whole step",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("kernels.json"), help="JSON result (PNG beside it)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=list(BATCHES))
    p.add_argument("--mixes", type=lambda s: s.split(","), default=list(MIXES))
    p.add_argument("--repeats", type=int, default=21, help="timed calls per path and configuration")
    p.add_argument("--scattered", action="store_true",
                   help="paged mode: adapters' pages at random pool positions (default: one run each)")
    p.add_argument("--profile-draws", type=int, default=4, help="random rank mixes per batch size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float32 on the CPU, float16 on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    log(f"building pools ({max(args.batches)} x {max(RANKS)} pages per group) ...")
    pools = make_pools(GROUPS, max(args.batches), args.dtype, device, gen)
    timer = Timer(device, args.repeats)
    result = {"meta": metadata(args, device)}
    result["decode"] = decode_table(args, pools, device, gen, timer)
    result["profile"] = profile(args, pools, device, gen, timer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")
    if not args.no_plot:
        plot(result, args.out.with_suffix(".png"))
        log(f"wrote {args.out.with_suffix('.png')}")
    print_summary(result)
    return result


def print_summary(result: dict) -> None:
    rows = [r for r in result["decode"] if r["mix"] == "mixed"]
    if not rows:
        return
    names = list(rows[0]["ms"])
    print("qkv decode, ranks mixed from {8,16,32,64}, one adapter per row: median us (speed-up vs loop)")
    print("batch " + " ".join(f"{n:>22}" for n in names))
    for r in rows:
        cells = [f"{r['ms'][n] * 1e3:10.1f}" + (f" ({r['speedup_vs_loop'][n]:5.1f}x)" if n != "loop" else " " * 9)
                 for n in names]
        print(f"{r['batch']:>5} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
