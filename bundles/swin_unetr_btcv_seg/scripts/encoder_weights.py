# Generated from bundles/common/scripts/encoder_weights.py: edit that, then run python -m tools sync_bundle_code
"""Reading, checking and writing pre-trained Swin encoder weights (the ``swinViT`` of a SwinUNETR).

Formats read (recognised by ``weights_format.detect_weights_format``, re-exported here):

* ``"official"``: the official ``model_swinvit.pt`` (Tang et al. 2022): ``{"state_dict": {...}}``,
  keys ``module.patch_embed.*``, ``module.layers{1..4}.0.blocks.{0,1}.*``,
  ``module.layers{i}.0.downsample.*``, MLP layers named ``mlp.fc1``/``mlp.fc2`` (MONAI:
  ``mlp.linear1``/``mlp.linear2``), plus 8 SSL head tensors (``module.norm``,
  ``module.rotation_head``, ``module.contrastive_head``, ``module.convTrans3d``, weight and bias)
  that are dropped. Trained with the monai <= 1.4 ("legacy") patch-merging order.
* ``"swin_ssl_encoder"``: this project's SSL export, written by :func:`save_encoder`.
* ``"monai"``: MONAI-native keys: ``swinViT.*`` (optionally ``module.``-prefixed, optionally a
  full SwinUNETR state dict, whose decoder tensors are kept apart, or the SSL bundle's
  pre-training network, whose heads are dropped) or bare ``network.swinViT`` keys; the mapping
  may be the file itself (``models/model.pt`` of the bundles) or wrapped in ``{"state_dict": ...}``
  or ``{"model": ...}`` (the bundles' full-state training checkpoints).

SSL export format ``swin_ssl_encoder``, version 1 (a ``torch.save`` of a plain dict)::

    {
        "state_dict": {<official key>: tensor, ...},   # the 126 encoder tensors (fs 48), official
                                                       # names: "module." prefix, mlp.fc1/mlp.fc2;
                                                       # no head tensors
        "format": "swin_ssl_encoder",
        "format_version": 1,
        "patch_merging": "legacy" | "current",         # order the encoder was trained with
        "feature_size": int,                           # embed dim (48 for Swin UNETR Base)
        "in_channels": int,
    }

Because ``state_dict`` uses the official layout, ``SwinUNETR.load_from(torch.load(path))`` and
the research code read it like ``model_swinvit.pt``; the top-level record tells this bundle which
patch-merging order to build. Files are written atomically (temp file + ``os.replace``).

Whole-network files of the bundles carry the order in the state dict itself: each patch-merging
layer's ``<layer>._extra_state`` record (``weights_format``). ``models/model.pt`` is that state dict
as it is (as in the model zoo); the full-state training checkpoints (``checkpoint_*.pt``) hold it
under ``"model"`` next to the optimizer and trainer states and a top-level ``"network_record"``
(:class:`NetworkRecord`), as ``model.pt`` did before. Any of them is read here: its encoder, plus
the decoder of a whole SwinUNETR; the heads of this project's SSL network are dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .bundle_logger import logger
from .checkpoints import atomic_torch_save
from .patch_merging import merging_order_of, set_merging_order
from .weights_format import (
    _FORMAT_LABELS,
    AUTO,
    MERGING_ORDERS,
    MONAI,
    OFFICIAL,
    ORDER_DESCRIPTIONS,
    RECORD_KEY,
    SSL_FORMAT,
    SSL_FORMAT_VERSION,
    UNRECORDED,
    _few,
    _is_extra_state,
    _order_from_file,
    _tensor_mapping,
    _torch_load,
    checked_choice,
    detect_merging_order,
    detect_weights_format,
    settle_order,
)

__all__ = [
    "SSL_FORMAT",
    "SSL_FORMAT_VERSION",
    "OFFICIAL_HEAD_KEYS",
    "NetworkRecord",
    "save_encoder",
    "detect_weights_format",
    "detect_merging_order",
    "encoder_state_dict_from_file",
    "load_pretrained_encoder",
    "IN_CHANNEL_RULES",
    "adapt_in_channels",
]


# SSL heads stored next to the encoder in model_swinvit.pt (names after removing "module.")
OFFICIAL_HEAD_KEYS = (
    "norm.weight",
    "norm.bias",
    "rotation_head.weight",
    "rotation_head.bias",
    "contrastive_head.weight",
    "contrastive_head.bias",
    "convTrans3d.weight",
    "convTrans3d.bias",
)

# heads of the SSL bundle's pre-training network (scripts/model.py) next to its swinViT: dropped
_SSL_HEAD_PREFIXES = ("rotation_head.", "contrastive_head.", "reconstruction_head.")

# top-level modules of a full monai SwinUNETR other than swinViT
_SWINUNETR_DECODER_PREFIXES = tuple(
    f"{name}." for name in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "out")
) + tuple(f"decoder{i}." for i in range(1, 6))

# swinViT-relative keys that a Swin encoder may hold (window/depth/width are checked on loading)
_ENCODER_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)"
    r"|layers[1-4]\.0\.blocks\.\d+\."
    r"(norm[12]\.(weight|bias)|attn\.(relative_position_bias_table|relative_position_index)"
    r"|attn\.(qkv|proj)\.(weight|bias)|mlp\.linear[12]\.(weight|bias))"
    r"|layers[1-4]\.0\.downsample\.(reduction\.weight|norm\.(weight|bias)))$"
)

# How a file's patch embedding meets a network with more input channels (see adapt_in_channels)
STRICT = "strict"
REPEAT_SCALED = "repeat_scaled"
IN_CHANNEL_RULES = (STRICT, REPEAT_SCALED)


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _encoder_of(network: nn.Module) -> nn.Module:
    """The Swin encoder: ``network.swinViT`` for a SwinUNETR, else the network itself."""
    while isinstance(getattr(network, "module", None), nn.Module):  # DataParallel / DDP wrappers
        network = network.module
    encoder = getattr(network, "swinViT", None)
    if isinstance(encoder, nn.Module):
        return encoder
    if hasattr(network, "patch_embed") and hasattr(network, "layers1"):
        return network
    raise TypeError(f"{type(network).__name__} is neither a SwinUNETR (no .swinViT) nor a Swin encoder.")


def _encoder_shape(encoder: nn.Module) -> tuple[int, int]:
    """(feature_size, in_channels) of a Swin encoder, from its patch embedding."""
    proj = encoder.patch_embed.proj
    return int(proj.out_channels), int(proj.in_channels)


# ------------------------------------------------------------------------------------------ write


def save_encoder(network_or_swinvit: nn.Module, path: str, patch_merging: str | None = None) -> str:
    """Write the encoder of ``network_or_swinvit`` to ``path`` in the ``swin_ssl_encoder`` format, atomically.

    ``patch_merging`` defaults to the order read off the network (``merging_order_of``); giving an
    order that contradicts the network's layers raises ValueError. Returns ``path``.
    """
    encoder = _encoder_of(network_or_swinvit)
    try:
        network_order = merging_order_of(encoder)
    except ValueError:
        if patch_merging is None:
            raise
        network_order = None
    order = network_order if patch_merging is None else str(patch_merging).lower()
    if order not in MERGING_ORDERS:
        raise ValueError(f"patch_merging must be 'legacy' or 'current', got {patch_merging!r}.")
    if network_order is not None and order != network_order:
        raise ValueError(
            f"patch_merging {order!r} contradicts the network, whose downsample layers use the "
            f"{ORDER_DESCRIPTIONS[network_order]}."
        )
    if network_order is None:
        logger.warning("cannot read the patch-merging order off the network; recording %r as given.", order)
    feature_size, in_channels = _encoder_shape(encoder)
    state = {}
    for key, value in encoder.state_dict().items():
        if _is_extra_state(key):  # the official layout holds tensors only; the order is recorded below
            continue
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{key}"] = value.detach().cpu().clone()
    payload = {
        "state_dict": state,
        "format": SSL_FORMAT,
        "format_version": SSL_FORMAT_VERSION,
        "patch_merging": order,
        "feature_size": feature_size,
        "in_channels": in_channels,
    }
    path = os.fspath(path)
    atomic_torch_save(payload, path)
    logger.info(
        "saved %d encoder tensors to %s (format %s, patch merging %s, feature_size %d, in_channels %d)",
        len(state),
        path,
        _FORMAT_LABELS[SSL_FORMAT],
        ORDER_DESCRIPTIONS[order],
        feature_size,
        in_channels,
    )
    return path


# ------------------------------------------------------------------------------------------- read


def _sort_tensors(mapping: Mapping[str, torch.Tensor], fmt: str) -> tuple[dict, dict, list, list, list]:
    """Sort a file's tensors into ``(encoder, decoder, dropped heads, ignored decoder keys, unexpected keys)``;
    encoder keys ``swinViT``-relative, decoder keys network-relative."""
    keys = list(mapping)
    prefix = "module." if all(k.startswith("module.") for k in keys) else ""
    state: dict[str, torch.Tensor] = {}
    decoder: dict[str, torch.Tensor] = {}
    dropped, ignored, unexpected = [], [], []
    has_swinvit_prefix = fmt == MONAI and any(_strip(k, prefix).startswith("swinViT.") for k in keys)
    for key in keys:
        if _is_extra_state(key):  # a layer's patch-merging record: read into the order elsewhere
            continue
        name = _strip(key, prefix)
        if fmt in (OFFICIAL, SSL_FORMAT):
            if name in OFFICIAL_HEAD_KEYS:
                dropped.append(key)
                continue
            name = name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        elif has_swinvit_prefix:
            if not name.startswith("swinViT."):
                if name.startswith(_SWINUNETR_DECODER_PREFIXES):
                    ignored.append(key)
                    decoder[name] = mapping[key]
                elif name.startswith(_SSL_HEAD_PREFIXES):
                    dropped.append(key)
                else:
                    unexpected.append(key)
                continue
            name = name[len("swinViT.") :]
        if _ENCODER_KEY.match(name):
            state[name] = mapping[key]
        else:
            unexpected.append(key)
    return state, decoder, dropped, ignored, unexpected


def _file_record(obj: Mapping[str, Any], fmt: str, path: str, embed: torch.Tensor) -> dict[str, Any] | None:
    """The record a file carries beside its tensors (an SSL export's, checked against the patch embedding,
    or the top-level ``network_record`` of older checkpoints); None if it has none."""
    if fmt == SSL_FORMAT:
        record = {k: obj.get(k) for k in ("format_version", "patch_merging", "feature_size", "in_channels")}
        if (record["feature_size"], record["in_channels"]) != tuple(embed.shape[:2]):
            raise ValueError(
                f"{path}: the record says feature_size {record['feature_size']}, in_channels "
                f"{record['in_channels']} but patch_embed.proj.weight has shape {tuple(embed.shape)}."
            )
        return record
    if isinstance(obj.get(RECORD_KEY), Mapping):  # files written before the layers recorded their order
        return dict(obj[RECORD_KEY])
    return None


def encoder_state_dict_from_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the Swin encoder tensors of the file at ``path`` with MONAI ``swinViT``-relative keys.

    Returns ``(state_dict, info)``; ``info`` holds ``path``, ``format``, ``format_label``,
    ``patch_merging`` (None when the file records none), ``patch_merging_source`` ("record" |
    "official" | "unrecorded"), ``dropped_head_tensors``, ``ignored_decoder_tensors``,
    ``decoder_state`` (the SwinUNETR decoder tensors of a whole-network file, network-relative
    keys), ``num_tensors``, ``feature_size``, ``in_channels`` and ``record`` (the export's record,
    or the top-level ``network_record`` of older checkpoints, if any). Keys that are neither encoder
    tensors nor known head/decoder tensors raise ValueError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = _torch_load(path)
    fmt = detect_weights_format(obj, path)
    order, where = _order_from_file(obj, fmt, path)
    mapping = obj["state_dict"] if fmt == SSL_FORMAT else _tensor_mapping(obj)
    state, decoder, dropped, ignored, unexpected = _sort_tensors(mapping, fmt)
    if unexpected:
        raise ValueError(
            f"{path}: {len(unexpected)} unexpected tensor(s) in a {_FORMAT_LABELS[fmt]} file: {_few(unexpected)}. "
            f"Only Swin encoder tensors (and known SSL head / SwinUNETR decoder tensors) are accepted; "
            f"export an SSL model's encoder with save_encoder()."
        )
    if "patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: no patch_embed.proj.weight tensor: not a complete Swin encoder.")
    if dropped:
        logger.info("%s: dropped %d SSL head tensor(s): %s", path, len(dropped), _few(dropped, 8))
    embed = state["patch_embed.proj.weight"]
    record = _file_record(obj, fmt, path, embed)
    info = {
        "path": path,
        "format": fmt,
        "format_label": _FORMAT_LABELS[fmt],
        "patch_merging": order,
        "patch_merging_source": where,
        "dropped_head_tensors": len(dropped),
        "ignored_decoder_tensors": len(ignored),
        "decoder_state": decoder,
        "num_tensors": len(state),
        "feature_size": int(embed.shape[0]),
        "in_channels": int(embed.shape[1]),
        "record": record,
    }
    return state, info


# ------------------------------------------------------------------------------------------- load


def _shape_problems(encoder: nn.Module, state: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> str | None:
    """A readable description of missing / unexpected / mis-shaped tensors, or None if they fit."""
    expected = {k: v for k, v in encoder.state_dict().items() if not _is_extra_state(k)}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    mismatched = [
        f"swinViT.{k} expected {tuple(v.shape)} got {tuple(state[k].shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or extra or mismatched):
        return None
    net_fs, net_in = _encoder_shape(encoder)
    parts = []
    if net_fs != info["feature_size"]:
        parts.append(f"feature_size {net_fs} network vs file made for feature_size {info['feature_size']}")
    if net_in != info["in_channels"]:
        parts.append(f"in_channels {net_in} network vs file made for in_channels {info['in_channels']}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched, 3)}")
    if missing:
        parts.append(f"{len(missing)} encoder tensor(s) missing from the file: {_few(f'swinViT.{k}' for k in missing)}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) the network does not have: {_few(f'swinViT.{k}' for k in extra)}")
    return "; ".join(parts)


def adapt_in_channels(state: dict[str, torch.Tensor], in_channels: int, source: str = "") -> dict[str, torch.Tensor]:
    """Widen a single-channel patch embedding to ``in_channels`` inputs (the "repeat_scaled" rule).

    The kernel ``patch_embed.proj.weight`` of shape (F, 1, p, p, p) is repeated over the channel
    axis and divided by ``in_channels``: an input whose channels are all equal to a single-channel
    image gives exactly that image's embedding. Every other tensor is kept as it is. A file with
    more than one input channel is returned unchanged (its shape is then checked as usual).
    """
    weight = state["patch_embed.proj.weight"]
    if weight.shape[1] != 1 or in_channels == 1:
        return state
    adapted = dict(state)
    adapted["patch_embed.proj.weight"] = weight.repeat(1, in_channels, 1, 1, 1) / in_channels
    logger.info(
        "%s: adapted the single-channel patch embedding to %d input channels (rule %s: kernel repeated "
        "over the channels and scaled by 1/%d)",
        source or "encoder weights",
        in_channels,
        REPEAT_SCALED,
        in_channels,
    )
    return adapted


def _decoder_of(network: nn.Module) -> nn.Module | None:
    """The SwinUNETR holding the encoder (DataParallel/DDP unwrapped), if ``network`` is one, else None."""
    while isinstance(getattr(network, "module", None), nn.Module):
        network = network.module
    return network if isinstance(getattr(network, "swinViT", None), nn.Module) else None


def _load_decoder(network: nn.Module, decoder: Mapping[str, torch.Tensor]) -> str:
    """Load a whole-network file's decoder tensors where every one fits; return what happened, for the log.

    All or nothing: every decoder tensor of the network must be in the file with its shape (e.g.
    not when out_channels differ), else the decoder keeps its initialisation.
    """
    net = _decoder_of(network)
    if net is None:
        return f"ignored {len(decoder)} decoder tensors (the network has no SwinUNETR decoder)"
    expected = {
        k: v
        for k, v in net.state_dict().items()
        if k.startswith(_SWINUNETR_DECODER_PREFIXES) and not _is_extra_state(k)
    }
    missing = [k for k in expected if k not in decoder]
    extra = [k for k in decoder if k not in expected]
    mismatched = [
        f"{k} {tuple(decoder[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in decoder and decoder[k].shape != v.shape
    ]
    if missing or extra or mismatched:
        if mismatched:
            why = _few(mismatched, 2)
        else:
            why = f"missing {_few(missing, 2)}" if missing else f"extra {_few(extra, 2)}"
        return f"decoder NOT loaded: its {len(decoder)} tensors do not all fit the network ({why}); encoder only"
    with torch.no_grad():
        for key, value in net.state_dict().items():
            if key in decoder:
                value.copy_(decoder[key])
    return f"and {len(decoder)}/{len(expected)} decoder tensors (whole fine-tuned network: every shape fits)"


def load_pretrained_encoder(
    network: nn.Module, pretrained_path: str | None, patch_merging: str = AUTO, in_channel_rule: str = STRICT
) -> nn.Module:
    """Load all Swin encoder tensors of ``pretrained_path`` into ``network.swinViT``; return ``network``.

    Empty/None path: nothing is loaded (training from scratch). Raises FileNotFoundError for a
    missing file and ValueError if any encoder tensor is missing or mis-shaped, or if the
    network's patch-merging order differs from the file's. ``patch_merging`` ("auto", "legacy",
    "current") may only set the order of a MONAI-native file without a record; under "auto" such a
    file must be a published one (``known_checkpoints``), else it is refused (UnrecordedOrderError).
    ``in_channel_rule`` "repeat_scaled" lets single-channel weights initialise a network with
    more input channels (see :func:`adapt_in_channels`); "strict" (default) requires equal counts.

    A whole fine-tuned SwinUNETR (e.g. the research code's ``{"state_dict": ..., "epoch", "best_acc"}``)
    also loads its decoder where every decoder tensor fits the network (not when out_channels
    differ); the log line says which (counts).
    """
    if not pretrained_path:
        logger.info("no pretrained_path: training from scratch")
        return network
    path = os.fspath(pretrained_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained encoder weights not found: {path}")
    choice = checked_choice(patch_merging)
    if in_channel_rule not in IN_CHANNEL_RULES:
        raise ValueError(f"in_channel_rule must be one of {IN_CHANNEL_RULES}; got {in_channel_rule!r}.")
    encoder = _encoder_of(network)
    net_fs, net_in = _encoder_shape(encoder)
    state, info = encoder_state_dict_from_file(path)
    if in_channel_rule == REPEAT_SCALED and info["feature_size"] == net_fs:  # else the shape check names the width
        state = adapt_in_channels(state, net_in, path)

    unrecorded = info["patch_merging_source"] == UNRECORDED
    file_order, where = settle_order(info["patch_merging"], info["patch_merging_source"], choice, path)
    if unrecorded and choice != AUTO:
        logger.info("%s: patch merging set to %r by the patch_merging setting", path, choice)
    elif choice != AUTO and choice != file_order:
        raise ValueError(
            f"patch_merging {choice!r} contradicts {path} ({info['format_label']}, {where}), whose encoder was "
            f"trained with the {ORDER_DESCRIPTIONS[file_order]}; set patch_merging to 'auto' or {file_order!r}."
        )
    info["patch_merging"] = file_order

    problems = _shape_problems(encoder, state, info)
    if problems:
        raise ValueError(f"cannot load the encoder weights of {path} ({info['format_label']}): {problems}.")

    network_order = merging_order_of(encoder)
    if network_order != file_order:
        raise ValueError(
            f"{path} ({info['format_label']}) was trained with the {ORDER_DESCRIPTIONS[file_order]}, but the "
            f"network's downsample layers use the {ORDER_DESCRIPTIONS[network_order]}: the tensors would "
            f"load but the encoder would compute a different function. Build the network with "
            f"downsample=resolve_downsample(patch_merging, pretrained_path) (patch_merging 'auto' or {file_order!r})."
        )

    encoder.load_state_dict(state, strict=True)
    total = sum(not _is_extra_state(k) for k in encoder.state_dict())
    extras = [f"dropped {info['dropped_head_tensors']} head tensors"] if info["dropped_head_tensors"] else []
    if net_in != info["in_channels"]:
        extras.append(
            f"patch embedding adapted from {info['in_channels']} to {net_in} input channels by {REPEAT_SCALED}"
        )
    if info["decoder_state"]:
        extras.append(_load_decoder(network, info["decoder_state"]))
    logger.info(
        "loaded %d/%d encoder tensors from %s (format %s, patch merging %s from %s%s)",
        len(state),
        total,
        path,
        info["format_label"],
        ORDER_DESCRIPTIONS[file_order],
        where,
        "".join(f", {e}" for e in extras),
    )
    return network


# ----------------------------------------------------------------------------------------- record


class NetworkRecord:
    """Checkpointable record of how the network was built, for ignite's ``CheckpointSaver``.

    ``NetworkRecord(network).state_dict()`` is ``{"patch_merging": ..., "feature_size": ...,
    "format_version": 1}``; saved under ``"network_record"`` next to ``"model"``, it lets
    ``detect_merging_order`` (and so ``resolve_downsample("auto", ckpt)``) rebuild the right order.
    """

    def __init__(self, network: nn.Module):
        encoder = _encoder_of(network)
        self._network = network
        self._record = {
            "patch_merging": merging_order_of(encoder),
            "feature_size": _encoder_shape(encoder)[0],
            "format_version": SSL_FORMAT_VERSION,
        }

    def state_dict(self) -> dict[str, Any]:
        """The record: patch_merging, feature_size, format_version."""
        return dict(self._record)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take a record read from a checkpoint (top-level ``network_record``, written before the layers
        carried their own): the network's patch-merging layers are set to its order; a network whose
        layers cannot switch (monai's own ``PatchMerging``) must already have it."""
        order = state_dict.get("patch_merging")
        if order != self._record["patch_merging"]:
            if order not in MERGING_ORDERS or not set_merging_order(self._network, order):
                raise ValueError(
                    f"the checkpoint's network_record says patch merging {order!r}, but this network uses the "
                    f"{ORDER_DESCRIPTIONS[self._record['patch_merging']]}: rebuild it with "
                    f"resolve_downsample('auto', <checkpoint>)."
                )
        self._record = dict(state_dict)
