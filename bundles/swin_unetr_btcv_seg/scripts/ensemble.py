# Generated from bundles/common/scripts/ensemble.py: edit that, then run python -m tools sync_bundle_code
"""Whole-network checkpoints for inference: one loader for checkpoints from anywhere, one model or an ensemble.

:func:`load_checkpoint` reads every format a fine-tuned Swin UNETR is published in:

* a raw state dict (``models/model.pt`` of these bundles and of the MONAI model zoo);
* ``{"state_dict": ..., <any other entries>}`` (research code: ``"epoch"``, ``"best_acc"``, maybe
  ``"optimizer"``);
* ``{"model": ..., ...}`` (the bundles' full-state checkpoints, and their ``model.pt`` of earlier
  versions, with a top-level ``"network_record"``);
* any of these with ``module.``-prefixed keys (saved under DataParallel / DDP).

(:func:`weights_format.read_checkpoint` reads them.)

It loads strictly (every tensor of the network, nothing else) and logs the format it read and how
many tensors it loaded; errors name the file. The patch-merging order is never guessed: it comes
from the file's record, else from the published-file table (``known_checkpoints``), else from an
explicit ``patch_merging`` setting; under "auto" anything else is refused
(``weights_format.settle_order``).

:func:`build_inference_network` gives the plain network for one checkpoint without test-time
augmentation, or a :class:`SoftmaxEnsemble` of one copy per checkpoint.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Sequence

import torch
from torch import nn

from .bundle_logger import logger
from .encoder_weights import NetworkRecord
from .patch_merging import merging_order_of, set_merging_order
from .weights_format import AUTO, ORDER_DESCRIPTIONS, _few, _is_extra_state, read_checkpoint

__all__ = ["checkpoint_paths", "load_checkpoint", "SoftmaxEnsemble", "build_inference_network"]


def checkpoint_paths(ckpt_path: str | Sequence[str], folds_dir: str) -> list[str]:
    """The model checkpoints to run: ``ckpt_path`` (one path or a list), or every ``fold*/model.pt`` under
    ``folds_dir``."""
    if isinstance(ckpt_path, (str, os.PathLike)):
        ckpt_path = os.fspath(ckpt_path)
        paths = [ckpt_path] if ckpt_path else sorted(glob.glob(os.path.join(folds_dir, "fold*", "model.pt")))
    else:
        paths = [os.fspath(p) for p in ckpt_path]
    if not paths:
        raise FileNotFoundError(
            f"no checkpoints: ckpt_path is empty and {folds_dir} holds no fold*/model.pt; "
            f"train a fold first or set ckpt_path"
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {', '.join(missing)}")
    return paths


def load_checkpoint(network: nn.Module, path: str, patch_merging: str = AUTO) -> nn.Module:
    """Load the checkpoint at ``path`` (any format of :func:`read_checkpoint`) into ``network``, strictly.

    The network's patch-merging layers are set to the file's order first (a network whose layers
    cannot switch must already have it). Logs the format, the order and where it comes from, and
    the number of tensors loaded. Returns ``network``.
    """
    state, order, info = read_checkpoint(path, patch_merging)
    if info["network_record"] is not None:  # files written before the layers recorded their order
        NetworkRecord(network).load_state_dict(info["network_record"])
    elif not set_merging_order(network, order) and merging_order_of(network) != order:
        raise ValueError(
            f"{path} was trained with the {ORDER_DESCRIPTIONS[order]}, but the network's patch-merging layers "
            f"cannot switch to it: build network_def with downsample=scripts.patch_merging.resolve_downsample(...)"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: does not fit the network built from this config "
            f"(task, num_classes, feature_size or in_channels differ?): {str(e).splitlines()[0]} "
            f"{_few(str(e).splitlines()[1:], 2)}"
        ) from e
    loaded = sum(not _is_extra_state(k) for k in state)
    total = sum(not _is_extra_state(k) for k in network.state_dict())
    logger.info(
        f"loaded {loaded}/{total} model tensors from {path} (format: {info['format']}; patch merging: "
        f"{ORDER_DESCRIPTIONS[order]}, from {info['where']})"
    )
    return network


class SoftmaxEnsemble(nn.Module):
    """Average of the softmax of several networks, each over the identity and the given flips, per window.

    It streams: a sliding-window inferer calls it on one window (batch) at a time, and inside that
    call the softmax of each member x view is added to one running sum of the window's size. So the
    memory of an ensemble is that of one window's probabilities plus one model at a time, never N
    full-resolution probability maps; the inferer then blends the windows once, as for one model.

    Returns the log of the averaged probabilities, so that a ``softmax`` in post-processing gives
    back exactly the averaged probabilities where windows do not overlap (where they do, the
    inferer blends these log-probabilities as it blends one model's logits): configs treat one
    model and an ensemble alike.
    """

    def __init__(self, networks: Sequence[nn.Module], flip_axes: Sequence[Sequence[int]] = ()):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.flips = [()] + [tuple(int(a) for a in axes) for axes in flip_axes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean softmax over members x views of the window batch ``x`` (B, C, D, H, W)."""
        total = None
        for network in self.networks:
            for axes in self.flips:
                dims = [a + 2 for a in axes]  # spatial axes after batch and channel
                inputs = torch.flip(x, dims) if dims else x
                probs = torch.softmax(network(inputs).float(), dim=1)
                probs = torch.flip(probs, dims) if dims else probs
                total = probs.clone() if total is None else total.add_(probs)  # one running sum
        mean = total / (len(self.networks) * len(self.flips))
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


def build_inference_network(
    network_def: nn.Module,
    ckpt_paths: Sequence[str],
    tta_flips: Sequence[Sequence[int]],
    device: torch.device | str,
    patch_merging: str = AUTO,
) -> nn.Module:
    """``network_def`` loaded from the single checkpoint, or a ``SoftmaxEnsemble`` of one copy per checkpoint.

    With one checkpoint and no ``tta_flips`` the plain network is returned (tracing for MONAI Deploy
    works on it). Each checkpoint is loaded strictly by :func:`load_checkpoint` and sets its copy's
    patch-merging order (``patch_merging`` applies to files that record none).
    """
    paths = list(ckpt_paths)
    if len(paths) == 1 and not tta_flips:
        return load_checkpoint(network_def, paths[0], patch_merging).to(device).eval()
    members = [
        load_checkpoint(copy.deepcopy(network_def) if i else network_def, p, patch_merging) for i, p in enumerate(paths)
    ]
    logger.info(
        f"ensemble of {len(members)} model(s) x {1 + len(tta_flips)} view(s) (flips {list(tta_flips)}); "
        f"softmax averaged per window"
    )
    return SoftmaxEnsemble(members, tta_flips).to(device).eval()
