"""Cheap questions to the compute device, for the service's probes and metrics."""

from __future__ import annotations

import torch


def memory_bytes(device: torch.device) -> dict[str, int] | None:
    """Bytes torch has allocated and reserved on a CUDA device; None on the CPU.

    Read from the caching allocator's own counters: no CUDA call, so it answers even when the
    GPU does not (a metrics scrape must never hang).
    """
    if device.type != "cuda":
        return None
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
    }


def answers(device: torch.device) -> bool:
    """Run a tiny op on the device and wait for its result; True on the CPU.

    On CUDA it runs on a side stream from torch's pool (non-blocking with the default stream, so
    it does not queue behind a running job's kernels). A GPU that has stopped answering blocks
    here: call it from a thread with a timeout.
    """
    if device.type != "cuda":
        return True
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        value = (torch.ones(1, device=device) + 1).item()
    return value == 2.0
