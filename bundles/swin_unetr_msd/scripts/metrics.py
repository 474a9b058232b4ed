# Generated from bundles/common/scripts/metrics.py: edit that, then run python -m tools sync_bundle_code
"""Evaluation metrics in physical units and a per-organ report."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import HausdorffDistance
from monai.utils import ImageMetaKey

from .bundle_logger import logger

__all__ = ["BEST_METRICS", "HausdorffDistanceMM", "OrganMetricsReport", "label_map_dice", "split_key_metric"]

# ``best_metric`` knob value -> the Dice handler's name: organs only, or with background as the research code
BEST_METRICS = {"organs": "val_mean_dice", "with_background": "val_mean_dice_with_background"}


def split_key_metric(metrics: Mapping[str, Any], best_metric: str) -> tuple[dict, dict]:
    """Split named metric handlers into (key metric, the others) by the ``best_metric`` knob.

    The key metric is the one the evaluator tracks as "best" and the checkpoint saver keeps
    ``model.pt`` by; the others are reported beside it.
    """
    if best_metric not in BEST_METRICS:
        raise ValueError(f"best_metric must be one of {sorted(BEST_METRICS)}, got {best_metric!r}")
    key = BEST_METRICS[best_metric]
    return {key: metrics[key]}, {k: v for k, v in metrics.items() if k != key}


class HausdorffDistanceMM(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler measured in millimetres.

    The stock handler does not pass the voxel spacing to the metric, so distances come out in
    voxels. Here each case is measured with the ``pixdim`` of its (inverted) prediction.
    """

    def update(self, output: Sequence[Any]) -> None:
        y_pred, y = output
        for pred, label in zip(y_pred, y):
            spacing = [float(s) for s in pred.pixdim] if hasattr(pred, "pixdim") else None
            self.metric_fn([pred], [label], spacing=spacing)


def label_map_dice(pred: Any, reference: Any, labels: Sequence[int]) -> np.ndarray:
    """Dice of each label in ``labels`` between two integer label maps of one case (same shape).

    The definition of MONAI's ``compute_dice`` with ``ignore_empty=True``, which the evaluators'
    ``MeanDice`` uses: ``2 |P & R| / (|P| + |R|)``, NaN where the reference lacks the label (so
    the means skip it as they do). Counted with one ``bincount`` per map instead of a mask per
    label, so a full-size CT label map takes one pass instead of one per label.
    ``tests/bundles/btcv/test_btcv_cross_validation.py`` checks it against ``compute_dice``.
    """
    pred, reference = np.asarray(pred), np.asarray(reference)
    if pred.shape != reference.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {reference.shape}")
    if pred.size and min(pred.min(), reference.min()) < 0:
        raise ValueError("label maps must hold non-negative label ids")
    labels = [int(v) for v in labels]
    size = max(labels + [int(pred.max(initial=0)), int(reference.max(initial=0))]) + 1
    pred, reference = pred.astype(np.int64, copy=False).ravel(), reference.astype(np.int64, copy=False).ravel()
    both = np.bincount(pred[pred == reference], minlength=size)[labels]
    in_pred, in_ref = np.bincount(pred, minlength=size)[labels], np.bincount(reference, minlength=size)[labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(in_ref > 0, 2.0 * both / (in_pred + in_ref), np.nan)


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


class OrganMetricsReport:
    """Write per-case, per-organ metrics as CSV and a summary JSON when an evaluation ends.

    For each metric in ``metric_names`` (which must be computed with ``save_details=True``), the
    evaluator's ``engine.state.metric_details[name]`` holds one row per case and one column per
    organ. Writes ``<output_dir>/<name>_per_case.csv`` and ``<output_dir>/metrics_summary.json``.
    Empty or undefined values (an organ absent from the reference, a prediction with no voxels
    of an organ for HD95) are written as empty cells and left out of the means, with counts.
    A metric with one more column than there are organs (``include_background=True``) is reported
    over every label, background first. ``mean`` averages the per-organ means; ``pooled_mean``
    averages every defined (case, label) value, as MONAI's ``MeanDice`` and the research code do.
    """

    def __init__(
        self,
        output_dir: str,
        metric_names: Sequence[str],
        organ_names: Mapping[Any, str],
        include_background: bool = False,
    ) -> None:
        self.output_dir = output_dir
        self.metric_names = list(metric_names)
        names = {int(k): v for k, v in organ_names.items()}
        self.labels = [(i, names[i]) for i in sorted(names)]  # background included
        self.organs = [(i, n) for i, n in self.labels if include_background or i != 0]
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._cases = []

    def _collect_names(self, engine: Engine) -> None:
        for item in engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]:
            image = item.get("image") if isinstance(item, Mapping) else None
            meta = getattr(image, "meta", {}) if image is not None else {}
            names = meta.get(ImageMetaKey.FILENAME_OR_OBJ, "unknown")
            names = names if isinstance(names, (list, tuple)) else [names]
            self._cases.extend(os.path.basename(str(n)) for n in names)

    def __call__(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        details = getattr(engine.state, "metric_details", {})
        summary: dict[str, Any] = {"cases": self._cases, "organs": [n for _, n in self.organs], "metrics": {}}
        for name in self.metric_names:
            if name not in details:
                raise KeyError(f"metric '{name}' has no per-case details; set save_details=True for it")
            values = details[name]
            values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
            values = values.reshape(len(self._cases), -1)
            organs = self._columns(name, values.shape[1])
            self._write_csv(name, values, organs)
            per_organ = {organ: _finite_mean(values[:, j]) for j, (_, organ) in enumerate(organs)}
            case_means = [_finite_mean(row) for row in values]
            summary["metrics"][name] = {
                "mean": _finite_mean(np.array([v for v in per_organ.values() if v is not None], dtype=float)),
                "pooled_mean": _finite_mean(values.ravel()),
                "per_organ": per_organ,
                "per_case_mean": dict(zip(self._cases, case_means)),
                "undefined_values": int((~np.isfinite(values)).sum()),
            }
        path = os.path.join(self.output_dir, "metrics_summary.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        for name, m in summary["metrics"].items():
            logger.info(f"{name}: mean over organs {m['mean']}")
        logger.info(f"per-organ metrics written to {self.output_dir}")

    def _columns(self, name: str, count: int) -> list[tuple[int, str]]:
        """The labels a metric's columns stand for: the organs, or every label for a background-inclusive one."""
        for labels in (self.organs, self.labels):
            if count == len(labels):
                return labels
        raise ValueError(f"metric '{name}' has {count} columns, expected {len(self.organs)} organs")

    def _write_csv(self, name: str, values: np.ndarray, organs: list[tuple[int, str]]) -> None:
        path = os.path.join(self.output_dir, f"{name}_per_case.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case"] + [organ for _, organ in organs] + ["mean"])
            for case, row in zip(self._cases, values):
                mean = _finite_mean(row)
                cells = ["" if not math.isfinite(v) else f"{v:.4f}" for v in row]
                writer.writerow([case] + cells + ["" if mean is None else f"{mean:.4f}"])
