# Generated from bundles/common/scripts/distributed.py: edit that, then run python -m tools sync_bundle_code
"""Multi-process (DDP) set-up used by the bundles' ``multi_gpu_train.json``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .bundle_logger import logger

__all__ = ["LR_SCALING", "effective_learning_rate", "rank", "rank_device", "world_size"]

LR_SCALING = ("none", "linear")


def rank_device() -> torch.device:
    """Join the default process group if not yet joined; select and return this rank's device.

    NCCL and ``cuda:<rank>`` (made the current CUDA device) when CUDA is available, else gloo on
    the CPU. ``multi_gpu_train.json`` resolves ``device`` through this, so the process group
    exists before anything reads ``@device``: train.json's ``setup`` steps (which may) run
    first, then the DDP steps that ``multi_gpu_train.json`` appends with ``+setup``.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(f"cuda:{dist.get_rank()}")
    torch.cuda.set_device(device)
    return device


def rank() -> int:
    """This process's rank in the default group, 0 without one (a single-process run)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size(device: torch.device | None = None) -> int:
    """Processes in the default group, 1 without one.

    ``device`` is not used: passing ``@device`` from a config resolves it first, and in
    ``multi_gpu_train.json`` resolving it joins the group (``rank_device``).
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def effective_learning_rate(learning_rate: float, lr_scaling: str = "none", processes: int = 1) -> float:
    """The optimiser's learning rate: ``learning_rate``, times ``processes`` when ``lr_scaling`` is ``linear``.

    Logs the rate it returns, so every run states the rate it trains with.
    """
    if lr_scaling not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {lr_scaling!r}")
    rate = float(learning_rate) * (processes if lr_scaling == "linear" else 1)
    logger.info(
        f"effective learning rate {rate:g} (learning_rate {float(learning_rate):g}, "
        f"lr_scaling {lr_scaling}, {processes} process{'es' if processes > 1 else ''})"
    )
    return rate
