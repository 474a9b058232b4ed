"""Shared test helpers: small settings, phantom shapes, and the plain functions the tests call.

The pytest fixtures that use them are in tests/conftest.py; tests import these with ``from tests.helpers import ...``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import monai
import pytest
import torch
from ignite.engine import Events
from monai.bundle import create_workflow
from monai.networks.nets import SwinUNETR

from tools.common.bundles import BTCV_DIR, MSD_DIR, SSL_DIR, bundle_on_path, forget_scripts_modules  # noqa: F401
from tools.common.bundles import REPO_ROOT as REPO

SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"

# Small settings that keep a CPU run to seconds: 64^3 is the smallest crop that trains
# (32^3 reaches a 1x1x1 bottleneck where InstanceNorm fails).
SMALL = {
    "feature_size": 12,
    "roi_size": [64, 64, 64],
    "num_samples": 1,
    "num_workers": 0,
    "sw_batch_size": 1,
    "use_checkpoint": False,
}
PHANTOM_SHAPE = (64, 64, 40)
PHANTOM_SPACING = (1.5, 1.5, 2.0)

# Pre-training needs only the encoder's bottleneck to hold 2 tokens (rotation and contrastive heads),
# so 32 x 64 x 64 crops work (square in the rotation plane) and halve the cost; two volumes per batch
# give the contrastive loss negatives.
SSL_SMALL = {
    "feature_size": 12,
    "roi_size": [32, 64, 64],
    "num_samples": 1,
    "batch_size": 2,
    "num_workers": 0,
    "use_checkpoint": False,
    "warmup_steps": 1,
}
SSL_PHANTOM_SHAPE = (40, 72, 68)

# The MSD bundle keeps each task's spacing, intensity and augmentation; only the size knobs shrink, as for BTCV.
MSD_SMALL = dict(SMALL)
MSD_INFER_SMALL = {k: MSD_SMALL[k] for k in ("feature_size", "roi_size", "num_workers", "sw_batch_size")}
MSD_PHANTOM_SHAPE = (40, 40, 24)


# The patch-merging order record as documented in the model cards (scripts/weights_format.py):
# int64 [format_version 2, code], code 1 = legacy, 2 = current. Version 1 (older files) was a dict.
ORDER_RECORD = {"legacy": [2, 1], "current": [2, 2]}


def order_record(order: str) -> torch.Tensor:
    """The record a patch-merging layer of the bundles keeps in the state dict for ``order``."""
    return torch.tensor(ORDER_RECORD[order], dtype=torch.int64)


def recorded(state: dict, order: str = "current", version: int = 2) -> dict:
    """A MONAI SwinUNETR state dict as the bundles save it: each patch-merging layer's order recorded in it.

    Without the record, ``patch_merging: auto`` refuses a file (the order is never guessed); a
    SwinUNETR built by today's monai has the current order. ``version=1`` writes the dict record
    of files saved by earlier versions of the bundles.
    """
    layers = {k.rsplit(".", 2)[0] for k in state if k.endswith(".downsample.reduction.weight")}
    record = order_record(order) if version == 2 else {"patch_merging": order, "format_version": 1}
    return {**state, **{f"{layer}._extra_state": record for layer in layers}}


def monai_swin_unetr(**kwargs) -> SwinUNETR:
    """MONAI's own ``SwinUNETR(**kwargs)`` as a user of the installed monai builds it (1.4 requires ``img_size``)."""
    if tuple(int(x) for x in monai.__version__.split(".")[:2]) < (1, 5):
        kwargs.setdefault("img_size", 64)
    return SwinUNETR(**kwargs)


def btcv_workflow(configs: list[str], workflow_type: str, bundle_dir: Path = BTCV_DIR, **overrides):
    """``create_workflow`` on a bundle's config files (names under configs/; BTCV by default), as a user would."""
    files = [str(bundle_dir / "configs" / c) for c in configs]
    workflow = create_workflow(
        config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type, **overrides
    )
    return workflow


def run_workflow(configs: list[str], workflow_type: str, bundle_dir: Path = BTCV_DIR, **overrides):
    """Create, initialise and run a workflow (BTCV by default) with the bundle's scripts importable; return it."""
    with bundle_on_path(bundle_dir):
        workflow = btcv_workflow(configs, workflow_type, bundle_dir, **overrides)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    return workflow


def train_until_failure(workflow) -> tuple[BaseException, list[int]]:
    """Initialise and run a training workflow that must fail; return the error and the iterations that started."""
    steps = []
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_STARTED, lambda e: steps.append(e.state.iteration)
        )
        workflow.run()
    return info.value, steps


def verify_metadata(meta_file: Path, bundle_dir: Path) -> str:
    """Check ``meta_file`` against the MONAI metadata schema (``monai.bundle verify_metadata``); return its output."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(meta_file),
            "--filepath",
            str(SCHEMA),
        ],
        capture_output=True,
        text=True,
        cwd=bundle_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def card_block(card: Path, title: str) -> str:
    """The first bash block after the heading ``### title`` of ``card``: a model card or a docs/ guide it links."""
    text = card.read_text()
    start = text.index(f"### {title}\n")
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block under '{title}' in {card}"
    return match.group(1)


def error_text(exc: BaseException) -> str:
    """All messages of an exception chain: config evaluation wraps the error the user should see."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def train_msd_fold(root: Path, bundle_root: Path, task: str, fold: int = 0, **overrides):
    """Train ``task``'s ``fold`` (3 folds of 3 cases: 2 iterations and a validation); return the workflow."""
    settings = {**MSD_SMALL, "num_folds": 3, "max_epochs": 1, "val_interval": 1, **overrides}
    return run_workflow(
        ["train.json"],
        "train",
        MSD_DIR,
        task=task,
        dataset_dir=str(root / task),
        bundle_root=str(bundle_root),
        fold=fold,
        **settings,
    )
