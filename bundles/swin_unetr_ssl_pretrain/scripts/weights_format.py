# Generated from bundles/common/scripts/weights_format.py: edit that, then run python -m tools sync_bundle_code
"""What a Swin weights file is: its format, and the patch-merging order it was trained with.

The lowest layer of the weight code: it imports no other module of this package except the
logger and ``known_checkpoints`` (the table of published files). ``patch_merging`` (building the
layers), ``encoder_weights`` (loading and writing encoder tensors) and ``ensemble`` (inference
networks) build on it, so imports go one way: weights_format <- patch_merging <- encoder_weights.
The encoder formats are described in ``encoder_weights``, the orders in ``patch_merging``; whole
networks are read by :func:`read_checkpoint`, in every layout a network is saved in (a raw state
dict, as the bundles' ``models/model.pt``; ``{"model": ...}``, as their full-state checkpoints;
``{"state_dict": ...}``; ``module.`` prefixes).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from .bundle_logger import logger
from .known_checkpoints import known_checkpoint

__all__ = [
    "LEGACY",
    "CURRENT",
    "AUTO",
    "MERGING_ORDERS",
    "ORDER_DESCRIPTIONS",
    "SSL_FORMAT",
    "SSL_FORMAT_VERSION",
    "RECORD_KEY",
    "EXTRA_STATE_SUFFIX",
    "ORDER_RECORD_VERSION",
    "ORDER_CODES",
    "order_record",
    "order_of_record",
    "detect_weights_format",
    "detect_merging_order",
    "settle_order",
    "checked_choice",
    "UnrecordedOrderError",
    "unrecorded_order_error",
    "UnreadableWeightsError",
    "checked_torch_file",
    "read_checkpoint",
    "recorded_state_dict",
]

# Patch-merging orders (see patch_merging): the values a weights file records as "patch_merging"
LEGACY = "legacy"
CURRENT = "current"
AUTO = "auto"
MERGING_ORDERS = (LEGACY, CURRENT)
ORDER_DESCRIPTIONS = {LEGACY: "legacy = monai<=1.4 order", CURRENT: "current = monai>=1.5 'merging' order"}

# Weights file formats (described in encoder_weights) and the checkpoint key of a network record
SSL_FORMAT = "swin_ssl_encoder"
SSL_FORMAT_VERSION = 1
OFFICIAL = "official"
MONAI = "monai"
RECORD_KEY = "network_record"
# Where a file's patch-merging order comes from (see settle_order); OFFICIAL is the official layout
RECORD = "record"
PUBLISHED = "published"
SETTING = "setting"
UNRECORDED = "unrecorded"
# state-dict key suffix of a module's extra state (torch's get_extra_state): the patch-merging
# layers of this project record their order there (patch_merging.RecordedPatchMerging)
EXTRA_STATE_SUFFIX = "_extra_state"
# The order record of a patch-merging layer ("<layer>._extra_state"), version 2: an int64 tensor
# [ORDER_RECORD_VERSION, code] with one code per order. A tensor of fixed shape (2,), so every
# state-dict consumer (monai's copy_model_state, hence monai.bundle.load, CheckpointLoader with
# strict_shape=False, MONAI Label) handles it like any other entry, and a shape-filtered copy always
# copies it, whichever order either side has. Version 1 (files written before) was a dict
# {"patch_merging": "legacy" | "current", "format_version": 1}; it is still read.
ORDER_RECORD_VERSION = 2
ORDER_CODES = {LEGACY: 1, CURRENT: 2}
_ORDERS_BY_CODE = {code: order for order, code in ORDER_CODES.items()}

_FORMAT_LABELS = {
    OFFICIAL: "official model_swinvit.pt",
    SSL_FORMAT: f"{SSL_FORMAT} v{SSL_FORMAT_VERSION} export",
    MONAI: "MONAI-native",
}

_MAX_LISTED = 6
_DDP_PREFIX = "module."


def _few(items, limit: int = _MAX_LISTED) -> str:
    """Comma-separated first ``limit`` items, with a count of the rest."""
    items = list(items)
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class UnreadableWeightsError(ValueError):
    """A weights or checkpoint file cannot be read at all (missing, truncated, not a PyTorch file)."""


def _unreadable(path: str, err: BaseException) -> UnreadableWeightsError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UnreadableWeightsError(
        f"{path}: cannot be read as a PyTorch weights file: truncated (e.g. an interrupted "
        f"copy or download) or not a torch.save file ({type(err).__name__}: {first})"
    )


def checked_torch_file(path: str, what: str = "checkpoint") -> str:
    """``path``, after a cheap check that it is a whole PyTorch file; an error naming it otherwise.

    ``torch.save`` writes a zip archive whose directory sits at its end: a truncated file has none.
    Files of the older, non-zip format are only checked to exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # a pickle: torch.save(..., _use_new_zipfile_serialization=False)
        if not legacy:
            raise _unreadable(path, ValueError("no zip directory at the end of the file"))
    return path


def _torch_load(path: str) -> Any:
    """``torch.load`` on CPU, tensors-and-plain-types only where the file allows it.

    A file that cannot be read at all raises ``UnreadableWeightsError`` naming it, not PyTorch's
    bare "failed finding central directory".
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        logger.warning(
            "%s holds Python objects that weights_only loading refuses (%s); loading it with full "
            "unpickling: only do this with files you trust.",
            path,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err2:
            raise _unreadable(path, err2) from err2
    except (RuntimeError, EOFError, OSError) as err:
        raise _unreadable(path, err) from err


def _is_extra_state(key: Any) -> bool:
    return isinstance(key, str) and key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


def _is_tensor_mapping(obj: Any) -> bool:
    """A non-empty state dict: tensors, plus any modules' ``_extra_state`` entries (dicts in older files)."""
    return (
        isinstance(obj, Mapping)
        and any(not _is_extra_state(k) for k in obj)
        and all(isinstance(v, torch.Tensor) or _is_extra_state(k) for k, v in obj.items())
    )


def order_record(order: str) -> torch.Tensor:
    """The record of ``order`` that a patch-merging layer keeps in the state dict: int64 ``[2, code]``."""
    if order not in ORDER_CODES:
        raise ValueError(f"patch_merging must be one of {MERGING_ORDERS}; got {order!r}.")
    return torch.tensor([ORDER_RECORD_VERSION, ORDER_CODES[order]], dtype=torch.int64)


def _record_values(record: Any) -> list[int] | None:
    """``[version, code]`` of a version-2 record (any integer-valued tensor of shape (2,)), else None."""
    if not isinstance(record, torch.Tensor) or tuple(record.shape) != (2,) or record.is_complex():
        return None
    values = record.detach().cpu().tolist()
    if not all(float(v).is_integer() for v in values):
        return None
    return [int(v) for v in values]


def order_of_record(record: Any, source: str = "") -> str:
    """The order ("legacy" | "current") of a patch-merging layer's record; ValueError naming ``source`` otherwise.

    Reads version 2 (int64 tensor ``[2, code]``, codes in ``ORDER_CODES``) and version 1 (the dict
    ``{"patch_merging": order, "format_version": 1}`` of earlier files). ``source`` (file, entry)
    starts the error message.
    """
    codes = ", ".join(f"{code} = {order}" for order, code in ORDER_CODES.items())
    where = f"{source}: " if source else ""
    if isinstance(record, Mapping):
        version = record.get("format_version")
        if version != 1 or record.get("patch_merging") not in MERGING_ORDERS:
            raise ValueError(
                f"{where}patch-merging record {record!r} is not readable: a dict record must be "
                f'{{"patch_merging": one of {MERGING_ORDERS}, "format_version": 1}}.'
            )
        return record["patch_merging"]
    values = _record_values(record)
    if values is None or values[0] != ORDER_RECORD_VERSION or values[1] not in _ORDERS_BY_CODE:
        if isinstance(record, torch.Tensor):
            values = record.tolist() if record.numel() <= 8 else f"shape {tuple(record.shape)}"
            what = f"tensor {values} ({record.dtype})"
        else:
            what = f"{type(record).__name__} {record!r}"
        raise ValueError(
            f"{where}patch-merging record {what} is not readable: expected an int64 tensor "
            f"[{ORDER_RECORD_VERSION}, code] with code {codes} (or a version-1 dict record)."
        )
    return _ORDERS_BY_CODE[values[1]]


def _embedded_order(mapping: Mapping[str, Any], source: str) -> str | None:
    """The patch-merging order recorded inside a state dict by its downsample layers, or None."""
    orders = {
        order_of_record(v, f"{source}: {k}")
        for k, v in mapping.items()
        if _is_extra_state(k) and k.rsplit(".", 2)[-2] == "downsample"
    }
    if len(orders) > 1:
        raise ValueError(
            f"{source}: the downsample layers record different patch-merging orders {sorted(map(str, orders))}."
        )
    return orders.pop() if orders else None


def _tensor_mapping(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The mapping of tensors inside ``obj`` (bare, or under "state_dict" / "model"), or None."""
    if not isinstance(obj, Mapping):
        return None
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if _is_tensor_mapping(inner):
            return inner
    return obj if _is_tensor_mapping(obj) else None


def _key_style(keys: list[str]) -> str | None:
    """ "official", "monai" or None from the key names of a tensor mapping."""
    if all(k.startswith("module.") for k in keys):
        keys = [k[len("module.") :] for k in keys]
    if any(k.startswith("swinViT.") for k in keys):
        return MONAI
    if any(".mlp.fc1." in k for k in keys) and not any(".mlp.linear1." in k for k in keys):
        return OFFICIAL
    if "patch_embed.proj.weight" in keys and any(".mlp.linear1." in k for k in keys):
        return MONAI  # a bare network.swinViT state dict
    return None


def detect_weights_format(obj: Any, source: str = "<in-memory object>") -> str:
    """Return "swin_ssl_encoder", "official" or "monai" for a loaded weights object.

    ``source`` (the file name) is used in the ValueError raised for anything else.
    """
    if isinstance(obj, Mapping) and obj.get("format") == SSL_FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > SSL_FORMAT_VERSION:
            raise ValueError(
                f"{source}: {SSL_FORMAT} format_version {version!r} is not supported by this code "
                f"(reads up to {SSL_FORMAT_VERSION})."
            )
        if not _is_tensor_mapping(obj.get("state_dict")):
            raise ValueError(f"{source}: {SSL_FORMAT} file without a 'state_dict' of tensors.")
        return SSL_FORMAT
    mapping = _tensor_mapping(obj)
    style = _key_style(list(mapping)) if mapping is not None else None
    if style is None:
        if mapping is None:
            what = f"a {type(obj).__name__}" + (f" with keys {_few(obj)}" if isinstance(obj, Mapping) else "")
        else:
            what = f"a state dict with keys {_few(mapping)}"
        raise ValueError(
            f"{source} is not Swin encoder weights (expected the official model_swinvit.pt, a "
            f"{SSL_FORMAT} export or a MONAI SwinUNETR/swinViT state dict); it holds {what}."
        )
    return style


def _order_from_file(obj: Any, fmt: str, source: str) -> tuple[str | None, str]:
    """(order, where it comes from: "record" | "official" | "unrecorded") for a loaded file.

    An unrecorded file (a MONAI-native state dict without a record) gives ``(None, "unrecorded")``:
    :func:`settle_order` decides from the ``patch_merging`` setting and the published-file table.
    """
    if fmt == SSL_FORMAT:
        order, where = obj.get("patch_merging"), RECORD
    elif fmt == OFFICIAL:
        return LEGACY, OFFICIAL
    elif (embedded := _embedded_order(_tensor_mapping(obj) or {}, source)) is not None:
        order, where = embedded, RECORD
    elif isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping):
        order, where = obj[RECORD_KEY].get("patch_merging"), RECORD
    else:
        return None, UNRECORDED
    if order not in MERGING_ORDERS:
        raise ValueError(f"{source}: recorded patch_merging {order!r} is not one of {MERGING_ORDERS}.")
    return order, where


class UnrecordedOrderError(ValueError):
    """A weights file records no patch-merging order, is not a known published file, and none was set."""


def unrecorded_order_error(path: str) -> UnrecordedOrderError:
    """The error for a file whose patch-merging order nothing tells, under ``patch_merging: auto``."""
    return UnrecordedOrderError(
        f"{path}: this checkpoint does not record the patch-merging order it was trained with, and it is "
        f"not a known published file (scripts/known_checkpoints.py), so 'auto' cannot tell the order and will "
        f"not guess it: set patch_merging to 'legacy' (trained with monai <= 1.4) or 'current' (trained with "
        f"monai >= 1.5); every Swin UNETR checkpoint published so far is legacy. Or convert the file once "
        f"with tools/convert_checkpoint.py (project repository), which records the order in it."
    )


def checked_choice(patch_merging: Any) -> str:
    """The ``patch_merging`` setting, lower-cased: "auto", "legacy" or "current"; ValueError otherwise."""
    choice = str(patch_merging).strip().lower()
    if choice not in (AUTO, *MERGING_ORDERS):
        raise ValueError(f"patch_merging must be one of 'auto', 'legacy', 'current'; got {patch_merging!r}.")
    return choice


def settle_order(order: str | None, where: str, patch_merging: str, path: str) -> tuple[str, str]:
    """(order, where) of a file once the ``patch_merging`` setting is applied to what it records.

    A record or the official layout is kept as it is (callers decide what a contradicting setting
    means). An unrecorded file takes an explicit "legacy"/"current" (``where`` = "setting"); under
    "auto" it is looked up by md5 in ``known_checkpoints.KNOWN_CHECKPOINTS`` (``where`` =
    "published"), else refused with :class:`UnrecordedOrderError` naming ``path``.
    """
    choice = checked_choice(patch_merging)
    if where != UNRECORDED:
        return order, where
    if choice != AUTO:
        return choice, SETTING
    entry = known_checkpoint(path) if os.path.isfile(path) else None
    if entry is None:
        raise unrecorded_order_error(path)
    logger.info(
        "%s is the published %s (md5 %s, source: %s): patch merging %s",
        path,
        entry["what"],
        entry["md5"],
        entry["source"],
        ORDER_DESCRIPTIONS[entry["patch_merging"]],
    )
    return entry["patch_merging"], PUBLISHED


def detect_merging_order(path: str, patch_merging: str = AUTO) -> str:
    """Return the patch-merging order ("legacy" | "current") that the weights at ``path`` were trained with.

    Official file -> "legacy"; ``swin_ssl_encoder`` export, a state dict whose downsample layers
    carry their record (``<layer>._extra_state``, written since this format) or a checkpoint with
    a top-level "network_record" (written before) -> the recorded order. A MONAI-native state dict
    without a record takes an explicit ``patch_merging``; under "auto" it must be a published file
    listed in ``known_checkpoints`` (-> its order), else :class:`UnrecordedOrderError` is raised:
    the order is never guessed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = _torch_load(path)
    order, where = _order_from_file(obj, detect_weights_format(obj, path), path)
    return settle_order(order, where, patch_merging, path)[0]


# ------------------------------------------------------------------- whole-network checkpoints


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
    if state is None or _key_style(list(state)) is None:
        if state is not None:
            what = f"a state dict with keys {_few(state)}"
        else:
            what = f"keys {_few(obj)}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ValueError(
            f"{path}: not a checkpoint of a Swin UNETR network: expected its state dict as it is, or under "
            f"'model' or 'state_dict' ({{'model': state dict, ...}}); it holds {what}"
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
