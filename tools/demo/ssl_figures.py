"""Figures of a ``swin_unetr_ssl_pretrain`` run: loss curves, an inpainting example, loss drops.

* ``plot_loss_curves(run_dir, png_path)``: one panel per loss (total, inpainting, contrastive,
  rotation) from the bundle's TensorBoard events in ``<bundle_root>/runs``: the raw training loss
  of every optimiser step (faint), a moving average over the steps (solid), and the validation
  losses (points, ``val_*`` tags, logged at the optimiser step they were computed at).
* ``plot_inpainting_example(ckpt_path, image_path, png_path, ...)``: one volume preprocessed exactly
  as the bundle's validation does (the bundle's ``validate#preprocessing``: orientation, spacing,
  HU window, foreground crop, pad, centre crop to the ROI), two proxy-task views drawn with a fixed
  seed (the bundle's ``validate#proxy_tasks``: 90-degree rotation + random-box cutout), the network
  of the checkpoint (``scripts.export.build_from_checkpoint``) run on them, and three columns for
  view 1: input with holes | reconstruction | target, at the mid axial, coronal and sagittal
  slices. The view is turned back by its rotation for display, so the anatomy is upright
  (radiological: patient right on image left).
* ``loss_drops(run_dir)``: mean of each training loss over the first and the last ``window``
  steps, and whether it fell; ``format_loss_drops`` writes that as one line.

The bundle's ``scripts`` package is imported as the top-level module ``scripts`` (as when running
from the bundle folder); ``tools.common.bundles.bundle_on_path`` puts the bundle folder first on
``sys.path`` and drops cached ``scripts*`` modules before and after, so another bundle's ``scripts``
never answers.

Command line::

    python -m tools ssl_figures plot_loss_curves --run_dir OUT/ssl/runs --png_path loss.png
    python -m tools ssl_figures plot_inpainting_example --ckpt_path OUT/ssl/models/model.pt \\
        --image_path ct.nii.gz --png_path inpaint.png --roi_size "[64,32,32]" --spacing "[2,2,2]"
    python -m tools ssl_figures loss_drops --run_dir OUT/ssl/runs
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tools.common.bundles import SSL_DIR as SSL_BUNDLE_DIR
from tools.common.bundles import bundle_on_path
from tools.common.scalars import read_scalars

TOTAL = "loss"
LOSS_TERMS = ("inpaint_loss", "contrast_loss", "rotation_loss")
"""Training loss tags of the bundle besides the weighted total ``loss``; validation tags add ``val_``."""
TITLES = {
    "loss": "total (weighted sum)",
    "inpaint_loss": "inpainting (L1)",
    "contrast_loss": "contrastive",
    "rotation_loss": "rotation (cross-entropy)",
}
SHORT_NAMES = {"loss": "total", "inpaint_loss": "inpaint", "contrast_loss": "contrast", "rotation_loss": "rotation"}

__all__ = ["read_scalars", "plot_loss_curves", "loss_drops", "format_loss_drops", "plot_inpainting_example"]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that shrinks at the ends (no lag, no padding artefacts)."""
    if window <= 1 or len(values) < 3:
        return values.astype(float)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(0, idx - half), np.minimum(len(values), idx + half + 1)
    return (csum[hi] - csum[lo]) / (hi - lo)


def _drop_window(n: int, window: int) -> int:
    """Steps averaged at each end: ``window``, or half the run when it is shorter than 2 windows."""
    return max(1, min(int(window), n // 2))


def loss_drops(
    run_dir: str | os.PathLike, window: int = 20, min_relative_drop: float = 0.05, scalars: dict | None = None
) -> dict[str, dict]:
    """Per training loss (total and each term): mean over the first and the last ``window`` steps.

    Returns ``{tag: {"first", "last", "relative_drop", "fell", "window", "steps"}}`` for the tags
    ``loss``, ``inpaint_loss``, ``contrast_loss``, ``rotation_loss`` that the run logged.
    ``relative_drop`` is ``(first - last) / first``; ``fell`` is true when it is at least
    ``min_relative_drop`` (a visible fall, not noise). With fewer than ``2 * window`` steps each end
    averages half the run.
    """
    scalars = read_scalars(run_dir) if scalars is None else scalars
    out = {}
    for tag in (TOTAL, *LOSS_TERMS):
        series = scalars.get(tag)
        if not series:
            continue
        values = np.array([v for _, v in series], dtype=float)
        w = _drop_window(len(values), window)
        first, last = float(values[:w].mean()), float(values[-w:].mean())
        rel = (first - last) / abs(first) if first != 0 else 0.0
        out[tag] = {
            "first": first,
            "last": last,
            "relative_drop": rel,
            "fell": bool(len(values) >= 2 and rel >= min_relative_drop),
            "window": w,
            "steps": len(values),
        }
    return out


def format_loss_drops(drops: dict[str, dict]) -> str:
    """``"inpaint 0.310 -> 0.120 (-61%), ..."`` (terms first, then the total)."""
    parts = []
    for tag in (*LOSS_TERMS, TOTAL):
        if tag in drops:
            d = drops[tag]
            parts.append(f"{SHORT_NAMES[tag]} {d['first']:.3f} -> {d['last']:.3f} ({-100 * d['relative_drop']:+.0f}%)")
    return ", ".join(parts)


def plot_loss_curves(
    run_dir: str | os.PathLike,
    png_path: str | os.PathLike,
    smooth: int | None = None,
    window: int = 20,
    title: str | None = None,
) -> str:
    """PNG of the training losses per optimiser step, one panel per loss; return ``png_path``.

    Each panel: the raw loss of every step (faint), its centred moving average over ``smooth``
    steps (default: about a tenth of the run, at least 5), the validation loss at each validation
    (points), and in the panel title the mean over the first and last ``window`` steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scalars = read_scalars(run_dir)
    tags = [t for t in (TOTAL, *LOSS_TERMS) if scalars.get(t)]
    if not tags:
        raise ValueError(f"{run_dir}: no training loss scalars ({TOTAL}, {', '.join(LOSS_TERMS)}) in the event files")
    drops = loss_drops(run_dir, window=window, scalars=scalars)
    fig = Figure(figsize=(11, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, tag in zip(axes, tags):
        steps = np.array([s for s, _ in scalars[tag]])
        values = np.array([v for _, v in scalars[tag]], dtype=float)
        k = smooth if smooth is not None else max(5, len(values) // 10)
        ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=0.8, label="training (each step)")
        ax.plot(steps, _moving_average(values, k), color="tab:blue", lw=2.0, label=f"training ({k}-step mean)")
        val = scalars.get(f"val_{tag}")
        if val:
            ax.plot(
                [s for s, _ in val], [v for _, v in val], "o--", color="tab:orange", ms=6, lw=1.0, label="validation"
            )
        d = drops.get(tag)
        sub = f"\nfirst {d['window']} steps {d['first']:.3f} -> last {d['window']} {d['last']:.3f}" if d else ""
        ax.set_title(f"{TITLES.get(tag, tag)}{sub}", fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    for ax in axes[len(tags) :]:
        ax.set_axis_off()
    n = len(scalars[tags[0]])
    fig.suptitle(title or f"Swin UNETR self-supervised pre-training: {n} optimiser steps", fontsize=12)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(png_path))
    return str(png_path)


# --------------------------------------------------------------------------------------------------
# inpainting example
# --------------------------------------------------------------------------------------------------
def _display(plane: np.ndarray) -> np.ndarray:
    """A RAS-array slice (first axis R-L or A-P, second A-P or S-I) shown radiologically / upright."""
    return plane[::-1, ::-1].T


def _mid_slices(vol: np.ndarray) -> list[tuple[str, np.ndarray]]:
    x, y, z = (s // 2 for s in vol.shape)
    return [
        ("axial", _display(vol[:, :, z])),
        ("coronal", _display(vol[:, y, :])),
        ("sagittal", _display(vol[x, :, :])),
    ]


def _bundle_parser(roi_size, spacing, hu_window):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SSL_BUNDLE_DIR / "configs" / "train.json"))
    for key, value in (("roi_size", roi_size), ("spacing", spacing), ("hu_window", hu_window)):
        if value is not None:
            parser[key] = list(value)
    return parser


def _require_inputs(ckpt_path: str | os.PathLike, image_path: str | os.PathLike) -> None:
    """FileNotFoundError naming the checkpoint or image that is missing."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    if not Path(image_path).exists():
        raise FileNotFoundError(f"image not found: {image_path}")


def plot_inpainting_example(
    ckpt_path: str | os.PathLike,
    image_path: str | os.PathLike,
    png_path: str | os.PathLike,
    roi_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    hu_window: Sequence[float] | None = None,
    seed: int = 0,
    display_range: Sequence[float] = (0.3, 0.7),
    title: str | None = None,
) -> dict:
    """PNG of an inpainting example: input with holes | reconstruction | target, mid slices; return its numbers.

    ``image_path`` is preprocessed with the bundle's own validation pipeline (``validate#preprocessing``
    of ``configs/train.json``, with ``roi_size``, ``spacing`` and ``hu_window`` overriding the
    bundle's values when given: use the ones the checkpoint was trained with), giving the centre
    crop of the foreground. The bundle's ``validate#proxy_tasks`` seeded with ``seed`` make two views
    (rotated, cut out); the checkpoint's network (``build_from_checkpoint``) reconstructs them; view 1
    is shown, turned back by its rotation. Intensities are the bundle's (HU window scaled to 0..1),
    displayed over ``display_range`` of that scale (default 0.3..0.7: -400..400 HU for the bundle's
    -1000..1000 window, so soft tissue shows; the noise in the holes spans 0..1 and saturates).

    Returns ``{"png", "l1", "l1_masked", "masked_fraction", "rotation", "predicted_rotation",
    "crop_shape"}`` (L1 over the whole crop and over the masked voxels only, view 1).
    """
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _require_inputs(ckpt_path, image_path)
    with bundle_on_path(SSL_BUNDLE_DIR):
        from scripts.export import build_from_checkpoint
        from scripts.proxy_tasks import rotate90

        parser = _bundle_parser(roi_size, spacing, hu_window)
        preprocess = parser.get_parsed_content("validate#preprocessing")
        views = parser.get_parsed_content("validate#proxy_tasks")
        roi = [int(r) for r in parser.get_parsed_content("roi_size")]
        hu = [float(h) for h in parser.get_parsed_content("hu_window")]
        network = build_from_checkpoint(str(ckpt_path)).eval()
        data = preprocess({"image": str(image_path)})
        crop = torch.as_tensor(data["image"]).float()
        if tuple(crop.shape[1:]) != tuple(roi):
            raise ValueError(
                f"preprocessing gave a crop of shape {tuple(crop.shape[1:])}, expected the ROI {tuple(roi)}"
            )
        views.set_random_state(seed)
        batch = views(crop[None])  # 2 views of the one crop
        mask = (batch["inputs"][0] != batch["targets"][0])[0]
        with torch.no_grad():
            out = network(batch["inputs"])
        k = int(batch["rotations"][0])
        predicted = int(out.rotation[0].argmax())
        recon = out.reconstruction[0].float()
        # back to the crop's own orientation (rotate90 turns by k quarter turns in spatial axes 1, 2)
        shown = {
            name: rotate90(t, -k)[0].numpy()
            for name, t in (("input", batch["inputs"][0]), ("reconstruction", recon), ("target", batch["targets"][0]))
        }
        mask_np = rotate90(mask[None], -k)[0].numpy()
    err = (recon - batch["targets"][0]).abs()[0]
    l1 = float(err.mean())
    l1_masked = float(err[mask].mean()) if bool(mask.any()) else float("nan")
    masked_fraction = float(mask.float().mean())

    cols = [("input with holes", "input"), ("reconstruction", "reconstruction"), ("target", "target")]
    slices = {name: _mid_slices(vol) for name, vol in shown.items()}
    mask_slices = _mid_slices(mask_np.astype(float))
    n_rows = len(slices["input"])
    heights = [s.shape[0] / s.shape[1] for _, s in slices["input"]]
    fig = Figure(figsize=(10, 1.5 + 3.3 * sum(heights)), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(n_rows, 3, height_ratios=heights)
    vmin, vmax = float(display_range[0]), float(display_range[1])
    for r in range(n_rows):
        plane = slices["input"][r][0]
        for c, (col_title, name) in enumerate(cols):
            ax = fig.add_subplot(gs[r, c])
            ax.imshow(slices[name][r][1], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if name == "input":
                ax.contour(mask_slices[r][1], levels=[0.5], colors="tab:red", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_title, fontsize=11)
            if c == 0:
                ax.set_ylabel(f"{plane} (mid slice)", fontsize=10)
    name = Path(image_path).name
    fig.suptitle(
        title
        or (
            f"Inpainting example: {name}, centre crop {tuple(roi)}, seed {seed}\n"
            f"view 1: rotation class {k} (predicted {predicted}), {100 * masked_fraction:.0f}% of voxels masked "
            f"(red outline), L1 {l1:.3f} (masked voxels {l1_masked:.3f})\n"
            f"shown turned back upright, window {hu[0] + vmin * (hu[1] - hu[0]):.0f}.."
            f"{hu[0] + vmax * (hu[1] - hu[0]):.0f} HU"
        ),
        fontsize=10,
    )
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(png_path))
    return {
        "png": str(png_path),
        "l1": l1,
        "l1_masked": l1_masked,
        "masked_fraction": masked_fraction,
        "rotation": k,
        "predicted_rotation": predicted,
        "crop_shape": list(roi),
    }


def _cli_loss_drops(run_dir: str, window: int = 20) -> str:
    """Print the first-vs-last mean of each training loss."""
    return format_loss_drops(loss_drops(run_dir, window=window))


if __name__ == "__main__":
    import fire

    fire.Fire(
        {
            "plot_loss_curves": plot_loss_curves,
            "plot_inpainting_example": plot_inpainting_example,
            "loss_drops": _cli_loss_drops,
        }
    )
