"""Start one CaraServe instance (a patched LightLLM server) on this host.

    python -m lightllm_patches.instance --model-dir DIR [--port 8100] [--lora-mode cpu-assist] ...

The cluster front end (`python -m caraserve_router.api_server`) starts local instances this
way; run it by hand on other hosts and give their URLs to `--instance-urls`.
"""
from __future__ import annotations

import argparse
import sys

import lightllm_patches  # noqa: F401  (patches LightLLM before anything imports it)
from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig, add_arguments, from_namespace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightllm_patches.instance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, InstanceConfig)
    add_arguments(parser, LoRAConfig, prefix="lora_")
    add_arguments(parser, SidecarConfig, prefix="sidecar_")
    return parser


def config_from_args(argv=None) -> InstanceConfig:
    ns = build_parser().parse_args(argv)
    return from_namespace(
        InstanceConfig, ns,
        lora=from_namespace(LoRAConfig, ns, prefix="lora_"),
        sidecar=from_namespace(SidecarConfig, ns, prefix="sidecar_"),
    )


def main(argv=None) -> int:
    from lightllm_patches.instance_server import serve

    try:
        config = config_from_args(argv)
        return serve(config)  # 1 when a process of the instance died: restart it
    except (ValueError, RuntimeError) as e:
        print(f"caraserve instance: error: {e}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Exit without finalising the interpreter: `serve` has stopped the children and removed
    the shared memory, and tearing down torch and the tokenizer measured 4-5 s on a loaded
    machine, which a supervisor waiting to restart the instance would otherwise sit through."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
