"""Start a real CaraServe server for a test, and make sure it leaves nothing behind.

`RunningServer` starts `python -m caraserve_router.api_server` (or `.instance`) in its own
session on a free loopback port, waits until /health answers, and on exit sends SIGTERM,
waits, kills whatever is left of its process group, and records what remains (processes,
`/dev/shm` entries under its own `--shm-prefix`, the port) so tests can assert a clean shutdown.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from caraserve_router.contracts.instance_auth import INSTANCE_KEY_ENV, auth_headers
from caraserve_router.contracts.processes import free_ports, group_members

REPO = Path(__file__).resolve().parents[2]


def shm_entries(prefix: str = "caraserve") -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def group_alive(pgid: int) -> list[int]:
    """Live processes of group `pgid` (zombies have ended: they only wait for their reaper)."""
    return group_members(pgid)


def groups_of(marker: str) -> set[int]:
    """Process groups of the processes whose command line contains `marker` (the local
    instances run in sessions of their own, outside the server's group)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pgid=,args="], capture_output=True, text=True).stdout  # -ww: whole lines
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if marker in line}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class RunningServer:
    def __init__(self, module: str, args: list[str], log_path: Path, startup_s: float = 300.0,
                 instance_key: str = ""):
        """`instance_key`: the front end's instance key (its environment), for talking to its
        instances directly with `instance_headers`; empty: the front end makes its own."""
        self.instance_key = instance_key
        self.instance_headers = auth_headers(instance_key)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.module, self.args, self.log_path, self.startup_s = module, list(args), log_path, startup_s
        # Its own /dev/shm names, so what other servers on the machine create is none of its business.
        if "--shm-prefix" in self.args:
            self.shm_prefix = self.args[self.args.index("--shm-prefix") + 1]
        else:
            self.shm_prefix = f"caraserve_t{os.getpid()}_{uuid.uuid4().hex[:8]}"
            self.args += ["--shm-prefix", self.shm_prefix]
        self.leftover_procs: list[int] = []
        self.leftover_shm: set = set()

    def __enter__(self) -> "RunningServer":
        self.shm_before = shm_entries(self.shm_prefix)
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", self.module, "--port", str(self.port), *self.args]
        env = {**os.environ, INSTANCE_KEY_ENV: self.instance_key} if self.instance_key else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited at start-up:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.instance_groups = groups_of(self.shm_prefix) - {self.proc.pid}
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy after {self.startup_s}s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, lines: int = 40) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        self.leftover_procs = group_alive(self.proc.pid)
        for pgid in getattr(self, "instance_groups", ()):
            self.leftover_procs += group_alive(pgid)
        self.leftover_shm = shm_entries(self.shm_prefix) - self.shm_before
        for pgid in {self.proc.pid, *getattr(self, "instance_groups", ())}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for name in self.leftover_shm:  # never leave them, even when a test fails
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except FileNotFoundError:
                pass
        self.log.close()
