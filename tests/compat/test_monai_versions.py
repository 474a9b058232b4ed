"""The bundles under each tested MONAI: a user who brings monai 1.4, 1.5 or 1.6 pre-trains, fine-tunes and infers.

Run with the python of each version's venv, beside the contract tests (``.ci/run`` does)::

    py=$(bash tools/env/monai_env.sh 1.4)    # or 1.5
    $py -m pytest -m "not slow" tests/compat tests/bundles/shared/test_bundle_contract.py
    .venv/bin/python -m pytest -m compat tests/compat    # monai 1.6.1, the project's .venv

Each bundle runs one training iteration at test size, as ``monai.bundle run`` would: pre-training and its
encoder export, BTCV and MSD fine-tuning from that encoder, then their inference on the trained weights.
The parts of the bundles that lean on MONAI's internals (the window attention and the patch-merging
order) are compared with the installed monai's own layers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import (
    BTCV_DIR,
    MSD_DIR,
    MSD_INFER_SMALL,
    MSD_PHANTOM_SHAPE,
    MSD_SMALL,
    SMALL,
    SSL_DIR,
    SSL_SMALL,
    bundle_on_path,
    monai_swin_unetr,
    run_workflow,
)
from tools.data.make_msd_tasks import write_msd_task

pytestmark = pytest.mark.compat

MSD_TASK = "Task09_Spleen"
ENCODER_TENSORS = 126


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3])


@contextmanager
def bundle_log(bundle_dir: Path):
    """The messages the bundle logs inside the block (its logging.conf replaces the root handlers)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(bundle_dir.name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _assert_prediction(pred_path: Path, image_path: Path, num_labels: int) -> None:
    pred, image = nib.load(str(pred_path)), nib.load(str(image_path))
    assert pred.shape == image.shape[:3]
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(num_labels))


def _trained_once(workflow) -> None:
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 1
    output = trainer.state.output
    loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
    assert math.isfinite(float(loss))


def test_installed_monai_and_torch_are_declared_tested_and_accepted():
    for bundle_dir in (BTCV_DIR, MSD_DIR, SSL_DIR):
        with bundle_on_path(bundle_dir):
            from scripts import compat

            assert monai.__version__ in compat.MONAI_TESTED, bundle_dir.name
            assert torch.__version__.split("+")[0] in compat.TORCH_TESTED, bundle_dir.name
            assert compat.unsupported_versions() == []


def test_plain_monai_patch_merging_is_read_as_the_installed_monai_s_order():
    """monai <= 1.4 merges in the legacy order (the official weights'), monai >= 1.5 in the current one."""
    with bundle_on_path(BTCV_DIR):
        from scripts.patch_merging import RecordedPatchMerging, merging_order_of

    torch.manual_seed(0)
    network = monai_swin_unetr(in_channels=1, out_channels=2, feature_size=12)
    order = merging_order_of(network)
    assert order == ("legacy" if _version(monai.__version__) < (1, 5) else "current")
    monai_layer = network.swinViT.layers1[0].downsample
    bundle_layer = RecordedPatchMerging(dim=12, merging_order=order)
    bundle_layer.load_state_dict(monai_layer.state_dict())
    x = torch.rand(2, 8, 6, 10, 12)
    assert torch.equal(bundle_layer(x), monai_layer(x))


def test_bundle_attention_gives_monai_s_output_and_gradients():
    """Inference (masks reused, SDPA) and CPU training (fused function) of the encoder against the installed monai.

    In float64, so that only the mathematics is compared.
    """
    with bundle_on_path(BTCV_DIR):
        from scripts.networks import swin_unetr
        from scripts.window_attention import fast_window_attention, trains_fused

    torch.manual_seed(0)
    reference = swin_unetr(in_channels=1, out_channels=3, feature_size=12, use_flash_attention=True).swinViT.double()
    fast = fast_window_attention(copy.deepcopy(reference))
    assert trains_fused(fast)
    x = torch.rand(2, 1, 64, 32, 32, dtype=torch.float64)  # shifted windows in stages 1-2; 2 bottleneck tokens
    with torch.no_grad():
        for ours, monais in zip(fast.eval()(x), reference.eval()(x)):
            torch.testing.assert_close(ours, monais, rtol=1e-10, atol=1e-12)
    grads = []
    for network in (fast.train(), reference.train()):
        network.zero_grad()
        sum(h.square().mean() for h in network(x[:1])).backward()
        grads.append({name: p.grad.clone() for name, p in network.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-15, msg=name)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, ssl_corpus) -> Path:
    """One pre-training step on the corpus (2 volumes, batch 2), then the encoder export."""
    out = tmp_path_factory.mktemp("ssl_compat")
    workflow = run_workflow(
        ["train.json"],
        "train",
        SSL_DIR,
        dataset_dir=str(ssl_corpus),
        bundle_root=str(out),
        num_steps=1,
        val_interval=1,
        **SSL_SMALL,
    )
    _trained_once(workflow)
    encoder_path = out / "model_swinvit.pt"
    run_workflow(
        ["export.json"],
        "infer",
        SSL_DIR,
        bundle_root=str(out),
        ckpt_path=str(out / "models" / "model.pt"),
        encoder_path=str(encoder_path),
    )
    return encoder_path


def test_pretraining_exports_the_official_encoder_layout(encoder):
    exported = torch.load(encoder, map_location="cpu", weights_only=True)
    assert exported["format"] == "swin_ssl_encoder" and exported["feature_size"] == 12
    assert len(exported["state_dict"]) == ENCODER_TENSORS
    assert all(k.startswith("module.") for k in exported["state_dict"])


def test_btcv_fine_tunes_one_iteration_from_the_encoder_and_infers(encoder, phantom_dir, tmp_path):
    datalist = json.loads((phantom_dir / "datalist.json").read_text())
    one = tmp_path / "datalist.json"
    one.write_text(
        json.dumps({**datalist, "training": datalist["training"][:1], "validation": datalist["validation"][:1]})
    )
    with bundle_log(BTCV_DIR) as log:
        workflow = run_workflow(
            ["train.json"],
            "train",
            dataset_dir=str(phantom_dir),
            datalist=str(one),
            bundle_root=str(tmp_path),
            pretrained_path=str(encoder),
            max_epochs=1,
            val_interval=1,
            **SMALL,
        )
    assert f"loaded {ENCODER_TENSORS}/{ENCODER_TENSORS} encoder tensors" in " ".join(log)
    _trained_once(workflow)
    model = tmp_path / "models" / "model.pt"
    assert model.is_file()

    out = tmp_path / "predictions"
    run_workflow(
        ["inference.json"],
        "infer",
        dataset_dir=str(phantom_dir),
        datalist=str(one),
        ckpt_path=str(model),
        output_dir=str(out),
        num_workers=0,
        **{k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")},
    )
    image = phantom_dir / datalist["testing"][0]["image"]
    _assert_prediction(out / image.name.replace(".nii.gz", "_seg.nii.gz"), image, 14)


def test_msd_fine_tunes_one_iteration_from_the_encoder_and_infers(encoder, tmp_path):
    task_dir = write_msd_task(tmp_path / "msd", MSD_TASK, num_training=2, num_test=1, seed=3, shape=MSD_PHANTOM_SHAPE)
    runs = tmp_path / "runs"
    with bundle_log(MSD_DIR) as log:
        workflow = run_workflow(
            ["train.json"],
            "train",
            MSD_DIR,
            task=MSD_TASK,
            dataset_dir=str(task_dir),
            bundle_root=str(runs),
            pretrained_path=str(encoder),
            fold=0,
            **{**MSD_SMALL, "num_folds": 2, "max_epochs": 1, "val_interval": 1},
        )
    assert f"loaded {ENCODER_TENSORS}/{ENCODER_TENSORS} encoder tensors" in " ".join(log)
    _trained_once(workflow)
    assert (runs / "models" / MSD_TASK / "fold0" / "model.pt").is_file()

    run_workflow(
        ["inference.json"],
        "infer",
        MSD_DIR,
        task=MSD_TASK,
        dataset_dir=str(task_dir),
        bundle_root=str(runs),
        **MSD_INFER_SMALL,
    )
    labels = json.loads((task_dir / "dataset.json").read_text())["labels"]
    for image in json.loads((task_dir / "dataset.json").read_text())["test"]:
        _assert_prediction(runs / "predictions" / MSD_TASK / Path(image).name, task_dir / image, len(labels))
