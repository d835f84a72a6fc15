"""One CaraServe instance as a Ray actor: it owns the instance's process tree on its node.

The actor starts `python -m lightllm_patches.instance ...` (the patched LightLLM server, which
starts its router, model worker and CPU LoRA sidecar) in a process group of its own, on a free
port of its node's address, and reports the URL; the front end talks HTTP to it as to a local
instance. When that process dies, the actor cleans the group and its `/dev/shm` files and exits
abnormally, so Ray restarts it (`max_restarts`): the new incarnation starts a fresh process,
possibly on another node, and reports a new URL that the front end re-reads.

Adapters never travel as paths: the front end sends the bytes of an adapter directory (a
`{file name: bytes}` dict, through Ray's object store) and the actor writes them into its own
temporary directory on its node, whose path it hands to the instance.

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
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from typing import Optional

from caraserve_router.contracts.configs import InstanceConfig, to_cli
from caraserve_router.contracts.device_kind import kind_name
from caraserve_router.contracts.processes import kill_groups, remove_shm
from caraserve_router.lora.host_segments import SharedDir, remove_idle

log = logging.getLogger("caraserve.ray_actor")

# {file name: bytes} of one PEFT adapter directory; {adapter name: AdapterFiles} of a set.
AdapterFiles = dict
AdapterSet = dict

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the instance's process before exec: SIGTERM it when the thread that started it dies.

    Ray kills an actor's worker with SIGKILL (`ray.kill`, driver exit, node shutdown), which
    gives the actor no chance to stop its child; the instance handles SIGTERM by stopping its
    own children and cleaning its shared memory, so nothing outlives the actor."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def instance_command(config: InstanceConfig) -> list[str]:
    """The command line of one instance (the same one `LocalLauncher` runs)."""
    return ([sys.executable, "-m", "lightllm_patches.instance"]
            + to_cli(config, skip=("lora", "sidecar"))
            + to_cli(config.lora, prefix="lora_")
            + to_cli(config.sidecar, prefix="sidecar_"))


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


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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

    def __init__(self, config: InstanceConfig, index: int, log_dir: str, adapters: Optional[AdapterSet] = None,
                 shm_prefix: str = "caraserve", host_store: str = ""):
        import ray

        self.index = index
        self.config = config
        self.node_id = ray.get_runtime_context().get_node_id()
        gpu_ids = list(ray.get_gpu_ids())
        self.kind = device_kind(gpu_ids)
        if gpu_ids and config.device == "auto":
            config.device = "cuda"  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU
        # The node's address: the one other nodes (and the front end) reach it on.
        config.host = ray.util.get_node_ip_address()
        config.port = free_port(config.host)
        config.shm_prefix = f"{shm_prefix}_r{index}_{uuid.uuid4().hex[:8]}"
        # The actors of one node (one run) share one host copy of each adapter: the same
        # segment names (host_store) and the same adapter files, written once per node.
        config.host_store_prefix = host_store
        self.work_dir = tempfile.mkdtemp(prefix=f"caraserve_ray{index}_")
        self.adapter_dir: Optional[SharedDir] = None  # --adapters, written at start
        self.runtime_dir: Optional[SharedDir] = None  # adapters loaded at run time (stage_adapter)
        if adapters:
            self.adapter_dir = SharedDir(os.path.join(tempfile.gettempdir(), f"{config.adapter_store_prefix}_adapters"))
            for name, files in adapters.items():
                check_adapter_dir_name(name)
                self.adapter_dir.put_dir(name, lambda tmp, files=files: write_files(tmp, files))
            config.lora.adapters = self.adapter_dir.path
        else:
            config.lora.adapters = None
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"instance{index}-ray-{os.getpid()}.log")
        self.stopping = False
        self.proc: Optional[subprocess.Popen] = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._own, args=(started,), name="instance-owner", daemon=True)
        self.thread.start()
        if not started.wait(60.0) or self.proc is None:
            raise RuntimeError(f"instance {index} process did not start; see {self.log_path}")

    # ---- the process ----------------------------------------------------------------------

    def _own(self, started: threading.Event) -> None:
        """Start the instance and wait for it, in one thread that lives as long as the process
        (PR_SET_PDEATHSIG fires when the *thread* that forked exits)."""
        try:
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(instance_command(self.config), stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
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
        for shared in (self.adapter_dir, self.runtime_dir):
            if shared is not None:
                shared.release()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ---- remote methods -------------------------------------------------------------------

    def info(self) -> dict:
        return {"url": f"http://{self.config.host}:{self.config.port}", "pid": self.proc.pid,
                "actor_pid": os.getpid(), "node_id": self.node_id, "node_ip": self.config.host,
                "device_kind": self.kind, "log_path": self.log_path,
                "alive": self.proc.poll() is None}

    def stage_adapter(self, name: str, files: AdapterFiles) -> str:
        """Write an adapter sent by the front end on this node (once per node: the directory is
        named by the files' digest, so the actors here share it and its host copy); return the
        path the instance loads."""
        check_adapter_dir_name(name)
        if self.runtime_dir is None:
            self.runtime_dir = SharedDir(os.path.join(tempfile.gettempdir(),
                                                      f"{self.config.adapter_store_prefix}_runtime"))
        digest = hashlib.sha1()
        for file_name in sorted(files):
            digest.update(file_name.encode() + b"\0" + hashlib.sha1(files[file_name]).digest())
        return self.runtime_dir.put_dir(digest.hexdigest()[:24], lambda tmp: write_files(tmp, files))

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(deque(f, maxlen=lines)).decode(errors="replace")
        except OSError:
            return ""

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
