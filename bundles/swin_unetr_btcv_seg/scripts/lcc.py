"""Optional per-organ largest-connected-component post-processing (knob ``lcc_labels``).

For each organ id in ``lcc_labels``, MONAI's ``KeepLargestConnectedComponentd`` keeps the organ's
largest connected component in the label map (full connectivity: 26 neighbours in 3D) and sets its
other components to background; other organs are left as they are. An empty list (the default)
changes nothing. ``tools/choose_postprocessing.py`` picks the list from cross-validation predictions.
inference.json and evaluate.json write the step out after the argmax (``applied_labels`` checked by
``check_lcc_labels``, ``is_onehot`` false, ``independent`` true); ``keep_largest_component`` builds the
same step for the tools.
MONAI computes the components with scikit-image (``skimage.measure.label``), or cuCIM on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import KeepLargestConnectedComponentd

from .bundle_logger import logger

__all__ = ["check_lcc_labels", "keep_largest_component"]


def check_lcc_labels(lcc_labels: Sequence[int] | None, num_classes: int) -> list[int]:
    """``lcc_labels`` as sorted distinct organ ids in ``1..num_classes - 1``; else an error naming the knob."""
    if lcc_labels is None:
        return []
    if isinstance(lcc_labels, (str, bytes)) or not isinstance(lcc_labels, Sequence):
        raise ValueError(f"lcc_labels must be a list of organ ids (1..{num_classes - 1}), got {lcc_labels!r}")
    bad = [v for v in lcc_labels if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    bad += [v for v in lcc_labels if v not in bad and not 1 <= int(v) < num_classes]
    if bad:
        raise ValueError(
            f"lcc_labels: {bad} not organ ids; each must be an integer in 1..{num_classes - 1} "
            f"(0 is the background), got {list(lcc_labels)}"
        )
    if len({int(v) for v in lcc_labels}) != len(lcc_labels):
        raise ValueError(f"lcc_labels lists an organ id more than once: {list(lcc_labels)}")
    labels = sorted(int(v) for v in lcc_labels)
    if labels:
        logger.info(f"largest-connected-component post-processing for organ ids {labels}")
    return labels


def keep_largest_component(
    keys: str | Sequence[str], lcc_labels: Sequence[int] | None, num_classes: int
) -> KeepLargestConnectedComponentd:
    """MONAI's ``KeepLargestConnectedComponentd`` on a single-channel label map, each listed organ on its own."""
    return KeepLargestConnectedComponentd(
        keys=keys, applied_labels=check_lcc_labels(lcc_labels, num_classes), is_onehot=False, independent=True
    )
