"""`--cluster ray`: instances as Ray actors placed over the nodes of a Ray cluster.

    python -m caraserve_router.api_server --cluster ray --instances 2 [--ray-address HOST:6379]

Each instance is an `InstanceActor` (`ray_actor.py`) that owns one instance's process tree on
the node Ray placed it on, with the resources the flags below ask for (one GPU per instance
where the cluster has GPUs: Ray sets the actor's visible device). The front end stays the
rank-aware router and talks HTTP to the URL each actor reports, as to local instances.

Lifecycle is Ray's: an actor whose instance process dies exits, Ray restarts it (up to
`--ray-max-restarts`, on another node if its node is lost), and `RayCluster` re-reads its URL
on the next health check; the front end routes to it again once it answers `/health` (the
dispatcher already re-routes requests that had no token yet and ends started ones with an
error). An actor that Ray gave up on is replaced by a new one, with the local cluster's
back-off. Adapters reach instances as bytes through Ray's object store, never as paths.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig
from caraserve_router.contracts.protocol import error_body
from caraserve_router.frontend.cluster import Cluster, InstanceHandle
from caraserve_router.frontend.instance_client import InstanceClient, InstanceError, InstanceUnavailable
from caraserve_router.frontend.ray_actor import AdapterFiles, AdapterSet, InstanceActor
from caraserve_router.frontend.ray_config import PLACEMENTS, RayClusterConfig

log = logging.getLogger("caraserve.ray")

ACTOR_CALL_TIMEOUT_S = 10.0
# Instance actors are named `caraserve-<front end>-instance<i>-<n>` in this Ray namespace, so
# `ray list actors` (and tests) can find them.
RAY_NAMESPACE = "caraserve"
# ActorDiedError this many health checks in a row: Ray gave up restarting the actor.
DEAD_AFTER_CHECKS = 2


@dataclass
class RayInstanceHandle(InstanceHandle):
    """An instance run by a Ray actor; `url` follows the actor across restarts."""

    actor: Any = None
    stop_ref: Any = None
    pid: Optional[int] = None
    node_id: str = ""
    device_kind: str = ""
    dead_checks: int = 0  # consecutive ActorDiedError answers
    actors_created: int = 0

    @property
    def actor_dead(self) -> bool:
        return self.dead_checks >= DEAD_AFTER_CHECKS


async def _call(ref, timeout_s: float = ACTOR_CALL_TIMEOUT_S):
    """Await a Ray ObjectRef on the running event loop (any loop, uvloop included)."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


# --------------------------------------------------------------------------- adapters as bytes


def check_adapter_dir(path: str) -> None:
    """InstanceError(400) unless `path` is a PEFT adapter directory the front end can read."""
    if not os.path.isdir(path):
        raise InstanceError(400, error_body(f"adapter path {path!r} is not a directory the front end can read", 400))
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise InstanceError(400, error_body(f"{path!r} has no adapter_config.json (not a PEFT adapter)", 400))


def read_adapter_dir(path: str) -> AdapterFiles:
    """The files of one PEFT adapter directory; InstanceError(400) if it is not one."""
    check_adapter_dir(path)
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                files[name] = f.read()
    return files


def read_adapter_set(root: str) -> AdapterSet:
    """Every adapter (subdirectory with an adapter_config.json) of `--adapters DIR`."""
    return {name: read_adapter_dir(os.path.join(root, name)) for name in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, name, "adapter_config.json"))}


class AdapterBundles:
    """Adapter directories the front end read, each put once into Ray's object store."""

    def __init__(self):
        self.refs: dict = {}  # (real path, files' (name, size, mtime)) -> ObjectRef of AdapterFiles

    def ref(self, path: str):
        import ray

        real = os.path.realpath(path)
        check_adapter_dir(real)
        try:
            key = (real, tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in sorted(
                os.scandir(real), key=lambda e: e.name) if e.is_file()))
        except OSError as e:
            raise InstanceError(400, error_body(f"cannot read adapter {path!r}: {e}", 400)) from e
        if key not in self.refs:
            self.refs = {k: v for k, v in self.refs.items() if k[0] != real}  # older versions of it
            self.refs[key] = ray.put(read_adapter_dir(real))
        return self.refs[key]


class RayInstanceClient(InstanceClient):
    """HTTP client of a Ray instance: follows its URL, ships adapters to its node first."""

    def __init__(self, handle: RayInstanceHandle, session, request_timeout_s: float, bundles: AdapterBundles):
        self.handle = handle
        self.bundles = bundles
        super().__init__(handle.url, session, request_timeout_s)

    @property
    def url(self) -> str:
        return self.handle.url.rstrip("/")

    @url.setter
    def url(self, value: str) -> None:
        self.handle.url = value

    async def load_adapter(self, name: str, path: str) -> dict:
        """`path` is the front end's; the actor writes the bytes on its node and the instance
        registers them from there."""
        ref = self.bundles.ref(path)
        try:
            local = await _call(self.handle.actor.stage_adapter.remote(name, ref), 120.0)
        except Exception as e:  # noqa: BLE001 - Ray errors: the instance cannot take it now
            raise InstanceUnavailable(f"instance {self.handle.index}: could not stage adapter {name!r}: {e}") from e
        return await super().load_adapter(name, local)


# --------------------------------------------------------------------------- launcher


class RayLauncher:
    """Starts and stops instance actors (the `LocalLauncher` interface, on Ray)."""

    def __init__(self, config: RayClusterConfig, log_dir: str, shm_prefix: str = "caraserve"):
        self.config = config
        self.log_dir = os.path.abspath(log_dir)
        self.shm_prefix = shm_prefix
        self.started_runtime = False
        self.adapters_ref = None
        self._actor_cls = None
        self.run_id = uuid.uuid4().hex[:8]

    def connect(self, adapters_dir: Optional[str]) -> None:
        """Join (or start) the Ray runtime; put `--adapters DIR`'s bytes in its object store."""
        import ray

        if not ray.is_initialized():
            # ray.init replaces the driver's SIGTERM handler with one that exits at once; the
            # front end's own handler unwinds through `finally` and stops the instances first.
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            if self.config.address:
                ray.init(address=self.config.address, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
                self.started_runtime = True
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if "node:" not in k})
        self._actor_cls = ray.remote(InstanceActor)
        if adapters_dir:
            adapters = read_adapter_set(adapters_dir)
            self.adapters_ref = ray.put(adapters)
            log.info("ray: %d adapter(s) of %s in the object store", len(adapters), adapters_dir)

    def _gpus(self, tp: int = 1) -> float:
        """GPUs one actor asks Ray for: a tensor-parallel instance holds `tp` (one per rank; Ray's
        CUDA_VISIBLE_DEVICES then lists them, and rank k takes the k-th)."""
        import ray

        if self.config.gpus_per_instance >= 0:
            return self.config.gpus_per_instance
        return float(tp) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def start(self, handle: RayInstanceHandle) -> None:
        """Create the actor; its URL arrives with the next `RayCluster.refresh` (non-blocking,
        so a restart never stalls the event loop while Ray finds room)."""
        config = dataclasses.replace(handle.config, lora=dataclasses.replace(handle.config.lora, adapters=None),
                                     sidecar=dataclasses.replace(handle.config.sidecar))
        handle.actor = self._actor_cls.options(
            num_cpus=self.config.cpus_per_instance, num_gpus=self._gpus(handle.config.tp),
 max_restarts=self.config.max_restarts,
            scheduling_strategy=PLACEMENTS[self.config.placement], namespace=RAY_NAMESPACE,
            name=f"caraserve-{self.run_id}-instance{handle.index}-{handle.actors_created}",
        ).remote(config, handle.index, self.log_dir, self.adapters_ref, self.shm_prefix,
                  f"{self.shm_prefix}_hs{self.run_id}")  # the actors of one node share adapter copies
        handle.actors_created += 1
        handle.url = ""
        handle.pid = None
        handle.dead_checks = 0
        handle.stop_ref = None
        handle.started_at = time.time()
        handle.healthy = False
        log.info("ray: created the actor of instance %d", handle.index)

    @staticmethod
    def signal_stop(handle: RayInstanceHandle) -> None:
        if handle.actor is not None and handle.stop_ref is None and not handle.actor_dead:
            handle.stop_ref = handle.actor.stop.remote()

    def stop(self, handle: RayInstanceHandle, grace_s: float = 20.0) -> None:
        import ray

        if handle.actor is None:
            return
        self.signal_stop(handle)
        if handle.stop_ref is not None:
            try:
                ray.get(handle.stop_ref, timeout=grace_s)
            except Exception as e:  # noqa: BLE001 - dead or stuck: killed below either way
                log.warning("ray: instance %d did not stop cleanly: %s", handle.index, type(e).__name__)
        ray.kill(handle.actor, no_restart=True)
        handle.actor = None
        handle.stop_ref = None
        handle.healthy = False

    @staticmethod
    def kill(handles: list[RayInstanceHandle], wait_s: float = 2.0) -> None:
        """Kill the actors now (any thread); each instance gets SIGTERM from the kernel
        (PR_SET_PDEATHSIG) and cleans up after itself. (`wait_s`: the local launcher's signature;
        Ray's processes may be on other hosts, so there is nothing here to wait for.)"""
        import ray

        for handle in handles:
            if handle.actor is None:
                continue
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray is shutting down
                pass

    @staticmethod
    def alive(handle: RayInstanceHandle) -> bool:
        return handle.actor is not None and not handle.actor_dead

    def shutdown(self) -> None:
        import ray

        if self.started_runtime and ray.is_initialized():
            ray.shutdown()


# --------------------------------------------------------------------------- cluster


class RayCluster(Cluster):
    """`Cluster` whose instances are Ray actors: URLs are re-read after restarts."""

    launcher: RayLauncher

    async def refresh(self) -> None:
        """Ask every actor where its instance is (after a restart: a new process and port)."""
        import ray

        async def one(i: int, h: RayInstanceHandle) -> None:
            if h.actor is None:
                return
            try:
                info = await _call(h.actor.info.remote())
            except ray.exceptions.ActorDiedError:
                h.dead_checks += 1
                return
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                return  # restarting, or busy: ask again next time
            h.dead_checks = 0
            if info["pid"] != h.pid:
                if h.pid is not None:
                    h.restarts += 1
                    log.warning("instance %d restarted by Ray: %s on node %s (was pid %s)", i, info["url"],
                                info["node_id"][:8], h.pid)
                    if h.healthy:  # restarted between two health checks: down first, so that coming
                        h.healthy = False  # up again restores its run-time adapters
                        h.failures += 1
                        self.on_down(i)
                h.pid, h.node_id, h.device_kind, h.log_path = (info["pid"], info["node_id"], info["device_kind"],
                                                               info["log_path"])
                h.url = info["url"]
                h.started_at = time.time()

        await asyncio.gather(*(one(i, h) for i, h in enumerate(self.handles) if isinstance(h, RayInstanceHandle)))

    async def wait_ready(self, timeout_s: Optional[float] = None) -> None:
        timeout_s = timeout_s or self.launcher.config.start_timeout_s
        deadline = time.time() + timeout_s
        pending = set(range(len(self.handles)))
        while pending:
            await self.refresh()
            for i in list(pending):
                h = self.handles[i]
                if h.local and not self.launcher.alive(h):
                    raise RuntimeError(f"instance {i}'s actor died during start-up (Ray gave up after "
                                       f"{self.launcher.config.max_restarts} restarts); see {h.log_path} on its node")
                if h.url and await self.clients[i].health():
                    h.healthy = True
                    h.crash_loops = 0
                    pending.discard(i)
                    log.info("instance %d ready at %s (node %s, %s)", i, h.url, h.node_id[:8], h.device_kind)
            if pending and time.time() > deadline:
                raise RuntimeError(f"instances {sorted(pending)} not ready after {timeout_s:.0f}s")
            if pending:
                await asyncio.sleep(0.5)

    async def check_once(self) -> None:
        await self.refresh()
        await super().check_once()

    def new_instance(self, template: InstanceConfig, index: int, session, request_timeout_s: float):
        """(handle, client) of one more instance actor (not started: `launcher.start(handle)`)."""
        handle = ray_handles(template, index + 1)[index]
        return handle, RayInstanceClient(handle, session, request_timeout_s, self.bundles)

    def stop(self, grace_s: float = 15.0) -> None:
        try:
            super().stop(grace_s)
        finally:
            self.launcher.shutdown()


def ray_handles(template: InstanceConfig, count: int) -> list[RayInstanceHandle]:
    handles = []
    for i in range(count):
        fields = {k: v for k, v in vars(template).items() if k not in ("lora", "sidecar")}
        config = InstanceConfig(**{**fields, "name": f"instance{i}"}, lora=LoRAConfig(**vars(template.lora)),
                                sidecar=SidecarConfig(**vars(template.sidecar)))
        handles.append(RayInstanceHandle(index=i, url="", config=config))
    return handles


def start_ray_cluster(front, template: InstanceConfig, session) -> RayCluster:
    """A `RayCluster` of `front.instances` instance actors (created, not yet ready: `await
    wait_ready()`), plus the instances at `--instance-urls` (attached as with `--cluster local`).
    `front` is the FrontendConfig; `template` the config every instance's is copied from."""
    front.ray.validate()
    launcher = RayLauncher(front.ray, front.log_dir, front.shm_prefix)
    launcher.connect(template.lora.adapters)
    bundles = AdapterBundles()
    handles: list = ray_handles(template, front.instances)
    clients: list = [RayInstanceClient(h, session, front.request_timeout_s, bundles) for h in handles]
    for url in front.urls:
        handles.append(InstanceHandle(index=len(handles), url=url))
        clients.append(InstanceClient(url, session, front.request_timeout_s))
    cluster = RayCluster(handles, launcher, clients, front.restart_dead)
    cluster.bundles = bundles
    cluster.start_local()
    return cluster
