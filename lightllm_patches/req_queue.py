"""Adapter-aware admission into the running batch.

`CaraReqQueue` overrides `ContinuesBatchQueue.generate_new_batch`: before LightLLM's KV-token
check, a request's adapter must be placeable in the device pool (resident already, or free /
evictable pages for it). A request whose adapter cannot be placed now is *skipped, not
dropped*: it stays in the queue, in order, and later requests may go ahead of it (no
head-of-line blocking by one big adapter); upstream stops at the first request that does
not fit, which is kept for the KV-token check.

With chunked prefill (`InstanceConfig.chunked_prefill`, from `--prefill-chunk-tokens`), the admitted
requests' prompts are not run in one prefill: they run a chunk per step, so the prefill-token
limit of one admission (`batch_max_tokens`) does not apply; the KV-token check does.
"""
from __future__ import annotations

import uuid
from typing import Callable

from lightllm.server.io_struct import Batch, ReqRunStatus
from lightllm.server.router.req_queue.continues_batch.impl import ContinuesBatchQueue


class CaraReqQueue(ContinuesBatchQueue):
    def __init__(self, args, router, admit_adapter: Callable[[str], bool], begin_admission: Callable[[], None],
                 chunked: bool):
        super().__init__(args, router)
        self.admit_adapter = admit_adapter  # adapter name -> placeable now (loads start)
        self.begin_admission = begin_admission
        self.chunked = chunked  # InstanceConfig.chunked_prefill

    def _adapter_ok(self, req) -> bool:
        adapter = req.sample_params.adapter_name  # the request's AdapterRequest, checked at the HTTP server
        if adapter is None or req.req_status == ReqRunStatus.PAUSED_AND_OFFLOAD:
            return True  # base model, or a paused request whose adapter is still referenced
        return self.admit_adapter(adapter)

    def generate_new_batch(self, current_batch: Batch):
        exist = (0 if current_batch is None else len(current_batch.reqs)) + len(self.pause_req_dict)
        if exist >= self.running_max_req_size:
            return None
        is_busy = self.is_busy()
        self._init_cache_list(current_batch, is_busy)
        self.begin_admission()
        can_run, keep = [], []
        prefill_tokens = 0
        for index, req in enumerate(self.waiting_req_list):
            if req.finish_status.is_aborted() and req.req_status == ReqRunStatus.WAIT_IN_QUEUE:
                continue  # aborted before it ever ran: drop it from the queue
            if not self._adapter_ok(req):
                keep.append(req)
                continue
            ok, prefill_tokens = self._can_add_new_req(req, is_busy, 0 if self.chunked else prefill_tokens)
            if not ok:
                keep.extend(self.waiting_req_list[index:])
                break
            can_run.append(req)
            if req.req_status == ReqRunStatus.PAUSED_AND_OFFLOAD:
                self.pause_req_dict.pop(req.request_id)
        self.waiting_req_list = keep
        return Batch(uuid.uuid4().hex, can_run) if can_run else None
