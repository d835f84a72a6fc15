"""Starting and stopping the processes of an instance, and cleaning what they leave behind.

LightLLM's `start_submodule_processes` exits the whole program when a child fails to start
and its children ignore SIGTERM; an instance must instead report the failure and, on
shutdown, leave no process, port or `/dev/shm` file behind.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import multiprocessing as mp
import os
import signal
import socket
import time

log = logging.getLogger("caraserve.processes")
SPAWN = mp.get_context("spawn")


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on the loopback interface."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


PORT_SCAN = 64  # ports tried above a given one that is taken


def bind_listening(host: str, port: int, scan: int = PORT_SCAN) -> socket.socket:
    """A listening TCP socket on `host`: port 0 takes any free port, another port the first free
    one of port..port+scan-1. Bound by the process that serves on it, so no other process can
    take the port between its choice and the bind (the race `free_ports` has)."""
    last: OSError = OSError("no port tried")
    for candidate in ([0] if port == 0 else range(port, min(port + scan, 65536))):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
        try:
            sock.bind((host, candidate))
            sock.listen(2048)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise OSError(f"no free port on {host} in {port}..{port + scan - 1}: {last}")


def write_port_file(path: str, port: int) -> None:
    """Write `port` to `path` atomically (a reader never sees half of it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)


def read_port_file(path: str) -> int:
    """The port in `path`, or 0 while it is not there yet."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def start_children(targets: list[tuple], timeout_s: float = 600.0) -> list:
    """Start each (function, args) as a spawned process that reports "init ok" on a pipe.

    Raises RuntimeError with the child's message if one fails; the started ones are stopped.
    """
    procs, readers = [], []
    for func, args in targets:
        reader, writer = SPAWN.Pipe(duplex=False)
        proc = SPAWN.Process(target=func, args=args + (writer,), daemon=False)
        proc.start()
        procs.append(proc)
        readers.append(reader)
    for (func, _), proc, reader in zip(targets, procs, readers):
        message = reader.recv() if reader.poll(timeout_s) else f"no answer in {timeout_s:.0f}s"
        if message != "init ok":
            stop_processes(procs)
            raise RuntimeError(f"{func.__name__} failed to start:\n{message}")
    return procs


def stop_processes(procs: list, grace_s: float = 3.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL every process (and reap them)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.time() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.time()))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def kill_groups(pgids, wait_s: float = 5.0) -> list[int]:
    """SIGKILL every process of each group, then wait (at most `wait_s` in all) until they are
    gone: a killed process with a large address space (torch) takes a moment to exit, and
    whoever stops an instance must not return, or exit, while its processes still run.
    Returns the pids still alive at the deadline."""
    pgids = [g for g in pgids if g]
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_s
    while True:
        left = [pid for pgid in pgids for pid in group_members(pgid)]
        if not left or time.monotonic() >= deadline:
            if left:
                log.warning("processes %s still alive %.0f s after SIGKILL", left, wait_s)
            return left
        time.sleep(0.05)


def remove_shm(prefix: str) -> list[str]:
    """Unlink every /dev/shm entry whose name starts with `prefix`; returns what was removed."""
    removed = []
    for path in glob.glob(os.path.join("/dev/shm", glob.escape(prefix) + "*")):
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except FileNotFoundError:
            pass
    return removed


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child process: have the kernel send `sig` to it when its parent dies (Linux
    PR_SET_PDEATHSIG), so a killed instance leaves no router or detokenizer behind. A no-op
    where prctl is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os.kill(os.getpid(), sig)


class Terminated(SystemExit):
    """Raised in the main thread by `raise_terminated` when SIGTERM arrives, so `finally`
    blocks (children, ports, shared memory) run as for Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated(0)
