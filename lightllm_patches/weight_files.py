"""A checkpoint's safetensors as memory-mapped tensors, for the ranks of a tensor-parallel model.

LightLLM's weight classes take a name -> tensor dict and slice each rank's part out of it
(`LlamaTransformerLayerWeight._load_qkvo_weights`, ...). Read with `safe_open().get_tensor`
every rank would copy the whole checkpoint into its own memory first: N copies of the model
at load (560 GB of host memory for a 70B fp16 model at tp = 4). Mapped instead, the tensors are
views of the files: a rank copies only the slices it keeps (`_cuda`: `.contiguous().to(...)`),
and the file's pages are the kernel's page cache, shared by the ranks of the host.
"""
from __future__ import annotations

import json
import mmap
import struct

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def map_safetensors(path: str) -> dict[str, torch.Tensor]:
    """name -> tensor view of `path` (a private copy-on-write mapping: nothing is written back,
    and torch gets the writable buffer it wants)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which CaraServe does not read")
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start) if count else torch.empty(
            0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors
