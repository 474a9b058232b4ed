"""Finding the checkpoint a resumed pre-training run continues from."""

from __future__ import annotations

import glob
import os

import torch

from .bundle_logger import logger

__all__ = ["latest_checkpoint"]


def _iteration_of(path: str) -> int:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    trainer = checkpoint.get("trainer") if isinstance(checkpoint, dict) else None
    if not isinstance(trainer, dict) or "iteration" not in trainer:
        raise ValueError(f"{path} is not a full training checkpoint (no trainer state).")
    return int(trainer["iteration"])


def latest_checkpoint(ckpt_dir: str) -> str:
    """The full-state checkpoint in ``ckpt_dir`` with the most iterations (``checkpoint_*.pt``).

    Raises FileNotFoundError when there is none: resuming must never silently start afresh.
    """
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "checkpoint*.pt")))
    if not paths:
        raise FileNotFoundError(f"resume is set but {ckpt_dir} holds no training checkpoint (checkpoint_*.pt).")
    iteration, _, latest = max((_iteration_of(p), os.path.getmtime(p), p) for p in paths)
    logger.info("resuming from %s (iteration %d)", latest, iteration)
    return latest
