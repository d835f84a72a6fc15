"""The device half of a sidecar call when `x` lives on a CUDA device (not runnable on a CPU host)."""
from __future__ import annotations

from typing import Optional

import torch

from caraserve_router.lora.sidecar.jobs import Job, runs
from caraserve_router.lora.sidecar.shm import ControlBlock


class CudaPath:
    """The device half of a call when `x` lives on a CUDA device (not runnable on a CPU host).

    - The whole segment is page-locked once (cudaHostRegister), so copies to and from it are
      truly asynchronous DMA.
    - Input: the rows are packed on the device (one cat) and copied device->host with
      non_blocking=True on the current stream.
    - Signal: a device int64 tensor is filled with the sequence number and copied into the
      participants' job words on the same stream: the words change only after `x` has landed,
      and the host never waits for the stream.
    - Output: one non_blocking host->device copy of the deltas, then the adds, on the stream.
      The next job's flags are queued behind that copy, so workers cannot overwrite the
      output buffer before the copy has read it. Host-signalled jobs (profiling, round trips)
      first wait for an event recorded after the last such copy.
    """

    def __init__(self, ctl: ControlBlock):
        self.ctl = ctl
        self.base = torch.frombuffer(ctl.shm.buf, dtype=torch.uint8, count=ctl.layout.total_bytes)
        self.registered = False
        self.seq: dict = {}  # device -> int64 [workers]
        self.last_copy: Optional[torch.cuda.Event] = None

    def register(self) -> None:
        if self.registered:
            return
        err = torch.cuda.cudart().cudaHostRegister(self.base.data_ptr(), self.ctl.layout.total_bytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the sidecar segment failed (error {int(err)})")
        self.registered = True

    def stage_input(self, x: torch.Tensor, job: Job, in_features: int) -> None:
        host = self.ctl.input_rows(job.rows, in_features)  # [rows, IN], pinned
        parts = [x[start:end] for start, end, _, _ in job.pieces]
        packed = parts[0] if len(parts) == 1 else torch.cat(parts)  # [rows, IN] on the device
        host.copy_(packed.to(host.dtype), non_blocking=True)

    def signal(self, workers: list, seq: int, device: torch.device) -> None:
        seqs = self.seq.get(device)
        if seqs is None:
            seqs = self.seq[device] = torch.zeros(self.ctl.layout.workers, dtype=torch.int64, device=device)
        seqs.fill_(seq)  # a kernel on the stream; the value is set in stream order
        for start, end in runs(sorted(w.index for w in workers)):
            self.ctl.job_flags[start:end].copy_(seqs[: end - start], non_blocking=True)

    def apply_output(self, out: torch.Tensor, job: Job, out_features: int) -> None:
        host = self.ctl.output_rows(job.rows, out_features)  # [rows, OUT], pinned
        delta = host.to(out.device, non_blocking=True)
        for start, end, _, pos in job.pieces:
            out[start:end] += delta[pos : pos + end - start]
        self.last_copy = torch.cuda.Event()
        self.last_copy.record()

    def drain(self) -> None:
        """Wait until no copy of ours is pending on the stream (fallbacks, host-signalled jobs)."""
        if self.last_copy is not None:
            self.last_copy.synchronize()
        if torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr())
            self.registered = False
        self.base = None
        self.seq.clear()
        self.last_copy = None

