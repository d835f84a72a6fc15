"""CPU LoRA sidecar: deltas against a float64 reference from the PEFT tensors, faults (killed,
stalled, failing workers), clean shutdown, and the measurement helpers.

Every sidecar here uses a fresh shm prefix and is stopped in a `finally`; workers use a short
spin so idle ones sleep instead of burning the (shared) cores.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from multiprocessing import shared_memory

import pytest
import torch
from safetensors.torch import save_file

from caraserve_router.contracts.configs import SidecarConfig
from caraserve_router.lora.adapter_store import AdapterStore
from caraserve_router.lora.shapes import GROUP_MODULES, GROUPS, MODULE_PARENT, ModelShapes
from caraserve_router.lora.sidecar import CpuLoraSidecar, split_rows, workers_for
from tests.testing import assert_close, wait_until

SHAPES = ModelShapes(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128)
MAX_TOKENS = 64
READY_TIMEOUT_S = 90.0  # a replacement imports torch on a loaded 2-core machine
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# name -> (rank, target modules, rank_pattern): different ranks, partial targets (slices of
# rank 0 inside a group) and a per-layer rank (rows past it are zero in the store)
ADAPTERS = {
    "a4": (4, list(GROUP_MODULES["qkv"] + GROUP_MODULES["o"] + GROUP_MODULES["gate_up"] + GROUP_MODULES["down"]), {}),
    "b8": (8, ["q_proj", "v_proj", "o_proj", "down_proj"], {}),
    "c2": (2, ["k_proj", "gate_proj", "up_proj"], {"model.layers.1.self_attn.k_proj": 6}),
}
SEGMENTS = [(0, 5, "a4"), (5, 6, "b8"), (8, 15, "c2"), (15, 23, "a4"), (23, 30, "b8")]  # rows 6..7: no adapter
ROWS = 30


def _prefix() -> str:
    return "cs" + uuid.uuid4().hex[:10]


def _shm_entries(prefix: str) -> list:
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie of a foreign parent
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------------------------- adapters


def _module_rank(rank: int, pattern: dict, layer: int, module: str) -> int:
    return pattern.get(f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}", rank)


def write_adapter(path, rank: int, targets: list, rank_pattern: dict, seed: int) -> dict:
    """A PEFT adapter dir; returns {(layer, module): (A [r, in], B [out, r], scale)} in float64."""
    g = torch.Generator().manual_seed(seed)
    alpha = 2.0 * rank
    tensors, reference = {}, {}
    for layer in range(SHAPES.num_layers):
        for module in targets:
            r = _module_rank(rank, rank_pattern, layer, module)
            in_f, out_f = SHAPES.module_shape(module)
            a = torch.randn(r, in_f, generator=g) / in_f ** 0.5
            b = torch.randn(out_f, r, generator=g)
            key = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            reference[(layer, module)] = (a.double(), b.double(), alpha / r)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
                   "rank_pattern": rank_pattern}, f)
    return reference


def reference_delta(reference: dict, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
    """x @ A^T @ (scale * B)^T per slice, zeros for slices the adapter does not target; float64."""
    x = x.double()
    parts = []
    for module in GROUP_MODULES[group]:
        out_f = SHAPES.module_shape(module)[1]
        if (layer, module) in reference:
            a, b, scale = reference[(layer, module)]
            parts.append(x @ a.t() @ (scale * b).t())
        else:
            parts.append(torch.zeros(x.shape[0], out_f, dtype=torch.float64))
    return torch.cat(parts, dim=1)


def expected_out(refs: dict, layer: int, group: str, x: torch.Tensor, base: torch.Tensor, segments) -> torch.Tensor:
    expected = base.double().clone()
    for start, end, name in segments:
        expected[start:end] += reference_delta(refs[name], layer, group, x[start:end])
    return expected


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecar-adapters")
    refs = {name: write_adapter(root / name, rank, targets, pattern, seed=i)
            for i, (name, (rank, targets, pattern)) in enumerate(ADAPTERS.items())}
    return root, refs


class Env:
    """A started sidecar with its own AdapterStore holding the test adapters."""

    def __init__(self, root, refs, dtype, **config):
        self.prefix = _prefix()
        self.refs = refs
        self.dtype = dtype
        self.store = AdapterStore(SHAPES, dtype, self.prefix, max_rank=16, pin=False)
        self.sidecar = CpuLoraSidecar(SidecarConfig(spin_iters=2000, **config), SHAPES, dtype, self.prefix,
                                      MAX_TOKENS)
        for name in ADAPTERS:
            self.store.add(name, str(root / name))

    def start(self) -> "Env":
        self.sidecar.start()
        for name in ADAPTERS:
            self.sidecar.register_adapter(self.store.get(name))
        return self

    def close(self) -> None:
        try:
            self.sidecar.stop()
        finally:
            self.store.close()
        assert _shm_entries(self.prefix) == []

    def call(self, layer: int, group: str, segments=SEGMENTS, rows: int = ROWS, seed: int = 0):
        """(ok, out, expected, base) of one compute call on random x and base output."""
        shape = SHAPES.group(group)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, shape.in_features, generator=g).to(self.dtype)
        base = torch.randn(rows, shape.out_total, generator=g).to(self.dtype)
        out = base.clone()
        ok = self.sidecar.compute(layer, group, x, segments, out)
        known = all(name in self.refs for _, _, name in segments)
        return ok, out, expected_out(self.refs, layer, group, x, base, segments) if known else None, base


@contextlib.contextmanager
def started(adapter_dirs, dtype, **config):
    env = Env(*adapter_dirs, dtype, **config)
    try:
        yield env.start()
    finally:
        env.close()


@pytest.fixture(scope="module")
def env2(adapter_dirs):
    """float32, two workers, c = 1 so every call with >= 2 rows uses both."""
    with started(adapter_dirs, torch.float32, workers=2, tokens_per_core=1, deadline_ms=5000.0) as env:
        yield env


@pytest.fixture(scope="module")
def env1(adapter_dirs):
    """float16, one worker, c profiled at start."""
    with started(adapter_dirs, torch.float16, workers=1, tokens_per_core=0) as env:
        yield env


@contextlib.contextmanager
def deadline(sidecar: CpuLoraSidecar, ms: float):
    old = sidecar.config.deadline_ms
    sidecar.config.deadline_ms = ms
    try:
        yield
    finally:
        sidecar.config.deadline_ms = old


# ---------------------------------------------------------------------------------- pure parts


def test_split_rows_is_balanced_and_contiguous():
    assert split_rows(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_rows(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert split_rows(0, 2) == [(0, 0), (0, 0)]


def test_workers_for_follows_ceil_rows_over_c():
    assert workers_for(128, 64, 16) == 2
    assert workers_for(129, 64, 16) == 3
    assert workers_for(1, 64, 16) == 1
    assert workers_for(1000, 8, 4) == 4


# ---------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("group", GROUPS)
def test_deltas_match_float64_reference_two_workers(env2, group):
    for layer in range(SHAPES.num_layers):
        ok, out, expected, base = env2.call(layer, group, seed=layer)
        assert ok
        assert_close(out, expected, msg=f"layer {layer} {group}")
        assert torch.equal(out[6:8], base[6:8]), "rows without a segment must be untouched"


@pytest.mark.parametrize("group", GROUPS)
def test_deltas_match_float64_reference_one_worker_fp16(env1, group):
    for layer in range(SHAPES.num_layers):
        ok, out, expected, _ = env1.call(layer, group, seed=10 + layer)
        assert ok
        assert_close(out, expected, msg=f"layer {layer} {group}")


def test_decode_style_rows_and_split_segments(env2):
    """One row per request (decode), adjacent rows of one adapter merged, many segments."""
    segments = [(i, i + 1, ("a4", "b8", "c2")[i % 3 if i < 12 else 0]) for i in range(20)]
    ok, out, expected, _ = env2.call(1, "qkv", segments=segments, rows=20, seed=3)
    assert ok
    assert_close(out, expected, msg="decode rows")


def test_submit_then_collect_overlaps_and_matches(env2):
    """The split call the engine uses (post, run the base matmul, collect) gives compute's result;
    a ticket never collected is drained by the next submit rather than corrupting it."""
    shape = SHAPES.group("gate_up")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, shape.in_features, generator=g)
    base = torch.randn(ROWS, shape.out_total, generator=g)
    out = base.clone()
    ticket = env2.sidecar.submit(0, "gate_up", x, SEGMENTS)
    torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # the engine's own work meanwhile
    assert env2.sidecar.collect(ticket, out)
    assert_close(out, expected_out(env2.refs, 0, "gate_up", x, base, SEGMENTS), msg="submit/collect")
    env2.sidecar.submit(1, "gate_up", x, SEGMENTS)  # abandoned
    out2 = base.clone()
    assert env2.sidecar.collect(env2.sidecar.submit(0, "gate_up", x, SEGMENTS), out2)
    assert_close(out2, out, msg="after a drained ticket")


def test_profiled_tokens_per_core(env1):
    stats = env1.sidecar.stats()
    assert stats["tokens_per_core"] >= 1
    assert stats["profile"]["tokens_per_core"] == stats["tokens_per_core"]
    assert len(stats["profile"]["layer_ms"]) == 2


def test_errors_and_oversize(env2):
    shape = SHAPES.group("o")
    x, out = torch.zeros(4, shape.in_features), torch.zeros(4, shape.out_total)
    with pytest.raises(KeyError, match="not registered"):
        env2.sidecar.compute(0, "o", x, [(0, 4, "nope")], out)
    with pytest.raises(ValueError, match="do not match"):
        env2.sidecar.compute(0, "o", x, [(0, 4, "a4")], torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unknown projection group"):
        env2.sidecar.compute(0, "lm_head", x, [(0, 4, "a4")], out)
    with pytest.raises(ValueError, match="outside"):
        env2.sidecar.compute(0, "o", x, [(0, 5, "a4")], out)
    assert env2.sidecar.compute(0, "o", x, [(2, 2, "a4")], out)  # nothing to do
    big_x = torch.randn(MAX_TOKENS + 1, shape.in_features)
    big_out = torch.zeros(MAX_TOKENS + 1, shape.out_total)
    assert not env2.sidecar.compute(0, "o", big_x, [(0, MAX_TOKENS + 1, "a4")], big_out)
    assert not big_out.any(), "a fallback must leave out untouched"
    assert env2.sidecar.stats()["fallback_reasons"]["too_many_rows"] >= 1


def test_sync_roundtrip_us(env2):
    for workers in (1, 2):
        r = env2.sidecar.sync_roundtrip_us(200, workers=workers)
        assert r["workers"] == workers
        assert 0 < r["median_us"] <= r["p99_us"] < 1e6
    assert not env2.sidecar.stats()["armed"], "the measurement restores the armed state"


def test_arm_disarm(env2):
    env2.sidecar.arm()
    try:
        assert env2.sidecar.stats()["armed"]
        ok, out, expected, _ = env2.call(0, "down", seed=5)
        assert ok
        assert_close(out, expected, msg="armed call")
    finally:
        env2.sidecar.disarm()
    assert not env2.sidecar.stats()["armed"]


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_armed_workers_stop_spinning_without_jobs(env2):
    """An engine that never calls disarm() (it failed mid-step) must not keep the cores busy."""
    env2.sidecar.arm()
    try:
        time.sleep(1.3)  # past the armed idle limit (1 s without a job or an arm())
        pids = env2.sidecar.worker_pids()
        before = [_cpu_seconds(p) for p in pids]
        time.sleep(1.0)
        used = [_cpu_seconds(p) - b for p, b in zip(pids, before)]
    finally:
        env2.sidecar.disarm()
    assert max(used) < 0.3, f"armed idle workers used {used} s of CPU in 1 s"


def test_unregister_detaches_workers(env2, adapter_dirs):
    root, refs = adapter_dirs
    host = env2.store.add("extra", str(root / "a4"))
    env2.sidecar.register_adapter(host)
    env2.refs = {**env2.refs, "extra": refs["a4"]}
    ok, out, expected, _ = env2.call(0, "qkv", segments=[(0, ROWS, "extra")])
    assert ok
    assert_close(out, expected, msg="a newly registered adapter")
    segment = host.shm_name
    pids = env2.sidecar.worker_pids()

    def mapped() -> bool:
        return any(segment in open(f"/proc/{pid}/maps").read() for pid in pids)

    assert mapped()
    assert env2.sidecar.unregister_adapter("extra")
    assert not env2.sidecar.unregister_adapter("extra")
    env2.store.remove("extra")
    assert wait_until(lambda: not mapped(), 5.0), "workers keep an unregistered adapter mapped"


def test_failing_job_falls_back_without_restart(env2):
    """A slot whose segment is gone: worker 0 reports the failure (no deadline wait, no restart);
    the engine still waits for worker 1, held up by SIGSTOP, before it returns, so no stale
    rows of this job can land in the next one's output."""
    shm = shared_memory.SharedMemory(name=f"{env2.prefix}_gone", create=True, size=4096)
    shm.close()
    shm.unlink()
    sidecar = env2.sidecar
    assert sidecar.wait_ready(READY_TIMEOUT_S)
    slot = 255
    sidecar._ctl.set_slot(slot, 10**6, 4, (4,) * 7, f"{env2.prefix}_gone")  # a stale table entry
    sidecar._slots["ghost"] = slot
    pids = sidecar.worker_pids()
    os.kill(pids[1], signal.SIGSTOP)
    resume = threading.Timer(0.4, os.kill, (pids[1], signal.SIGCONT))
    resume.start()
    try:
        start = time.monotonic()
        ok, out, _, base = env2.call(0, "o", segments=[(0, 15, "ghost"), (15, ROWS, "a4")])
        elapsed = time.monotonic() - start
    finally:
        resume.join()
        sidecar.unregister_adapter("ghost")
    assert not ok and torch.equal(out, base)
    assert elapsed >= 0.35, "returned while worker 1 was still computing the failed job"
    assert sidecar.stats()["fallback_reasons"]["worker_error"] >= 1
    assert sidecar.worker_pids() == pids
    ok, out, expected, _ = env2.call(0, "o", seed=4)
    assert ok
    assert_close(out, expected, msg="after a failed job")


# ---------------------------------------------------------------------------------- faults


def test_worker_killed_during_call(env2):
    sidecar = env2.sidecar
    assert sidecar.wait_ready(READY_TIMEOUT_S)
    victim = sidecar.worker_pids()[0]
    restarts = sidecar.stats()["restarts"]
    os.kill(victim, signal.SIGSTOP)  # hold it inside the call ...
    result = {}
    thread = threading.Thread(target=lambda: result.update(zip(("ok", "out", "expected", "base"),
                                                               env2.call(1, "gate_up", seed=7))))
    thread.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)  # ... and kill it there
    thread.join(30)
    assert not thread.is_alive()
    assert result["ok"] is False
    assert torch.equal(result["out"], result["base"]), "no partial result may reach out"
    stats = sidecar.stats()
    assert stats["fallback_reasons"]["dead"] >= 1 and stats["restarts"] == restarts + 1
    assert _gone(victim)
    assert sidecar.wait_ready(READY_TIMEOUT_S), "the killed worker was not replaced"
    assert sidecar.worker_pids()[0] != victim
    ok, out, expected, _ = env2.call(1, "gate_up", seed=8)
    assert ok
    assert_close(out, expected, msg="after replacement")


def test_stalled_worker_misses_deadline(env2):
    sidecar = env2.sidecar
    assert sidecar.wait_ready(READY_TIMEOUT_S)
    victim = sidecar.worker_pids()[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        with deadline(sidecar, 300.0):
            start = time.monotonic()
            ok, out, _, base = env2.call(0, "qkv", seed=9)
            elapsed = time.monotonic() - start
    finally:
        if not _gone(victim):
            os.kill(victim, signal.SIGKILL)
    assert not ok and torch.equal(out, base)
    assert 0.3 <= elapsed < 10.0
    assert sidecar.stats()["fallback_reasons"]["late"] >= 1
    assert _gone(victim), "a late worker must be killed before the buffers are reused"
    assert sidecar.wait_ready(READY_TIMEOUT_S)
    ok, out, expected, _ = env2.call(0, "qkv", seed=9)
    assert ok
    assert_close(out, expected, msg="after deadline replacement")


# ---------------------------------------------------------------------------------- shutdown


def test_stop_leaves_no_process_or_segment(adapter_dirs):
    env = Env(*adapter_dirs, torch.float32, workers=2, tokens_per_core=4)
    try:
        env.start()
        assert env.call(0, "qkv")[0]
        pids = env.sidecar.worker_pids()
        assert all(pids) and _shm_entries(env.sidecar.segment_name)
    finally:
        env.sidecar.stop()
    env.sidecar.stop()  # idempotent
    assert all(_gone(pid) for pid in pids)
    assert _shm_entries(env.sidecar.segment_name) == []
    assert not env.sidecar.healthy()
    with pytest.raises(RuntimeError, match="not running"):
        env.call(0, "qkv")
    env.store.close()
    assert _shm_entries(env.prefix) == []


ORPHAN_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from caraserve_router.contracts.configs import SidecarConfig
    from caraserve_router.lora.shapes import ModelShapes
    from caraserve_router.lora.sidecar import CpuLoraSidecar
    sidecar = CpuLoraSidecar(SidecarConfig(workers=1, tokens_per_core=4, spin_iters=2000),
                             ModelShapes(**{shapes}), torch.float32, sys.argv[1], 16)
    sidecar.start()
    print(sidecar.worker_pids()[0], flush=True)
    time.sleep(60)
""")


def test_workers_exit_when_the_engine_dies():
    """SIGKILL the engine: no atexit runs, the worker notices its parent is gone and exits."""
    prefix = _prefix()
    script = ORPHAN_SCRIPT.replace("{shapes}", repr(SHAPES.__dict__))
    engine = subprocess.Popen([sys.executable, "-c", script, prefix], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(engine.stdout.readline())
    finally:
        engine.kill()
        engine.wait(10)
        engine.stdout.close()
    assert wait_until(lambda: _gone(worker), 10.0), "an orphaned worker kept running"
    # the engine's resource tracker unlinks the segment it can no longer clean up itself
    assert wait_until(lambda: _shm_entries(prefix) == [], 10.0)
