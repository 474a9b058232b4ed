"""Multi-process (DDP) set-up used by the bundles' ``multi_gpu_train.json``."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank_device"]


def rank_device() -> torch.device:
    """Join the default process group if not yet joined; select and return this rank's device.

    NCCL and ``cuda:<rank>`` (made the current CUDA device) when CUDA is available, else gloo on
    the CPU. ``multi_gpu_train.json`` resolves ``device`` through this, so the process group
    exists before anything reads ``@device``: train.json's ``initialize`` steps (which may) run
    first, then the DDP steps that ``multi_gpu_train.json`` appends with ``+initialize``.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(f"cuda:{dist.get_rank()}")
    torch.cuda.set_device(device)
    return device
