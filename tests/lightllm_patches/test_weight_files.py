"""Memory-mapped safetensors (what TP ranks load from) equal safetensors' own reader, every dtype."""
from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightllm_patches.weight_files import map_safetensors


def test_mapped_tensors_equal_the_reader(tiny_llama_dir, tmp_path):
    path = tmp_path / "mixed.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"a.f32": torch.randn(3, 5, generator=gen), "b.f16": torch.randn(7, generator=gen).half(),
               "c.bf16": torch.randn(2, 2, 2, generator=gen).bfloat16(), "d.i64": torch.arange(4),
               "e.empty": torch.empty(0, 3)}, str(path))
    for file in (path, tiny_llama_dir / "model.safetensors"):
        mapped = map_safetensors(str(file))
        with safe_open(str(file), "pt", "cpu") as f:
            assert sorted(mapped) == sorted(f.keys())
            for key in f.keys():
                want = f.get_tensor(key)
                assert mapped[key].dtype == want.dtype and mapped[key].shape == want.shape, key
                assert torch.equal(mapped[key], want), key
    cols = map_safetensors(str(path))["a.f32"][:, 2:4]  # a row-parallel rank's slice, as LightLLM cuts it
    with safe_open(str(path), "pt", "cpu") as f:
        assert torch.equal(cols.contiguous(), f.get_tensor("a.f32")[:, 2:4])
