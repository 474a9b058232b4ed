# Generated from bundles/common/scripts/patch_merging.py by tools/sync_bundle_code.py: edit that file, then run it.
"""Patch-merging orders of the Swin encoder, and the choice of ``SwinUNETR(downsample=...)``.

A Swin "patch merging" layer gathers the 8 sub-voxels of every 2x2x2 neighbourhood, concatenates
them along the channel axis (8*C), then applies LayerNorm and a Linear(8*C -> 2*C). The weights of
that Linear only make sense for the order in which the 8 sub-voxels were concatenated in training.

monai 1.5 changed the order of ``PatchMerging`` (``downsample="merging"``) without changing the
parameter names, so a state dict trained with one order loads into the other without any error
and the encoder silently computes a different function. Two orders are handled here:

* ``"legacy"``  - monai <= 1.4 ``PatchMerging``; the order of the official ``model_swinvit.pt``
  (Tang et al. 2022). Implemented by :class:`LegacyPatchMerging`.
* ``"current"`` - monai >= 1.5 ``PatchMerging`` (``downsample="merging"``).

``"mergingv2"`` (``PatchMergingV2``) is a third order; no weights of this project use it, so it
is reported as unsupported rather than guessed.

The order names are defined in ``weights_format`` (re-exported here); ``resolve_downsample`` reads a
file's order through it, so this module never imports ``encoder_weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging, PatchMergingV2
from torch import nn

from .bundle_logger import logger
from .weights_format import AUTO, CURRENT, LEGACY, MERGING_ORDERS, ORDER_DESCRIPTIONS, detect_merging_order

__all__ = [
    "LEGACY",
    "CURRENT",
    "AUTO",
    "MERGING_ORDERS",
    "ORDER_DESCRIPTIONS",
    "LegacyPatchMerging",
    "merging_order_of",
    "resolve_downsample",
]


# (depth, height, width) start offsets of the 8 strided slices, in concatenation order, as
# monai <= 1.4 wrote them. Entries 2/5 and 3/6 repeat: that is what the weights were trained with.
_LEGACY_OFFSETS = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 0, 1),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
)


class LegacyPatchMerging(PatchMergingV2):
    """Patch merging with the monai <= 1.4 sub-voxel order (the order of the official weights).

    Same parameters and names as monai's ``PatchMerging`` (``reduction``, ``norm``), so state
    dicts are interchangeable; only the 5D (3D spatial) forward differs. 4D input is handled by
    the parent class.
    """

    merging_order = LEGACY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merge 2x2x2 neighbourhoods of ``x`` (B, D, H, W, C) into (B, D/2, H/2, W/2, 2C)."""
        if x.dim() == 4:
            return super().forward(x)
        if x.dim() != 5:
            raise ValueError(f"expecting 5D x, got {tuple(x.shape)}.")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in _LEGACY_OFFSETS], dim=-1)
        x = self.norm(x)
        return self.reduction(x)


def _order_of_module(module: nn.Module | None) -> str:
    """Order name of one downsample module, or raise ValueError."""
    if module is not None and getattr(type(module), "merging_order", None) == LEGACY:
        # checked by attribute, not identity, so a re-imported copy of this module still counts
        return LEGACY
    if type(module) is PatchMerging:
        return CURRENT
    if type(module) is PatchMergingV2:
        raise ValueError(
            "the network uses PatchMergingV2 (downsample='mergingv2'): this order is not supported "
            "by this bundle; build it with resolve_downsample() ('legacy' or 'current')."
        )
    raise ValueError(f"unknown downsample module {type(module).__name__!r}: cannot tell its patch-merging order.")


def merging_order_of(network: nn.Module) -> str:
    """Return ``"legacy"`` or ``"current"``: the patch-merging order of all downsample layers of ``network``.

    Raises ValueError if the network has no Swin stages, mixes orders, or uses another layer
    (e.g. ``"mergingv2"``).
    """
    orders = {}
    for name, module in network.named_modules():
        if isinstance(module, BasicLayer) and module.downsample is not None:
            orders[name] = _order_of_module(module.downsample)
    if not orders:
        raise ValueError(
            f"{type(network).__name__} has no Swin downsample layers: cannot tell its patch-merging order."
        )
    found = set(orders.values())
    if len(found) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in orders.items())
        raise ValueError(f"the network mixes patch-merging orders ({detail}).")
    return found.pop()


def resolve_downsample(patch_merging: str = AUTO, weights_path: str | None = "") -> str | type[nn.Module]:
    """Return the value to pass as ``SwinUNETR(downsample=...)``.

    ``patch_merging``: ``"legacy"`` -> :class:`LegacyPatchMerging`; ``"current"`` -> ``"merging"``;
    ``"auto"`` -> the order recorded in, or implied by, the file at ``weights_path`` (see
    ``weights_format.detect_merging_order``); ``"auto"`` with no path -> ``"current"``.
    A missing file with ``"auto"`` raises FileNotFoundError.
    """
    choice = str(patch_merging).strip().lower()
    if choice not in (AUTO, *MERGING_ORDERS):
        raise ValueError(f"patch_merging must be one of 'auto', 'legacy', 'current'; got {patch_merging!r}.")
    if choice == AUTO:
        if not weights_path:
            order = CURRENT
            why = "patch_merging 'auto' and no weights file"
        else:
            order = detect_merging_order(str(weights_path))
            why = f"patch_merging 'auto', read from {weights_path}"
    else:
        order = choice
        why = f"patch_merging {choice!r} set explicitly"
    logger.info("patch merging: %s (%s)", ORDER_DESCRIPTIONS[order], why)
    return LegacyPatchMerging if order == LEGACY else "merging"
