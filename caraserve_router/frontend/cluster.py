"""The instances behind the front end: local ones it starts (and restarts), remote ones it attaches.

A local instance is `python -m lightllm_patches.instance ...` in its own process group, so
stopping it (SIGTERM, then SIGKILL of the group) leaves nothing behind even if one of its
children ignores signals; its shared memory carries a prefix the front end sweeps afterwards.

An instance binds its port itself (`--port 0`, or the first free one from `--instance-base-port
+ i`) and reports it in a port file: a port chosen here and bound later could be taken in
between by any outgoing connection of the host. It gets the cluster's instance key in its
environment and its share of the host's cores (`--cpu-cores`). An instance that fails at start
is retried; the front end starts once every instance is up or out of retries, if one is up.
An instance whose process lives but misses health checks for `hung_after_s` is killed and
restarted (SIGKILL: a stopped process never handles SIGTERM).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig, instance_command
from caraserve_router.contracts.instance_auth import INSTANCE_KEY_ENV
from caraserve_router.contracts.processes import kill_groups, read_port_file, remove_shm

from caraserve_router.frontend.gpu_assignment import gpu_env
from caraserve_router.frontend.instance_client import InstanceClient
from caraserve_router.contracts.host_segments import remove_idle

log = logging.getLogger("caraserve.cluster")

RESTART_BACKOFF_MAX_S = 60.0
START_RETRIES = 2  # further starts of an instance that exits during start-up (not for a bad config)
CONFIG_ERROR_EXIT = 2  # `lightllm_patches.instance` exits 2 on a bad config: a retry cannot help


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
    port_file: str = ""  # where a local instance reports the port it bound (url is "" until then)
    unhealthy_since: Optional[float] = None  # first failed probe of a live process (hung detection)
    start_failure: str = ""  # why its start-up failed for good (wait_ready)
    was_up: bool = False  # healthy since its last start (only such an instance can be declared hung)

    @property
    def local(self) -> bool:
        return self.config is not None

    @property
    def name(self) -> str:
        return self.config.display_name if self.config else self.url


class HandleClient(InstanceClient):
    """The client of a launched instance: it follows the handle's URL, which changes when the
    instance binds a new port (a restart)."""

    def __init__(self, handle: InstanceHandle, session, request_timeout_s: float = 600.0):
        self.handle = handle
        super().__init__(handle.url, session, request_timeout_s)

    @property
    def url(self) -> str:
        return self.handle.url.rstrip("/")

    @url.setter
    def url(self, value: str) -> None:
        self.handle.url = value


def host_core_shares(count: int, cores: Optional[list] = None) -> list[str]:
    """`count` disjoint, contiguous shares of this host's usable cores, as --cpu-cores values
    (more instances than cores: one core each, shared round-robin)."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if count <= 0:
        return []
    if count >= len(cores):
        return [str(cores[i % len(cores)]) for i in range(count)]
    base, extra = divmod(len(cores), count)
    shares, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        shares.append(",".join(map(str, cores[start:start + size])))
        start += size
    return shares


class LocalLauncher:
    """Starts and stops local instance processes.

    The launcher interface the Cluster uses (another launcher, e.g. Ray's, provides the same):
    `start(handle)`, `signal_stop(handle)`, `stop(handle, grace_s)`, `kill(handle)` (immediate,
    safe from a signal handler or another thread) and `alive(handle)`.
    """

    def __init__(self, log_dir: str, shm_prefix: str = "caraserve", key: str = ""):
        self.log_dir = log_dir
        self.shm_prefix = shm_prefix
        self.key = key  # the cluster's instance key: in each instance's environment, never its command line
        # one host copy of each adapter for all instances of this run (see contracts.host_segments)
        self.host_store = f"{shm_prefix}_hs{uuid.uuid4().hex[:8]}"
        os.makedirs(log_dir, exist_ok=True)

    def start(self, handle: InstanceHandle) -> None:
        config = handle.config
        config.shm_prefix = f"{self.shm_prefix}_i{handle.index}_{uuid.uuid4().hex[:8]}"
        config.host_store_prefix = self.host_store
        handle.log_path = os.path.join(self.log_dir, f"instance{handle.index}.log")
        handle.port_file = config.port_file = os.path.join(self.log_dir, f"instance{handle.index}.port")
        if os.path.exists(handle.port_file):
            os.unlink(handle.port_file)  # the last run's: the new one reports its own
        handle.url = ""
        env = gpu_env(handle.gpu) or dict(os.environ)
        if self.key:
            env[INSTANCE_KEY_ENV] = self.key
        out = open(handle.log_path, "ab")
        handle.proc = subprocess.Popen(instance_command(config), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        out.close()
        handle.started_at = time.time()
        handle.healthy = False
        handle.unhealthy_since = None
        handle.was_up = False
        log.info("started instance %d (pid %d), cores %s, log %s", handle.index, handle.proc.pid,
                 config.cpu_cores or "all", handle.log_path)

    @staticmethod
    def locate(handle: InstanceHandle) -> None:
        """Set the URL of an instance from the port it reported (nothing until it has)."""
        if not handle.url and handle.port_file:
            port = read_port_file(handle.port_file)
            if port:
                handle.url = f"http://{handle.config.host}:{port}"

    @staticmethod
    def exit_code(handle: InstanceHandle) -> Optional[int]:
        return handle.proc.poll() if handle.proc is not None else None

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


def local_handles(template: InstanceConfig, count: int, base_port: int, host: str,
                  split_cores: bool = True) -> list[InstanceHandle]:
    """Handles of `count` local instances: ports from `base_port` (0: any), the host's cores split
    between them unless `split_cores` is off or the template names its own cores."""
    shares = host_core_shares(count) if split_cores and not template.cpu_cores else [template.cpu_cores] * count
    handles = []
    for i in range(count):
        lora = LoRAConfig(**vars(template.lora))
        sidecar = SidecarConfig(**vars(template.sidecar))
        fields = {k: v for k, v in vars(template).items() if k not in ("lora", "sidecar")}
        port = base_port + i if base_port else 0
        config = InstanceConfig(**{**fields, "port": port, "host": host, "name": f"instance{i}",
                                   "cpu_cores": shares[i]}, lora=lora, sidecar=sidecar)
        handles.append(InstanceHandle(index=i, url="", config=config))
    return handles


class Cluster:
    """All instances, their health, and restarts of local ones that die or hang."""

    def __init__(self, handles: list[InstanceHandle], launcher: Optional[LocalLauncher],
                 clients: list[InstanceClient], restart_dead: bool = True, hung_after_s: float = 0.0):
        self.handles = handles
        self.launcher = launcher
        self.clients = clients
        self.restart_dead = restart_dead
        self.hung_after_s = hung_after_s  # 0: a live process is never declared hung
        self.on_down = lambda index: None  # set by the front end: fail what was in flight there
        self.on_up = lambda index: None

    def start_local(self) -> None:
        for h in self.handles:
            if h.local:
                self.launcher.start(h)

    def _locate(self, h: InstanceHandle) -> None:
        locate = getattr(self.launcher, "locate", None)
        if h.local and locate is not None:
            locate(h)

    def _start_failed(self, h: InstanceHandle) -> bool:
        """A local instance died during start-up: retry it (True) or give it up (False)."""
        code = self.launcher.exit_code(h) if hasattr(self.launcher, "exit_code") else None
        reason = f"instance {h.index} exited during start-up; see {h.log_path}:\n{_tail(h.log_path)}"
        if code == CONFIG_ERROR_EXIT or h.crash_loops >= START_RETRIES:
            h.start_failure = reason
            return False
        log.warning("instance %d exited during start-up (code %s); starting it again", h.index, code)
        self.launcher.stop(h)
        h.crash_loops += 1
        h.restarts += 1
        self.launcher.start(h)
        return True

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Until every instance is healthy or has failed its start-up for good; raises unless
        one is healthy (the failed ones stay down, and the monitor keeps retrying them)."""
        start = time.time()
        deadline = start + timeout_s
        pending = set(range(len(self.handles)))
        failed: list[int] = []
        next_note = start + 10.0
        while pending:
            for i in list(pending):
                h = self.handles[i]
                if h.local and not self.launcher.alive(h):
                    if not self._start_failed(h):
                        pending.discard(i)
                        failed.append(i)
                    continue
                self._locate(h)
                if h.url and await self.clients[i].health():
                    h.healthy = True
                    h.crash_loops = 0
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
        if failed and not any(h.healthy for h in self.handles):
            raise RuntimeError(self.handles[failed[0]].start_failure)
        for i in failed:
            log.error("serving without %s", self.handles[i].start_failure)

    async def check_once(self) -> None:
        for i, h in enumerate(self.handles):
            if h.removed:
                continue
            dead = h.local and not self.launcher.alive(h)
            self._locate(h)
            ok = not dead and bool(h.url) and await self.clients[i].health(timeout_s=5.0)
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
            elif h.local and not ok and self._hung(h):
                log.error("instance %d (%s) missed health checks for %.0f s while its process lives: killing "
                          "and restarting it", i, h.url, time.time() - h.unhealthy_since)
                self._restart_hung(h)
            if ok:
                h.was_up = True
            if ok or dead:
                h.unhealthy_since = None

    def _hung(self, h: InstanceHandle) -> bool:
        """A live process failing its probes for longer than allowed. (One still starting is not
        hung: loading a model takes a while; only one that was up since its start can hang.)"""
        if not self.hung_after_s or not self.restart_dead or not h.was_up:
            return False
        now = time.time()
        if h.unhealthy_since is None:
            h.unhealthy_since = now
        return now - h.unhealthy_since >= self.hung_after_s

    def _restart_hung(self, h: InstanceHandle) -> None:
        h.unhealthy_since = None
        h.was_up = False
        restart = getattr(self.launcher, "restart_hung", None)
        if restart is not None:  # Ray: the actor kills its instance and Ray restarts the actor
            restart(h)
            return
        self.launcher.kill([h])  # SIGKILL: a stopped (SIGSTOP) process never handles SIGTERM
        h.started_at = 0.0  # no back-off: it did not crash, it hung
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
