"""Whole-network checkpoints for inference: one loader for checkpoints from anywhere, one model or an ensemble.

:func:`load_checkpoint` reads every format a fine-tuned Swin UNETR is published in:

* a raw state dict (the MONAI model zoo's ``models/model.pt``);
* ``{"state_dict": ..., <any other entries>}`` (research code: ``"epoch"``, ``"best_acc"``, maybe
  ``"optimizer"``);
* ``{"model": ..., ...}`` (MONAI's ``CheckpointSaver``, this project);
* any of these with ``module.``-prefixed keys (saved under DataParallel / DDP).

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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .bundle_logger import logger
from .encoder_weights import NetworkRecord
from .patch_merging import merging_order_of, set_merging_order
from .weights_format import (
    AUTO,
    EXTRA_STATE_SUFFIX,
    MONAI,
    ORDER_DESCRIPTIONS,
    RECORD,
    RECORD_KEY,
    _few,
    _is_extra_state,
    _order_from_file,
    _tensor_mapping,
    _torch_load,
    checked_choice,
    checked_torch_file,
    detect_weights_format,
    order_record,
    settle_order,
)

__all__ = [
    "checkpoint_paths",
    "read_checkpoint",
    "recorded_state_dict",
    "load_checkpoint",
    "SoftmaxEnsemble",
    "build_inference_network",
]

_DDP_PREFIX = "module."


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


def _describe_format(obj: Any, state: Mapping[str, Any]) -> str:
    """Which of the accepted layouts ``obj`` is, in words, for the log."""
    if state is obj:
        return "raw state dict"
    wrapper = "state_dict" if obj.get("state_dict") is state else "model"
    others = [str(k) for k in obj if k != wrapper]
    return f"{{'{wrapper}': state dict}}" + (f" with {_few(others)}" if others else "")


def read_checkpoint(path: str, patch_merging: str = AUTO) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Read a whole-network checkpoint: ``(state dict, patch-merging order, info)``.

    The state dict has network keys (``module.`` prefixes removed) and keeps the file's
    ``*._extra_state`` records, if any. ``info`` holds ``format`` (in words), ``where`` the order
    comes from ("record" | "published" | "setting") and ``network_record`` (a top-level record of
    older files of this project, or None). Raises ValueError naming ``path`` for anything that is
    not a Swin UNETR state dict, and ``UnrecordedOrderError`` under "auto" for an unrecorded file
    that is not a known published one.
    """
    path = checked_torch_file(path, "checkpoint")
    choice = checked_choice(patch_merging)
    obj = _torch_load(path)
    state = _tensor_mapping(obj)
    if state is None:
        what = f"keys {_few(obj)}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ValueError(
            f"{path}: not a model checkpoint: expected a state dict, {{'state_dict': state dict, ...}} or "
            f"{{'model': state dict, ...}}; it holds {what}"
        )
    fmt = detect_weights_format(obj, path)
    if fmt != MONAI:
        raise ValueError(
            f"{path}: holds Swin encoder weights only ({fmt}), not a whole network: use it as "
            f"pretrained_path for training, not as ckpt_path"
        )
    described = _describe_format(obj, state)
    if all(isinstance(k, str) and k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
        described += ", 'module.' prefixes removed (DDP)"
    order, where = settle_order(*_order_from_file(obj, fmt, path), choice, path)
    if where == RECORD and choice != AUTO and choice != order:
        logger.warning("%s records the %s: patch_merging %r is ignored for it", path, ORDER_DESCRIPTIONS[order], choice)
    record = obj.get(RECORD_KEY) if isinstance(obj.get(RECORD_KEY), Mapping) else None
    return dict(state), order, {"format": described, "where": where, "network_record": record}


def recorded_state_dict(state: Mapping[str, Any], order: str) -> dict[str, Any]:
    """``state`` with every Swin downsample layer's order record (``<layer>._extra_state``) set to ``order``.

    The layers of this project (``patch_merging.RecordedPatchMerging``) take that record when the
    state dict is loaded, by any loader, so such a file needs no setting to compute the right function.
    """
    layers = sorted({k.rsplit(".", 2)[0] for k in state if k.rsplit(".", 3)[-3:-1] == ["downsample", "reduction"]})
    if not layers:
        raise ValueError("no Swin downsample layers (*.downsample.reduction.weight) in the state dict")
    out = {k: v for k, v in state.items() if not _is_extra_state(k)}
    for layer in layers:
        out[f"{layer}.{EXTRA_STATE_SUFFIX}"] = order_record(order)
    return out


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
