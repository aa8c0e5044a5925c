"""Peak memory of a run, for the results' run record (the tables compare editors by it).

On a CUDA device: the peak of `torch.cuda.max_memory_allocated` since `reset_peak` (tensors only).
On the CPU: the peak resident set size of the whole process since it started (the OS cannot reset
it), so it includes the backbone, Python and everything loaded before the evaluation.
"""
from __future__ import annotations

import resource
import sys

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """{"peak_mb": float, "peak_kind": "cuda_allocated" | "process_rss"}."""
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "peak_kind": "process_rss"}
