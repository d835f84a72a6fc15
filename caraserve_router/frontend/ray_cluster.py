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
back-off; one whose instance hangs (`--hung-after-s`) kills its instance and Ray restarts it.
Adapters reach instances as bytes through Ray's object store, on use, never as paths
(`ray_adapters.py`).

Actors are detached and named in `--ray-namespace` (`ray_attach.py`): a front end that dies
leaves them running, `--ray-attach` serves them from another (several at once share them), and
the namespace's instance key is kept in Ray's KV store (`instance_auth.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig
from caraserve_router.frontend.cluster import Cluster, HandleClient, InstanceHandle
from caraserve_router.frontend.instance_auth import ray_key, use_key
from caraserve_router.frontend.instance_client import InstanceClient, InstanceUnavailable
from caraserve_router.frontend.ray_actor import ActorSettings, InstanceActor
from caraserve_router.frontend.ray_adapters import AdapterBundles, OnUseAdapters, OnUseLoader
from caraserve_router.frontend.ray_attach import actor_name, running_instances
from caraserve_router.frontend.ray_config import PLACEMENTS, RayClusterConfig, require_ray

log = logging.getLogger("caraserve.ray")

ACTOR_CALL_TIMEOUT_S = 10.0
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


# --------------------------------------------------------------------------- client


class RayInstanceClient(HandleClient):
    """HTTP client of a Ray instance: follows its URL, ships adapters to its node first (and
    an on-use adapter before the first request for it there)."""

    def __init__(self, handle: RayInstanceHandle, session, request_timeout_s: float, bundles: AdapterBundles,
                 on_use: OnUseAdapters):
        super().__init__(handle, session, request_timeout_s)
        self.bundles = bundles
        self.on_use = OnUseLoader(on_use)

    async def load_adapter(self, name: str, path: str) -> dict:
        """`path` is the front end's; the actor writes the bytes on its node and the instance
        registers them from there."""
        try:
            ref = self.bundles.ref(path)
            local = await _call(self.handle.actor.stage_adapter.remote(name, ref), 120.0)
        except InstanceUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - Ray errors: the instance cannot take it now
            if getattr(e, "status", 0) == 400:  # not an adapter the front end can read
                raise
            raise InstanceUnavailable(f"instance {self.handle.index}: could not stage adapter {name!r}: {e}") from e
        return await super().load_adapter(name, local)

    async def generate_stream(self, body: dict):
        await self.on_use.ensure(body.get("adapter"), self.handle.pid, self.load_adapter)
        async for event in super().generate_stream(body):
            yield event


# --------------------------------------------------------------------------- launcher


class RayLauncher:
    """Starts and stops instance actors (the `LocalLauncher` interface, on Ray)."""

    def __init__(self, config: RayClusterConfig, log_dir: str, shm_prefix: str = "caraserve",
                 split_cores: bool = True):
        self.config = config
        self.log_dir = os.path.abspath(log_dir)
        self.shm_prefix = shm_prefix
        self.split_cores = split_cores
        self.started_runtime = False
        self._actor_cls = None
        self.key = ""
        self.front_node_ip = ""
        self.host_store = ""
        self.on_use = OnUseAdapters()

    def connect(self, adapters_dir: Optional[str], resolver_dir: Optional[str] = None) -> None:
        """Join (or start) the Ray runtime; learn the namespace's instance key; register the
        adapters of `--adapters DIR` on use (their configs only: no bytes move now)."""
        require_ray()
        import ray

        if not ray.is_initialized():
            # ray.init replaces the driver's SIGTERM handler with one that exits at once; the
            # front end's own handler unwinds through `finally` and stops the instances first.
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            if self.config.address:
                ray.init(address=self.config.address, namespace=self.config.namespace, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, namespace=self.config.namespace, logging_level=logging.WARNING)
                self.started_runtime = True
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if "node:" not in k})
        self._actor_cls = ray.remote(InstanceActor)
        self.key = ray_key(self.config.namespace, self.config.attach)
        self.front_node_ip = ray.util.get_node_ip_address()
        # The actors of one node share one host copy of each adapter; named by the namespace, so
        # the actors an attaching front end adds share them with the running ones.
        self.host_store = f"{self.shm_prefix}_hs{uuid.uuid5(uuid.NAMESPACE_DNS, self.config.namespace).hex[:8]}"
        self.on_use = OnUseAdapters(resolver_dir)
        if adapters_dir:
            start = time.perf_counter()
            count = self.on_use.add_dir(adapters_dir)
            log.info("ray: %d adapter(s) of %s registered in %.2f s; each reaches an instance on its first request "
                     "there", count, adapters_dir, time.perf_counter() - start)

    @property
    def leaves_running(self) -> bool:
        """At exit, leave the instances to other front ends (attached, or asked to)."""
        return self.config.attach or self.config.keep_instances

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
        config = dataclasses.replace(handle.config, lora=dataclasses.replace(handle.config.lora, adapters=None,
                                                                           adapter_dir=None),
                                     sidecar=dataclasses.replace(handle.config.sidecar))
        settings = ActorSettings(
            index=handle.index, log_dir=self.log_dir, shm_prefix=self.shm_prefix, host_store=self.host_store,
            key=self.key, front_node_ip=self.front_node_ip, bind_node_address=self.config.bind_node_address,
            namespace=self.config.namespace, cores=max(1, math.ceil(self.config.cpus_per_instance)),
            split_cores=self.split_cores, orphan_timeout_s=self.config.orphan_timeout_s)
        # Detached: the actor outlives this front end (ray_attach.py); named for the others to find.
        handle.actor = self._actor_cls.options(
            num_cpus=self.config.cpus_per_instance, num_gpus=self._gpus(config.tp),
            max_restarts=self.config.max_restarts,
            scheduling_strategy=PLACEMENTS[self.config.placement], namespace=self.config.namespace,
            name=actor_name(handle.index, handle.actors_created), lifetime="detached",
        ).remote(config, settings)
        handle.actors_created += 1
        handle.url = ""
        handle.pid = None
        handle.dead_checks = 0
        handle.stop_ref = None
        handle.started_at = time.time()
        handle.healthy = False
        handle.was_up = False
        log.info("ray: created the actor of instance %d", handle.index)

    def attach(self, handle: RayInstanceHandle, name: str, generation: int) -> None:
        """Serve the running actor `name` (created by another front end) through `handle`."""
        import ray

        handle.actor = ray.get_actor(name, namespace=self.config.namespace)
        handle.actors_created = generation + 1
        handle.started_at = time.time()

    @staticmethod
    def restart_hung(handle: RayInstanceHandle) -> None:
        """Its instance hangs: the actor SIGKILLs it and exits, and Ray restarts the actor."""
        if handle.actor is not None and handle.pid is not None:
            handle.actor.kill_instance.remote(handle.pid)

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

        if ray.is_initialized():
            ray.shutdown()  # ours: the runtime ends; a cluster's: only this driver disconnects


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
                    log.warning("instance %d restarted by Ray on node %s: pid %s (was %s)", i, info["node_id"][:8],
                                info["pid"], h.pid)
                    if h.healthy:  # restarted between two health checks: down first, so that coming
                        h.healthy = False  # up again restores its run-time adapters
                        h.failures += 1
                        self.on_down(i)
                h.pid, h.node_id, h.device_kind, h.log_path = (info["pid"], info["node_id"], info["device_kind"],
                                                               info["log_path"])
                h.url = ""
                h.started_at = time.time()
                h.was_up = False
            if info["url"] and info["url"] != h.url:  # the instance bound its port (after its start)
                h.url = info["url"]

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
        return handle, RayInstanceClient(handle, session, request_timeout_s, self.bundles, self.on_use)

    @property
    def on_use(self) -> OnUseAdapters:
        return self.launcher.on_use

    def stop(self, grace_s: float = 15.0) -> None:
        try:
            if self.launcher.leaves_running:
                log.info("ray: leaving the instances running in namespace %r", self.launcher.config.namespace)
            else:
                super().stop(grace_s)
        finally:
            self.launcher.shutdown()

    def kill(self) -> None:
        if not self.launcher.leaves_running:
            super().kill()


def ray_handles(template: InstanceConfig, count: int) -> list[RayInstanceHandle]:
    handles = []
    for i in range(count):
        fields = {k: v for k, v in vars(template).items() if k not in ("lora", "sidecar")}
        config = InstanceConfig(**{**fields, "name": f"instance{i}"}, lora=LoRAConfig(**vars(template.lora)),
                                sidecar=SidecarConfig(**vars(template.sidecar)))
        handles.append(RayInstanceHandle(index=i, url="", config=config))
    return handles


def start_ray_cluster(front, template: InstanceConfig, session) -> RayCluster:
    """A `RayCluster` of `front.instances` new instance actors (created, not yet ready: `await
    wait_ready()`), or with `--ray-attach` of the ones running in `--ray-namespace`, plus the
    instances at `--instance-urls` (attached as with `--cluster local`).
    `front` is the FrontendConfig; `template` the config every instance's is copied from."""
    front.ray.validate()
    launcher = RayLauncher(front.ray, front.log_dir, front.shm_prefix, front.split_cores)
    launcher.connect(template.lora.adapters, template.lora.adapter_dir)
    use_key(session, launcher.key)
    bundles = AdapterBundles()
    running = running_instances(front.ray.namespace)
    if front.ray.attach:
        if not running:
            raise RuntimeError(f"--ray-attach: no instance actors running in Ray namespace {front.ray.namespace!r}")
        handles: list = ray_handles(template, max(running) + 1)
        handles = [h for h in handles if h.index in running]
        for h in handles:
            launcher.attach(h, running[h.index][1], running[h.index][0])
        log.info("ray: attached to %d running instance(s) in namespace %r", len(handles), front.ray.namespace)
    else:
        if running:
            raise RuntimeError(f"Ray namespace {front.ray.namespace!r} already runs instances "
                               f"{sorted(running)}: serve them with --ray-attach, or stop them with "
                               "scripts/ray_down.py")
        handles = ray_handles(template, front.instances)
    clients: list = [RayInstanceClient(h, session, front.request_timeout_s, bundles, launcher.on_use)
                     for h in handles]
    for url in front.urls:
        handles.append(InstanceHandle(index=len(handles), url=url))
        clients.append(InstanceClient(url, session, front.request_timeout_s))
    for i, h in enumerate(handles):  # attached indexes may have gaps: the cluster's are 0..n-1
        h.index = i
    cluster = RayCluster(handles, launcher, clients, front.restart_dead, front.hung_after_s)
    cluster.bundles = bundles
    if not front.ray.attach:
        cluster.start_local()
    return cluster
