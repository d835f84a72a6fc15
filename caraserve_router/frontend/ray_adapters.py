"""Adapters under `--cluster ray`: bytes through Ray's object store, shipped to an actor on use.

Nodes share no paths with the front end, so an adapter reaches an instance as the bytes of its
directory: the front end reads them and puts them into the object store once (`AdapterBundles`),
and an actor writes them on its node (`InstanceActor.stage_adapter`).

`--adapters DIR` registers every adapter of DIR at start by its `adapter_config.json` alone
(rank and target modules, for routing): no bytes move then, so a thousand adapters over many
actors start in seconds. The first request for an adapter that lands on an instance ships it
there first (`OnUseLoader`); a restarted instance gets it again the same way, on its next use.
The resolver (`--lora-adapter-dir DIR`) works the same way from the front end's DIR: nodes need
no copy of it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Optional

from caraserve_router.contracts.adapters import resolvable
from caraserve_router.contracts.protocol import error_body
from caraserve_router.frontend.adapter_registry import AdapterInfo
from caraserve_router.frontend.instance_client import InstanceError

log = logging.getLogger("caraserve.ray")

AdapterFiles = dict  # {file name: bytes} of one PEFT adapter directory


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


def adapter_info(path: str) -> AdapterInfo:
    """What routing needs of an adapter, from its adapter_config.json (no weights read)."""
    check_adapter_dir(path)
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        rank = int(cfg["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InstanceError(400, error_body(f"adapter {os.path.basename(path)!r}: bad adapter_config.json ({e})",
                                            400)) from e
    targets = cfg.get("target_modules") or []
    return AdapterInfo(rank, sorted(targets) if isinstance(targets, list) else [str(targets)], path, on_use=True)


def scan_adapter_set(root: str) -> dict[str, AdapterInfo]:
    """Every adapter (subdirectory with an adapter_config.json) of `--adapters DIR`."""
    return {name: adapter_info(os.path.join(root, name)) for name in sorted(os.listdir(root))
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


class OnUseAdapters:
    """The adapters registered on use (name -> AdapterInfo with the front end's path), shared
    by the front end's registry and every Ray instance client."""

    def __init__(self, resolver_dir: Optional[str] = None):
        self.adapters: dict[str, AdapterInfo] = {}
        self.resolver_dir = resolver_dir

    def add_dir(self, root: str) -> int:
        self.adapters.update(scan_adapter_set(root))
        return len(self.adapters)

    def resolve(self, name: str) -> Optional[AdapterInfo]:
        """The resolver, on the front end: DIR/NAME registered on use on its first request."""
        if name in self.adapters:
            return self.adapters[name]
        if not self.resolver_dir or not resolvable(name):
            return None
        path = os.path.join(self.resolver_dir, name)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            return None
        self.adapters[name] = adapter_info(path)
        return self.adapters[name]


class OnUseLoader:
    """Per instance client: load an on-use adapter on its instance before the first request
    for it there (once per instance process; concurrent first requests wait for one load)."""

    def __init__(self, adapters: OnUseAdapters):
        self.adapters = adapters
        self.loaded: set = set()
        self.pid: Optional[int] = None
        self.loading: dict[str, asyncio.Future] = {}

    async def ensure(self, name: Optional[str], pid: Optional[int], load) -> None:
        """`load(name, path)`: the client's own load (stage the bytes, then register)."""
        if pid != self.pid:  # a new instance process: it has none of them
            self.pid, self.loaded, self.loading = pid, set(), {}
        if not name or name in self.loaded:
            return
        info = self.adapters.resolve(name)
        if info is None:
            return  # not an on-use adapter: the instance has it (loaded at run time) or answers 404
        if name not in self.loading:
            self.loading[name] = asyncio.ensure_future(load(name, info.path))
        future = self.loading[name]
        try:
            await asyncio.shield(future)
        except InstanceError as e:
            if e.status != 409 or "already" not in str(e):  # already registered there: fine
                self.loading.pop(name, None)
                raise
        except BaseException:
            if future.done():
                self.loading.pop(name, None)
            raise
        if self.pid == pid:
            self.loaded.add(name)
