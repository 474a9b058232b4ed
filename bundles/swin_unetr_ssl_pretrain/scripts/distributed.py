# Generated from bundles/common/scripts/distributed.py by tools/sync_bundle_code.py: edit that file, then run it.
"""Multi-process (DDP) set-up used by the bundles' ``multi_gpu_train.json``."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank_device"]


def rank_device() -> torch.device:
    """Join the default process group if not yet joined; return this rank's device.

    NCCL with ``cuda:<rank>`` when CUDA is available, else gloo on the CPU. The device is the first
    thing the configs resolve, so joining here lets every single-process ``initialize`` step (which
    may read ``@device``) run before the DDP-specific ones that ``multi_gpu_train.json`` appends.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.device(f"cuda:{dist.get_rank()}" if torch.cuda.is_available() else "cpu")
