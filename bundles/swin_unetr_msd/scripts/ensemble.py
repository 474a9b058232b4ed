"""Fold checkpoints for inference: one model, or a softmax-averaging ensemble with flip test-time augmentation."""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Sequence

import torch
from torch import nn

from .bundle_logger import logger
from .encoder_weights import NetworkRecord
from .weights_format import _tensor_mapping, _torch_load

__all__ = ["checkpoint_paths", "SoftmaxEnsemble", "build_inference_network"]


def checkpoint_paths(ckpt_path: str | Sequence[str], folds_dir: str) -> list[str]:
    """The model checkpoints to run: ``ckpt_path`` (one path or a list), or every ``fold*/model.pt`` under
    ``folds_dir``."""
    if isinstance(ckpt_path, str):
        paths = [ckpt_path] if ckpt_path else sorted(glob.glob(os.path.join(folds_dir, "fold*", "model.pt")))
    else:
        paths = [str(p) for p in ckpt_path]
    if not paths:
        raise FileNotFoundError(
            f"no checkpoints: ckpt_path is empty and {folds_dir} holds no fold*/model.pt; "
            f"train a fold first or set ckpt_path"
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {', '.join(missing)}")
    return paths


def _load_into(network: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint of this bundle (``{"model": ..., "network_record": ...}``) or a bare state dict, strictly."""
    obj = _torch_load(path)
    state = _tensor_mapping(obj)
    if state is None:
        raise ValueError(f"{path}: not a model checkpoint (expected {{'model': state_dict}} or a state dict)")
    if isinstance(obj.get("network_record"), dict):  # files written before the layers recorded their order
        NetworkRecord(network).load_state_dict(obj["network_record"])  # sets the network's patch-merging order
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: does not fit the network built from this config "
            f"(task, feature_size or in_channels differ?): {str(e).splitlines()[0]}"
        ) from e
    tensors = [sum(torch.is_tensor(v) for v in sd.values()) for sd in (state, network.state_dict())]
    logger.info(f"loaded {tensors[0]}/{tensors[1]} model tensors from {path}")  # not counting the order records
    return network


class SoftmaxEnsemble(nn.Module):
    """Average of the softmax of several networks, each over the identity and the given flips.

    Returns the log of the averaged probabilities, so that a ``softmax`` in post-processing gives
    back exactly the averaged probabilities: configs treat one model and an ensemble alike.
    """

    def __init__(self, networks: Sequence[nn.Module], flip_axes: Sequence[Sequence[int]] = ()):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.flips = [()] + [tuple(int(a) for a in axes) for axes in flip_axes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for network in self.networks:
            for axes in self.flips:
                dims = [a + 2 for a in axes]  # spatial axes after batch and channel
                inputs = torch.flip(x, dims) if dims else x
                probs = torch.softmax(network(inputs).float(), dim=1)
                probs = torch.flip(probs, dims) if dims else probs
                total = probs if total is None else total + probs
        mean = total / (len(self.networks) * len(self.flips))
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


def build_inference_network(
    network_def: nn.Module, ckpt_paths: Sequence[str], tta_flips: Sequence[Sequence[int]], device: torch.device | str
) -> nn.Module:
    """``network_def`` loaded from the single checkpoint, or a ``SoftmaxEnsemble`` of one copy per checkpoint.

    With one checkpoint and no ``tta_flips`` the plain network is returned (tracing for MONAI Deploy
    works on it). Each checkpoint is loaded strictly and sets its copy's patch-merging order.
    """
    paths = list(ckpt_paths)
    if len(paths) == 1 and not tta_flips:
        return _load_into(network_def, paths[0]).to(device).eval()
    members = [_load_into(copy.deepcopy(network_def) if i else network_def, p) for i, p in enumerate(paths)]
    logger.info(
        f"ensemble of {len(members)} model(s) x {1 + len(tta_flips)} view(s) (flips {list(tta_flips)}); "
        f"softmax averaged"
    )
    return SoftmaxEnsemble(members, tta_flips).to(device).eval()
