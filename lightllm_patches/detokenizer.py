"""Process target for LightLLM's detokenizer that imports the patches first.

Upstream `start_detokenization_process` is spawned by reference to its module, which imports
LightLLM's model packages (through its tokenizer module) before any patch is applied; on a
CPU-only machine that import fails. This wrapper lives in our package, so the child process
imports `lightllm_patches` (and thus the patches) before LightLLM.

It dies with the instance's HTTP process (`die_with_parent`), and gives the process an event
loop first: upstream calls `asyncio.get_event_loop()`
with uvloop's policy installed, which uvloop 0.23 answers with an error when no loop is set.
"""
from __future__ import annotations


def start_detokenization_process(args, detokenization_port, httpserver_port, log_level, pipe_writer):
    import asyncio
    import signal

    from caraserve_router.contracts.processes import die_with_parent
    from lightllm_patches._global import set_log_level

    die_with_parent(signal.SIGKILL)  # it holds nothing to clean up
    from lightllm.server.detokenization.manager import start_detokenization_process as upstream

    set_log_level(log_level)
    asyncio.set_event_loop(asyncio.new_event_loop())
    upstream(args, detokenization_port, httpserver_port, pipe_writer)
