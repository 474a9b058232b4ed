"""Shared fixtures: the BTCV bundle run as a user runs it, on data the tests build (helpers: tests/helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    MSD_PHANTOM_SHAPE,
    PHANTOM_SHAPE,
    PHANTOM_SPACING,
    SMALL,
    SSL_DIR,
    SSL_PHANTOM_SHAPE,
    SSL_SMALL,
    run_workflow,
)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Four small synthetic abdomen cases (oblique, flipped affines) and a datalist: 2 train, 2 validation."""
    from tools.data.make_phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    pairs = write_phantom_dataset(root, num_cases=4, seed=7, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    items = [
        {"image": str(Path(image).relative_to(root)), "label": str(Path(label).relative_to(root))}
        for image, label in pairs
    ]
    datalist = {"training": items[:2], "validation": items[2:], "testing": [{"image": items[3]["image"]}]}
    (root / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return root


@pytest.fixture(scope="session")
def sample_ct(tmp_path_factory) -> dict:
    """The real sample CT (TotalSegmentator's test volume) with its labels mapped to BTCV ids."""
    from tools.data.fetch_sample_ct import fetch_sample_ct

    return fetch_sample_ct(tmp_path_factory.mktemp("sample_ct"))


def _training_run(out: Path, workflow) -> dict:
    """What a training fixture hands the tests: its bundle_root, workflow and checkpoint paths."""
    return {
        "root": out,
        "workflow": workflow,
        "model": out / "models" / "model.pt",
        "last": out / "models" / "checkpoint_last.pt",
    }


@pytest.fixture(scope="session")
def trained(tmp_path_factory, phantom_dir) -> dict:
    """One small training run: 2 iterations (one epoch of 2 cases) and a validation."""
    out = tmp_path_factory.mktemp("trained")
    workflow = run_workflow(
        ["train.json"],
        "train",
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        bundle_root=str(out),
        max_epochs=1,
        val_interval=1,
        **SMALL,
    )
    return _training_run(out, workflow)


@pytest.fixture(scope="session")
def ssl_corpus(tmp_path_factory) -> Path:
    """Three unlabelled CT-like volumes and a pre-training datalist: 2 for training, 1 for validation."""
    from tools.data.make_phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("ssl_corpus")
    pairs = write_phantom_dataset(root, num_cases=3, seed=11, shape=SSL_PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    items = [{"image": str(Path(image).relative_to(root))} for image, _ in pairs]
    (root / "datalist.json").write_text(json.dumps({"training": items[:2], "validation": items[2:]}, indent=2))
    return root


@pytest.fixture(scope="session")
def ssl_trained(tmp_path_factory, ssl_corpus) -> dict:
    """A small pre-training run: 2 optimiser steps, validating after each."""
    out = tmp_path_factory.mktemp("ssl_trained")
    workflow = run_workflow(
        ["train.json"],
        "train",
        SSL_DIR,
        dataset_dir=str(ssl_corpus),
        bundle_root=str(out),
        num_steps=2,
        val_interval=1,
        **SSL_SMALL,
    )
    return _training_run(out, workflow)


@pytest.fixture(scope="session")
def msd_root(tmp_path_factory) -> Path:
    """All ten Decathlon tasks as synthetic mini-datasets: 3 training and 1 test case each."""
    from tools.data.make_msd_tasks import MSD_TASKS, write_msd_task

    root = tmp_path_factory.mktemp("msd")
    for i, task in enumerate(MSD_TASKS):
        write_msd_task(root, task, num_training=3, num_test=1, seed=i, shape=MSD_PHANTOM_SHAPE)
    return root
