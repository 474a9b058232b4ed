# Generated from bundles/common/scripts/precision.py: edit that, then run python -m tools sync_bundle_code
"""Which reduced precision pays on a device: the one rule every bundle's autocast follows."""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The reduced precision worth using on ``device_type``, or None to stay in float32.

    float16 on CUDA. On CPU, bfloat16 only where oneDNN has native bf16 kernels (AVX-512 bf16 or
    AMX): elsewhere (e.g. AVX2-only CPUs) bf16 Conv3d falls back to a reference kernel that is
    far slower than float32.
    """
    if device_type == "cuda":
        return torch.float16
    if device_type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None
