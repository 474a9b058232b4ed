"""Sliding-window inference with mixed precision where the hardware makes it pay."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

from .bundle_logger import logger

__all__ = ["AutocastSlidingWindowInferer", "autocast_dtype"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The reduced precision worth using on ``device_type``, or None to stay in float32.

    float16 on CUDA. On CPU, bfloat16 only where oneDNN has native bf16 kernels (AVX-512 bf16 or
    AMX): elsewhere (e.g. AVX2-only CPUs) bf16 Conv3d falls back to a reference kernel that is
    about 100x slower than float32.
    """
    if device_type == "cuda":
        return torch.float16
    if device_type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


class AutocastSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that runs the network under autocast when ``autocast`` is true.

    MONAI's evaluators only autocast on CUDA; this inferer also covers CPUs with native bf16
    (see ``autocast_dtype``) and always returns float32, so softmax, inversion and argmax run at
    full precision. It works wherever a bundle's ``inferer`` is used (MONAI Label, MONAI Deploy).
    """

    def __init__(self, *args: Any, autocast: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocast = autocast
        self._told: set[str] = set()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        device_type = "cuda" if inputs.is_cuda else "cpu"
        dtype = autocast_dtype(device_type) if self.autocast else None
        if device_type not in self._told:
            self._told.add(device_type)
            logger.info(f"sliding-window inference on {device_type} in {dtype or torch.float32}"
                        + ("" if dtype or not self.autocast else " (no native reduced-precision kernels here)"))
        if dtype is None:
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = super().__call__(inputs, network, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out
