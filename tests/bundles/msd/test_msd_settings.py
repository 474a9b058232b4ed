"""The MSD bundle's task settings, fold split, input checks, encoder hand-off, metrics and metadata.

Everything here parses the bundle's configs as a user's tools would (create_workflow) on synthetic
Decathlon-layout task folders; nothing trains.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR

from tests.helpers import (
    MSD_DIR,
    MSD_INFER_SMALL,
    MSD_SMALL,
    btcv_workflow,
    bundle_on_path,
    error_text,
    recorded,
    train_until_failure,
    verify_metadata,
)
from tools.data.make_msd_tasks import MSD_TASKS, write_msd_task

CONFIGS = MSD_DIR / "configs"
N_ENCODER = 126
EXPECTED = {  # task: (input channels, labels incl. background, intensity rule)
    "Task01_BrainTumour": (4, 4, "zscore_nonzero"),
    "Task02_Heart": (1, 2, "zscore_nonzero"),
    "Task03_Liver": (1, 3, "ct_window"),
    "Task04_Hippocampus": (1, 3, "zscore_nonzero"),
    "Task05_Prostate": (2, 3, "zscore_nonzero"),
    "Task06_Lung": (1, 2, "ct_window"),
    "Task07_Pancreas": (1, 3, "ct_window"),
    "Task08_HepaticVessel": (1, 3, "ct_window"),
    "Task09_Spleen": (1, 2, "ct_window"),
    "Task10_Colon": (1, 2, "ct_window"),
}


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory):
    """Tiny folders of all ten tasks (3 training, 1 test case) for parsing and checks."""
    root = tmp_path_factory.mktemp("msd_small")
    for i, task in enumerate(MSD_TASKS):
        write_msd_task(root, task, num_training=3, num_test=1, seed=i, shape=(24, 24, 16))
    return root


def _workflow(configs, kind, task, root, **overrides):
    return btcv_workflow(configs, kind, MSD_DIR, task=task, dataset_dir=str(root / task), **overrides)


@pytest.mark.parametrize("task", list(MSD_TASKS))
def test_task_settings_come_from_the_task_file_and_dataset_json(task, tasks_root):
    channels, labels, rule = EXPECTED[task]
    dataset = json.loads((tasks_root / task / "dataset.json").read_text())
    task_file = json.loads((CONFIGS / "tasks" / f"{task}.json").read_text())
    with bundle_on_path(MSD_DIR):
        parser = _workflow(["train.json"], "train", task, tasks_root).parser
        assert parser.get_parsed_content("in_channels") == channels
        assert parser.get_parsed_content("num_classes") == labels
        assert parser.get_parsed_content("label_names") == {int(k): v for k, v in dataset["labels"].items()}
        assert parser.get_parsed_content("intensity")["type"] == rule
        assert parser.get_parsed_content("spacing") == task_file["spacing"]
        assert parser.get_parsed_content("roi_size") == task_file["roi_size"]
        assert all(s % 32 == 0 and s >= 64 for s in task_file["roi_size"])
        # the augmentation and normalisation of the task are what the preprocessing applies
        names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert ("ScaleIntensityRanged" in names) == (rule == "ct_window")
    assert ("NormalizeIntensityd" in names) == (rule == "zscore_nonzero")
    assert names.count("RandFlipd") == len(task_file["augmentation"]["flip_axes"])


@pytest.mark.parametrize("task", list(MSD_TASKS))
def test_task_files_name_the_channels_and_labels_of_the_decathlons_dataset_json(task):
    """The bundle's own copy of what each task's dataset.json says (mimicked by tools/data/make_msd_tasks.py)."""
    _, modality, labels, _ = MSD_TASKS[task]
    task_file = json.loads((CONFIGS / "tasks" / f"{task}.json").read_text())
    assert (task_file["channel_names"], task_file["label_names"]) == (modality, labels)
    assert "num_channels" not in task_file and "num_labels" not in task_file  # the counts follow from the names


@pytest.mark.parametrize("task", ["Task09_Spleen", "Task05_Prostate"])
def test_inference_needs_no_dataset_json(task, tmp_path):
    """Labels, spacing, ROI, intensity and the network come from the bundle alone; dataset_dir does not exist."""
    channels, labels, rule = EXPECTED[task]
    task_file = json.loads((CONFIGS / "tasks" / f"{task}.json").read_text())
    with bundle_on_path(MSD_DIR):
        parser = btcv_workflow(
            ["inference.json"], "infer", MSD_DIR, task=task, dataset_dir=str(tmp_path / "nowhere"), **MSD_INFER_SMALL
        ).parser
        assert parser.get_parsed_content("label_names") == {int(k): v for k, v in task_file["label_names"].items()}
        assert (parser.get_parsed_content("in_channels"), parser.get_parsed_content("num_classes")) == (
            channels,
            labels,
        )
        assert parser.get_parsed_content("spacing") == task_file["spacing"]
        assert parser.get_parsed_content("intensity")["type"] == rule
        names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms]
        net = parser.get_parsed_content("network_def")
    assert ("ScaleIntensityRanged" in names) == (rule == "ct_window")
    assert net.out.conv.conv.out_channels == labels
    assert not (tmp_path / "nowhere").exists()


def test_dataset_json_label_names_that_differ_are_a_warning_and_the_task_files_are_used(tmp_path, caplog):
    folder = write_msd_task(tmp_path, "Task09_Spleen", num_training=1, num_test=0, shape=(8, 8, 8))
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"0": "background", "1": "Spleen (renamed)"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    bundle_log = logging.getLogger("swin_unetr_msd")
    bundle_log.addHandler(caplog.handler)  # the bundle's logging.conf does not propagate it to the root
    try:
        with bundle_on_path(MSD_DIR):
            parser = btcv_workflow(["train.json"], "train", MSD_DIR, task="Task09_Spleen", dataset_dir=str(folder))
            assert parser.parser.get_parsed_content("label_names") == {0: "background", 1: "spleen"}
    finally:
        bundle_log.removeHandler(caplog.handler)
    assert "Spleen (renamed)" in caplog.text and "using the task file's" in caplog.text


def _spleen_folder_error(tasks_root, task: str, key: str) -> str:
    """The error text of parsing ``key`` for ``task`` on the Task09_Spleen folder (which must fail)."""
    with bundle_on_path(MSD_DIR):
        parser = btcv_workflow(
            ["train.json"], "train", MSD_DIR, task=task, dataset_dir=str(tasks_root / "Task09_Spleen")
        ).parser
        with pytest.raises(Exception) as info:
            parser.get_parsed_content(key)
    return error_text(info.value)


def test_a_dataset_json_of_another_task_is_refused(tasks_root):
    text = _spleen_folder_error(tasks_root, "Task01_BrainTumour", "task_settings")
    assert str(tasks_root / "Task09_Spleen" / "dataset.json") in text
    assert "does not describe Task01_BrainTumour" in text and "1 input channel(s)" in text


def test_an_unknown_task_lists_the_ten_tasks(tasks_root):
    text = _spleen_folder_error(tasks_root, "Task11_Kidney", "num_classes")
    assert "unknown task 'Task11_Kidney'" in text and all(t in text for t in MSD_TASKS)


def test_five_fold_split_is_disjoint_covers_all_cases_and_is_seeded(tmp_path):
    folder = write_msd_task(tmp_path, "Task04_Hippocampus", num_training=13, num_test=0, shape=(8, 8, 8))
    with bundle_on_path(MSD_DIR):
        splits = []
        for fold in range(5):
            parser = btcv_workflow(
                ["train.json"], "train", MSD_DIR, task="Task04_Hippocampus", dataset_dir=str(folder), fold=fold
            ).parser
            splits.append(parser.get_parsed_content("train#split"))
        from scripts.msd_data import fold_indices
    every = sorted(str(folder / "imagesTr" / f"hippocampus_{n:03d}.nii.gz") for n in range(1, 14))
    validation = [[c["image"] for c in s["validation"]] for s in splits]
    assert sorted(sum(validation, [])) == every  # disjoint and complete
    assert sorted(len(v) for v in validation) == [2, 2, 3, 3, 3]
    for split, val in zip(splits, validation):
        training = [c["image"] for c in split["training"]]
        assert not set(training) & set(val) and sorted(training + val) == every
        assert all(c["label"].replace("labelsTr", "imagesTr") == c["image"] for c in split["training"])
    assert fold_indices(13, 5, seed=1) == fold_indices(13, 5, seed=1) != fold_indices(13, 5, seed=2)
    with pytest.raises(ValueError, match="fold must be 0..4"):
        with bundle_on_path(MSD_DIR):
            from scripts.msd_data import fold_datalist

            fold_datalist(str(folder / "dataset.json"), 5)


def test_without_a_training_list_images_and_labels_are_paired_by_name(tmp_path, caplog):
    folder = write_msd_task(tmp_path, "Task02_Heart", num_training=4, num_test=0, shape=(8, 8, 8))
    dataset = json.loads((folder / "dataset.json").read_text())
    del dataset["training"]
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "imagesTr" / "._la_001.nii.gz").write_bytes(b"macOS resource fork")
    (folder / "imagesTr" / "notes.txt").write_text("not an image")
    with bundle_on_path(MSD_DIR):
        workflow = btcv_workflow(
            ["train.json"], "train", MSD_DIR, task="Task02_Heart", dataset_dir=str(folder), num_folds=2
        )
        bundle_logger = logging.getLogger("swin_unetr_msd")  # the config's logging set-up happened above
        bundle_logger.disabled = False
        bundle_logger.addHandler(caplog.handler)
        caplog.set_level(logging.INFO, logger="swin_unetr_msd")
        try:
            split = workflow.parser.get_parsed_content("train#split")
        finally:
            bundle_logger.removeHandler(caplog.handler)
    cases = split["training"] + split["validation"]
    assert sorted(c["image"] for c in cases) == [str(folder / "imagesTr" / f"la_{n:03d}.nii.gz") for n in range(1, 5)]
    assert all(c["label"] == c["image"].replace("imagesTr", "labelsTr") for c in cases)
    assert f"{folder / 'imagesTr'}: skipping notes.txt (not an image file" in caplog.text
    assert "ignoring macOS resource file" in caplog.text


def _replace(path, data, affine=None):
    old = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), str(path))


BAD_INPUTS = {
    "wrong channel count": ("imagesTr", lambda a: a[..., :3], "has 3 channel(s), the network expects 4"),
    "label ids outside the task's labels": (
        "labelsTr",
        lambda a: (a > 0).astype(np.uint8) * 7,
        "label ids [7] are outside 0..3",
    ),
    "non-finite image": ("imagesTr", lambda a: np.where(a > 400, np.nan, a).astype(np.float32), "non-finite"),
    "missing file": ("imagesTr", None, "file not found"),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_training_input_stops_before_training_naming_the_file(problem, tmp_path):
    sub, change, message = BAD_INPUTS[problem]
    folder = write_msd_task(tmp_path, "Task01_BrainTumour", num_training=3, num_test=0, shape=(24, 24, 16))
    culprit = folder / sub / "BRATS_002.nii.gz"
    if change is None:
        culprit.unlink()
    else:
        _replace(culprit, change(np.asarray(nib.load(str(culprit)).dataobj)))
    with bundle_on_path(MSD_DIR):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            MSD_DIR,
            task="Task01_BrainTumour",
            dataset_dir=str(folder),
            bundle_root=str(tmp_path / "run"),
            num_folds=3,
            fold=2,
            max_epochs=1,
            **MSD_SMALL,
        )
        error, steps = train_until_failure(workflow)
    text = error_text(error)
    assert str(culprit) in text and message in text
    assert steps == []


def _official_encoder_file(path, feature_size):
    """An official-format (model_swinvit.pt layout) single-channel encoder file from a random encoder."""
    torch.manual_seed(3)
    encoder = SwinUNETR(1, 2, feature_size=feature_size).swinViT
    state = {
        f"module.{k}".replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
        for k, v in encoder.state_dict().items()
    }
    torch.save({"state_dict": state}, path)
    return state["module.patch_embed.proj.weight"]


@pytest.mark.parametrize("task", ["Task01_BrainTumour", "Task05_Prostate"])
def test_multi_channel_task_loads_every_encoder_tensor_with_the_documented_rule(task, tasks_root, tmp_path, caplog):
    kernel = _official_encoder_file(tmp_path / "model_swinvit.pt", 12)
    channels = EXPECTED[task][0]
    with bundle_on_path(MSD_DIR):
        logging.getLogger("swin_unetr_msd").addHandler(caplog.handler)
        caplog.set_level(logging.INFO, logger="swin_unetr_msd")
        parser = _workflow(
            ["train.json"], "train", task, tasks_root, pretrained_path=str(tmp_path / "model_swinvit.pt"), **MSD_SMALL
        ).parser
        network = parser.get_parsed_content("network")
    assert f"loaded {N_ENCODER}/{N_ENCODER} encoder tensors" in caplog.text
    assert f"adapted the single-channel patch embedding to {channels} input channels" in caplog.text
    assert f"scaled by 1/{channels}" in caplog.text
    weight = network.swinViT.patch_embed.proj.weight.detach()
    torch.testing.assert_close(weight, kernel.repeat(1, channels, 1, 1, 1) / channels)
    # equal channels give exactly what the single-channel encoder computes (legacy merging: official file)
    single = SwinUNETR(1, 2, feature_size=12, downsample=network.swinViT.layers1[0].downsample.__class__).swinViT
    single.load_state_dict(
        {k: v for k, v in network.swinViT.state_dict().items() if k != "patch_embed.proj.weight"}
        | {"patch_embed.proj.weight": kernel},
        strict=True,
    )
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            network.swinViT(x.repeat(1, channels, 1, 1, 1))[-1], single(x)[-1], atol=1e-4, rtol=1e-4
        )


def test_feature_size_mismatch_is_a_clear_error(tasks_root, tmp_path):
    _official_encoder_file(tmp_path / "fs24.pt", 24)
    with bundle_on_path(MSD_DIR):
        parser = _workflow(
            ["train.json"],
            "train",
            "Task01_BrainTumour",
            tasks_root,
            pretrained_path=str(tmp_path / "fs24.pt"),
            **MSD_SMALL,
        ).parser
        with pytest.raises(Exception) as info:
            parser.get_parsed_content("network")
    text = error_text(info.value)
    assert str(tmp_path / "fs24.pt") in text
    assert "feature_size 12 network vs file made for feature_size 24" in text


def test_nsd_is_measured_in_millimetres():
    with bundle_on_path(MSD_DIR):
        from monai.data import MetaTensor

        from scripts.surface_dice import NormalisedSurfaceDistance

        label = torch.zeros(2, 20, 20, 20)
        label[1, 5:15, 5:15, 5:15] = 1
        label[0] = 1 - label[1]
        shifted = torch.roll(label, 1, dims=1)  # one voxel = 2 mm off along the first axis
        affine = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))
        pred = MetaTensor(shifted, affine=affine)
        results = {}
        for tolerance in (1.5, 2.5):
            handler = NormalisedSurfaceDistance([tolerance])
            handler.reset()
            handler.update(([pred], [label]))
            results[tolerance] = float(handler.metric_fn.aggregate())
    assert results[2.5] == pytest.approx(1.0)
    assert 0.3 < results[1.5] < 1.0


def test_metadata_describes_the_default_task():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    spleen = json.loads((CONFIGS / "tasks" / "Task09_Spleen.json").read_text())
    train = json.loads((CONFIGS / "train.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert train["task"] == "Task09_Spleen" and len(spleen["label_names"]) == pred["num_channels"]
    assert pred["channel_def"] == spleen["label_names"]


def test_a_metadata_copy_for_another_task_names_its_channels_and_labels(tasks_root, tmp_path):
    task, out = "Task05_Prostate", tmp_path / "metadata_Task05_Prostate.json"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/task_metadata.json']",
        "--task",
        task,
        "--dataset_dir",
        str(tasks_root / task),
        "--task_metadata_file",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=MSD_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    verify_metadata(out, MSD_DIR)
    formats = json.loads(out.read_text())["network_data_format"]
    dataset = json.loads((tasks_root / task / "dataset.json").read_text())
    assert formats["inputs"]["image"]["num_channels"] == 2
    assert formats["inputs"]["image"]["channel_def"] == dataset["modality"]
    assert formats["outputs"]["pred"]["channel_def"] == dataset["labels"]
    assert formats["outputs"]["pred"]["num_channels"] == 3


def test_train_and_infer_workflows_pass_check_properties(tasks_root, tmp_path):
    task = "Task05_Prostate"
    with bundle_on_path(MSD_DIR):
        train = _workflow(
            ["train.json"], "train", task, tasks_root, bundle_root=str(tmp_path), num_folds=3, **MSD_SMALL
        )
        assert train.check_properties() in (None, [])
        ckpt = tmp_path / "model.pt"
        torch.save({"model": recorded(SwinUNETR(2, 3, feature_size=12).state_dict())}, ckpt)
        infer = _workflow(
            ["inference.json"],
            "infer",
            task,
            tasks_root,
            ckpt_path=str(ckpt),
            bundle_root=str(tmp_path),
            **MSD_INFER_SMALL,
        )
        assert infer.check_properties() in (None, [])
        for key in ("run", "network_def", "preprocessing", "postprocessing", "inferer", "device"):
            assert key in infer.parser
        sample = infer.parser.get_parsed_content("preprocessing")(
            {"image": str(tasks_root / task / "imagesTs" / "prostate_004.nii.gz"), "image_path": "x"}
        )
    assert sample["image"].shape[0] == 2 and sample["image_path"] == "x"
