"""Render BTCV label maps over CT as PNG overlays (axial + coronal panels).

Volumes are reoriented to RAS canonical before display, so the pictures are
anatomically upright whatever the input affine. Display convention is
radiological: patient right on image left, anterior (axial) / superior
(coronal) at the top.

CLI::

    python -m tools overlays render_overlay --image_path ct.nii.gz \
        --label_path pred.nii.gz --output_png out/overlay.png
    python -m tools overlays render_comparison --image_path ct.nii.gz \
        --label_paths '{"prediction": "pred.nii.gz", "reference": "ref.nii.gz"}' \
        --output_png out/compare.png
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DEFAULT_META_FILE = Path(__file__).resolve().parents[2] / "bundles/swin_unetr_btcv_seg/configs/metadata.json"
CONVENTION = "radiological: patient right on image left"
OVERLAY_ALPHA = 0.45
# tab20 reordered: the 10 saturated colours first, then the 10 light ones, greys dropped,
# so neighbouring label ids get clearly different hues.
_TAB20_ORDER = [0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19]


def label_names_from_metadata(meta_file=DEFAULT_META_FILE) -> dict[int, str]:
    """Return {label id: name} from network_data_format.outputs.pred.channel_def."""
    with open(meta_file) as f:
        meta = json.load(f)
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): str(v) for k, v in channel_def.items()}


def label_color(label_id: int) -> tuple[float, float, float]:
    """Fixed RGB colour for a (non-zero) label id, the same for every image."""
    cmap = colormaps["tab20"]
    return tuple(cmap(_TAB20_ORDER[(int(label_id) - 1) % len(_TAB20_ORDER)])[:3])


def load_ras(path, is_label: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load a NIfTI, reorient to RAS canonical; return (array, voxel spacing, original shape)."""
    img = nib.squeeze_image(nib.load(str(path)))
    orig_shape = np.array(img.shape)
    if img.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    can = nib.as_closest_canonical(img)
    data = can.get_fdata(dtype=np.float32)
    if is_label:
        data = np.rint(data).astype(np.int32)
    spacing = nib.affines.voxel_sizes(can.affine)
    return data, spacing, orig_shape


def axial_view(vol: np.ndarray, k: int) -> np.ndarray:
    """2D axial slice of a RAS volume: rows anterior->posterior, columns patient right->left."""
    return vol[:, :, k].T[::-1, ::-1]


def coronal_view(vol: np.ndarray, j: int) -> np.ndarray:
    """2D coronal slice of a RAS volume: rows superior->inferior, columns patient right->left."""
    return vol[:, j, :].T[::-1, ::-1]


def _best_slices(label: np.ndarray) -> tuple[int, int]:
    """(axial k, coronal j) with the most foreground voxels; centre slices if empty."""
    fg = label > 0
    if not fg.any():
        return label.shape[2] // 2, label.shape[1] // 2
    return int(fg.sum(axis=(0, 1)).argmax()), int(fg.sum(axis=(0, 2)).argmax())


def _rgba(label2d: np.ndarray) -> np.ndarray:
    """Semi-transparent RGBA image of a 2D label slice (background fully transparent)."""
    out = np.zeros(label2d.shape + (4,), dtype=np.float32)
    for lid in np.unique(label2d):
        if lid > 0:
            out[label2d == lid] = (*label_color(lid), OVERLAY_ALPHA)
    return out


def _edge_letters(ax, top: str, bottom: str) -> None:
    """Write orientation letters on the panel edges."""
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    kw = dict(
        transform=ax.transAxes,
        color="white",
        fontsize=10,
        fontweight="bold",
        ha="center",
        va="center",
        path_effects=outline,
    )
    ax.text(0.03, 0.5, "R", **kw)
    ax.text(0.97, 0.5, "L", **kw)
    ax.text(0.5, 0.96, top, **kw)
    ax.text(0.5, 0.04, bottom, **kw)


def _resolve_names(label_names, meta_file) -> dict[int, str]:
    """Label names as {int: str}; read from meta_file (default: the BTCV bundle) when not given."""
    if label_names is None:
        return label_names_from_metadata(meta_file or DEFAULT_META_FILE)
    return {int(k): str(v) for k, v in label_names.items()}


def _save(fig: Figure, output_png) -> None:
    """Save the figure as PNG via a temp file + rename, creating the parent directory."""
    out = Path(output_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", facecolor="white")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; make it an ordinary readable file
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def render_comparison(
    image_path,
    label_paths: dict,
    output_png,
    label_names: dict | None = None,
    title: str | None = None,
    hu_window=(-175, 250),
    meta_file=None,
) -> dict[str, list[str]]:
    """Render one row (axial + coronal) per label map over the same CT slices.

    Slices are those with most foreground in the first label map. Returns
    {row name: legend entries "id name"} (organs present in that map).
    """
    if not label_paths:
        raise ValueError("label_paths is empty")
    names = _resolve_names(label_names, meta_file)
    ct, spacing, ct_shape = load_ras(image_path)
    ct_affine = nib.load(str(image_path)).affine
    labels = {}
    for row, path in label_paths.items():
        lab, _, lab_shape = load_ras(path, is_label=True)
        if tuple(lab_shape) != tuple(ct_shape):
            raise ValueError(
                f"shape mismatch: image {image_path} has shape {tuple(ct_shape)}, "
                f"label {path} has shape {tuple(lab_shape)}"
            )
        if not np.allclose(nib.load(str(path)).affine, ct_affine, atol=1e-3):
            warnings.warn(f"affines of {image_path} and {path} differ; overlay may be misaligned", stacklevel=2)
        labels[str(row)] = lab

    k, j = _best_slices(next(iter(labels.values())))
    lo, hi = hu_window
    sx, sy, sz = spacing
    nx, ny, nz = ct.shape
    ratios = [nx * sx / (ny * sy), nx * sx / (nz * sz)]  # width/height of each panel in mm
    fig = Figure(figsize=(min(max(4.0 * sum(ratios) + 2.5, 8.0), 20.0), 4.8 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(labels), 2, squeeze=False, gridspec_kw={"width_ratios": ratios})
    entries = {}
    for (row, lab), (ax_a, ax_c) in zip(labels.items(), axes):
        prefix = f"{row}: " if len(labels) > 1 else ""
        panels = [
            (ax_a, axial_view(ct, k), axial_view(lab, k), sy / sx, f"axial z={k}/{ct.shape[2]}", ("A", "P")),
            (ax_c, coronal_view(ct, j), coronal_view(lab, j), sz / sx, f"coronal y={j}/{ct.shape[1]}", ("S", "I")),
        ]
        for ax, ct2d, lab2d, aspect, name, (top, bottom) in panels:
            ax.imshow(ct2d, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.imshow(_rgba(lab2d), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{prefix}{name}\n({CONVENTION})", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            _edge_letters(ax, top, bottom)
        present = [int(i) for i in np.unique(lab) if i > 0]
        entries[row] = [f"{i} {names.get(i, 'unknown')}" for i in present]
        handles = [Patch(facecolor=label_color(i), edgecolor="black", label=e) for i, e in zip(present, entries[row])]
        if handles:
            ax_c.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
        else:
            ax_c.text(1.02, 1.0, "(no organs)", transform=ax_c.transAxes, va="top", fontsize=9)
    fig.suptitle(title or Path(str(image_path)).name, fontsize=12)
    _save(fig, output_png)
    return entries


def render_overlay(
    image_path,
    label_path,
    output_png,
    label_names: dict | None = None,
    title: str | None = None,
    hu_window=(-175, 250),
    meta_file=None,
) -> list[str]:
    """Render one label map over its CT (axial + coronal panel); return the legend entries "id name"."""
    rows = render_comparison(
        image_path,
        {"label": label_path},
        output_png,
        label_names,
        title=title,
        hu_window=hu_window,
        meta_file=meta_file,
    )
    return rows["label"]


if __name__ == "__main__":
    import fire

    fire.Fire(
        {
            "render_overlay": render_overlay,
            "render_comparison": render_comparison,
            "label_names_from_metadata": label_names_from_metadata,
        }
    )
