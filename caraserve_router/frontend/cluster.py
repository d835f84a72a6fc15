"""The instances behind the front end: local ones it starts (and restarts), remote ones it attaches.

A local instance is `python -m lightllm_patches.instance ...` in its own process group, so
stopping it (SIGTERM, then SIGKILL of the group) leaves nothing behind even if one of its
children ignores signals; its shared memory carries a prefix the front end sweeps afterwards.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig, to_cli
from caraserve_router.contracts.processes import free_ports, kill_groups, remove_shm

from caraserve_router.frontend.gpu_assignment import gpu_env
from caraserve_router.frontend.instance_client import InstanceClient
from caraserve_router.contracts.host_segments import remove_idle

log = logging.getLogger("caraserve.cluster")

RESTART_BACKOFF_MAX_S = 60.0


@dataclass
class InstanceHandle:
    """One instance as the front end manages it."""

    index: int
    url: str
    config: Optional[InstanceConfig] = None  # None: remote (attached by URL)
    proc: Optional[subprocess.Popen] = None
    healthy: bool = False
    restarts: int = 0
    failures: int = 0
    log_path: Optional[str] = None
    started_at: float = field(default_factory=time.time)
    crash_loops: int = 0  # restarts in a row that died before becoming healthy (for back-off)
    gpu: Optional[str] = None  # CUDA_VISIBLE_DEVICES of a local instance (gpu_assignment.py)
    removed: bool = False  # taken out at run time (routes_instances.py): never checked or restarted again

    @property
    def local(self) -> bool:
        return self.config is not None

    @property
    def name(self) -> str:
        return self.config.display_name if self.config else self.url


def _command(config: InstanceConfig) -> list[str]:
    return ([sys.executable, "-m", "lightllm_patches.instance"]
            + to_cli(config, skip=("lora", "sidecar"))
            + to_cli(config.lora, prefix="lora_")
            + to_cli(config.sidecar, prefix="sidecar_"))


class LocalLauncher:
    """Starts and stops local instance processes.

    The launcher interface the Cluster uses (another launcher, e.g. Ray's, provides the same):
    `start(handle)`, `signal_stop(handle)`, `stop(handle, grace_s)`, `kill(handle)` (immediate,
    safe from a signal handler or another thread) and `alive(handle)`.
    """

    def __init__(self, log_dir: str, shm_prefix: str = "caraserve"):
        self.log_dir = log_dir
        self.shm_prefix = shm_prefix
        # one host copy of each adapter for all instances of this run (see contracts.host_segments)
        self.host_store = f"{shm_prefix}_hs{uuid.uuid4().hex[:8]}"
        os.makedirs(log_dir, exist_ok=True)

    def start(self, handle: InstanceHandle) -> None:
        config = handle.config
        config.shm_prefix = f"{self.shm_prefix}_i{handle.index}_{uuid.uuid4().hex[:8]}"
        config.host_store_prefix = self.host_store
        handle.log_path = os.path.join(self.log_dir, f"instance{handle.index}.log")
        out = open(handle.log_path, "ab")
        handle.proc = subprocess.Popen(_command(config), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env=gpu_env(handle.gpu))
        out.close()
        handle.started_at = time.time()
        handle.healthy = False
        log.info("started instance %d (pid %d) on %s, log %s", handle.index, handle.proc.pid, handle.url,
                 handle.log_path)

    @staticmethod
    def signal_stop(handle: InstanceHandle) -> None:
        """Ask the instance to stop (it stops its own children and cleans its shm)."""
        if handle.proc is not None and handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)

    def stop(self, handle: InstanceHandle, grace_s: float = 15.0) -> None:
        proc = handle.proc
        if proc is None:
            return
        self.signal_stop(handle)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        kill_groups([proc.pid])  # anything of its group still alive; returns once it is gone
        proc.wait()
        remove_shm(handle.config.shm_prefix)
        remove_idle(self.host_store)  # the adapter copies no live instance maps
        handle.proc = None
        handle.healthy = False

    def kill(self, handles: list[InstanceHandle], wait_s: float = 2.0) -> None:
        """SIGKILL the instances' whole process groups at once, wait (at most `wait_s`) until
        they are gone, and remove their shared memory."""
        kill_groups([h.proc.pid for h in handles if h.proc is not None], wait_s)
        for h in handles:
            if h.config is not None and h.config.shm_prefix:
                remove_shm(h.config.shm_prefix)
        remove_idle(self.host_store)

    @staticmethod
    def alive(handle: InstanceHandle) -> bool:
        return handle.proc is not None and handle.proc.poll() is None


def local_handles(template: InstanceConfig, count: int, base_port: int, host: str) -> list[InstanceHandle]:
    ports = [base_port + i for i in range(count)] if base_port else free_ports(count)
    handles = []
    for i, port in enumerate(ports):
        lora = LoRAConfig(**vars(template.lora))
        sidecar = SidecarConfig(**vars(template.sidecar))
        fields = {k: v for k, v in vars(template).items() if k not in ("lora", "sidecar")}
        config = InstanceConfig(**{**fields, "port": port, "host": host, "name": f"instance{i}"},
                                lora=lora, sidecar=sidecar)
        handles.append(InstanceHandle(index=i, url=f"http://{host}:{port}", config=config))
    return handles


class Cluster:
    """All instances, their health, and restarts of local ones that die."""

    def __init__(self, handles: list[InstanceHandle], launcher: Optional[LocalLauncher],
                 clients: list[InstanceClient], restart_dead: bool = True):
        self.handles = handles
        self.launcher = launcher
        self.clients = clients
        self.restart_dead = restart_dead
        self.on_down = lambda index: None  # set by the front end: fail what was in flight there
        self.on_up = lambda index: None

    def start_local(self) -> None:
        for h in self.handles:
            if h.local:
                self.launcher.start(h)

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        start = time.time()
        deadline = start + timeout_s
        pending = set(range(len(self.handles)))
        next_note = start + 10.0
        while pending:
            for i in list(pending):
                h = self.handles[i]
                if h.local and not self.launcher.alive(h):
                    raise RuntimeError(f"instance {i} exited during start-up; see {h.log_path}:\n{_tail(h.log_path)}")
                if await self.clients[i].health():
                    h.healthy = True
                    pending.discard(i)
                    log.info("instance %d ready at %s", i, h.url)
            if pending and time.time() > deadline:
                raise RuntimeError(f"instances {sorted(pending)} not ready after {timeout_s:.0f}s")
            if pending and time.time() > next_note:  # progress: loading a model can take a while
                log.info("still starting instance(s) %s (%.0f s; logs in %s)", sorted(pending), time.time() - start,
                         os.path.dirname(self.handles[min(pending)].log_path or "") or "their hosts")
                next_note = time.time() + 10.0
            if pending:
                await asyncio.sleep(0.5)

    async def check_once(self) -> None:
        for i, h in enumerate(self.handles):
            if h.removed:
                continue
            dead = h.local and not self.launcher.alive(h)
            ok = not dead and await self.clients[i].health(timeout_s=5.0)
            if h.removed:  # removed while the probe was in flight: leave it to the removal
                continue
            if h.healthy and not ok:
                h.healthy = False
                h.failures += 1
                log.error("instance %d (%s) is down", i, h.url)
                self.on_down(i)
            elif ok and not h.healthy:
                h.healthy = True
                h.crash_loops = 0
                log.info("instance %d (%s) is up", i, h.url)
                self.on_up(i)
            # Decided apart from the health transition: the health probe can fail a moment
            # before the killed process is reaped, and the dead one must still be restarted.
            if dead and self.restart_dead:
                self._restart(h)

    def _restart(self, h: InstanceHandle) -> None:
        # An instance that keeps dying during start-up is retried with back-off, not in a loop.
        backoff_s = min(RESTART_BACKOFF_MAX_S, 2.0 ** h.crash_loops - 1.0)
        if time.time() < h.started_at + backoff_s:
            return
        log.warning("restarting instance %d (%s); see %s", h.index, h.url, h.log_path)
        self.launcher.stop(h)
        h.restarts += 1
        h.crash_loops += 1
        self.launcher.start(h)

    async def monitor(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - the monitor must keep running
                log.exception("health check failed")

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the local instances: ask all at once, then wait at most `grace_s` in all."""
        local = [h for h in self.handles if h.local]
        for h in local:
            self.launcher.signal_stop(h)
        deadline = time.monotonic() + grace_s
        for h in local:
            self.launcher.stop(h, max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """End every local instance at once (a second signal, or the shutdown deadline)."""
        self.launcher.kill([h for h in self.handles if h.local])


def _tail(path: Optional[str], lines: int = 30) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
