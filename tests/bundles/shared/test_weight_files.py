"""Every weight file a user may hold, through every entry of every bundle that takes one.

A small network of each bundle (feature size 12, built by its own ``train.json``) is trained with the
legacy (monai <= 1.4) patch-merging order, which only the file's records tell apart from the default,
and saved in each layout: ``models/model.pt`` as the bundles write it now (a plain state dict, the
order recorded inside it), the same saved from a DDP-wrapped network, wrapped in ``{"model": ...}`` or
``{"state_dict": ...}``, a full-state training checkpoint, the ``model.pt`` of earlier versions
(``{"model": ..., "network_record": ...}``, also with the version-1 dict records or with the top-level
record alone), the official encoder layout (``model_swinvit.pt``) and the SSL bundle's encoder export.

Each file goes through the bundles' entries as their configs evaluate them (``create_workflow``):
``ckpt_path`` (inference), ``pretrained_path`` (training), ``resume_from`` (training: the resume
handler restores the trainer without training) and the SSL bundle's ``export.json``. Where a file
fits, the network gets its tensors and its order; where it cannot (encoder weights as a whole network,
weights without trainer state to resume from), the error names the file, what is wrong and what to do.
``model.pt`` also loads through ``monai.bundle.load`` without ``key_in_ckpt``, and the pre-training
bundle's ``model.pt`` starts a fine-tuning run. (That training writes ``model.pt`` in this layout is
checked on real runs in test_btcv_training.py and test_ssl_training.py; ``ckpt_export`` without
``key_in_ckpt`` in test_btcv_evaluate_infer.py and test_bundle_contract.py.)
"""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BTCV_DIR,
    MSD_DIR,
    MSD_PHANTOM_SHAPE,
    MSD_SMALL,
    SMALL,
    SSL_DIR,
    SSL_SMALL,
    btcv_workflow,
    bundle_on_path,
    error_text,
    order_record,
    recorded,
)

ORDER = "legacy"
TASK = "Task09_Spleen"
BUNDLES = {"btcv": BTCV_DIR, "msd": MSD_DIR, "ssl": SSL_DIR}
# the tests' small settings (conftest), and no data loaded ahead (the trainers are built, never run)
KNOBS = {
    "btcv": {**SMALL, "cache_rate": 0.0},
    "msd": {**MSD_SMALL, "cache_rate": 0.0, "task": TASK},
    "ssl": {**SSL_SMALL, "cache_rate": 0.0},
}
INFER_KNOBS = {"btcv": {"feature_size": 12}, "msd": {"feature_size": 12, "task": TASK}}
WHOLE = [
    "model.pt",
    "DDP model.pt",
    "{'model'}",
    "{'state_dict'}",
    "full state",
    "earlier model.pt",
    "dict records",
    "network_record only",
]
ENCODERS = ["official encoder", "ssl export"]
FORMATS = WHOLE + ENCODERS


def _tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _encoder(state: dict) -> dict:
    """The swinViT tensors of a network's state dict, with swinViT-relative keys."""
    return {k[len("swinViT.") :]: v for k, v in _tensors(state).items() if k.startswith("swinViT.")}


def _official_names(encoder: dict) -> dict:
    """Encoder tensors under the official model_swinvit.pt names ("module." prefix, mlp.fc1/fc2)."""
    return {
        "module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
        for k, v in encoder.items()
    }


def _official(encoder: dict) -> dict:
    """The official model_swinvit.pt layout of ``encoder``, with its SSL heads (small stand-ins, dropped on loading)."""
    state = _official_names(encoder)
    dim = 16 * 12
    heads = {
        "norm": (dim,),
        "rotation_head": (4, dim),
        "contrastive_head": (512, dim),
        "convTrans3d": (dim, 1, 2, 2, 2),
    }
    for name, shape in heads.items():
        state[f"module.{name}.weight"] = torch.randn(shape)
        state[f"module.{name}.bias"] = torch.randn(1 if name == "convTrans3d" else shape[0])
    return state


def _write_files(bundle: str, root: Path) -> dict:
    """The bundle's small legacy-order network (train.json, seeded) saved in every layout of FORMATS."""
    root.mkdir(parents=True)
    with bundle_on_path(BUNDLES[bundle]):
        torch.manual_seed(5)
        workflow = btcv_workflow(
            ["train.json"], "train", BUNDLES[bundle], bundle_root=str(root), patch_merging=ORDER, **KNOBS[bundle]
        )
        parser = workflow.parser
        network = parser.get_parsed_content("network")
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        record = parser.get_parsed_content("network_record").state_dict()
        full = {
            "model": state,
            "optimizer": parser.get_parsed_content("optimizer").state_dict(),
            "lr_scheduler": parser.get_parsed_content("lr_scheduler").state_dict(),
            "trainer": {"epoch_length": 1, "max_epochs": 1, "iteration": 1},
            "network_record": record,
        }
        if bundle == "ssl":
            full["scaler"] = parser.get_parsed_content("scaler").state_dict()
        export = root / "ssl export.pt"
        importlib.import_module("scripts.encoder_weights").save_encoder(network, str(export))
    assert record["patch_merging"] == ORDER and state["swinViT.layers1.0.downsample._extra_state"].tolist() == [2, 1]
    layouts = {
        "model.pt": state,
        "DDP model.pt": {f"module.{k}": v for k, v in state.items()},
        "{'model'}": {"model": state},
        "{'state_dict'}": {"state_dict": state, "epoch": 7, "best_acc": 0.5},
        "full state": full,
        "earlier model.pt": {"model": state, "network_record": record},
        "dict records": {"model": recorded(_tensors(state), ORDER, version=1), "network_record": record},
        "network_record only": {"model": _tensors(state), "network_record": record},
        "official encoder": {"state_dict": _official(_encoder(state))},
    }
    paths = {"ssl export": export}
    for fmt, obj in layouts.items():
        paths[fmt] = root / (re.sub(r"\W+", "_", fmt).strip("_") + ".pt")
        torch.save(obj, paths[fmt])
    return {"state": state, "paths": paths}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Per bundle: the source state dict and its file in each layout."""
    root = tmp_path_factory.mktemp("weight_files")
    return {bundle: _write_files(bundle, root / bundle) for bundle in BUNDLES}


@pytest.fixture(scope="module")
def msd_task(tmp_path_factory) -> Path:
    """One small Decathlon task (3 training cases) for the MSD trainer."""
    from tools.data.make_msd_tasks import write_msd_task

    return write_msd_task(
        tmp_path_factory.mktemp("msd"), TASK, num_training=3, num_test=1, seed=0, shape=MSD_PHANTOM_SHAPE
    )


def _assert_loaded(network, source: dict, prefix: str = "") -> None:
    """``network`` holds every tensor of ``source`` whose key starts with ``prefix``, and the legacy order."""
    got = _tensors(network.state_dict())
    expected = {k: v for k, v in _tensors(source).items() if k.startswith(prefix)}
    assert expected and all(torch.equal(got[k], v) for k, v in expected.items())
    assert importlib.import_module("scripts.patch_merging").merging_order_of(network) == ORDER
    records = [v for k, v in network.state_dict().items() if k.endswith("downsample._extra_state")]
    assert len(records) == 4 and all(torch.equal(r, order_record(ORDER)) for r in records)


def _refused(call, path: Path, *advice: str) -> None:
    with pytest.raises(Exception) as info:
        call()
    text = error_text(info.value)
    assert str(path) in text and all(a in text for a in advice), text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bundle", ["btcv", "msd"])
def test_ckpt_path(bundle, fmt, files, tmp_path):
    """inference.json's ``network``: every whole-network layout; encoder weights are sent to pretrained_path."""
    path = files[bundle]["paths"][fmt]
    with bundle_on_path(BUNDLES[bundle]):
        workflow = btcv_workflow(
            ["inference.json"],
            "infer",
            BUNDLES[bundle],
            bundle_root=str(tmp_path),
            ckpt_path=str(path),
            **INFER_KNOBS[bundle],
        )
        network = lambda: workflow.parser.get_parsed_content("network")  # noqa: E731
        if fmt in ENCODERS:
            _refused(network, path, "holds Swin encoder weights only", "use it as pretrained_path")
        else:
            _assert_loaded(network(), files[bundle]["state"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_pretrained_path(bundle, fmt, files, tmp_path):
    """train.json's ``network``: the encoder of every layout (a whole SwinUNETR also gives its decoder)."""
    path = files[bundle]["paths"][fmt]
    with bundle_on_path(BUNDLES[bundle]):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            BUNDLES[bundle],
            bundle_root=str(tmp_path),
            pretrained_path=str(path),
            **KNOBS[bundle],
        )
        network = workflow.parser.get_parsed_content("network")
        whole_unetr = bundle != "ssl" and fmt in WHOLE
        _assert_loaded(network, files[bundle]["state"], "" if whole_unetr else "swinViT.")


@pytest.mark.parametrize("bundle", ["btcv", "msd"])
def test_the_pretraining_model_pt_starts_fine_tuning(bundle, files, tmp_path):
    """The pre-training bundle's model.pt as it is, as a fine-tuning bundle's pretrained_path: its encoder."""
    path = files["ssl"]["paths"]["model.pt"]
    with bundle_on_path(BUNDLES[bundle]):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            BUNDLES[bundle],
            bundle_root=str(tmp_path),
            pretrained_path=str(path),
            **KNOBS[bundle],
        )
        _assert_loaded(workflow.parser.get_parsed_content("network"), files["ssl"]["state"], "swinViT.")


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_monai_bundle_load_reads_model_pt_without_key_in_ckpt(bundle, files, tmp_path):
    """``monai.bundle.load`` on a bundle folder whose models/model.pt is as training writes it (no key_in_ckpt)."""
    from monai.bundle import load

    name = BUNDLES[bundle].name
    copy = tmp_path / name
    for part in ("configs", "scripts"):
        shutil.copytree(BUNDLES[bundle] / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "models").mkdir()
    shutil.copy(files[bundle]["paths"]["model.pt"], copy / "models" / "model.pt")
    with bundle_on_path(copy):
        network = load(
            name=name,
            bundle_dir=str(tmp_path),
            workflow_type="inference",
            net_override={"feature_size": 12},
            device="cpu",
        )
        _assert_loaded(network, files[bundle]["state"])


def _data_knobs(bundle: str, phantom_dir: Path, ssl_corpus: Path, msd_task: Path) -> dict:
    return {
        "btcv": {"dataset_dir": str(phantom_dir), "datalist": str(phantom_dir / "datalist.json")},
        "msd": {"dataset_dir": str(msd_task), "num_folds": 3},
        "ssl": {"dataset_dir": str(ssl_corpus)},
    }[bundle]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_resume_from(bundle, fmt, files, tmp_path, request):
    """train.json's resume handler restores a full-state checkpoint; weights alone are sent to pretrained_path."""
    path = files[bundle]["paths"][fmt]
    with bundle_on_path(BUNDLES[bundle]):
        workflow = btcv_workflow(
            ["train.json"], "train", BUNDLES[bundle], bundle_root=str(tmp_path), resume_from=str(path), **KNOBS[bundle]
        )
        parser = workflow.parser
        if fmt != "full state":
            _refused(lambda: parser.get_parsed_content("network"), path, "cannot resume", "set pretrained_path to it")
            return
        data = {n: request.getfixturevalue(n) for n in ("phantom_dir", "ssl_corpus", "msd_task")}
        parser.update(_data_knobs(bundle, **data))
        network = parser.get_parsed_content("network")
        trainer = parser.get_parsed_content("train#trainer")
        parser.get_parsed_content("train#resume_handler")(trainer)
        assert trainer.state.iteration == 1
        _assert_loaded(network, files[bundle]["state"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_ssl_export(fmt, files, tmp_path):
    """export.json: the encoder of every layout of the pre-training network; an encoder file needs no export."""
    path = files["ssl"]["paths"][fmt]
    out = tmp_path / "model_swinvit.pt"
    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(["export.json"], "infer", SSL_DIR, ckpt_path=str(path), encoder_path=str(out))
        export = lambda: workflow.parser.get_parsed_content("export")  # noqa: E731
        if fmt in ENCODERS:
            _refused(export, path, "holds Swin encoder weights only", "use it as pretrained_path")
            assert not out.exists()
            return
        export()
    exported = torch.load(out, weights_only=True)
    assert exported["patch_merging"] == ORDER and exported["feature_size"] == 12
    expected = _official_names(_encoder(files["ssl"]["state"]))
    assert exported["state_dict"].keys() == expected.keys()
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in expected.items())
