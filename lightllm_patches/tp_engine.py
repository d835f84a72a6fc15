"""A tensor-parallel offline engine: N rank processes of LightLLM's own TP llama, one batch API.

Each rank is a spawned process that joins a torch.distributed group (gloo on the CPU, NCCL on
CUDA with rank k on GPU k, as upstream `ModeBackend.init_model` does) and runs an
`OfflineEngine` built with `tp_rank` / `world_size`: LightLLM's weight classes load that rank's
slice of the base, its layers all-reduce o and down and all-gather the logits, and the rank's
`LoraRuntime` holds only its shard of every adapter (`caraserve_router/lora/tp_shard.py`), in its
own pool, host segments, link and (cpu-assist) sidecar. Every rank runs every step on the same
inputs (upstream's router calls every rank's `ModelRpcServer` the same way); after the
all-gather each rank holds the full logits, so greedy decoding picks the same token on all of
them, and rank 0's logits are returned.

    engine = TpOfflineEngine(model_dir, tp=2, lora=LoRAConfig(mode="cached"), adapters={"a": path})
    logits = engine.run([[1, 2, 3], [4, 5]], ["a", None], steps=8)   # list of [batch, vocab]
    engine.close()

A rank that dies (or raises) fails the call with `TpRankError` and the engine stops every other
rank: they would otherwise wait in their next collective until gloo's / NCCL's timeout.
"""
from __future__ import annotations

import multiprocessing.connection
import os
import traceback
import uuid
from typing import Optional

from caraserve_router.contracts.processes import SPAWN, free_ports, remove_shm, stop_processes


POLL_S = 0.2  # how often the parent checks that every rank is alive while it waits


class TpRankError(RuntimeError):
    """A rank of a tensor-parallel engine died or failed; the engine is stopped."""


def _rank_main(rank: int, world: int, port: int, model_dir: str, kwargs: dict, conn) -> None:
    """One rank: join the group, build the engine, then serve (method, args) calls on `conn`."""
    import torch

    try:
        import lightllm_patches  # noqa: F401  (the patches before LightLLM is used)
        from lightllm_patches.offline import OfflineEngine
        from lightllm_patches.tp_group import join_group, leave_group

        torch.set_num_threads(kwargs.pop("torch_threads", 1))
        device = str(join_group(torch.device(kwargs.pop("device", "cpu")), rank, world, port))

        def open_engine(options: dict):
            return OfflineEngine(model_dir, device=device, tp_rank=rank, world_size=world, **options)

        engine = open_engine(kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        while True:
            method, args = conn.recv()
            if method == "close":
                break
            try:
                if method == "reopen":  # a new engine (other LoRA settings) in the same process group
                    engine.close()
                    engine = None
                    engine = open_engine({**kwargs, **args[0]})
                    result = None
                else:
                    result = _call(engine, rank, method, args)
            except Exception:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
                continue
            conn.send(("ok", result))
    finally:
        if engine is not None:
            engine.close()
        leave_group()


def _call(engine, rank: int, method: str, args: tuple):
    if method == "run":
        out = engine.run(*args)
        return [t.cpu() for t in out] if rank == 0 else None  # every rank holds the same logits
    if method == "stats":
        return engine.runtime.stats()
    if method == "shard_bytes":  # (host segment bytes, device pool bytes) of one adapter on this rank
        key = engine.runtime.names.key(args[0])
        host = engine.runtime.store.get(key)
        entry = engine.runtime.pool.get(key)
        return host.nbytes, engine.runtime.pool.entry_bytes(entry) if entry is not None else None
    raise ValueError(f"unknown call {method!r}")


class TpOfflineEngine:
    """`OfflineEngine`'s API over `tp` rank processes (see the module docstring).

    Keyword arguments are `OfflineEngine`'s (device, lora, sidecar, adapters, ...), plus
    `torch_threads` per rank (default 1) and `start_timeout_s`."""

    def __init__(self, model_dir, *, tp: int = 2, start_timeout_s: float = 300.0, **kwargs):
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        kwargs["adapters"] = {n: os.path.abspath(str(p)) for n, p in (kwargs.get("adapters") or {}).items()}
        device = str(kwargs.get("device", "cpu"))
        if device.startswith("cuda"):
            import torch

            if torch.cuda.device_count() < tp:
                raise ValueError(f"tp={tp} needs {tp} GPUs; this host has {torch.cuda.device_count()}")
        self.tp = tp
        # every rank's /dev/shm names start with this, so that _stop can remove what a killed
        # rank leaves (its engine's close() never ran)
        self.shm_prefix = f"cstp_{uuid.uuid4().hex[:8]}"
        port = free_ports(1)[0]
        self._conns, self._procs = [], []
        for rank in range(tp):
            parent, child = SPAWN.Pipe()
            options = {**kwargs, "shm_prefix": f"{self.shm_prefix}_r{rank}"}
            proc = SPAWN.Process(target=_rank_main, args=(rank, tp, port, str(model_dir), options, child),
                                 name=f"caraserve-tp{rank}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            self._gather(timeout_s=start_timeout_s)
        except BaseException:
            self._stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _gather(self, timeout_s: Optional[float] = None) -> list:
        """Every rank's answer to the last call; a dead or failed rank stops the engine."""
        answers: dict[int, object] = {}
        waited = 0.0
        while len(answers) < self.tp:
            pending = [r for r in range(self.tp) if r not in answers]
            ready = multiprocessing.connection.wait([self._conns[r] for r in pending], timeout=POLL_S)
            for r in pending:
                if self._conns[r] in ready:
                    try:
                        status, value = self._conns[r].recv()
                    except (EOFError, OSError):
                        status, value = "error", f"rank {r} died (exit code {self._procs[r].exitcode})"
                    if status != "ok":
                        self._stop()
                        raise TpRankError(f"tensor-parallel rank {r} failed:\n{value}")
                    answers[r] = value
                elif not self._procs[r].is_alive():
                    self._stop()
                    raise TpRankError(f"tensor-parallel rank {r} died (exit code {self._procs[r].exitcode})")
            waited += POLL_S
            if timeout_s is not None and waited > timeout_s and len(answers) < self.tp:
                self._stop()
                raise TpRankError(f"tensor-parallel ranks gave no answer in {timeout_s:.0f}s")
        return [answers[r] for r in range(self.tp)]

    def call(self, method: str, *args) -> list:
        """`method` on every rank; their results in rank order."""
        if not self._procs:
            raise TpRankError("the tensor-parallel engine is stopped")
        for conn in self._conns:
            try:
                conn.send((method, args))
            except (BrokenPipeError, OSError):
                pass  # that rank is gone: _gather reports it
        return self._gather()

    def reopen(self, **kwargs) -> None:
        """Replace every rank's engine by one with `kwargs` changed (e.g. another `lora`), keeping
        the rank processes and their process group (starting ranks takes seconds)."""
        if "adapters" in kwargs:
            kwargs["adapters"] = {n: os.path.abspath(str(p)) for n, p in kwargs["adapters"].items()}
        self.call("reopen", kwargs)

    def run(self, prompts: list[list[int]], adapters: Optional[list] = None, steps: int = 0) -> list:

        """Rank 0's logits [batch, vocab] of the prefill and of `steps` greedy decode steps."""
        return self.call("run", prompts, adapters, steps)[0]

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=30)
        self._stop()

    def _stop(self) -> None:
        stop_processes([p for p in self._procs if p.is_alive()])
        remove_shm(self.shm_prefix)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
