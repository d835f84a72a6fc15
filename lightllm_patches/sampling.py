"""Request sampling parameters and the sampler, device-aware and seedable.

- `CaraSamplingParams` overrides `lightllm.server.sampling_params.SamplingParams`: carries the
  request's `AdapterRequest` (checked once, by the instance's HTTP server) and seed to the
  model worker (in `to_dict`, as the object itself), and encodes stop strings
  without dropping their first token (upstream assumes every tokenizer prepends a BOS).
- `sample` replaces `continues_batch.post_process.sample`, which builds its tensors on
  "cuda" and cannot be seeded per request: greedy rows take the argmax; sampled rows draw from
  their own `torch.Generator` (seeded by the request's seed), so a seed reproduces a reply
  whatever else shares the batch.
"""
from __future__ import annotations

from typing import Optional

import torch

from lightllm.server.sampling_params import SamplingParams

from caraserve_router.contracts.adapters import AdapterRequest

# Keys CaraServe adds to the per-request dict LightLLM sends to the model worker.
EXTRA_KEYS = ("adapter", "seed")


class CaraSamplingParams(SamplingParams):
    def __init__(self, adapter: Optional[AdapterRequest] = None, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if adapter is not None and not isinstance(adapter, AdapterRequest):
            raise TypeError(f"adapter must be an AdapterRequest, got {type(adapter).__name__}")
        self.adapter = adapter
        self.seed = seed

    @property
    def adapter_name(self) -> Optional[str]:
        return self.adapter.name if self.adapter is not None else None

    def verify(self):
        super().verify()
        if self.seed is not None and not (0 <= int(self.seed) < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    def stop_sentences_to_token_ids(self, tokenizer):
        stops = self.stop_sequences or []
        if isinstance(stops, str):
            stops = [stops]
        ids = [tokenizer.encode(s, add_special_tokens=False) for s in stops]
        self.stop_sequences = [i for i in ids if len(i) > 0]

    def to_dict(self):
        ret = super().to_dict()
        ret["adapter"] = self.adapter
        ret["seed"] = self.seed
        return ret


def split_extra(sampling_param: dict) -> dict:
    """Remove CaraServe's keys from a request's sampling dict (LightLLM's InferSamplingParams
    rejects unknown keys) and return them."""
    return {key: sampling_param.pop(key, None) for key in EXTRA_KEYS}


def make_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


def _apply_penalties(logits: torch.Tensor, reqs, device) -> None:
    rows, ids, counts, presence, frequency, repetition = [], [], [], [], [], []
    for i, req in enumerate(reqs):
        p = req.sampling_param
        if p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0:
            continue
        for token_id, count in req.out_token_id_count.items():
            rows.append(i)
            ids.append(token_id)
            counts.append(count)
            presence.append(p.presence_penalty)
            frequency.append(p.frequency_penalty)
            repetition.append(p.repetition_penalty)
    if not rows:
        return
    rows_t = torch.tensor(rows, device=device)
    ids_t = torch.tensor(ids, device=device)
    cur = logits[rows_t, ids_t]
    rep = torch.tensor(repetition, device=device, dtype=logits.dtype)
    cur = torch.where(cur > 0, cur / rep, cur * rep)
    cur = cur - torch.tensor(counts, device=device, dtype=logits.dtype) * torch.tensor(
        frequency, device=device, dtype=logits.dtype
    )
    cur = cur - torch.tensor(presence, device=device, dtype=logits.dtype)
    logits[rows_t, ids_t] = cur


def _apply_eos_rules(logits: torch.Tensor, reqs, eos_id: list[int]) -> None:
    for i, req in enumerate(reqs):
        p = req.sampling_param
        out_len = len(req.input_token_ids) - req.prompt_len
        if out_len < p.min_new_tokens - 1:
            logits[i, eos_id] = -1e6
            continue
        start, factor = p.exponential_decay_length_penalty
        if factor != 1.0 and out_len > start:
            eos = logits[i, eos_id]
            logits[i, eos_id] = eos + eos.abs() * (factor ** (out_len - start) - 1)


_NUCLEUS_CANDIDATES = 256


def _candidates(probs: torch.Tensor, top_p: float, top_k: int):
    """(probabilities, token ids or None) that top-k / top-p leave in play, without sorting
    the whole vocabulary unless the nucleus really is that wide."""
    vocab = probs.shape[0]
    k = min(top_k if top_k > 0 else vocab, vocab)
    if k == vocab and top_p >= 1.0:
        return probs, None
    vals, ids = probs.topk(min(k, _NUCLEUS_CANDIDATES))  # sorted, descending
    if k > vals.shape[0] and (top_p >= 1.0 or float(vals.sum()) < top_p):
        vals, ids = probs.topk(k)
    if top_p < 1.0:
        vals = vals.masked_fill((vals.cumsum(0) - vals) > top_p, 0.0)
    return vals, ids


def _sample_row(probs: torch.Tensor, top_p: float, top_k: int, gen: torch.Generator):
    vals, ids = _candidates(probs, top_p, top_k)
    # Exponential race: argmax(p_i / E_i), E_i ~ Exp(1), picks i with probability p_i / sum(p).
    race = vals / -torch.log(torch.rand(vals.shape, generator=gen, device=vals.device))
    pick = int(race.argmax())
    token = int(ids[pick]) if ids is not None else pick
    return token, float(vals[pick] / vals.sum())


@torch.no_grad()
def sample(logits: torch.Tensor, reqs, eos_id: list[int], generators: dict) -> tuple[list[int], list[float]]:
    """Next token and its probability per row. Shape: logits [B, vocab] (float32)."""
    logits = logits.float().contiguous()
    _apply_penalties(logits, reqs, logits.device)
    _apply_eos_rules(logits, reqs, eos_id)
    next_ids: list[int] = [0] * len(reqs)
    next_probs: list[float] = [0.0] * len(reqs)
    greedy = [i for i, r in enumerate(reqs) if r.sampling_param.top_k == 1]
    if greedy:
        # all greedy rows on the device, then one device-to-host copy of (ids, probabilities)
        picked = logits if len(greedy) == len(reqs) else logits[torch.tensor(greedy, device=logits.device)]
        best_p, best = torch.softmax(picked, dim=-1).max(dim=-1)
        ids, probs = torch.stack([best.double(), best_p.double()]).cpu().tolist()  # [2, G] on the host
        for j, i in enumerate(greedy):
            next_ids[i], next_probs[i] = int(ids[j]), probs[j]
    for i, req in enumerate(reqs):
        p = req.sampling_param
        if p.top_k == 1:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        next_ids[i], next_probs[i] = _sample_row(probs, p.top_p, p.top_k, generators[req.r_id])
    return next_ids, next_probs
