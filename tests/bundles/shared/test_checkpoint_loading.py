"""Checkpoints from elsewhere in the BTCV and MSD bundles, the patch-merging order never guessed, and ensembles.

Each foreign checkpoint format (the model zoo's raw state dict, the research code's
``{"state_dict": ..., "epoch", "best_acc", "optimizer"}``, ``{"model": ...}`` without records,
``module.``-prefixed keys) predicts exactly what the same weights give saved natively. A file that
records no order is refused under ``patch_merging: auto`` unless its md5 is listed as a published
file (registered here for a test file), which then predicts like explicit ``legacy``; the convert
tool's output works under ``auto``. ``pretrained_path`` takes a whole fine-tuned network. A BTCV
ensemble of two fold checkpoints with flip TTA equals the mean of the members' softmaxes, and its
members only ever see window-sized inputs.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.utils import copy_model_state

from tests.helpers import (
    BTCV_DIR,
    MSD_DIR,
    MSD_INFER_SMALL,
    REPO,
    btcv_workflow,
    bundle_on_path,
    error_text,
    order_record,
    recorded,
)
from tools.release.convert_checkpoint import convert_checkpoint

FS = 12
BTCV_INFER = {"feature_size": FS, "roi_size": [64, 64, 64], "sw_batch_size": 1, "num_workers": 0, "amp": False}
FORMATS = ["raw", "state_dict+extras", "model", "module."]


def _tensors(state):
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _native(path: Path, seed: int, order: str = "current", out_channels: int = 14, in_channels: int = 1) -> dict:
    """A randomly initialised SwinUNETR saved as the bundles save model.pt (its state dict, with order records)."""
    with bundle_on_path(BTCV_DIR):
        pm = importlib.import_module("scripts.patch_merging")
        torch.manual_seed(seed)
        net = SwinUNETR(in_channels, out_channels, feature_size=FS, downsample=pm.resolve_downsample(order))
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _foreign(path: Path, state: dict, fmt: str) -> Path:
    """The tensors of ``state`` (no order records) saved in a foreign layout."""
    tensors = _tensors(state)
    obj = {
        "raw": tensors,
        "state_dict+extras": {"state_dict": tensors, "epoch": 4999, "best_acc": 0.83, "optimizer": {"lr": 1e-4}},
        "model": {"model": tensors},
        "module.": {"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 7},
    }[fmt]
    torch.save(obj, path)
    return path


def _probabilities(workflow, x=None):
    """Softmax of the workflow's network through its inferer, on ``x`` or the first image of its dataset."""
    network = workflow.parser.get_parsed_content("network")
    inferer = workflow.parser.get_parsed_content("inferer")
    if x is None:
        x = torch.as_tensor(workflow.parser.get_parsed_content("dataset")[0]["image"])[None]
    with torch.no_grad():
        return torch.softmax(torch.as_tensor(inferer(x, network)), dim=1)


def _btcv_predict(phantom_dir, root, ckpt_path, patch_merging="auto", register=None, **extra):
    """BTCV inference.json's probabilities for the first test phantom (``register``: md5 -> table entry)."""
    overrides = dict(
        BTCV_INFER,
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        bundle_root=str(root),
        ckpt_path=ckpt_path,
        patch_merging=patch_merging,
        **extra,
    )
    with bundle_on_path(BTCV_DIR):
        if register:
            importlib.import_module("scripts.known_checkpoints").KNOWN_CHECKPOINTS.update(register)
        return _probabilities(btcv_workflow(["inference.json"], "infer", **overrides))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Native checkpoints: fs12 14-class networks, current order (seed 1) and legacy order (seed 2)."""
    root = tmp_path_factory.mktemp("weights")
    current = _native(root / "native_current.pt", seed=1, order="current")
    legacy = _native(root / "native_legacy.pt", seed=2, order="legacy")
    return {"root": root, "current": current, "legacy": legacy}


@pytest.fixture(scope="module")
def native_probs(weights, phantom_dir):
    """BTCV inference.json's probabilities with each native checkpoint (its order read from its records)."""
    return {
        order: _btcv_predict(phantom_dir, weights["root"], str(weights["root"] / f"native_{order}.pt"))
        for order in ("current", "legacy")
    }


@pytest.fixture
def log(caplog):
    """The bundles' log records (a bundle's logging.conf replaces the root's handlers, so caplog listens directly)."""
    loggers = [logging.getLogger(name) for name in ("swin_unetr_btcv_seg", "swin_unetr_msd")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
        caplog.set_level(logging.INFO, logger=logger.name)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("fmt", FORMATS)
def test_btcv_foreign_format_predicts_exactly_like_native(fmt, weights, native_probs, phantom_dir, tmp_path, log):
    path = _foreign(tmp_path / f"{fmt.strip('.')}.pt", weights["current"], fmt)
    foreign = _btcv_predict(phantom_dir, tmp_path, str(path), patch_merging="current")
    assert torch.equal(foreign, native_probs["current"])
    line = next(r.getMessage() for r in log.records if r.getMessage().startswith("loaded "))
    total = len(_tensors(weights["current"]))
    assert line.startswith(f"loaded {total}/{total} model tensors from {path}")
    expected = {
        "raw": "format: raw state dict;",
        "state_dict+extras": "format: {'state_dict': state dict} with epoch, best_acc, optimizer;",
        "model": "format: {'model': state dict};",
        "module.": "with epoch, 'module.' prefixes removed (DDP);",
    }[fmt]
    assert expected in line and "current = monai>=1.5 'merging' order, from setting" in line


def test_unrecorded_file_is_refused_under_auto(weights, phantom_dir, tmp_path):
    path = _foreign(tmp_path / "zoo_like.pt", weights["legacy"], "raw")
    with pytest.raises(Exception) as info:
        _btcv_predict(phantom_dir, tmp_path, str(path))
    text = error_text(info.value)
    assert "UnrecordedOrderError" in text and str(path) in text
    assert "'legacy' (trained with monai <= 1.4) or 'current' (trained with monai >= 1.5)" in text


def test_hash_listed_file_uses_legacy_and_predicts_like_explicit_legacy(
    weights, native_probs, phantom_dir, tmp_path, log
):
    path = _foreign(tmp_path / "published.pt", weights["legacy"], "raw")
    native = native_probs["legacy"]
    explicit = _btcv_predict(phantom_dir, tmp_path, str(path), patch_merging="legacy")
    wrong = _btcv_predict(phantom_dir, tmp_path, str(path), patch_merging="current")
    with bundle_on_path(BTCV_DIR):
        md5 = importlib.import_module("scripts.known_checkpoints").file_md5(str(path))
    entry = {"name": "published.pt", "what": "test file", "source": "this test", "patch_merging": "legacy"}
    log.clear()
    listed = _btcv_predict(phantom_dir, tmp_path, str(path), register={md5: entry})
    assert f"is the published test file (md5 {md5}, source: this test)" in log.text
    assert "legacy = monai<=1.4 order, from published" in log.text
    assert torch.equal(listed, explicit) and torch.equal(listed, native)
    assert not torch.allclose(wrong, explicit, atol=1e-4)  # the order matters: the other one computes otherwise


def test_converted_file_works_under_auto(weights, native_probs, phantom_dir, tmp_path, log):
    path = _foreign(tmp_path / "research.pt", weights["legacy"], "module.")
    out = tmp_path / "models" / "model.pt"
    cmd = [sys.executable, "-m", "tools", "convert_checkpoint", "--input", str(path), "--output"]
    result = subprocess.run(cmd + [str(out), "--patch_merging", "legacy"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"read {path} ({{'state_dict': state dict}} with epoch, 'module.' prefixes removed (DDP))" in result.stdout
    assert f"wrote {out}: a state dict of {len(_tensors(weights['legacy']))} tensors + 4 patch-merging records" in (
        result.stdout
    )
    saved = torch.load(out)  # as the bundles save model.pt: the state dict, its order recorded inside
    assert saved.keys() == weights["legacy"].keys()
    assert torch.equal(saved["swinViT.layers1.0.downsample._extra_state"], order_record("legacy"))
    log.clear()
    converted = _btcv_predict(phantom_dir, tmp_path, str(out))  # auto: the record
    assert "legacy = monai<=1.4 order, from record" in log.text
    assert torch.equal(converted, native_probs["legacy"])  # = the same weights saved natively, legacy order

    before = path.read_bytes()
    for target, message in ((path, "the output is the input"), (out, "exists")):
        again = subprocess.run(cmd + [str(target)], capture_output=True, text=True, cwd=REPO)
        assert again.returncode == 1 and message in again.stderr
    assert path.read_bytes() == before
    unrecorded = subprocess.run(cmd + [str(tmp_path / "x.pt")], capture_output=True, text=True, cwd=REPO)
    assert unrecorded.returncode == 1 and "does not record the patch-merging order" in unrecorded.stderr
    assert not (tmp_path / "x.pt").exists()


def test_copy_model_state_from_a_legacy_network_switches_a_current_one_to_legacy(weights):
    """monai's copy_model_state (monai.bundle.load, zoo/MONAI Label shape-filtered loads) copies the records too."""
    with bundle_on_path(BTCV_DIR):
        pm = importlib.import_module("scripts.patch_merging")
        source = SwinUNETR(1, 14, feature_size=FS, downsample=pm.resolve_downsample("legacy"))
        source.load_state_dict(weights["legacy"])
        target = SwinUNETR(1, 14, feature_size=FS, downsample=pm.resolve_downsample("current"))
        assert pm.merging_order_of(target) == "current"
        _, updated, unchanged = copy_model_state(target, source)
        records = [f"swinViT.layers{i}.0.downsample._extra_state" for i in range(1, 5)]
        assert set(records) <= set(updated) and unchanged == []
        assert pm.merging_order_of(target) == "legacy"
        # from a file's state dict as well: a shape-filtered copy skips nothing
        again = SwinUNETR(1, 14, feature_size=FS, downsample=pm.resolve_downsample("current"))
        _, updated, unchanged = copy_model_state(again, torch.load(weights["root"] / "native_legacy.pt"))
        assert unchanged == [] and pm.merging_order_of(again) == "legacy"
    torch.manual_seed(3)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        expected, copied, from_file = (n.eval()(x) for n in (source, target, again))
    assert torch.equal(copied, expected) and torch.equal(from_file, expected)


def test_version_1_dict_record_file_loads_with_its_order(weights, native_probs, phantom_dir, tmp_path, log):
    """Files written before the tensor record (each layer's record a dict) keep their order, in the bundle and bare."""
    path = tmp_path / "models" / "v1.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": recorded(_tensors(weights["legacy"]), "legacy", version=1)}, path)
    assert torch.equal(_btcv_predict(phantom_dir, tmp_path, str(path)), native_probs["legacy"])  # auto
    assert "legacy = monai<=1.4 order, from record" in log.text
    with bundle_on_path(BTCV_DIR):
        pm = importlib.import_module("scripts.patch_merging")
        net = SwinUNETR(1, 14, feature_size=FS, downsample=pm.resolve_downsample("current"))
        net.load_state_dict(torch.load(path)["model"])  # torch's own strict load
        assert pm.merging_order_of(net) == "legacy"
        assert torch.equal(net.state_dict()["swinViT.layers1.0.downsample._extra_state"], order_record("legacy"))
    # the convert tool rewrites it with tensor records (what monai.bundle.load's copy_model_state needs)
    result = convert_checkpoint(str(path), str(tmp_path / "v2.pt"))
    assert (result["patch_merging"], result["from"], result["records"]) == ("legacy", "record", 4)
    converted = torch.load(tmp_path / "v2.pt")
    assert all(torch.equal(converted[k], order_record("legacy")) for k in converted if k.endswith("_extra_state"))


@pytest.mark.parametrize(
    "record",
    [torch.tensor([2, 7]), torch.tensor([3, 1]), torch.tensor([2, 1, 0]), "legacy", {"patch_merging": "v2"}],
    ids=["unknown-code", "unknown-version", "wrong-shape", "string", "bad-dict"],
)
def test_malformed_record_is_refused_naming_the_file(record, weights, phantom_dir, tmp_path):
    path = tmp_path / "models" / "bad_record.pt"
    path.parent.mkdir(parents=True)
    key = "swinViT.layers2.0.downsample._extra_state"
    torch.save({"model": {**weights["legacy"], key: record}}, path)
    with pytest.raises(Exception) as info:
        _btcv_predict(phantom_dir, tmp_path, str(path))
    text = error_text(info.value)
    assert f"{path}: {key}: patch-merging record" in text and "is not readable" in text
    with bundle_on_path(BTCV_DIR):  # a bare load_state_dict names the entry
        pm = importlib.import_module("scripts.patch_merging")
        net = SwinUNETR(1, 14, feature_size=FS, downsample=pm.resolve_downsample("current"))
        with pytest.raises(ValueError, match=f"{key}: patch-merging record .* is not readable"):
            net.load_state_dict(torch.load(path, weights_only=False)["model"])


def test_btcv_two_checkpoint_ensemble_with_tta_equals_mean_of_softmaxes(weights, phantom_dir, tmp_path, log):
    folds = [tmp_path / "models" / f"fold{k}" / "model.pt" for k in (0, 1)]
    for k, path in enumerate(folds):
        _native(path, seed=10 + k)
    flips = [[0], [2]]
    # one window per 64^3 tile and no overlap: each voxel's probabilities come from one window only
    x = torch.rand(1, 1, 64, 64, 128, generator=torch.Generator().manual_seed(3))
    common = dict(
        BTCV_INFER,
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        bundle_root=str(tmp_path),
        overlap=0.0,
    )
    with bundle_on_path(BTCV_DIR):
        workflow = btcv_workflow(["inference.json"], "infer", ckpt_path="", tta_flips=flips, **common)
        ensemble = workflow.parser.get_parsed_content("network")
        assert type(ensemble).__name__ == "SoftmaxEnsemble" and len(ensemble.networks) == 2
        seen = []
        for member in ensemble.networks:
            member.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[2:])))
        got = _probabilities(workflow, x)
    assert "ensemble of 2 model(s) x 3 view(s)" in log.text
    assert set(seen) == {(64, 64, 64)} and len(seen) == 2 * 3 * 2  # members x views x windows: never the volume

    expected = torch.zeros_like(got)
    for path in folds:
        with bundle_on_path(BTCV_DIR):
            single = btcv_workflow(["inference.json"], "infer", ckpt_path=str(path), **common)
            assert type(single.parser.get_parsed_content("network")).__name__ == "SwinUNETR"
            for axes in [[]] + flips:
                dims = [a + 2 for a in axes]
                probs = _probabilities(single, torch.flip(x, dims) if dims else x)
                expected += torch.flip(probs, dims) if dims else probs
    expected /= 2 * 3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_btcv_ensemble_inference_writes_predictions(phantom_dir, tmp_path):
    paths = [tmp_path / f"m{k}.pt" for k in (0, 1)]
    for k, path in enumerate(paths):
        _native(path, seed=20 + k)
    out_dir = tmp_path / "eval"
    with bundle_on_path(BTCV_DIR):
        workflow = btcv_workflow(
            ["inference.json"],
            "infer",
            **BTCV_INFER,
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            bundle_root=str(tmp_path),
            output_dir=str(out_dir),
            ckpt_path=[str(p) for p in paths],
            tta_flips=[[1]],
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    (pred,) = sorted(out_dir.glob("*.nii.gz"))
    image = nib.load(str(phantom_dir / json.loads((phantom_dir / "datalist.json").read_text())["testing"][0]["image"]))
    assert nib.load(str(pred)).shape == image.shape[:3]
    assert set(np.unique(np.asarray(nib.load(str(pred)).dataobj)).tolist()) <= set(range(14))


def _train_network(bundle_dir, pretrained_path, patch_merging="current", **overrides):
    with bundle_on_path(bundle_dir):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            bundle_dir,
            pretrained_path=str(pretrained_path),
            patch_merging=patch_merging,
            **overrides,
        )
        return workflow.parser.get_parsed_content("network_with_encoder")


def test_pretrained_whole_network_loads_the_decoder_where_every_shape_fits(weights, msd_root, tmp_path, log):
    path = _foreign(tmp_path / "research.pt", weights["current"], "state_dict+extras")
    with pytest.raises(Exception) as info:  # no record, not published: train.json's 'auto' refuses it too
        _train_network(BTCV_DIR, path, "auto", feature_size=FS, bundle_root=str(tmp_path))
    assert "UnrecordedOrderError" in error_text(info.value) and str(path) in error_text(info.value)
    log.clear()
    net = _train_network(BTCV_DIR, path, feature_size=FS, bundle_root=str(tmp_path))
    line = next(r.getMessage() for r in log.records if r.getMessage().startswith("loaded "))
    assert "loaded 126/126 encoder tensors" in line and "and 33/33 decoder tensors" in line
    got = _tensors(net.state_dict())
    assert set(got) == set(_tensors(weights["current"]))
    assert all(torch.equal(got[k], v) for k, v in _tensors(weights["current"]).items())

    # MSD Task09_Spleen has 2 output channels: the 14-class decoder does not fit, the encoder loads alone
    log.clear()
    task = "Task09_Spleen"
    net = _train_network(MSD_DIR, path, feature_size=FS, task=task, dataset_dir=str(msd_root / task))
    line = next(r.getMessage() for r in log.records if r.getMessage().startswith("loaded "))
    assert "loaded 126/126 encoder tensors" in line and "decoder NOT loaded" in line and "(2, 12, 1, 1, 1)" in line
    got = _tensors(net.state_dict())
    source = _tensors(weights["current"])
    assert all(torch.equal(got[k], v) for k, v in source.items() if k.startswith("swinViT."))
    assert not torch.equal(got["encoder1.layer.conv1.conv.weight"], source["encoder1.layer.conv1.conv.weight"])


def test_msd_research_checkpoint_predicts_exactly_like_native(msd_root, tmp_path, log):
    task = "Task09_Spleen"
    state = _native(tmp_path / "native.pt", seed=30, out_channels=2)
    path = _foreign(tmp_path / "research.pt", state, "module.")
    overrides = dict(MSD_INFER_SMALL, amp=False, task=task, dataset_dir=str(msd_root / task), bundle_root=str(tmp_path))
    results = []
    for ckpt, order in ((tmp_path / "native.pt", "auto"), (path, "current")):
        with bundle_on_path(MSD_DIR):
            workflow = btcv_workflow(
                ["inference.json"], "infer", MSD_DIR, ckpt_path=str(ckpt), patch_merging=order, **overrides
            )
            results.append(_probabilities(workflow))
    assert torch.equal(results[0], results[1])
    assert "'module.' prefixes removed (DDP)" in log.text
    with pytest.raises(Exception) as info:
        with bundle_on_path(MSD_DIR):
            btcv_workflow(
                ["inference.json"], "infer", MSD_DIR, ckpt_path=str(path), **overrides
            ).parser.get_parsed_content("network")
    assert "UnrecordedOrderError" in error_text(info.value) and str(path) in error_text(info.value)
