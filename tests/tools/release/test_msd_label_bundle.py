"""tools/release/msd_label_bundle.py: a single-task copy of the MSD bundle set up for MONAI Label, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import MSD_DIR
from tools.common.bundles import bundle_parser, forget_scripts_modules
from tools.data.make_msd_tasks import write_msd_task
from tools.release.msd_label_bundle import LabelBundleError, msd_label_bundle

TASK = "Task01_BrainTumour"  # not the bundle's default task, so every edit shows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_msd_task(tmp_path_factory.mktemp("msd"), TASK, num_training=1, num_test=1, seed=5, shape=(16, 16, 8))


@pytest.fixture(scope="module")
def label_copy(tmp_path_factory, task_dir) -> Path:
    out = tmp_path_factory.mktemp("app") / "model" / "swin_unetr_msd_brain"
    assert msd_label_bundle(TASK, str(task_dir), str(out)) == out
    return out


def _parsed(bundle: Path, config: str, ids: list[str]) -> dict:
    """Resolve ``ids`` from the copy's ``config`` as MONAI Label would (bundle_root = the copy)."""
    parser = bundle_parser(bundle, config, {})
    try:
        return {i: parser.get_parsed_content(i) for i in ids}
    finally:
        forget_scripts_modules()


def test_copy_holds_the_bundle_without_outputs_and_its_json_is_bundle_formatted(label_copy):
    assert sorted(p.name for p in label_copy.iterdir()) == ["LICENSE", "configs", "docs", "scripts"]
    source = sorted(p.relative_to(MSD_DIR).as_posix() for p in (MSD_DIR / "scripts").rglob("*.py"))
    assert sorted(p.relative_to(label_copy).as_posix() for p in (label_copy / "scripts").rglob("*.py")) == source
    assert not list(label_copy.rglob("metadata_*.json")) and not list(label_copy.rglob("__pycache__"))
    for config in (label_copy / "configs").glob("*.json"):
        text = config.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", config


def test_copy_is_fixed_to_the_task_with_checkpoints_in_its_models_folder(label_copy, task_dir):
    train = _parsed(label_copy, "train.json", ["task", "dataset_json", "ckpt_dir", "in_channels", "num_classes"])
    assert train["task"] == TASK
    assert Path(train["dataset_json"]) == task_dir / "dataset.json"
    assert Path(train["ckpt_dir"]) == label_copy / "models"
    assert (train["in_channels"], train["num_classes"]) == (4, 4)
    infer = _parsed(label_copy, "inference.json", ["task", "dataset_json", "ckpt_path"])
    assert infer["task"] == TASK and Path(infer["dataset_json"]) == task_dir / "dataset.json"
    assert Path(infer["ckpt_path"]) == label_copy / "models" / "model.pt"
    evaluate = bundle_parser(label_copy, "train.json", {})
    evaluate.read_config([str(label_copy / "configs" / c) for c in ("train.json", "evaluate.json")])
    evaluate.update({"bundle_root": str(label_copy)})
    try:
        assert Path(evaluate.get_parsed_content("ckpt_path")) == label_copy / "models" / "model.pt"
    finally:
        forget_scripts_modules()
    # the bundle itself is untouched
    assert json.loads((MSD_DIR / "configs" / "train.json").read_text())["task"] == "Task09_Spleen"


def test_copy_metadata_describes_the_task_as_its_dataset_json_does(label_copy, task_dir):
    meta = json.loads((label_copy / "configs" / "metadata.json").read_text())
    dataset = json.loads((task_dir / "dataset.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 4 and image["modality"] == "MR"
    assert image["channel_def"] == {str(k): v for k, v in dataset["modality"].items()}
    assert pred["channel_def"] == {str(k): v for k, v in dataset["labels"].items()}
    assert pred["num_channels"] == 4
    bundle_meta = json.loads((MSD_DIR / "configs" / "metadata.json").read_text())
    assert meta["version"] == bundle_meta["version"]
    assert bundle_meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "spleen"}


def test_refuses_an_existing_output_unless_overwrite(label_copy, task_dir):
    marker = label_copy / "models" / "stale.pt"
    marker.parent.mkdir(exist_ok=True)
    marker.write_bytes(b"x")
    with pytest.raises(LabelBundleError, match="exists; pass --overwrite"):
        msd_label_bundle(TASK, str(task_dir), str(label_copy))
    assert marker.is_file()
    msd_label_bundle(TASK, str(task_dir), str(label_copy), overwrite=True)
    assert not marker.exists() and (label_copy / "configs" / "metadata.json").is_file()


def test_refuses_an_unknown_task_and_a_folder_without_dataset_json(tmp_path, task_dir):
    with pytest.raises(LabelBundleError, match="unknown task 'Task11_Liver'.*Task10_Colon"):
        msd_label_bundle("Task11_Liver", str(task_dir), str(tmp_path / "a"))
    with pytest.raises(LabelBundleError, match=r"dataset\.json not found"):
        msd_label_bundle(TASK, str(task_dir.parent), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_dataset_of_another_task_fails_naming_it_and_leaves_no_copy(tmp_path, task_dir):
    with pytest.raises(LabelBundleError, match="does not describe Task09_Spleen"):
        msd_label_bundle("Task09_Spleen", str(task_dir), str(tmp_path / "spleen"))
    assert not (tmp_path / "spleen").exists()


def test_without_a_dataset_the_copy_describes_the_task_from_its_task_file_and_infers(tmp_path):
    """A copy for inference (MONAI Deploy): no dataset folder anywhere; metadata and network from the task file."""
    out = msd_label_bundle("Task05_Prostate", output=str(tmp_path / "prostate"))
    task_file = json.loads((MSD_DIR / "configs" / "tasks" / "Task05_Prostate.json").read_text())
    meta = json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]
    assert meta["inputs"]["image"]["channel_def"] == task_file["channel_names"] == {"0": "T2", "1": "ADC"}
    assert meta["outputs"]["pred"]["channel_def"] == task_file["label_names"]
    train = json.loads((out / "configs" / "train.json").read_text())
    assert train["dataset_dir"] == json.loads((MSD_DIR / "configs" / "train.json").read_text())["dataset_dir"]
    infer = _parsed(out, "inference.json", ["task", "ckpt_path", "label_names", "spacing", "network_def"])
    assert infer["task"] == "Task05_Prostate" and Path(infer["ckpt_path"]) == out / "models" / "model.pt"
    assert infer["label_names"] == {0: "background", 1: "PZ", 2: "TZ"} and infer["spacing"] == task_file["spacing"]
    with pytest.raises(LabelBundleError, match="--output"):
        msd_label_bundle("Task05_Prostate")
