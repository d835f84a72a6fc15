"""What the benchmarks in `scripts/bench/` share: the server under test, the server flags a
benchmark passes through (generated from the config dataclasses, with the server's own names,
help and checks), the machine a result was measured on, and writing the result.

A benchmark imports it by file name (`from common import ...`): `python scripts/bench/<name>.py`
puts `scripts/bench/` first on `sys.path`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

from caraserve_router.contracts.configs import add_arguments, to_cli
from caraserve_router.evaluation.server_process import RunningServer

API_SERVER = "caraserve_router.api_server"


def add_server_arguments(parser: argparse.ArgumentParser, defaults, fields: tuple[str, ...], prefix: str = "") -> None:
    """The server's flags for `fields` of config `defaults` (an `InstanceConfig`, `LoRAConfig`
    with prefix "lora_", `SidecarConfig` with "sidecar_"), defaulting to the benchmark's values
    in `defaults`; parsed into `args.<prefix><field>`."""
    add_arguments(parser, defaults, prefix=prefix, only=fields)


def server_flags(args: argparse.Namespace, defaults, fields: tuple[str, ...], prefix: str = "",
                 server_prefix: Optional[str] = None) -> list[str]:
    """The server command line of the parsed values of `fields` (the config dataclass checks
    and types them, `to_cli` writes them back: `--lora-mode cached`, `--no-lora-prefetch`).
    `server_prefix` (default: `prefix`) is the server's, where the benchmark's flags are shorter
    (`--mode` here, `--lora-mode` there)."""
    config = dataclasses.replace(defaults, **{f: getattr(args, prefix + f) for f in fields})
    skip = tuple(f for f in vars(config) if f not in fields)
    return to_cli(config, prefix=prefix if server_prefix is None else server_prefix, skip=skip)


def start_server(flags: list[str], log: Path, startup_s: float = 300.0) -> RunningServer:
    """The api_server with `flags`, its output in `log` (use as a context manager: it waits for
    /health on entry, and stops the server and checks nothing is left on exit)."""
    return RunningServer(API_SERVER, flags, log, startup_s=startup_s)


def machine() -> dict[str, Any]:
    """What a result was measured on (no paths, no host names)."""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def write_result(path: Path, result: dict, indent: Optional[int] = 1) -> Path:
    """Write `result` as JSON to `path` (folders made; values JSON lacks, as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent, default=str) + "\n", encoding="utf-8")
    return path
