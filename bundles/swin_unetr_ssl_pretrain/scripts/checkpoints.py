# Generated from bundles/common/scripts/checkpoints.py by tools/sync_bundle_code.py: edit that file, then run it.
"""Checkpoint saving that never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicDiskSaver", "AtomicCheckpointSaver", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file in the same folder, then rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` writing atomically, optionally always to one fixed file name.

    With a fixed name, ``remove`` does nothing: the next save replaces the file in one rename,
    so there is never a moment without a complete checkpoint on disk.
    """

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, create_dir=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        atomic_torch_save(checkpoint, os.path.join(self.dirname, self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically (MONAI's are not)."""

    def __init__(self, save_dir: str, *args: Any, final_filename: str | None = None,
                 key_metric_filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, *args, final_filename=final_filename,
                         key_metric_filename=key_metric_filename, **kwargs)
        for attr, fixed_name in (("_final_checkpoint", final_filename),
                                 ("_key_metric_checkpoint", key_metric_filename),
                                 ("_interval_checkpoint", None)):
            checkpoint = getattr(self, attr, None)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, fixed_name)
