"""One CaraServe instance as a Ray actor: it owns the instance's process tree on its node.

The actor starts `python -m lightllm_patches.instance ...` (the patched LightLLM server, which
starts its router, model worker and CPU LoRA sidecar) in a process group of its own; the
instance binds a port itself and reports it in a port file, and the actor reports the URL. The
instance listens on loopback when the front end that created the actor runs on the same node,
else on the node's address; it gets the cluster's instance key in its environment and the cores
this actor claimed on its host (`core_claims.py`: as many as Ray reserved for it). When that
process dies, the actor cleans the group and its `/dev/shm` files and exits abnormally, so Ray
restarts it (`max_restarts`): the new incarnation starts a fresh process, possibly on another
node, and reports a new URL that the front end re-reads.

Actors are detached and named (`caraserve-instance<i>-g<n>` in the front end's namespace): they
outlive the front end that made them, other front ends attach to them (`--ray-attach`), and
`scripts/ray_down.py` reaps them; one that no front end asked for `info()` for
`orphan_timeout_s` stops itself.

Adapters never travel as paths: the front end sends the bytes of an adapter directory (a
`{file name: bytes}` dict, through Ray's object store) the first time a request for it lands
here, and the actor writes them into a directory of its node, whose path it hands to the instance.

This module runs inside Ray worker processes; like the rest of the front end it never imports
torch or LightLLM (the instance process does).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Optional

from caraserve_router.contracts.configs import InstanceConfig, instance_command
from caraserve_router.contracts.device_kind import kind_name
from caraserve_router.contracts.instance_auth import INSTANCE_KEY_ENV
from caraserve_router.contracts.processes import kill_groups, read_port_file, remove_shm
from caraserve_router.frontend.core_claims import claim_cores, claims_path, release_cores
from caraserve_router.contracts.host_segments import SharedDir, remove_idle

log = logging.getLogger("caraserve.ray_actor")

# {file name: bytes} of one PEFT adapter directory (sent on use: ray_adapters.py).
AdapterFiles = dict

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the instance's process before exec: SIGTERM it when the thread that started it dies.

    Ray kills an actor's worker with SIGKILL (`ray.kill`, driver exit, node shutdown), which
    gives the actor no chance to stop its child; the instance handles SIGTERM by stopping its
    own children and cleaning its shared memory, so nothing outlives the actor."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ActorSettings:
    """What an instance actor needs besides its instance's config (sent once, at creation)."""

    index: int
    log_dir: str
    shm_prefix: str = "caraserve"
    host_store: str = ""  # /dev/shm prefix of adapter bytes shared by the actors of one node
    key: str = ""  # the cluster's instance key: the instance's environment, never its command line
    front_node_ip: str = ""  # the creating front end's node: an instance there binds loopback
    bind_node_address: bool = False  # always bind the node's address (front ends on other nodes attach)
    namespace: str = "caraserve"
    cores: int = 1  # cores to claim on the host (what Ray reserved)
    split_cores: bool = True
    orphan_timeout_s: float = 0.0  # stop after this long without a front end's info() (0: never)


def check_adapter_dir_name(name: str) -> None:
    if not name or os.sep in name or name in (".", "..") or name.startswith(".tmp-"):
        raise ValueError(f"bad adapter name {name!r}")


def write_files(path: str, files: AdapterFiles) -> None:
    """Write one adapter's files into the existing directory `path`."""
    for file_name, data in files.items():
        if os.sep in file_name or file_name in (".", ".."):
            raise ValueError(f"bad file name {file_name!r} in adapter {os.path.basename(path)!r}")
        with open(os.path.join(path, file_name), "wb") as f:
            f.write(data)


def device_kind(gpu_ids: list) -> str:
    """A name for the kind of device this instance computes on (keys per-kind PerfModels):
    the GPU's product name where Ray gave the actor a GPU, else the CPU's model name."""
    if gpu_ids:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={gpu_ids[0]}"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return "cuda:" + out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
        return kind_name("cuda")
    return kind_name("cpu")


class InstanceActor:
    """Ray actor class (wrapped with `ray.remote` by `ray_cluster`, which sets its resources)."""

    def __init__(self, config: InstanceConfig, settings: ActorSettings):
        import ray

        index = settings.index
        self.index = index
        self.config = config
        self.settings = settings
        self.node_id = ray.get_runtime_context().get_node_id()
        gpu_ids = list(ray.get_gpu_ids())
        self.kind = device_kind(gpu_ids)
        if gpu_ids and config.device == "auto":
            config.device = "cuda"  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU
        self.node_ip = ray.util.get_node_ip_address()
        # Loopback unless another node must reach it: the only front end known now is this node's.
        local_front = settings.front_node_ip == self.node_ip and not settings.bind_node_address
        config.host = "127.0.0.1" if local_front else self.node_ip
        config.port = 0  # the instance binds a free one itself and reports it (port_file)
        config.shm_prefix = f"{settings.shm_prefix}_r{index}_{uuid.uuid4().hex[:8]}"
        # The actors of one node (one run) share one host copy of each adapter: the same
        # segment names (host_store) and the same adapter files, written once per node.
        config.host_store_prefix = settings.host_store
        self.work_dir = tempfile.mkdtemp(prefix=f"caraserve_ray{index}_")
        config.port_file = os.path.join(self.work_dir, "port")
        # Adapters arrive on use (stage_adapter), into one directory per node: the only place
        # this instance may load from (the front end's roots are paths of its own host).
        self.runtime_dir = SharedDir(os.path.join(tempfile.gettempdir(), f"{config.adapter_store_prefix}_runtime"))
        config.adapter_roots = self.runtime_dir.path
        config.lora.adapters = None
        self.staged: dict[str, int] = {}  # adapter name -> bytes written here (what reached this actor)
        self.claims = claims_path(settings.namespace)
        if settings.split_cores and not config.cpu_cores:
            config.cpu_cores = ",".join(map(str, claim_cores(settings.cores, os.getpid(), self.claims)))
        os.makedirs(settings.log_dir, exist_ok=True)
        self.log_path = os.path.join(settings.log_dir, f"instance{index}-ray-{os.getpid()}.log")
        self.stopping = False
        self.last_seen = time.monotonic()
        self.proc: Optional[subprocess.Popen] = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._own, args=(started,), name="instance-owner", daemon=True)
        self.thread.start()
        if not started.wait(60.0) or self.proc is None:
            raise RuntimeError(f"instance {index} process did not start; see {self.log_path}")
        if settings.orphan_timeout_s > 0:
            threading.Thread(target=self._watch_orphan, name="orphan-watch", daemon=True).start()

    # ---- the process ----------------------------------------------------------------------

    def _own(self, started: threading.Event) -> None:
        """Start the instance and wait for it, in one thread that lives as long as the process
        (PR_SET_PDEATHSIG fires when the *thread* that forked exits)."""
        env = {**os.environ, INSTANCE_KEY_ENV: self.settings.key} if self.settings.key else None
        try:
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(instance_command(self.config), stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent, env=env)
        finally:
            started.set()
        code = self.proc.wait()
        if self.stopping:
            return
        # Died on its own: clean up, then let Ray restart this actor (a fresh process and port).
        print(f"caraserve ray actor {self.index}: instance process exited with {code}; restarting the actor",
              file=sys.stderr, flush=True)
        self._clean()
        os._exit(1)

    def _clean(self) -> None:
        if self.proc is not None:
            kill_groups([self.proc.pid])  # whatever of its group is left, and wait until it is gone
        remove_shm(self.config.shm_prefix)
        remove_idle(self.config.adapter_store_prefix)  # the adapter copies no other instance here maps
        self.runtime_dir.release()
        release_cores(os.getpid(), self.claims)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _watch_orphan(self) -> None:
        """No front end asked for `info` in `orphan_timeout_s`: stop, and end this actor for good."""
        import ray

        while not self.stopping:
            time.sleep(min(5.0, self.settings.orphan_timeout_s / 4))
            if time.monotonic() - self.last_seen > self.settings.orphan_timeout_s:
                print(f"caraserve ray actor {self.index}: no front end for {self.settings.orphan_timeout_s:.0f} s; "
                      "stopping", file=sys.stderr, flush=True)
                self.stop()
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    # ---- remote methods -------------------------------------------------------------------

    def info(self) -> dict:
        """Where the instance is (and a front end's heartbeat: see orphan_timeout_s)."""
        self.last_seen = time.monotonic()
        port = read_port_file(self.config.port_file)
        return {"url": f"http://{self.config.host}:{port}" if port else "", "pid": self.proc.pid,
                "actor_pid": os.getpid(), "node_id": self.node_id, "node_ip": self.node_ip,
                "device_kind": self.kind, "log_path": self.log_path, "cores": self.config.cpu_cores,
                "staged": dict(self.staged), "alive": self.proc.poll() is None}

    def stage_adapter(self, name: str, files: AdapterFiles) -> str:
        """Write an adapter sent by the front end on this node (once per node: the directory is
        named by the files' digest, so the actors here share it and its host copy); return the
        path the instance loads."""
        check_adapter_dir_name(name)
        digest = hashlib.sha1()
        for file_name in sorted(files):
            digest.update(file_name.encode() + b"\0" + hashlib.sha1(files[file_name]).digest())
        self.staged[name] = sum(len(data) for data in files.values())
        return self.runtime_dir.put_dir(digest.hexdigest()[:24], lambda tmp: write_files(tmp, files))

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(deque(f, maxlen=lines)).decode(errors="replace")
        except OSError:
            return ""

    def kill_instance(self, pid: int) -> bool:
        """Instance process `pid` hangs (health missed while it lives): SIGKILL its group (a
        stopped process never handles SIGTERM); the owner thread then ends this actor and Ray
        restarts it with a fresh instance. Another pid (this actor restarted meanwhile, and the
        call was queued for the new incarnation): nothing to do."""
        if self.proc is None or self.proc.pid != pid:
            return False
        kill_groups([pid], 0.0)
        return True

    def stop(self, grace_s: float = 15.0) -> bool:
        """Stop the instance (SIGTERM: it stops its children and cleans its shm), then make sure."""
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        self._clean()
        if proc is not None:
            proc.wait()
        return True
