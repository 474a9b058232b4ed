"""Normalised surface distance (surface Dice), the Decathlon's second metric, as an Ignite handler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import SurfaceDiceMetric

__all__ = ["NormalisedSurfaceDistance"]

PRED_AND_LABEL = from_engine(["pred", "label"])  # the handler's default output transform: (pred, label) batches


class NormalisedSurfaceDistance(IgniteMetricHandler):
    """NSD per foreground label at ``tolerance_mm`` (one value per label), in millimetres.

    MONAI's ``SurfaceDiceMetric`` measures in voxels unless it is given the spacing; here each
    case is measured with the ``pixdim`` of its (inverted, original-space) prediction.
    """

    def __init__(
        self,
        tolerance_mm: Sequence[float],
        include_background: bool = False,
        output_transform: Callable = PRED_AND_LABEL,
        save_details: bool = True,
    ) -> None:
        metric = SurfaceDiceMetric(
            class_thresholds=[float(t) for t in tolerance_mm], include_background=include_background
        )
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)

    def update(self, output: Sequence[Any]) -> None:
        y_pred, y = output
        for pred, label in zip(y_pred, y):
            spacing = [float(s) for s in pred.pixdim] if hasattr(pred, "pixdim") else None
            self.metric_fn([pred], [label], spacing=spacing)
