"""Tests for tools.demo.overlays on a small synthetic CT + label pair with an oblique, flipped, permuted affine."""

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from tools.demo.overlays import (
    DEFAULT_META_FILE,
    axial_view,
    coronal_view,
    label_names_from_metadata,
    load_ras,
    render_comparison,
    render_overlay,
)

SHAPE = (48, 40, 32)
ORGANS = (1, 6, 11)


def _oblique_affine():
    """Array axis 0 -> patient left (flipped x), axis 1 -> superior, axis 2 -> posterior; rotated 20 deg about z."""
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    axes = np.array([[-1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=float)  # columns: world dir of each array axis
    aff = np.eye(4)
    aff[:3, :3] = rot @ axes @ np.diag([0.8, 2.5, 0.9])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    return aff


def _world_coords(aff):
    """World (RAS) coordinates of every voxel centre, relative to the volume centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(float)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    centre = (np.array(SHAPE) - 1) / 2 @ aff[:3, :3].T + aff[:3, 3]
    return xyz - centre


def _write_pair(tmp_path, drop=()):
    """Write ct.nii.gz and label.nii.gz with three box organs placed in world (RAS) coordinates."""
    aff = _oblique_affine()
    x, y, z = np.moveaxis(_world_coords(aff), -1, 0)
    label = np.zeros(SHAPE, np.uint8)
    label[(x > 2) & (x < 16) & (y > 0) & (y < 14) & (z > -2) & (z < 26)] = 6  # liver: right, anterior, superior
    label[(x > -16) & (x < -6) & (y > -14) & (y < -4) & (z > -14) & (z < 12)] = 1  # spleen: left, posterior
    label[(x > -6) & (x < 4) & (y > -10) & (y < -2) & (z > -20) & (z < -6)] = 11  # pancreas: central, inferior
    for lid in drop:
        label[label == lid] = 0
    rng = np.random.default_rng(0)
    ct = np.where((x / 20) ** 2 + (y / 16) ** 2 < 1, 40.0, -1000.0) + rng.normal(0, 10, SHAPE)
    ct[label > 0] += 30
    ct_path, lab_path = tmp_path / "ct.nii.gz", tmp_path / f"label{''.join(map(str, drop))}.nii.gz"
    nib.save(nib.Nifti1Image(ct.astype(np.float32), aff), ct_path)
    nib.save(nib.Nifti1Image(label, aff), lab_path)
    return ct_path, lab_path


def _expected_entries(ids):
    names = label_names_from_metadata(DEFAULT_META_FILE)
    return [f"{i} {names[i]}" for i in ids]


def _check_png(path):
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert 200 < h < 3000 and 300 < w < 3000
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    coloured = (np.abs(r - g) > 0.05) | (np.abs(g - b) > 0.05)
    return img, int(coloured.sum())


def test_label_names_from_metadata():
    names = label_names_from_metadata(DEFAULT_META_FILE)
    assert sorted(names) == list(range(14)) and all(isinstance(v, str) and v for v in names.values())


def test_display_is_upright_despite_oblique_affine(tmp_path):
    _, lab_path = _write_pair(tmp_path)
    lab, spacing, _ = load_ras(lab_path, is_label=True)
    assert sorted(np.round(spacing, 3)) == [0.8, 0.9, 2.5]
    _, jj, kk = np.nonzero(lab == 6)
    ax2d, co2d = axial_view(lab, int(np.median(kk))), coronal_view(lab, int(np.median(jj)))
    # liver is right + anterior + superior: top-left in both panels (radiological convention)
    for view in (ax2d, co2d):
        rows, cols = np.nonzero(view == 6)
        assert rows.mean() < view.shape[0] / 2 and cols.mean() < view.shape[1] / 2
    # spleen is on the patient's left: image right half of the axial panel
    _, _, kk = np.nonzero(lab == 1)
    _, cols = np.nonzero(axial_view(lab, int(np.median(kk))) == 1)
    assert cols.mean() > ax2d.shape[1] / 2


def test_render_overlay(tmp_path):
    ct_path, lab_path = _write_pair(tmp_path)
    out = tmp_path / "sub" / "overlay.png"
    entries = render_overlay(ct_path, lab_path, out, label_names_from_metadata(DEFAULT_META_FILE), title="synthetic")
    assert entries == _expected_entries(ORGANS)
    img, n_coloured = _check_png(out)
    assert img.shape[1] > img.shape[0]
    assert n_coloured > 2000  # overlay in the panels, not just the legend swatches


def test_render_overlay_default_meta_and_no_organs(tmp_path):
    ct_path, lab_path = _write_pair(tmp_path, drop=ORGANS)
    entries = render_overlay(ct_path, lab_path, tmp_path / "empty.png")  # names from the default bundle metadata
    assert entries == []
    _, n_coloured = _check_png(tmp_path / "empty.png")
    assert n_coloured < 200


def test_shape_mismatch_names_both_files(tmp_path):
    ct_path, _ = _write_pair(tmp_path)
    bad = tmp_path / "small_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), bad)
    with pytest.raises(ValueError) as err:
        render_overlay(ct_path, bad, tmp_path / "x.png")
    assert "ct.nii.gz" in str(err.value) and "small_label.nii.gz" in str(err.value)
    assert not (tmp_path / "x.png").exists()


def test_render_comparison(tmp_path):
    ct_path, ref_path = _write_pair(tmp_path)
    _, pred_path = _write_pair(tmp_path, drop=(11,))
    out = tmp_path / "compare.png"
    rows = render_comparison(ct_path, {"prediction": pred_path, "reference": ref_path}, out, title="pred vs ref")
    assert list(rows) == ["prediction", "reference"]
    assert rows["prediction"] == _expected_entries((1, 6))
    assert rows["reference"] == _expected_entries(ORGANS)
    _, n_coloured = _check_png(out)
    assert n_coloured > 4000
