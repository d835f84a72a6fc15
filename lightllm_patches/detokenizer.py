"""Process target for LightLLM's detokenizer that imports the patches first.

Upstream `start_detokenization_process` is spawned by reference to its module, which imports
LightLLM's model packages (through its tokenizer module) before any patch is applied; on a
CPU-only machine that import fails. This wrapper lives in our package, so the child process
imports `lightllm_patches` (and thus the patches) before LightLLM.

It dies with the instance's HTTP process (`die_with_parent`), and gives the process an event
loop first: upstream calls `asyncio.get_event_loop()`
with uvloop's policy installed, which uvloop 0.23 answers with an error when no loop is set.

It also replaces `lightllm.server.detokenization.decode.decode_token` (as the manager imported
it) with `decode_in_vocab`: a model's vocabulary is often larger than its tokenizer (Qwen2.5:
151,936 rows, 151,665 tokens; padded rows), and upstream turns such an id into a None token
that makes every later decode of the request raise, so the request never finishes. Those ids
add no text; the token id itself is still returned.
"""
from __future__ import annotations

import functools


def decode_in_vocab(upstream, sizes: dict, tokenizer, req, new_token_id: int, eos_id) -> str:
    """Upstream `decode_token` for ids the tokenizer has; the text so far for the others.
    `sizes` caches len(tokenizer) (one tokenizer per process)."""
    size = sizes.get(id(tokenizer))
    if size is None:
        size = sizes[id(tokenizer)] = len(tokenizer)
    if not 0 <= new_token_id < size:
        return req.output_str
    return upstream(tokenizer, req, new_token_id, eos_id)


def start_detokenization_process(args, detokenization_port, httpserver_port, log_level, pipe_writer):
    import asyncio
    import signal

    from caraserve_router.contracts.processes import die_with_parent
    from lightllm_patches._global import set_log_level

    die_with_parent(signal.SIGKILL)  # it holds nothing to clean up
    from lightllm.server.detokenization.manager import start_detokenization_process as upstream

    import lightllm.server.detokenization.manager as manager

    manager.decode_token = functools.partial(decode_in_vocab, manager.decode_token, {})
    set_log_level(log_level)
    asyncio.set_event_loop(asyncio.new_event_loop())
    upstream(args, detokenization_port, httpserver_port, pipe_writer)
