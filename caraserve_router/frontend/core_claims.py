"""Disjoint shares of one host's cores for the instance actors Ray placed on it.

Ray reserves CPUs per actor (`--ray-cpus-per-instance`) but pins nothing: two instances on one
node would each start a sidecar worker per core of the whole host, pinned to the same cores.
So each actor claims as many cores as Ray reserved for it in a claims file of its host
(under a lock), and its instance runs on those (`--cpu-cores`: its sidecar's workers and pinning
stay within them). A claim dies with its holder's process: claims of dead pids are taken again.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from typing import Optional


def claims_path(namespace: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"caraserve_cores_{namespace}.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True


def claim_cores(count: int, owner: int, path: str, cores: Optional[list] = None) -> list[int]:
    """`count` cores of this host for process `owner`: free ones first (lowest numbers), then,
    on an oversubscribed host, the least-claimed ones. Replaces what `owner` held before."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    count = max(1, min(count, len(cores)))
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        try:
            held = {int(k): [int(p) for p in v] for k, v in json.loads(f.read() or "{}").items()}
        except ValueError:
            held = {}
        held = {c: [p for p in pids if p != owner and _alive(p)] for c, pids in held.items()}
        mine = sorted(cores, key=lambda c: (len(held.get(c, [])), c))[:count]
        for c in mine:
            held.setdefault(c, []).append(owner)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({str(c): pids for c, pids in held.items() if pids}))
    return sorted(mine)


def release_cores(owner: int, path: str) -> None:
    try:
        with open(path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            held = json.loads(f.read() or "{}")
            f.seek(0)
            f.truncate()
            f.write(json.dumps({c: [p for p in pids if p != owner] for c, pids in held.items()}))
    except (OSError, ValueError):
        pass
