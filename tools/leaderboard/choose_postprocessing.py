"""Choose the BTCV bundle's ``lcc_labels`` from cross-validation predictions, by nnU-Net's rule.

Input: the cross-validation predictions that evaluate.json writes for each fold k (run without
``lcc_labels``): ``eval/fold<k>/predictions/*_seg.nii.gz`` in the original geometry, listed in that
folder's ``manifest.json`` with the reference label map of each (``"output"``, ``"reference"``).

Rule (nnU-Net v2, ``nnunetv2/postprocessing/remove_connected_components.py``,
``determine_postprocessing``; MIC-DKFZ/nnUNet on GitHub): over all cross-validation cases, for each
foreground label, remove all but the largest connected component of that label and keep the step
only if the label's mean Dice over the cases rises strictly (``pp > baseline``, a tie keeps it off).
nnU-Net applies the labels one after another, each on top of the steps kept so far; in a label map
(labels never overlap) LCC of one label changes no voxel of another, so every label's Dice, and so
the decision, is the same when all are tested at once, as here. nnU-Net first tries keeping only the
largest component of the whole foreground; the bundle's knob is per organ, so that step is not
offered. Dice is the project's (``scripts.metrics.label_map_dice``: MONAI's ``compute_dice`` with
``ignore_empty``; a case whose reference lacks the organ is left out of its mean; nnU-Net counts
such a case as 0 when the prediction is not empty, which LCC cannot change). The LCC step is the
bundle's (``scripts.lcc``: MONAI's ``KeepLargestConnectedComponentd``).

Outputs in ``output_dir`` (default: the evaluation folder): ``lcc_labels.json`` (``{"lcc_labels":
[...]}``, an overlay config for inference.json or evaluate.json), ``postprocessing.md`` and
``postprocessing.json`` (per organ: cases, mean Dice without and with LCC, the change, the decision).

    python -m tools choose_postprocessing --eval_dir bundles/swin_unetr_btcv_seg/eval [--num_folds 5]
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from tools.common.bundles import BTCV_DIR, use_bundle_scripts
from tools.common.folds import CrossValidationError, fold_dirs, mean_sd, organ_names, read_json
from tools.common.stats import num

__all__ = ["prediction_pairs", "case_dice", "choose", "write_outputs", "main"]

PREDICTIONS = "predictions"
MANIFEST = "manifest.json"


def prediction_pairs(eval_dir: str | Path, num_folds: int | None = None) -> list[tuple[Path, Path]]:
    """(prediction, reference) of every fold's validation cases, from each ``fold<k>/predictions/manifest.json``."""
    pairs = []
    for fold in fold_dirs(eval_dir, num_folds):
        manifest = fold / PREDICTIONS / MANIFEST
        entries = read_json(manifest, "cross-validation prediction list (evaluate.json writes it)")
        if not isinstance(entries, list) or not entries:
            raise CrossValidationError(f"{manifest}: expected a non-empty list of prediction entries")
        for entry in entries:
            if not isinstance(entry, dict) or not entry.get("output") or not entry.get("reference"):
                raise CrossValidationError(f"{manifest}: entry {entry!r} lacks 'output' or 'reference'")
            pred, ref = Path(entry["output"]), Path(entry["reference"])
            for path in (pred, ref):
                if not path.is_file():
                    raise CrossValidationError(f"{manifest}: file not found: {path}")
            pairs.append((pred, ref))
    return pairs


def _label_map(path: Path) -> np.ndarray:
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as e:  # nibabel raises several types for a broken file
        raise CrossValidationError(f"{path}: label map cannot be read ({e})") from e
    return np.rint(data).astype(np.int16)


def case_dice(pred_file: Path, ref_file: Path, organ_ids: list[int], lcc, dice) -> tuple[np.ndarray, np.ndarray]:
    """Per-organ Dice of one case without and with ``lcc`` (the bundle's step on every organ, each on its own).

    ``lcc`` is ``scripts.lcc.keep_largest_component("pred", organ_ids, ...)`` and ``dice``
    ``scripts.metrics.label_map_dice`` of the bundle.
    """
    pred, ref = _label_map(pred_file), _label_map(ref_file)
    if pred.shape != ref.shape:
        raise CrossValidationError(f"{pred_file}: shape {pred.shape} differs from its reference {ref_file} {ref.shape}")
    kept = np.asarray(lcc({"pred": pred[None]})["pred"])[0]
    return dice(pred, ref, organ_ids), dice(kept, ref, organ_ids)


def choose(eval_dir: str | Path, num_folds: int | None = None, bundle_dir: str | Path = BTCV_DIR) -> dict:
    """Per-organ mean Dice without/with LCC over all cross-validation cases, and the organs where LCC raises it."""
    organs = organ_names(bundle_dir)
    ids = list(organs)
    scripts = use_bundle_scripts(bundle_dir)
    pairs = prediction_pairs(eval_dir, num_folds)
    lcc = scripts.lcc.keep_largest_component("pred", ids, max(ids) + 1)
    without, with_lcc = zip(*(case_dice(p, r, ids, lcc, scripts.metrics.label_map_dice) for p, r in pairs))
    without, with_lcc = np.stack(without), np.stack(with_lcc)
    rows = []
    for j, organ_id in enumerate(ids):
        before, after = mean_sd(list(without[:, j])), mean_sd(list(with_lcc[:, j]))
        keep = before["mean"] is not None and after["mean"] > before["mean"]
        change = None if before["mean"] is None else after["mean"] - before["mean"]
        rows.append(
            {
                "id": organ_id,
                "organ": organs[organ_id],
                "cases": before["n"],
                "dice_without_lcc": before["mean"],
                "dice_with_lcc": after["mean"],
                "change": change,
                "lcc": bool(keep),
            }
        )
    return {
        "eval_dir": str(eval_dir),
        "cases": len(pairs),
        "rule": "nnU-Net v2 determine_postprocessing, per label: keep LCC where the mean Dice rises strictly",
        "lcc_labels": [r["id"] for r in rows if r["lcc"]],
        "organs": rows,
    }


def _markdown(result: dict) -> str:
    lines = [
        f"# Largest-connected-component choice ({result['cases']} cross-validation cases, {result['eval_dir']})",
        "",
        f"Rule: {result['rule']}. Chosen `lcc_labels`: `{result['lcc_labels']}`",
        "",
        "| id | organ | cases | Dice without LCC | Dice with LCC | change | LCC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["organs"]:
        cells = [num(r[k], ".4f") for k in ("dice_without_lcc", "dice_with_lcc")] + [num(r["change"], "+.4f")]
        lines.append(
            f"| {r['id']} | {r['organ']} | {r['cases']} | " + " | ".join(cells) + f" | {'yes' if r['lcc'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output_dir: str | Path) -> list[Path]:
    """Write ``lcc_labels.json`` (the knob), ``postprocessing.md`` and ``postprocessing.json``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "lcc_labels.json", output_dir / "postprocessing.md", output_dir / "postprocessing.json"]
    paths[0].write_text(json.dumps({"lcc_labels": result["lcc_labels"]}) + "\n")
    paths[1].write_text(_markdown(result))
    paths[2].write_text(json.dumps(result, indent=2) + "\n")
    return paths


def main(eval_dir: str = str(BTCV_DIR / "eval"), num_folds: int | None = None, output_dir: str | None = None) -> str:
    """Command line: choose ``lcc_labels`` from ``eval_dir/fold*/predictions``; write the knob and the table.

    Args:
        eval_dir: the folder holding ``fold0``, ``fold1``, ... as evaluate.json wrote them (without ``lcc_labels``).
        num_folds: folds expected (default: one more than the highest ``fold<k>`` found); a missing one is an error.
        output_dir: where ``lcc_labels.json`` and the table go (default ``eval_dir``).
    """
    result = choose(eval_dir, num_folds)
    paths = write_outputs(result, output_dir or eval_dir)
    return _markdown(result) + "\nwritten: " + ", ".join(str(p) for p in paths)


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main, report=str, errors=(CrossValidationError,))
