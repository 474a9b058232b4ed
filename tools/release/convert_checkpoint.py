"""Convert a Swin UNETR checkpoint from elsewhere into this project's format, with its patch-merging order recorded.

Reads every format the bundles' loader reads (``scripts/ensemble.py``: a raw state dict as in the
MONAI model zoo, the research code's ``{"state_dict": ..., "epoch", "best_acc"}``, ``{"model": ...}``,
``module.``-prefixed keys) and writes the plain state dict, as the bundles save ``models/model.pt``,
with each patch-merging layer's order record (``<layer>._extra_state``) embedded, atomically, never
over its input. The bundles then load the file under ``patch_merging: auto`` (as ``ckpt_path`` or
``pretrained_path``), and so do ``monai.bundle ckpt_export`` and ``monai.bundle.load`` without
``key_in_ckpt`` and any bare ``load_state_dict`` into a network built with
``scripts.patch_merging.resolve_downsample``.

The order comes from the file's own record, from the table of published files
(``scripts/known_checkpoints.py``, by md5) under ``--patch_merging auto``, or from
``--patch_merging legacy`` (trained with monai <= 1.4: every checkpoint published so far) /
``current`` (trained with monai >= 1.5). Nothing is guessed.

    python -m tools convert_checkpoint --input swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt \\
        --output bundles/swin_unetr_btcv_seg/models/model.pt --patch_merging legacy
"""

from __future__ import annotations

import os
from typing import Any

from tools.common.bundles import BTCV_DIR, use_bundle_scripts
from tools.common.cli import fire_command

__all__ = ["convert_checkpoint"]


def convert_checkpoint(input: str, output: str, patch_merging: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Write ``output`` = the input's state dict, its patch-merging order recorded in it (as ``models/model.pt``).

    Args:
        input: the checkpoint to convert (left untouched).
        output: the file to write; must not be ``input``; an existing file only with ``overwrite``.
        patch_merging: "auto" (the file's record or the published-file table), "legacy" or "current".
        overwrite: replace an existing ``output``.

    Returns what was read and written (paths, format, order, where the order comes from, tensor count).
    """
    input, output = os.fspath(input), os.fspath(output)
    if not os.path.isfile(input):
        raise FileNotFoundError(f"checkpoint not found: {input}")
    if os.path.exists(output):
        if os.path.realpath(output) == os.path.realpath(input) or os.path.samefile(output, input):
            raise ValueError(f"{output}: the output is the input checkpoint; write the converted file elsewhere")
        if not overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite True to replace it")
    scripts = use_bundle_scripts(BTCV_DIR)
    state, order, info = scripts.weights_format.read_checkpoint(input, patch_merging)
    converted = scripts.weights_format.recorded_state_dict(state, order)
    scripts.checkpoints.atomic_torch_save(converted, output)
    records = sum(k.endswith("._extra_state") for k in converted)
    return {
        "input": input,
        "format": info["format"],
        "patch_merging": order,
        "from": info["where"],
        "tensors": len(converted) - records,
        "records": records,
        "output": output,
    }


def _report(result: dict[str, Any]) -> str:
    return (
        f"read {result['input']} ({result['format']}); patch merging {result['patch_merging']} "
        f"(from {result['from']})\n"
        f"wrote {result['output']}: a state dict of {result['tensors']} tensors + {result['records']} "
        f"patch-merging records; load it with patch_merging 'auto'"
    )


if __name__ == "__main__":
    fire_command(convert_checkpoint, report=_report, errors=(ValueError, FileNotFoundError, FileExistsError))
