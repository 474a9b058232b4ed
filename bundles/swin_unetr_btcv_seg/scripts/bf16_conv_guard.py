# Generated from bundles/common/scripts/bf16_conv_guard.py: edit that, then run python -m tools sync_bundle_code
"""Convolutions whose bf16 weight gradient oneDNN gets wrong on a CPU run in float32 instead.

On CPUs with AVX-512 bf16 but no AMX (AMD EPYC of CPU families 25 and 26 among them), the oneDNN
kernel that torch uses for a bf16 ``Conv3d`` weight gradient reads memory it never wrote when the
input's depth (first spatial axis) is at least 2 and smaller than the kernel's depth, with
stride 1: a 3x3x3 convolution on a depth-2 input, as in SwinUNETR's bottleneck block
(``encoder10``) for 64-voxel-deep crops, or the first decoder convolution of the pre-training
network for 64 x 32 x 32 crops. The gradient it returns is garbage, and NaN when the freed memory
it reads held NaN. Forward and input gradient are right; 1x1 and strided convolutions, transposed
convolutions and deeper inputs are right. Such inputs are small (the network's coarsest level),
so computing those layers in float32 costs next to nothing.

``guard_bf16_conv_gradients`` converts a network in place (class swap, same parameters and state
dict) so that, while CPU autocast to bf16 records gradients, every ``Conv3d`` whose input is
shallower than its kernel runs in float32. ``bf16_weight_grad_fault`` tells whether this CPU
shows the fault (a tiny probe, run once), for the log.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = [
    "Bf16GuardedConv3d",
    "bf16_guard_note",
    "bf16_weight_grad_fault",
    "guard_bf16_conv_gradients",
    "needs_float32",
]


def _cpu_bf16_autocast() -> bool:
    """Whether CPU autocast to bfloat16 is on."""
    try:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    except TypeError:  # torch < 2.4 takes no device type here
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


def needs_float32(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a call whose bf16 weight gradient oneDNN may get wrong (see the module doc)."""
    return (
        x.dim() == 5
        and x.device.type == "cpu"
        and conv.weight.dtype == torch.float32  # autocast leaves float64 alone
        and torch.is_grad_enabled()
        and x.shape[2] < conv.kernel_size[0]
        and _cpu_bf16_autocast()
    )


class Bf16GuardedConv3d(nn.Conv3d):
    """``Conv3d`` that computes in float32 when its bf16 weight gradient could be wrong (``needs_float32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_float32(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_bf16_conv_gradients(network: nn.Module) -> int:
    """Convert every plain ``Conv3d`` of ``network`` in place to ``Bf16GuardedConv3d``; return how many.

    Idempotent; parameters, state dict and every float32 or inference result are unchanged.
    """
    converted = 0
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = Bf16GuardedConv3d
        if isinstance(module, Bf16GuardedConv3d):
            converted += 1
    return converted


@functools.lru_cache(maxsize=1)
def bf16_weight_grad_fault() -> bool:
    """Whether this CPU's bf16 ``Conv3d`` weight gradient is wrong for a depth-2 input (probe, float32 reference)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 2, 4, 4, generator=generator).bfloat16().float()
    weight = torch.randn(48, 48, 3, 3, 3, generator=generator).bfloat16().float()
    grad = torch.randn(1, 48, 2, 4, 4, generator=generator).bfloat16().float()
    reference = torch.nn.grad.conv3d_weight(x, weight.shape, grad, padding=1)
    w16 = weight.bfloat16().requires_grad_()
    torch.nn.functional.conv3d(x.bfloat16(), w16, padding=1).backward(grad.bfloat16())
    error = (w16.grad.float() - reference).abs().max() / reference.abs().max()
    return not bool(torch.isfinite(error)) or float(error) > 0.05


def bf16_guard_note() -> str:
    """One line for the training log: what the guard does, and whether this CPU shows the fault."""
    fault = "shows" if bf16_weight_grad_fault() else "does not show"
    return (
        "Conv3d on inputs shallower than the kernel in float32 (oneDNN's bf16 weight gradient is wrong there "
        f"on some CPUs; this one {fault} the fault)"
    )
