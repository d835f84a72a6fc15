"""The ranks 1..N-1 of a tensor-parallel instance (`--tp N`), driven by the router process.

Upstream LightLLM starts one rpyc `ModelRpcServer` process per rank and its router calls every
rank's `init_batch` / `prefill_batch` / `decode_batch` / `filter_batch` / `merge_batch` /
`remove_batch` / `pause_reqs` each step (`RouterManager._init_batch` etc., over
`self.model_rpcs`), using rank 0's answer. We keep that loop and upstream's router code, with
two differences:

- rank 0 is the router's in-process `CaraBackend` (as with tp = 1), so the router keeps its
  typed, in-process access to rank 0's `LoraRuntime` for admission and adapter control; ranks
  1..N-1 are spawned processes (`rank_main`), each a `CaraBackend` of its rank, reached through
  `RankClient` (a pipe; calls are sent the moment they are made, in order, and answered in
  order, so a rank never waits in a collective for a call that is still queued);
- adapter control and admission (`TpLora`): rank 0 decides (it registers, admits, evicts), and
  every decision is applied, in the same order, on every other rank, whose pool, store and
  sidecar hold only their shard of each adapter (`caraserve_router/lora/tp_shard.py`). The
  ranks' pools are the same size and see the same calls, so they place alike; a rank whose
  host read is still running places at `attach_request` instead.

Any failure of a rank (death, an exception in a step, a refused decision) leaves the ranks out
of step, so it is fatal to the instance: `on_fatal` ends the router process (exit 1), the HTTP
process's `ChildWatch` fails what is in flight with 503 and exits, and the instance's supervisor
(the front end's monitor, Ray) restarts it. A rank dies with the router (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import signal
import threading
import traceback
from typing import Callable

from caraserve_router.contracts.configs import InstanceConfig
from caraserve_router.contracts.processes import SPAWN, die_with_parent, stop_processes

log = logging.getLogger("caraserve.tp")

# What `RankClient` forwards: the backend's step calls (the names upstream's client uses) and
# the LoRA runtime's mutating calls. Rank k answers a backend call with None (rank 0's
# answer is the one used) and a LoRA call with its result.
BACKEND_CALLS = ("add_batch", "prefill_batch", "decode_batch", "filter_batch", "merge_batch", "remove_batch",
                 "pause_reqs")
LORA_CALLS = ("add", "remove", "pin", "unpin", "resolve", "begin_admission", "admit", "prefetch", "map_host")


def rank_config(config: InstanceConfig, rank: int) -> InstanceConfig:
    """Rank `rank`'s copy of the instance config: its own /dev/shm names (KV counters, sidecar
    table), under the instance's prefix so the instance's clean-up removes them too."""
    if rank == 0:
        return config
    return dataclasses.replace(config, shm_prefix=f"{config.shm_prefix}_tp{rank}")


def rank_main(config: InstanceConfig, rank: int, dist_port: int, eos_id, conn) -> None:
    """Process target of rank `rank` >= 1: build its backend, then serve calls until EOF."""
    import lightllm_patches  # noqa: F401  (the patches before LightLLM is used)
    from lightllm_patches._global import set_log_level
    from lightllm_patches.backend import CaraBackend

    die_with_parent(signal.SIGKILL)  # the router is gone: nobody drives this rank any more
    set_log_level(config.log_level)
    config = rank_config(config, rank)
    backend = CaraBackend()
    try:
        backend.init_model({"cara_config": config, "eos_id": eos_id, "shm_prefix": config.shm_prefix,
                            "tp_rank": rank, "world_size": config.tp, "dist_port": dist_port})
    except BaseException:  # noqa: BLE001 - the router reports it and stops
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                return
            try:
                if method in BACKEND_CALLS:
                    getattr(backend, method)(*args)
                    result = None
                elif method in LORA_CALLS:
                    result = getattr(backend.lora, method)(*args)
                else:
                    raise ValueError(f"unknown call {method!r}")
            except Exception as e:  # noqa: BLE001 - the router decides (fatal)
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                continue
            conn.send(("ok", result))
    finally:
        backend.shutdown()


class RankClient:
    """The router's handle on rank k >= 1: upstream `ModelRpcClient`'s async step methods (each
    sent at once, awaited later) and `send` for LoRA calls. One reader thread takes the rank's
    answers in order; a dead rank or a failed call ends in `on_fatal`."""

    def __init__(self, rank: int, proc, conn, on_fatal: Callable[[str], None]):
        self.rank, self.proc, self.conn = rank, proc, conn
        self.on_fatal = on_fatal
        self.closing = False  # set by close(): the end of the pipe is then no failure
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()  # futures, in the order of the calls
        self._reader = threading.Thread(target=self._read, name=f"tp-rank{rank}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                status, value = self.conn.recv()
            except (EOFError, OSError):
                if self.closing:
                    return
                self.proc.join(1)  # reap it, for its exit code
                self.on_fatal(f"tensor-parallel rank {self.rank} died (exit code {self.proc.exitcode})")
                return
            with self._lock:
                future = self._waiting.popleft()
            if status == "ok":
                future.set_result(value)
            else:
                self.on_fatal(f"tensor-parallel rank {self.rank} failed: {value}")
                future.set_exception(RuntimeError(f"tensor-parallel rank {self.rank} failed"))

    def send(self, method: str, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting.append(future)
            try:
                self.conn.send((method, args))
            except (BrokenPipeError, OSError):
                self._waiting.pop()
                self.on_fatal(f"tensor-parallel rank {self.rank} is gone")
                raise RuntimeError(f"tensor-parallel rank {self.rank} is gone") from None
        return future

    def close(self) -> None:
        """The instance stops: close the pipe (the rank sees EOF, shuts down and exits)."""
        self.closing = True
        self.conn.close()

    # upstream ModelRpcClient's interface (RouterManager calls them for every rank, then gathers)
    def _async(self, method: str, *args):
        return asyncio.wrap_future(self.send(method, *args))

    def init_batch(self, batch_id, reqs):
        return self._async("add_batch", batch_id, reqs)

    def prefill_batch(self, batch_id):
        return self._async("prefill_batch", batch_id)

    def decode_batch(self, batch_id):
        return self._async("decode_batch", batch_id)

    def filter_batch(self, batch_id, req_id_list, finished_req_id_list):
        return self._async("filter_batch", batch_id, req_id_list, finished_req_id_list)

    def merge_batch(self, batch_id1, batch_id2):
        return self._async("merge_batch", batch_id1, batch_id2)

    def remove_batch(self, batch_id):
        return self._async("remove_batch", batch_id)

    def pause_reqs(self, batch_id, reqs_list):
        return self._async("pause_reqs", batch_id, reqs_list)


class TpLora:
    """Rank 0's `LoraRuntime` (the router's `AdapterManager` and admission hooks) with every
    decision also applied on the other ranks. Reads (list, stats, info, is_known, ...) are
    rank 0's. A call rank 0 refuses (AdapterError) changes nothing anywhere.

    The other ranks are never waited for here: a rank may be inside a step whose rank-0 part
    has not run yet (it waits for this event loop), so waiting would deadlock. Their pipes are
    FIFO, so each applies the call before anything sent after it; a rank that fails it stops
    the instance (`RankClient.on_fatal`)."""

    def __init__(self, rank0, clients: list[RankClient]):
        self._rank0 = rank0
        self._clients = clients

    def __getattr__(self, name):
        return getattr(self._rank0, name)

    def _everywhere(self, method: str, *args):
        result = getattr(self._rank0, method)(*args)
        for client in self._clients:
            client.send(method, *args)
        return result

    def add(self, name, path):
        return self._everywhere("add", name, path)

    def remove(self, name):
        return self._everywhere("remove", name)

    def pin(self, name):
        return self._everywhere("pin", name)

    def unpin(self, name):
        return self._everywhere("unpin", name)

    def resolve(self, name):
        known = self._rank0.is_known(name)
        info = self._rank0.resolve(name)
        if not known:  # rank 0 registered DIR/name: so does every rank
            for client in self._clients:
                client.send("add", name, self._rank0.resolver.path(name))
        return info

    def begin_admission(self):
        return self._everywhere("begin_admission")

    def admit(self, name):
        return self._everywhere("admit", name)

    def prefetch(self, name):
        return self._everywhere("prefetch", name)


def start_ranks(config: InstanceConfig, dist_port: int, eos_id, on_fatal: Callable[[str], None]) -> list:
    """Spawn ranks 1..tp-1 (they join the group while rank 0 builds its model); returns their
    processes and pipes. `wait_ready` later checks that they came up."""
    started = []
    for rank in range(1, config.tp):
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=rank_main, args=(config, rank, dist_port, eos_id, child),
                             name=f"caraserve-tp{rank}", daemon=False)
        proc.start()
        child.close()
        started.append((rank, proc, parent))
    return started


def wait_ready(started: list, on_fatal: Callable[[str], None], timeout_s: float = 600.0) -> list[RankClient]:
    """Each rank's start-up answer; RuntimeError (and every rank stopped) if one failed."""
    for rank, proc, conn in started:
        answer = conn.recv() if conn.poll(timeout_s) else ("error", f"no answer in {timeout_s:.0f}s")
        if answer[0] != "ok":
            stop_processes([p for _, p, _ in started])
            raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{answer[1]}")
    return [RankClient(rank, proc, conn, on_fatal) for rank, proc, conn in started]
