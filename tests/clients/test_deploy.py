"""The BTCV and MSD bundles in the real MONAI Deploy App SDK 4.0.0 (apps/btcv_seg_deploy).

A small copy of the bundle (feature size 12, 64^3 windows, written into its configs, since a model.ts archive
carries the configs as they are on disk) gets weights saved the bundle's way: the state dict as it is, with the
legacy (monai <= 1.4) patch-merging order recorded inside it, which only the record tells apart.
A phantom CT becomes a DICOM series (tools/data/make_dicom_series.py). The Deploy app runs in the deploy venv, from
a folder that is not the bundle's, on (a) the bundle folder and (b) a traced model.ts exported with the
``inference_deploy.json`` overlay. Each DICOM SEG must reference the input series, put its frames on the input
slices, describe the 13 organs, and hold the labels that the same bundle predicts in memory (project venv) on the
same series: ``inference.json`` for the folder, ``inference.json`` + ``inference_deploy.json`` for model.ts.

The MSD bundle runs as the single-task copy of Task09_Spleen that ``tools/release/msd_label_bundle.py`` writes with no
dataset folder (the task file gives labels, spacing, ROI and intensity), small sizes written into its
``inference.json`` and random weights saved the bundle's way, through the operator's ``bundle_path``: the SEG has one
segment, "spleen", from the copy's ``channel_def``, and equals the copy's in-memory prediction.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tests.helpers import PHANTOM_SHAPE, PHANTOM_SPACING, run_workflow
from tools.common.bundles import BTCV_DIR, REPO_ROOT, bundle_parser, forget_scripts_modules
from tools.release.msd_label_bundle import msd_label_bundle

pytestmark = pytest.mark.clients

APP = REPO_ROOT / "apps" / "btcv_seg_deploy" / "app.py"
# Written into the copy's inference.json: the exported archive and the directory bundle both read them from there.
SMALL_KNOBS = {"feature_size": 12, "roi_size": [64, 64, 64], "sw_batch_size": 1, "num_workers": 0}
TRACE_SHAPE = "[1, 1, 64, 64, 64]"  # = roi_size: a traced network runs only at its traced shape
# model.ts runs a traced network: float32 like the eager overlay run, but not bit-identical.
MODEL_TS_AGREEMENT = 0.999
MSD_TASK = "Task09_Spleen"


def export_command(bundle: Path, model_ts: Path) -> list[str]:
    """The export of the BTCV "MONAI Deploy" section (docs/monai_deploy.md), run in the bundle folder."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "network_def",
        "--filepath",
        str(model_ts),
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "['configs/inference.json','configs/inference_deploy.json']",
        "--use_trace",
        "True",
        "--input_shape",
        TRACE_SHAPE,
    ]


def small_copy_with_weights(bundle: Path) -> None:
    """Write SMALL_KNOBS into the copy's inference.json and save random weights the bundle's way in models/model.pt.

    The state dict as it is, with the legacy (monai <= 1.4) patch-merging order recorded in its patch-merging layers
    (``*.downsample._extra_state``), which only the records tell apart.
    """
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config.update(SMALL_KNOBS)
    config_file.write_text(json.dumps(config, indent=4) + "\n")
    parser = bundle_parser(bundle, "inference.json", {"patch_merging": "legacy", "ckpt_path": ""})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    state = network.state_dict()
    forget_scripts_modules()
    sys.path.remove(str(bundle))  # bundle_parser put the copy's scripts first on sys.path
    assert state["swinViT.layers1.0.downsample._extra_state"].tolist() == [2, 1]  # record version 2, legacy
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(state, bundle / "models" / "model.pt")


def phantom_series(root: Path) -> tuple[Path, np.ndarray]:
    """A DICOM series of one phantom CT (tools/data/make_dicom_series.py) and its affine."""
    from tools.data.make_dicom_series import write_dicom_series
    from tools.data.make_phantoms import make_phantom

    image, _, affine = make_phantom(21, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    if np.linalg.det(affine[:3, :3]) < 0:  # a DICOM series stacks slices along the right-handed normal
        affine[:, 2] *= -1
    series = root / "dicom" / "ct"
    write_dicom_series(image, affine, str(series))
    return series, affine


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """The small bundle copy with weights, its model.ts, and a DICOM series of one phantom CT."""
    root = tmp_path_factory.mktemp("deploy")
    bundle = root / "swin_unetr_btcv_seg"
    shutil.copytree(BTCV_DIR, bundle, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    small_copy_with_weights(bundle)

    model_ts = root / "export" / "model.ts"  # outside models/: the SDK would prefer models/model.ts over model.pt
    model_ts.parent.mkdir()
    done = subprocess.run(export_command(bundle, model_ts), cwd=bundle, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    series, affine = phantom_series(root)
    return {"root": root, "bundle": bundle, "model_ts": model_ts, "series": series, "affine": affine}


@pytest.fixture(scope="module")
def msd_case(tmp_path_factory) -> dict:
    """The MSD bundle's Task09_Spleen copy (no dataset folder), small, with weights; a phantom series; a datalist."""
    root = tmp_path_factory.mktemp("deploy_msd")
    bundle = msd_label_bundle(MSD_TASK, output=str(root / "swin_unetr_msd_spleen"))
    small_copy_with_weights(bundle)
    series, affine = phantom_series(root)
    datalist = root / "datalist.json"  # the in-memory run: the MSD bundle lists cases from a datalist or dataset.json
    datalist.write_text(json.dumps({"testing": [{"image": str(series)}]}))
    return {"root": root, "bundle": bundle, "series": series, "affine": affine, "datalist": datalist}


def in_memory_prediction(case: dict, configs: list[str]) -> np.ndarray:
    """The bundle's label map of the series, predicted in this process: the evaluator's post-processed output."""
    bundle = case["bundle"]
    listing = {"datalist": str(case["datalist"])} if "datalist" in case else {}
    workflow = run_workflow(
        configs,
        "infer",
        bundle,
        dataset_dir=str(case["series"].parent),
        output_dir=str(case["root"] / f"pred_{len(configs)}"),
        **listing,
    )
    (item,) = workflow.parser.get_parsed_content("evaluator").state.output
    pred = item["pred"]
    np.testing.assert_allclose(pred.affine.numpy(), case["affine"], atol=1e-4)  # the grid of the DICOM slices
    return pred[0].numpy().astype(np.uint8)


def run_deploy_app(deploy_python: Path, model: Path, case: dict, name: str) -> Path:
    """Run the Deploy app (from a folder outside the bundle) and return the single DICOM SEG it wrote."""
    out = case["root"] / f"out_{name}"
    work = case["root"] / f"cwd_{name}"
    work.mkdir()
    cmd = [str(deploy_python), str(APP), "-i", str(case["series"]), "-o", str(out), "-m", str(model)]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    segs = [p for p in out.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    assert len(segs) == 1, f"expected one DICOM SEG under {out}, found {segs}\n{done.stderr[-3000:]}"
    return segs[0]


def seg_label_map(seg: pydicom.Dataset, slices: list[pydicom.Dataset]) -> np.ndarray:
    """The SEG's segments as one label map indexed (i, j, k) like the input volume; frames placed by position."""
    by_position = np.array([[float(v) for v in s.ImagePositionPatient] for s in slices])
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    labels = np.zeros((seg.Columns, seg.Rows, len(slices)), np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        distance = np.abs(by_position - position).max(axis=1)
        k = int(distance.argmin())
        assert distance[k] < 1e-3, f"SEG frame at {position} lies on no input slice"
        # with one segment, highdicom puts its identification into the shared functional groups
        identification = group if "SegmentIdentificationSequence" in group else seg.SharedFunctionalGroupsSequence[0]
        segment = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask = frame.T > 0  # rows follow j, columns follow i (tools/data/make_dicom_series.py)
        assert not labels[..., k][mask].any(), "segments overlap"
        labels[..., k][mask] = segment
    return labels


def check_seg(seg_file: Path, case: dict) -> np.ndarray:
    """Assert the SEG's references and segment descriptions; return its label map."""
    slices = [pydicom.dcmread(p) for p in sorted(case["series"].glob("*.dcm"))]
    seg = pydicom.dcmread(seg_file)
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == slices[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == slices[0].SeriesInstanceUID
    instances = {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence}
    assert instances <= {s.SOPInstanceUID for s in slices}
    meta = json.loads((case["bundle"] / "configs" / "metadata.json").read_text())
    organs = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    labels = range(1, len(organs))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [organs[str(i)] for i in labels]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == list(labels)
    assert {s.SegmentAlgorithmName for s in seg.SegmentSequence} == {meta["name"]}
    return seg_label_map(seg, slices)


def test_deploy_app_on_the_directory_bundle(deploy_python, case):
    expected = in_memory_prediction(case, ["inference.json"])
    labels = check_seg(run_deploy_app(deploy_python, case["bundle"], case, "directory"), case)
    assert labels.shape == expected.shape
    assert len(np.unique(expected)) > 2, "a prediction of one or two labels would test little"
    mismatch = np.count_nonzero(labels != expected)
    assert mismatch == 0, f"{mismatch} of {labels.size} voxels differ from the in-memory prediction"


def test_deploy_app_on_the_exported_model_ts(deploy_python, case):
    expected = in_memory_prediction(case, ["inference.json", "inference_deploy.json"])
    labels = check_seg(run_deploy_app(deploy_python, case["model_ts"], case, "model_ts"), case)
    assert labels.shape == expected.shape
    agreement = float(np.mean(labels == expected))
    assert agreement >= MODEL_TS_AGREEMENT, f"model.ts labels agree on {agreement:.4%} of voxels"


def test_deploy_app_on_the_msd_single_task_copy(deploy_python, msd_case):
    meta = json.loads((msd_case["bundle"] / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "spleen"}
    expected = in_memory_prediction(msd_case, ["inference.json"])
    labels = check_seg(run_deploy_app(deploy_python, msd_case["bundle"], msd_case, "msd_directory"), msd_case)
    assert labels.shape == expected.shape
    assert 0.01 < np.mean(expected == 1) < 0.99, "a prediction of one label would test little"
    mismatch = np.count_nonzero(labels != expected)
    assert mismatch == 0, f"{mismatch} of {labels.size} voxels differ from the in-memory prediction"
