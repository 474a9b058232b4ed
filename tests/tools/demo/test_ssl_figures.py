"""tools.demo.ssl_figures: loss curves and loss drops from TensorBoard events, the inpainting example."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from tests.helpers import SSL_DIR, bundle_on_path
from tools.data.make_phantoms import make_phantom
from tools.demo import ssl_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TERMS = ("loss", "inpaint_loss", "contrast_loss", "rotation_loss")


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture
def fake_run(tmp_path):
    """A run dir as the bundle writes it: training scalars every step and validation scalars, from two writers."""
    run = tmp_path / "runs"
    rng = np.random.default_rng(0)
    train = SummaryWriter(str(run))
    steps = 60
    for step in range(1, steps + 1):
        inpaint = 0.3 * np.exp(-step / 20) + 0.05 + 0.01 * rng.standard_normal()
        contrast = 1.1 - 0.002 * step + 0.02 * rng.standard_normal()
        rotation = 1.39 + 0.03 * rng.standard_normal()  # flat: must be reported as not falling
        train.add_scalar("inpaint_loss", inpaint, step)
        train.add_scalar("contrast_loss", contrast, step)
        train.add_scalar("rotation_loss", rotation, step)
        train.add_scalar("loss", inpaint + contrast + rotation, step)
        train.add_scalar("lr", 1e-3, step)
    train.close()
    val = SummaryWriter(str(run))
    for step in (30, 60):
        for tag in TERMS:
            val.add_scalar(f"val_{tag}", 1.0 - step / 100, step)
    val.close()
    return run


def test_read_scalars_merges_writers(fake_run):
    scalars = ssl_figures.read_scalars(fake_run)
    assert len(list(fake_run.iterdir())) == 2  # two event files, as the bundle's two handlers write
    for tag in TERMS:
        assert [s for s, _ in scalars[tag]] == list(range(1, 61))
        assert [s for s, _ in scalars[f"val_{tag}"]] == [30, 60]
    assert scalars["val_loss"][1][1] == pytest.approx(0.4)


def test_read_scalars_no_events(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        ssl_figures.read_scalars(tmp_path)


def test_loss_drops(fake_run):
    drops = ssl_figures.loss_drops(fake_run, window=20)
    assert set(drops) == set(TERMS)
    assert drops["inpaint_loss"]["fell"] and drops["contrast_loss"]["fell"]
    assert not drops["rotation_loss"]["fell"]  # flat, within noise
    assert drops["inpaint_loss"]["first"] > drops["inpaint_loss"]["last"]
    assert drops["inpaint_loss"]["window"] == 20 and drops["inpaint_loss"]["steps"] == 60
    # a run shorter than two windows averages half of it at each end
    assert ssl_figures.loss_drops(fake_run, window=50)["loss"]["window"] == 30
    line = ssl_figures.format_loss_drops(drops)
    assert line.startswith("inpaint ") and "contrast " in line and "rotation " in line and "total " in line
    assert "->" in line and "%" in line


def test_plot_loss_curves(fake_run, tmp_path):
    png = tmp_path / "figs" / "loss.png"
    assert ssl_figures.plot_loss_curves(fake_run, png) == str(png)
    width, height = _png_size(png)
    assert width >= 800 and height >= 500
    assert png.stat().st_size > 20_000


def test_plot_loss_curves_needs_losses(tmp_path):
    writer = SummaryWriter(str(tmp_path / "runs"))
    writer.add_scalar("lr", 1e-3, 1)
    writer.close()
    with pytest.raises(ValueError, match="no training loss scalars"):
        ssl_figures.plot_loss_curves(tmp_path / "runs", tmp_path / "x.png")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An untrained SwinSSLNet (feature size 12) saved as the bundle saves its best model: the state dict."""
    with bundle_on_path(SSL_DIR):
        from scripts.model import SwinSSLNet
        from scripts.patch_merging import resolve_downsample

        torch.manual_seed(0)
        net = SwinSSLNet(feature_size=12, downsample=resolve_downsample("current"))  # as train.json builds it
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def phantom_image(tmp_path):
    image, _, affine = make_phantom(3, shape=(56, 48, 36), spacing=(2.5, 2.5, 3.0))
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def test_plot_inpainting_example(tiny_checkpoint, phantom_image, tmp_path):
    png = tmp_path / "inpaint.png"
    kwargs = dict(roi_size=[64, 32, 32], spacing=[2.0, 2.0, 2.0], hu_window=[-1000, 1000], seed=3)
    info = ssl_figures.plot_inpainting_example(tiny_checkpoint, phantom_image, png, **kwargs)
    assert info["png"] == str(png)
    width, height = _png_size(png)
    assert width >= 600 and height >= 400
    assert info["crop_shape"] == [64, 32, 32]
    assert 0.05 <= info["masked_fraction"] <= 0.35  # the bundle's cutout_fraction (0.1, 0.3), per view
    assert info["rotation"] in range(4) and info["predicted_rotation"] in range(4)
    assert np.isfinite(info["l1"]) and info["l1_masked"] > 0
    # the bundle's scripts do not stay importable afterwards
    assert "scripts" not in sys.modules
    # same seed, same example
    again = ssl_figures.plot_inpainting_example(tiny_checkpoint, phantom_image, tmp_path / "again.png", **kwargs)
    for key in ("l1", "masked_fraction", "rotation"):
        assert again[key] == info[key]


def test_plot_inpainting_example_missing_files(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ssl_figures.plot_inpainting_example(tmp_path / "none.pt", tmp_path / "x.nii.gz", tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="image not found"):
        ssl_figures.plot_inpainting_example(tiny_checkpoint, tmp_path / "x.nii.gz", tmp_path / "x.png")
