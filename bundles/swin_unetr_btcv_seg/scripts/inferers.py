# Generated from bundles/common/scripts/inferers.py: edit that, then run python -m tools sync_bundle_code
"""Network calls (sliding window, training forward) with mixed precision and a memory layout chosen for the hardware."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from torch import nn

from .allocator import reuse_cpu_memory
from .bf16_conv_guard import bf16_guard_note, guard_bf16_conv_gradients
from .bundle_logger import logger
from .precision import autocast_dtype
from .window_attention import reuse_attention_masks, trains_fused

__all__ = ["AutocastSimpleInferer", "AutocastSlidingWindowInferer", "autocast_dtype", "to_channels_last"]


def _call_in(dtype: torch.dtype | None, device_type: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` under autocast to ``dtype`` (None: none) on ``device_type``; tensor in float32."""
    if dtype is None:
        return call(*args, **kwargs)
    with torch.autocast(device_type=device_type, dtype=dtype):
        out = call(*args, **kwargs)
    return out.float() if isinstance(out, torch.Tensor) else out


def to_channels_last(network: nn.Module) -> int:
    """Convert ``network`` in place to channels-last 3D for faster CPU convolutions; return the norms swapped.

    oneDNN's Conv3d is faster on channels-last (NDHWC) tensors, but ``InstanceNorm3d``
    copies such tensors back to NCDHW, which costs more than the convolutions gain. Each
    ``InstanceNorm3d`` without running statistics is therefore replaced by ``GroupNorm`` with one
    group per channel: the same function (per sample and channel), with a channels-last kernel and
    the same parameter names, so state dicts still load. That kernel sums in float32, so results
    differ from the NCDHW path by rounding (about 1e-3 on normalised activations). Idempotent.
    """
    if getattr(network, "_channels_last_norms", None) is not None:
        return network._channels_last_norms
    swapped = 0
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
                norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    norm.weight, norm.bias = child.weight, child.bias
                setattr(module, name, norm)
                swapped += 1
    network.to(memory_format=torch.channels_last_3d)
    network._channels_last_norms = swapped
    return swapped


class AutocastSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that runs the network under autocast when ``autocast`` is true.

    MONAI's evaluators only autocast on CUDA; this inferer also covers CPUs with native bf16
    (see ``autocast_dtype``) and always returns float32, so softmax, inversion and argmax run at
    full precision. It works wherever a bundle's ``inferer`` is used (MONAI Label, MONAI Deploy).

    With ``channels_last`` true, a network given for CPU inference is first converted in place by
    ``to_channels_last`` (meant for inference-only configs; CUDA is left as it is). With
    ``reuse_cpu_memory`` true, the first CPU call applies ``allocator.reuse_cpu_memory``.
    """

    def __init__(
        self,
        *args: Any,
        autocast: bool = False,
        channels_last: bool = False,
        reuse_cpu_memory: bool = False,
        reuse_attention_masks: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.autocast = autocast
        self.channels_last = channels_last
        self.reuse_cpu_memory = reuse_cpu_memory
        self.reuse_attention_masks = reuse_attention_masks
        self._told: set[str] = set()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        device_type = "cuda" if inputs.is_cuda else "cpu"
        dtype = autocast_dtype(device_type) if self.autocast else None
        layout = ""
        if self.reuse_attention_masks and isinstance(network, nn.Module) and reuse_attention_masks(network):
            layout = ", Swin attention masks reused across windows"
        if self.channels_last and device_type == "cpu" and isinstance(network, nn.Module):
            layout += f", channels-last 3D ({to_channels_last(network)} InstanceNorm3d as GroupNorm)"
        if device_type not in self._told:
            self._told.add(device_type)
            if device_type == "cpu":
                reuse_cpu_memory(self.reuse_cpu_memory)
            logger.info(
                f"sliding-window inference on {device_type} in {dtype or torch.float32}{layout}"
                + ("" if dtype or not self.autocast else " (no native reduced-precision kernels here)")
            )
        return _call_in(dtype, device_type, super().__call__, inputs, network, *args, **kwargs)


class AutocastSimpleInferer(SimpleInferer):
    """``SimpleInferer`` for a trainer's forward: autocast on CPUs with native bf16 when ``autocast`` is true.

    MONAI's ``SupervisedTrainer(amp=True)`` autocasts (float16 with a gradient scaler) on CUDA only.
    This inferer adds the CPU case: where ``autocast_dtype("cpu")`` is bfloat16 (AVX-512 bf16 or AMX)
    the network runs under ``torch.autocast("cpu", bfloat16)`` and its output is returned in float32,
    so the loss is computed at full precision; bfloat16 has float32's range, so no scaler is needed.
    In bf16 the network's convolutions on inputs shallower than their kernel run in float32
    (``bf16_conv_guard``: oneDNN's bf16 weight gradient is wrong there on some CPUs).
    On CPUs without native bf16 (e.g. AVX2 only) and on CUDA (the trainer's own amp) it is a plain
    ``SimpleInferer``. ``description`` says how the forward ran (set at the first call), for logs and errors.
    """

    def __init__(self, autocast: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.autocast = autocast
        self.description: str | None = None

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        dtype = autocast_dtype("cpu") if self.autocast and not inputs.is_cuda else None
        if dtype is not None and isinstance(network, nn.Module):
            guard_bf16_conv_gradients(network)
        if self.description is None:
            where = "cuda" if inputs.is_cuda else "cpu"
            fused = not inputs.is_cuda and isinstance(network, nn.Module) and trains_fused(network)
            attention = "fused window attention" if fused else "MONAI's window attention"
            precision = dtype or "the trainer precision (amp on CUDA only)"
            self.description = f"on {where} in {precision}; {attention}"
            if dtype is not None and isinstance(network, nn.Module):
                self.description += "; " + bf16_guard_note()
            logger.info(f"training forward {self.description}")
        return _call_in(dtype, "cpu", super().__call__, inputs, network, *args, **kwargs)
