"""The `args` namespace LightLLM's router, queue and HTTP server read, built from our config.

LightLLM passes its argparse namespace everywhere; CaraServe keeps one validated
`InstanceConfig` and derives this namespace from it (upstream's own defaults for the rest).
`nccl_port` is only used by LightLLM as the prefix of its shared-memory names, so it carries
the instance's unique shm prefix.
"""
from __future__ import annotations

import argparse
import json
import os

from caraserve_router.contracts.configs import InstanceConfig


def model_eos_ids(model_dir: str) -> list[int]:
    """EOS token ids from generation_config.json (or config.json); LightLLM defaults to [2]."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [int(eos)]
    return [2]


def lightllm_args(config: InstanceConfig) -> argparse.Namespace:
    batch_max_tokens = config.batch_max_tokens or max(config.max_total_token_num // 6, config.max_req_total_len)
    return argparse.Namespace(
        model_dir=config.model_dir,
        tokenizer_mode="auto",
        load_way="HF",
        max_total_token_num=config.max_total_token_num,
        batch_max_tokens=batch_max_tokens,
        eos_id=model_eos_ids(config.model_dir),
        running_max_req_size=config.running_max_req_size,
        tp=config.tp,
        max_req_input_len=config.max_req_input_len,
        max_req_total_len=config.max_req_total_len,
        nccl_port=config.shm_prefix,
        mode=[],
        trust_remote_code=False,
        disable_log_stats=True,
        log_stats_interval=10,
        router_token_ratio=0.0,
        router_max_new_token_len=1024,
        router_max_wait_tokens=config.router_max_wait_tokens,
        use_dynamic_prompt_cache=False,
        # Chunked prefill runs through upstream's splitfuse switches: the router only registers
        # new requests with the worker and every step is a (mixed) decode step; SplitFuseReq
        # accounts a step's KV need as at most one chunk per request.
        splitfuse_block_size=config.prefill_chunk_tokens or 256,
        splitfuse_mode=config.chunked_prefill,
        beam_mode=False,
        diverse_mode=False,
        token_healing_mode=False,
        enable_multimodal=False,
        cache_capacity=200,
        cache_reserved_ratio=0.5,
        data_type=config.dtype,
        return_all_prompt_logprobs=False,
        long_truncation_mode=None,
        use_tgi_api=False,
        health_monitor=False,
    )
