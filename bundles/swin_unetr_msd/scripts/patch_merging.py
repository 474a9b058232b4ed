# Generated from bundles/common/scripts/patch_merging.py: edit that, then run python -m tools sync_bundle_code
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

The bundles never build MONAI's own ``PatchMerging`` (``resolve_downsample`` gives a class of this
module, which keeps its order under any monai); a network that has one (built elsewhere) is read as
the order of the installed monai.

``"mergingv2"`` (``PatchMergingV2``) is a third order; no weights of this project use it, so it
is reported as unsupported rather than guessed.

The order names are defined in ``weights_format`` (re-exported here); ``resolve_downsample`` reads a
file's order through it, so this module never imports ``encoder_weights``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging, PatchMergingV2
from torch import nn

from .bundle_logger import logger
from .compat import MONAI_VERSION
from .weights_format import (
    AUTO,
    CURRENT,
    EXTRA_STATE_SUFFIX,
    LEGACY,
    MERGING_ORDERS,
    ORDER_DESCRIPTIONS,
    checked_choice,
    detect_merging_order,
    order_of_record,
    order_record,
)

__all__ = [
    "LEGACY",
    "CURRENT",
    "AUTO",
    "MERGING_ORDERS",
    "ORDER_DESCRIPTIONS",
    "RecordedPatchMerging",
    "LegacyPatchMerging",
    "merging_order_of",
    "set_merging_order",
    "resolve_downsample",
]


# (depth, height, width) start offsets of the 8 strided slices, in concatenation order, as
# monai <= 1.4 wrote them. Entries 2/5 and 3/6 repeat: that is what the weights were trained with.
_LEGACY_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
# the same for monai >= 1.5 PatchMerging ("merging")
_CURRENT_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
_OFFSETS = {LEGACY: _LEGACY_OFFSETS, CURRENT: _CURRENT_OFFSETS}
# the order of the installed monai's own PatchMerging
_MONAI_ORDER = LEGACY if MONAI_VERSION < (1, 5, 0) else CURRENT


class RecordedPatchMerging(PatchMergingV2):
    """Patch merging whose sub-voxel order is a setting of the layer, carried in its state dict.

    Same parameters and names as monai's ``PatchMerging`` (``reduction``, ``norm``) plus one
    entry, ``<module>._extra_state``: the int64 tensor ``[2, code]`` (code 1 = legacy, 2 = current;
    ``weights_format.order_record``), a tensor of fixed shape so that every state-dict consumer
    (monai's ``copy_model_state``, ``monai.bundle.load``) copies it like any other entry; the dict
    ``{"patch_merging": order, "format_version": 1}`` of earlier files is read too.
    Loading a state dict that carries it (``load_state_dict``, strict or not, hence any loader:
    ignite's ``CheckpointLoader``, a bare ``net.load_state_dict(sd)``) sets the layer to that order,
    so the network always computes the function its weights were trained with. A state dict
    without it (a raw MONAI one) leaves the order chosen when the network was built
    (:func:`resolve_downsample`), and is not reported missing even by a strict load.
    """

    merging_order = CURRENT

    def __init__(
        self,
        dim: int,
        norm_layer: type[nn.LayerNorm] = nn.LayerNorm,
        spatial_dims: int = 3,
        merging_order: str | None = None,
    ) -> None:
        super().__init__(dim=dim, norm_layer=norm_layer, spatial_dims=spatial_dims)
        self.merging_order = _checked_order(merging_order or type(self).merging_order, "merging_order")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merge 2x2x2 neighbourhoods of ``x`` (B, D, H, W, C) into (B, D/2, H/2, W/2, 2C)."""
        if x.dim() == 4:
            return super().forward(x)
        if x.dim() != 5:
            raise ValueError(f"expecting 5D x, got {tuple(x.shape)}.")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in _OFFSETS[self.merging_order]], dim=-1)
        x = self.norm(x)
        return self.reduction(x)

    def get_extra_state(self) -> torch.Tensor:
        """The record saved with the weights: int64 ``[2, code]`` (``weights_format.order_record``)."""
        return order_record(self.merging_order)

    def set_extra_state(self, state: Any) -> None:
        """Take the order recorded with loaded weights: a version-2 tensor record or a version-1 dict.

        Anything else raises ValueError (``weights_format.order_of_record``).
        """
        order = order_of_record(state)
        if order != self.merging_order:
            logger.info(
                "patch merging: switched to the %s, as recorded in the weights loaded", ORDER_DESCRIPTIONS[order]
            )
        self.merging_order = order

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + EXTRA_STATE_SUFFIX
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        except ValueError as err:  # a malformed record: say which entry of the state dict it is
            if key in state_dict:
                raise ValueError(f"{key}: {err}") from err
            raise
        # a raw MONAI state dict has no record: keep the order chosen at build time, strict or not
        if key in missing_keys:
            missing_keys.remove(key)


class LegacyPatchMerging(RecordedPatchMerging):
    """:class:`RecordedPatchMerging` built with the monai <= 1.4 order (the order of the official weights)."""

    merging_order = LEGACY


def _checked_order(order: Any, what: str) -> str:
    if order not in MERGING_ORDERS:
        raise ValueError(f"{what} must be one of {MERGING_ORDERS}; got {order!r}.")
    return order


def _order_of_module(module: nn.Module | None) -> str:
    """Order name of one downsample module, or raise ValueError."""
    order = getattr(module, "merging_order", None)
    if isinstance(module, PatchMergingV2) and order in MERGING_ORDERS:
        # checked by attribute, not class identity, so a re-imported copy of this module still counts
        return order
    if type(module) is PatchMerging:
        return _MONAI_ORDER
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


def set_merging_order(network: nn.Module, order: str) -> bool:
    """Set every :class:`RecordedPatchMerging` layer of ``network`` to ``order``; False if it has none."""
    order = _checked_order(order, "patch_merging")
    # by attribute, not class identity, so layers of a re-imported copy of this module count too
    layers = [m for m in network.modules() if isinstance(m, PatchMergingV2) and hasattr(m, "merging_order")]
    for layer in layers:
        layer.set_extra_state(order_record(order))
    return bool(layers)


def resolve_downsample(patch_merging: str = AUTO, weights_path: str | Sequence[str] | None = "") -> type[nn.Module]:
    """Return the value to pass as ``SwinUNETR(downsample=...)``: a :class:`RecordedPatchMerging` class.

    The order it starts with: ``patch_merging`` ``"legacy"`` -> :class:`LegacyPatchMerging`,
    ``"current"`` -> :class:`RecordedPatchMerging` (the file is not read); ``"auto"`` -> the order
    recorded in the file at ``weights_path``, or listed for it as a published file (see
    ``weights_format.detect_merging_order``); a file that tells neither is refused, naming it.
    With no path, or no file there (yet), ``"auto"`` starts with ``"current"``: the network can be
    built from the configs alone. A list of paths (an ensemble) is read at its first path; the
    ensemble loader sets each member's own order. Whatever it starts with, weights loaded later
    with a patch-merging record in their state dict set each layer to their order.
    """
    choice = checked_choice(patch_merging)
    if weights_path is not None and not isinstance(weights_path, (str, os.PathLike)):
        weights_path = next(iter(weights_path), "")
    if choice != AUTO:
        order, why = choice, f"patch_merging {choice!r} set explicitly"
    elif not weights_path:
        order, why = CURRENT, "patch_merging 'auto' and no weights file"
    elif not os.path.isfile(os.fspath(weights_path)):
        order = CURRENT
        why = f"patch_merging 'auto', no weights file at {weights_path} yet: weights loaded later set their order"
    else:
        order = detect_merging_order(os.fspath(weights_path))
        why = f"patch_merging 'auto', read from {weights_path}"
    logger.info("patch merging: %s (%s)", ORDER_DESCRIPTIONS[order], why)
    return LegacyPatchMerging if order == LEGACY else RecordedPatchMerging
