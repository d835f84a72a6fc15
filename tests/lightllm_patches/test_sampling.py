"""lightllm_patches/sampling.sample: greedy rows from one device-to-host copy for the batch,
sampled rows from their own generators; against torch's softmax / argmax."""
from __future__ import annotations

import types

import torch

from lightllm_patches.sampling import make_generator, sample


def req(r_id, top_k=1, temperature=1.0, top_p=1.0):
    params = types.SimpleNamespace(top_k=top_k, temperature=temperature, top_p=top_p, presence_penalty=0.0,
                                   frequency_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0,
                                   exponential_decay_length_penalty=(0, 1.0))
    return types.SimpleNamespace(r_id=r_id, sampling_param=params, out_token_id_count={}, input_token_ids=[1, 2],
                                 prompt_len=2)


def test_greedy_rows_are_the_argmax_with_its_probability():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    ids, probs = sample(logits, [req(i) for i in range(5)], eos_id=[0], generators={})
    assert ids == logits.argmax(-1).tolist()
    expected = torch.softmax(logits, -1).max(-1).values.tolist()
    assert all(abs(p - e) < 1e-6 for p, e in zip(probs, expected)) and all(isinstance(i, int) for i in ids)


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(4))
    reqs = [req(0), req(1, top_k=5), req(2), req(3, top_k=-1, temperature=0.7)]
    gens = {1: make_generator(7, torch.device("cpu")), 3: make_generator(8, torch.device("cpu"))}
    ids, probs = sample(logits.clone(), reqs, eos_id=[0], generators=gens)
    assert ids[0] == int(logits[0].argmax()) and ids[2] == int(logits[2].argmax())
    assert ids[1] in logits[1].topk(5).indices.tolist()
    again = sample(logits.clone(), reqs, eos_id=[0], generators={1: make_generator(7, torch.device("cpu")),
                                                                 3: make_generator(8, torch.device("cpu"))})
    assert again == (ids, probs)  # seeded rows reproduce
