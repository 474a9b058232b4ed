"""Export the pre-trained encoder of a training checkpoint in the official ``model_swinvit.pt`` layout."""

from __future__ import annotations

from .bundle_logger import logger
from .encoder_weights import save_encoder
from .model import SwinSSLNet
from .patch_merging import resolve_downsample
from .weights_format import _is_extra_state, read_checkpoint

__all__ = ["build_from_checkpoint", "export_encoder"]

_PATCH_EMBED = "swinViT.patch_embed.proj.weight"
_CONTRASTIVE = "contrastive_head.weight"


def build_from_checkpoint(ckpt_path: str) -> SwinSSLNet:
    """The pre-training network of ``ckpt_path`` with its weights loaded strictly.

    ``ckpt_path`` is any layout of the network's weights (``weights_format.read_checkpoint``):
    ``models/model.pt`` (a raw state dict), a full-state ``checkpoint_*.pt`` or the
    ``{"model": ..., "network_record": ...}`` of earlier versions. Feature size and input channels
    are read off the stored patch embedding, the patch-merging order off the file's records, so no
    training override needs repeating. A file that records no order is refused, naming it.
    """
    state, order, info = read_checkpoint(ckpt_path)
    if _PATCH_EMBED not in state or _CONTRASTIVE not in state:
        raise ValueError(
            f"{ckpt_path} ({info['format']}) is not a checkpoint of the pre-training network: it has no "
            f"{_PATCH_EMBED if _PATCH_EMBED not in state else _CONTRASTIVE}; give models/model.pt or a "
            f"checkpoint_*.pt of this bundle's training."
        )
    feature_size, in_channels = (int(n) for n in state[_PATCH_EMBED].shape[:2])
    network = SwinSSLNet(
        in_channels=in_channels,
        feature_size=feature_size,
        contrastive_dim=int(state[_CONTRASTIVE].shape[0]),
        downsample=resolve_downsample(order),
    )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{ckpt_path} does not match the pre-training network (feature_size {feature_size}, in_channels "
            f"{in_channels}): {str(err).splitlines()[0]}"
        ) from err
    logger.info(
        "loaded %d tensors from %s (%s; feature_size %d, in_channels %d, patch merging %s from %s)",
        sum(not _is_extra_state(k) for k in state),
        ckpt_path,
        info["format"],
        feature_size,
        in_channels,
        order,
        info["where"],
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
