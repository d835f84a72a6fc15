"""How honest a CPU emulation of the device is, for one adapter (benchmarks print it).

On a GPU the LoRA term is a few percent of a prefill and the CPU computes it far slower than
the device; on this machine the "device" is a CPU core, so both numbers can be far from a
GPU's, and they decide how much cpu-assist gains by moving the LoRA term to the sidecar:

- `lora_share_of_prefill`: the adapter's LoRA kernels (sgmv, every layer and targeted group)
  over a prefill of `prompt_len` tokens, against the base prefill plus those kernels;
- `cpu_vs_device_lora_time_ratio`: the same LoRA work through the CPU sidecar
  (`CpuLoraSidecar.compute`, layer by layer) against the device kernels.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def calibrate(model_dir: str, adapter_dir: Path, prompt_len: int, engine_threads: int = 1, sidecar_workers: int = 1,
              rounds: int = 5, shm_prefix: str = "csbench") -> dict:
    """Prefill / decode times and the LoRA numbers that decide how honest the emulation is.

    The device's LoRA time is measured directly: the step's LoRA kernels (sgmv) for every
    layer and targeted group of a `prompt_len`-token prefill, on the engine's thread; the
    sidecar's time is the same work through `CpuLoraSidecar.compute`."""
    from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
    from caraserve_router.lora.shapes import GROUPS
    from lightllm_patches.offline import OfflineEngine

    torch.set_num_threads(engine_threads)
    name = adapter_dir.name
    engine = OfflineEngine(model_dir, lora=LoRAConfig(mode="cpu-assist", link_bandwidth_mbps=1e5, pool_mb=512),
                           sidecar=SidecarConfig(workers=sidecar_workers), adapters={name: adapter_dir},
                           max_seq=prompt_len + 16, shm_prefix=shm_prefix)
    prompt = [1000 + (i * 37) % 20000 for i in range(prompt_len)]
    rt = engine.runtime
    shapes = rt.shapes

    def step_ms(adapter, batch=1, steps=0, kind="prefill"):
        times = []
        engine.run([prompt[: prompt_len if batch == 1 else 16]] * batch, [adapter] * batch, steps,
                   on_step=lambda k, s: times.append(s * 1000) if k == kind else None)
        return statistics.median(times)

    try:
        step_ms(name)  # loads the adapter (fast link), warms up
        base_runs, decode_runs = [], []
        for _ in range(rounds):
            base_runs.append(step_ms(None))
            decode_runs.append(step_ms(None, batch=8, steps=4, kind="decode"))
        spec = rt.store.get(name).spec
        groups = [g for g in GROUPS if any(spec.slice_ranks[g])]
        x_in = {g: torch.randn(prompt_len, shapes.group(g).in_features) for g in groups}
        outs = {g: torch.zeros(prompt_len, shapes.group(g).out_total) for g in groups}
        req = engine._attach(name)
        device_runs, cpu_runs = [], []
        try:
            view = {"is_prefill": True, "b_seq_len": torch.tensor([prompt_len]), "b_ready_cache_len": torch.tensor([0])}
            for _ in range(rounds):
                batch = rt.build_batch([req], view)
                start = time.perf_counter()
                for layer in range(shapes.num_layers):
                    for g in groups:
                        batch.add_delta(layer, g, x_in[g], outs[g])
                device_runs.append((time.perf_counter() - start) * 1000)
                rt.after_forward(batch)
                rt.sidecar.arm()
                start = time.perf_counter()
                for layer in range(shapes.num_layers):
                    for g in groups:
                        if not rt.sidecar.compute(layer, g, x_in[g], [(0, prompt_len, name)], outs[g]):
                            raise RuntimeError("the sidecar did not answer during calibration")
                cpu_runs.append((time.perf_counter() - start) * 1000)
                rt.sidecar.disarm()
        finally:
            rt.detach_request(req.r_id)
    finally:
        engine.close()
    base, device_lora, cpu_lora = (statistics.median(v) for v in (base_runs, device_runs, cpu_runs))
    return {"prompt_tokens": prompt_len, "prefill_ms_base": base, "prefill_ms_base_runs": base_runs,
            "decode_step_ms_batch8": statistics.median(decode_runs), "decode_step_ms_batch8_runs": decode_runs,
            "device_lora_ms": device_lora, "device_lora_ms_runs": device_runs,
            "lora_share_of_prefill": device_lora / (base + device_lora),
            "sidecar_lora_ms": cpu_lora, "sidecar_lora_ms_runs": cpu_runs,
            "cpu_vs_device_lora_time_ratio": cpu_lora / device_lora, "targets": groups}
