"""Export the pre-trained encoder of a training checkpoint in the official ``model_swinvit.pt`` layout."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from .bundle_logger import logger
from .encoder_weights import save_encoder
from .model import SwinSSLNet
from .patch_merging import resolve_downsample
from .weights_format import RECORD_KEY, UnreadableWeightsError

__all__ = ["build_from_checkpoint", "export_encoder"]

_PATCH_EMBED = "swinViT.patch_embed.proj.weight"


def _model_state(checkpoint: Any, path: str) -> Mapping[str, torch.Tensor]:
    state = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a checkpoint of this bundle: no 'model' entry (found {keys}).")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if _PATCH_EMBED not in state:
        raise ValueError(f"{path}: the model holds no Swin encoder ({_PATCH_EMBED} missing).")
    return state


def build_from_checkpoint(ckpt_path: str) -> SwinSSLNet:
    """The pre-training network of ``ckpt_path`` with its weights loaded strictly.

    Feature size and input channels are read off the stored patch embedding, the patch-merging
    order off the checkpoint's network record, so no training override needs repeating.
    """
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"training checkpoint not found: {ckpt_path}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise UnreadableWeightsError(
            f"{ckpt_path}: training checkpoint cannot be read: truncated (an interrupted "
            f"copy or write?) or not a torch.save file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    state = _model_state(checkpoint, ckpt_path)
    feature_size, in_channels = (int(n) for n in state[_PATCH_EMBED].shape[:2])
    if RECORD_KEY not in checkpoint:
        raise ValueError(
            f"{ckpt_path} has no {RECORD_KEY!r}: cannot tell which patch-merging order it was trained with."
        )
    network = SwinSSLNet(
        in_channels=in_channels,
        feature_size=feature_size,
        contrastive_dim=int(state["contrastive_head.weight"].shape[0]),
        downsample=resolve_downsample(str(checkpoint[RECORD_KEY].get("patch_merging"))),
    )
    result = network.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{ckpt_path} does not match the pre-training network: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}."
        )
    logger.info(
        "loaded %d tensors from %s (feature_size %d, in_channels %d)", len(state), ckpt_path, feature_size, in_channels
    )
    return network


def export_encoder(ckpt_path: str, encoder_path: str) -> str:
    """Write the encoder of training checkpoint ``ckpt_path`` to ``encoder_path`` (format ``swin_ssl_encoder``).

    The file is ``{"state_dict": <official model_swinvit.pt keys>, "patch_merging", "feature_size",
    ...}``: ``SwinUNETR.load_from``, the research code and the fine-tuning bundles' ``pretrained_path``
    all read it. Returns ``encoder_path``.
    """
    if not encoder_path:
        raise ValueError("encoder_path is empty: give the file to write, e.g. --encoder_path models/model_swinvit.pt")
    return save_encoder(build_from_checkpoint(ckpt_path), encoder_path)
