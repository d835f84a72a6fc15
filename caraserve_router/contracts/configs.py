"""Config dataclasses of one instance, and the glue that turns any of them into CLI flags.

Every field carries its help text in `metadata["help"]`; `add_arguments` makes one
`--field-name` flag per field, so the docs of every flag live next to the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from caraserve_router.contracts.names import DecodeKernel, LoraMode, values
from caraserve_router.contracts.tensor_parallel import tp_split_problem



def option(default: Any, help: str, choices: Optional[tuple] = None, aliases: tuple = (), **kw) -> Any:
    """A dataclass field with its CLI help (and optional choices, and other flag names, taken
    as written: no prefix)."""
    meta = {"help": help, "choices": choices, "aliases": aliases}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _flag(name: str, prefix: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple = (),
                  only: Optional[tuple] = None) -> None:
    """Add one flag per field of dataclass `cls` (nested dataclasses are not expanded; with `only`,
    just those fields). `cls` may be an instance: its values are then the flags' defaults (a
    benchmark passing a server flag through with its own default)."""
    instance = None if isinstance(cls, type) else cls
    cls = type(cls) if instance is not None else cls
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if instance is not None:
            default = getattr(instance, f.name)
        if f.name in skip or (only is not None and f.name not in only) or dataclasses.is_dataclass(default) \
                or f.metadata.get("cli") is False:
            continue
        kwargs = {"dest": prefix + f.name, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif isinstance(default, list):
            kwargs["nargs"] = "*"
            kwargs["default"] = default
            kwargs["type"] = type(default[0]) if default else str
        else:
            kwargs["default"] = default
            kwargs["type"] = _field_type(f, default)
        group.add_argument(_flag(f.name, prefix), *f.metadata.get("aliases", ()), **kwargs)


def _field_type(f, default):
    if isinstance(default, enum.Enum):  # the flag keeps the typed string (argparse checks choices);
        return str                      # the dataclass parses it into the enum (parse_enum)
    if default is None:
        return {"Optional[int]": int, "Optional[float]": float}.get(str(f.type), str)
    return type(default)


def from_namespace(cls, ns: argparse.Namespace, prefix: str = "", **overrides):
    """Build `cls` from parsed flags (fields absent from `ns` keep their defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if hasattr(ns, key):
            values[f.name] = getattr(ns, key)
    values.update(overrides)
    return cls(**values)


def to_cli(config, prefix: str = "", skip: tuple = ()) -> list[str]:
    """The flags that reproduce `config` (for starting an instance process)."""
    args: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in skip or dataclasses.is_dataclass(value) or f.metadata.get("cli") is False:
            continue
        flag = _flag(f.name, prefix)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def instance_command(config: "InstanceConfig", python: str = sys.executable) -> list[str]:
    """The one command line of an instance process (local launcher and Ray actor alike)."""
    return ([python, "-m", "lightllm_patches.instance"]
            + to_cli(config, skip=("lora", "sidecar"))
            + to_cli(config.lora, prefix="lora_")
            + to_cli(config.sidecar, prefix="sidecar_"))


def parse_cores(spec: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (ValueError on anything else)."""
    cores: set = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"bad core list {spec!r} (want e.g. 0-3,8)")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cores)


LORA_MODES = values(LoraMode)  # the CLI strings; config.mode is the LoraMode, code asks its capabilities
DECODE_KERNELS = values(DecodeKernel)


def parse_enum(enum_cls: type[enum.Enum], value: Any, what: str):
    """`value` (a member or its string) as a member of `enum_cls`; ValueError naming the choices.
    Config dataclasses call it once, in `__post_init__`, so a field holds the enum whatever
    built it (flags, keyword arguments, `vars()` of another config)."""
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {values(enum_cls)}, got {value!r}") from None


def check_shm_prefix(flag: str, prefix: str) -> None:
    """A /dev/shm name prefix: letters, digits, '_' and '-' (ValueError otherwise)."""
    if not prefix.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{flag} may hold letters, digits, '_' and '-' only, got {prefix!r}")


@dataclass
class LoRAConfig:
    """LoRA serving: adapter pool, loading mode and kernels of one instance."""

    mode: LoraMode = option(LoraMode.AUTO, "How cold adapters are brought to the device: cached (all "
                       "preloaded: the ideal), on-demand (load fully, then prefill; running batch waits: "
                       "S-LoRA), pipeline (layer-wise async load, device waits per layer: vLLM/SGLang), "
                       "cpu-assist (CaraServe: CPU computes the LoRA term of layers not yet loaded), auto "
                       "(per cold load, the cheapest of the last three from the link's measured rate, the "
                       "adapter's bytes, the prompt, the predicted prefill and the free sidecar workers)",
                       choices=LORA_MODES)
    adapters: Optional[str] = option(None, "Directory whose subdirectories are PEFT adapters, all "
                                     "registered at start (name = subdirectory name)")
    pool_mb: float = option(0.0, "Device memory for adapter weights, in MiB (0 = auto: pool_fraction of the "
                            "GPU's memory on CUDA, 256 MiB on the CPU). Adapters take their own bytes")
    pool_fraction: float = option(0.12, "Auto pool size on CUDA as a fraction of the device's memory "
                                  "(0.12: nine rank-64 adapters on all seven projections of a 7B model on a "
                                  "24 GB GPU)")
    host_cache_mb: float = option(4096.0, "Host memory for the bytes of adapters in use, in MiB (shared "
                                  "memory the CPU sidecar reads); idle adapters past it are unmapped, LRU, "
                                  "and read again from their files when next used (0 = unbounded)")
    adapter_dir: Optional[str] = option(None, "Resolver: a request naming an unregistered adapter NAME "
                                        "registers DIR/NAME on first use (NAME: a plain directory name)",
                                        aliases=("--adapter-dir",))
    max_rank: int = option(64, "Largest adapter rank accepted")
    decode_kernel: DecodeKernel = option(DecodeKernel.MBGMV, "Decode kernel: mbgmv (heterogeneous ranks, no padding) or "
                                "bgmv (Punica: padded to the batch's max rank)",
                                choices=DECODE_KERNELS)
    layer_group_size: int = option(1, "Layers per copy in pipelined loading (1 = layer by layer)")
    link: str = option("auto", "Host->device link: cuda (real copies on a side stream), emulated "
                       "(CPU machine: a layer group is resident no earlier than bytes/bandwidth after "
                       "its copy began), auto (cuda when the device is CUDA, else emulated)",
                       choices=("auto", "cuda", "emulated"))
    link_bandwidth_mbps: float = option(2000.0, "Emulated link bandwidth in MB/s (emulated link only)")
    link_latency_us: float = option(20.0, "Emulated per-copy latency in microseconds (emulated link only)")
    auto_layer_sync_us: float = option(-1.0, "auto mode: cost of one layer waited on or handed to the sidecar, "
                                       "in microseconds (-1 = by link: 180 on cuda, from the H200 run; 20 emulated)")
    prefetch: bool = option(True, "Start loading a cold adapter when its request arrives (it may wait in "
                            "the queue for several decode steps) instead of at admission into a batch")

    def __post_init__(self) -> None:
        self.mode = parse_enum(LoraMode, self.mode, "lora mode")
        self.decode_kernel = parse_enum(DecodeKernel, self.decode_kernel, "decode kernel")

    def validate(self) -> None:
        if self.pool_mb < 0 or not 0 < self.pool_fraction < 1 or self.host_cache_mb < 0:
            raise ValueError("lora pool_mb and host_cache_mb must be >= 0 and pool_fraction in (0, 1)")
        if self.adapter_dir is not None and not os.path.isdir(self.adapter_dir):
            raise ValueError(f"adapter directory {self.adapter_dir!r} (resolver) does not exist")
        if not 1 <= self.max_rank <= 256:
            raise ValueError("lora max_rank must be in 1..256")
        if self.layer_group_size < 1:
            raise ValueError("lora layer_group_size must be >= 1")
        if self.link_bandwidth_mbps <= 0 or self.link_latency_us < 0:
            raise ValueError("link bandwidth must be > 0 and latency >= 0")
        if self.adapters is not None and not os.path.isdir(self.adapters):
            raise ValueError(f"adapters directory {self.adapters!r} does not exist")


@dataclass
class SidecarConfig:
    """CPU LoRA sidecar: worker processes that compute LoRA terms of layers not yet loaded."""

    workers: int = option(0, "Worker processes (0 = one per core; half the cores when the CPU is also the "
                           "model's device)")
    tokens_per_core: int = option(0, "Profiled tokens one core handles per layer within budget "
                                  "(0 = profile at start)")
    spin_iters: int = option(20000, "Flag polls before a worker starts yielding the core")
    deadline_ms: float = option(200.0, "A layer not answered within this time falls back to the "
                                "device copy and the worker is restarted")
    pin_cores: bool = option(True, "Pin each worker to one core where the OS allows")

    def validate(self) -> None:
        if self.workers < 0 or self.tokens_per_core < 0 or self.spin_iters < 0:
            raise ValueError("sidecar workers, tokens_per_core and spin_iters must be >= 0")
        if self.deadline_ms <= 0:
            raise ValueError("sidecar deadline_ms must be > 0")


# Tensor-parallel degrees an instance accepts (LightLLM splits heads, KV heads and the MLP evenly).
TP_SIZES = (1, 2, 4, 8)

# CPU base-projection weight layouts (see InstanceConfig.cpu_weight_layout); value: whether
# nn.Linear's [out, in] copy is kept beside LightLLM's [in, out] weight.
WEIGHT_LAYOUTS = {"lightllm": False, "both": True}


@dataclass
class InstanceConfig:
    """One CaraServe instance: a patched LightLLM server (HTTP server, router, model worker)."""

    model_dir: str = option("", "HF llama model directory (safetensors + config + tokenizer)")
    host: str = option("127.0.0.1", "Address the instance's HTTP server binds")
    port: int = option(8100, "Port of the instance's HTTP server (0: any free one; taken: the next free one "
                       "above it). The instance binds it itself, so nothing can take it in between")
    port_file: str = option("", "Write the port the instance bound here once it listens (how a launcher "
                            "learns it)")
    cpu_cores: str = option("", "Cores this instance (server, model worker and sidecar workers) runs on, e.g. "
                            "0-3 (default: all this process may use); launchers give the instances of one "
                            "host disjoint sets")
    adapter_roots: str = option("", "Comma-separated absolute directories that /v1/load_lora_adapter may load "
                                "from (empty: any path; the front end passes its own roots)")
    name: str = option("", "Instance name in logs and metrics (default: host:port)")
    device: str = option("auto", "Compute device: auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "Model dtype: auto (float32 on CPU, float16 on CUDA), float32, "
                        "float16, bfloat16")
    tp: int = option(1, "Tensor-parallel degree: ranks of LightLLM's TP llama per instance, one GPU each on CUDA "
                     "(gloo processes on the CPU); every adapter is sharded like the base (docs/DEPLOY.md)",
                     choices=TP_SIZES)
    max_total_token_num: int = option(8192, "KV-cache capacity in tokens")
    max_req_input_len: int = option(2048, "Longest prompt accepted, in tokens")
    max_req_total_len: int = option(3072, "Longest prompt + output accepted, in tokens")
    running_max_req_size: int = option(64, "Most requests in the running batch")
    batch_max_tokens: int = option(0, "Most prompt tokens in one prefill batch (0 = derived)")
    router_max_wait_tokens: int = option(10, "Decode steps between admissions of new requests (without "
                                         "chunked prefill; with it, waiting requests are admitted every step)")
    prefill_chunk_tokens: int = option(
        256, "Chunked prefill (SARATHI): most prompt tokens one forward step runs beside the running batch's "
        "decode tokens, so no decode step waits for more than one chunk of a prompt; 0 = off (LightLLM's "
        "whole-prompt prefill between decode steps). Default measured in docs/RESULTS.md (chunked prefill)")
    cuda_graphs: bool = option(
        True, "CUDA only: pure decode steps replay CUDA graphs captured at start, one per batch-size bucket "
        "(powers of two and a few between, up to --running-max-req-size), with and without LoRA rows; batches "
        "above the largest bucket, steps with a prefill chunk and steps with an adapter still loading run "
        "eagerly (docs/GPU.md, CUDA graphs)")
    graph_emulation: bool = field(default=False, metadata={
        "help": "CPU tests only: run the CUDA-graph path's static buffers and bucket padding on the CPU, the "
                "capture replaced by a direct call", "cli": False})
    torch_threads: int = option(0, "Intra-op threads of the model worker (0 = all cores, or the cores the "
                                "cpu-assist sidecar leaves free when the CPU is the device)")
    cpu_weight_layout: str = option(
        "lightllm", "CPU device only: base projection weights as LightLLM keeps them ('lightllm': [in, out], "
        "x @ W), or 'both': also nn.Linear's [out, in] copy, used for batches of 2+ rows (matmuls 2-2.6x "
        "faster at 2-4 rows, 1.2-1.3x at 16-32 here: scripts/bench/cpu_matmul_layout.py) for twice the "
        "weights' memory", choices=tuple(WEIGHT_LAYOUTS))
    log_level: str = option("info", "Log level", choices=("debug", "info", "warning", "error"))
    shm_prefix: str = option("", "Prefix of this instance's /dev/shm names (default: derived, unique)")
    host_store_prefix: str = option(
        "", "Prefix of the /dev/shm names of adapter bytes: the instances of one host given the same prefix "
        "map one copy of each adapter (the front end's launchers give theirs one per run); default: "
        "SHM_PREFIX_ad, this instance's own")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)

    def validate(self) -> None:
        if not self.model_dir or not os.path.isdir(self.model_dir):
            raise ValueError(f"model_dir {self.model_dir!r} is not a directory")
        if self.tp not in TP_SIZES:
            raise ValueError(f"tp must be one of {TP_SIZES}, got {self.tp}")
        if self.tp > 1 and os.path.isfile(os.path.join(self.model_dir, "config.json")):
            with open(os.path.join(self.model_dir, "config.json")) as f:
                problem = tp_split_problem(json.load(f), self.tp)
            if problem:
                raise ValueError(problem)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if not 0 < self.max_req_input_len < self.max_req_total_len <= self.max_total_token_num:
            raise ValueError("need 0 < max_req_input_len < max_req_total_len <= max_total_token_num")
        if self.running_max_req_size < 1:
            raise ValueError("running_max_req_size must be >= 1")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0 (0 = off), got {self.prefill_chunk_tokens}")
        if self.cpu_cores:
            parse_cores(self.cpu_cores)
        if any(not os.path.isabs(r) for r in self.roots):
            raise ValueError(f"adapter_roots must be absolute directories, got {self.adapter_roots!r}")
        for flag in ("shm_prefix", "host_store_prefix"):
            if getattr(self, flag):
                check_shm_prefix(flag, getattr(self, flag))
        self.lora.validate()
        self.sidecar.validate()

    @property
    def chunked_prefill(self) -> bool:
        """Chunked prefill is on (the one test of it: LightLLM's `splitfuse_mode`, the router's
        mixed step, the backend's step planning and the request queue all read this)."""
        return self.prefill_chunk_tokens > 0

    @property
    def roots(self) -> list[str]:
        return [r.strip() for r in self.adapter_roots.split(",") if r.strip()]

    @property
    def display_name(self) -> str:
        return self.name or f"{self.host}:{self.port}"

    @property
    def adapter_store_prefix(self) -> str:
        """The /dev/shm prefix of this instance's adapter bytes: the host's shared one if the
        launcher gave one (`host_store_prefix`), else the instance's own."""
        return self.host_store_prefix or f"{self.shm_prefix}_ad"
