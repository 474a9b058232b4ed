# Generated from bundles/common/scripts/window_attention.py: edit that, then run python -m tools sync_bundle_code
"""Swin window attention without MONAI's full-size mask copies, for inference and for CPU training.

MONAI's ``WindowAttention`` (monai 1.6, flash-attention path, used when no gradient is recorded)
expands the relative position bias plus the shifted-window mask to one float32 tensor per window of
every sample, ``[batch x windows, heads, tokens, tokens]``, and casts it to the activations' dtype: a
full-size tensor written twice per stage-1 block, and ``compute_mask`` rebuilds the shifted-window
mask at every forward. On a CPU those copies are a large share of the forward (the model cards give
the profiles).

``reuse_attention_masks`` converts a network in place (class swap, no new parameters, same state
dict) so that, while no gradient is recorded:

* each Swin stage builds its shifted-window mask once per padded input size and reuses it;
* each attention block adds its relative position bias to that mask once per (mask, dtype, bias
  version), ``[windows, heads, tokens, tokens]`` in the activations' dtype, and runs
  ``scaled_dot_product_attention`` per sample against it, so no per-sample copy is made.

Under autograd (training) the layers run MONAI's own code and drop their caches. The result equals
MONAI's flash-attention path (the same kernel on the same operands, sample by sample).

Training on a CPU: MONAI's attention under autograd is the plain math path, ``softmax(q k^T + bias
+ mask) v``, with five to six full-size ``[windows, heads, tokens, tokens]`` tensors per call, in
float32 even under bf16 autocast (the float32 bias promotes the scores). On a CPU, those copies,
adds and softmaxes are most of a pre-training step (the model cards give the profiles).
``fast_window_attention`` additionally switches on, for gradients on a CPU, one autograd function
(``WindowAttentionFunction``) that writes bias + mask into one score tensor in the activations'
dtype, runs the softmax in place and keeps only the probabilities for the backward pass, whose
softmax gradient is also computed in place. Same mathematics: its float64 output and gradients
equal MONAI's (tested), in float32 they agree to rounding; in bf16 the scores are kept in bf16
(the softmax itself accumulates in float32). On CUDA, and with attention dropout, MONAI's own code
runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, WindowAttention, compute_mask, get_window_size
from torch import nn

__all__ = [
    "MaskReusingBasicLayer",
    "MaskReusingWindowAttention",
    "WindowAttentionFunction",
    "fast_window_attention",
    "reuse_attention_masks",
    "trains_fused",
]


# MONAI masks shifted-window pairs with -100: exp(-100) is a subnormal float, and subnormals make the
# softmax much slower on CPUs. Training scales the mask by 100, so masked pairs get exactly 0
# instead of ~4e-44 of the weight.
HARD_MASK_SCALE = 100.0


class WindowAttentionFunction(torch.autograd.Function):
    """``softmax(scale q k^T + bias + mask_scale mask) v`` over windows: one score tensor per call, softmax in place.

    ``q, k, v``: ``[samples x windows, heads, tokens, head_dim]``; ``bias``: ``[heads, tokens, tokens]``
    (float32, gets a gradient); ``mask``: ``[windows, tokens, tokens]`` or None (no gradient).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, mask_scale=1.0):
        b, heads, n, d = q.shape
        windows = 1 if mask is None else mask.shape[0]
        additive = bias.to(q.dtype).unsqueeze(0)
        if mask is not None:  # [windows, heads, n, n], once per call; the mask's 0 entries keep the bias exact
            additive = torch.add(additive, mask.to(q.dtype).unsqueeze(1), alpha=mask_scale)
        scores = torch.empty((b // windows, windows, heads, n, n), dtype=q.dtype, device=q.device)
        scores.copy_(additive)  # broadcast over the samples
        q3, k3, v3 = (t.reshape(b * heads, n, d) for t in (q, k, v))
        probs = scores.view(b * heads, n, n).baddbmm_(q3, k3.transpose(1, 2), alpha=scale)
        torch.softmax(probs, -1, out=probs)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale, ctx.windows, ctx.shape, ctx.bias_dtype = scale, windows, (b, heads, n, d), bias.dtype
        return torch.bmm(probs, v3).view(b, heads, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, probs = ctx.saved_tensors
        b, heads, n, d = ctx.shape
        grad_out = grad_out.reshape(b * heads, n, d).to(q3.dtype)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        grad_scores = torch.bmm(grad_out, v3.transpose(1, 2))
        torch.ops.aten._softmax_backward_data.out(grad_scores, probs, -1, probs.dtype, grad_input=grad_scores)
        grad_bias = None
        if ctx.needs_input_grad[3]:  # summed in the scores' dtype (float accumulation), returned in the bias's
            grad_bias = grad_scores.view(b // ctx.windows, ctx.windows, heads, n, n).sum((0, 1)).to(ctx.bias_dtype)
        grad_q = torch.bmm(grad_scores, k3).mul_(ctx.scale).view(b, heads, n, d)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q3).mul_(ctx.scale).view(b, heads, n, d)
        return grad_q, grad_k, grad_v.view(b, heads, n, d), grad_bias, None, None, None


class MaskReusingBasicLayer(BasicLayer):
    """A 3D Swin stage that keeps its shifted-window mask for the last padded input size (inference only)."""

    _mask_key: tuple | None = None
    _mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dim() != 5 or getattr(self, "use_hyena", False):
            self._mask_key = self._mask = None
            return super().forward(x)
        b, _, d, h, w = x.shape
        window_size, shift_size = get_window_size((d, h, w), self.window_size, self.shift_size)
        padded = [math.ceil(s / ws) * ws for s, ws in zip((d, h, w), window_size)]
        key = (tuple(padded), tuple(window_size), tuple(shift_size), x.device)
        if key != self._mask_key:
            self._mask_key, self._mask = key, compute_mask(padded, window_size, shift_size, x.device)
        x = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x, self._mask)
        x = x.view(b, d, h, w, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


class MaskReusingWindowAttention(WindowAttention):
    """Window attention that, without autograd, keeps bias + mask per mask and attends sample by sample."""

    _bias_key: tuple | None = None
    _bias_mask: torch.Tensor | None = None
    _bias: torch.Tensor | None = None

    fused_training: bool = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() or not getattr(self, "use_flash_attention", False) or torch.jit.is_scripting():
            self._bias_key = self._bias_mask = self._bias = None
            if self._fused_training_applies(x):
                return self._fused_training_forward(x, mask)
            return super().forward(x, mask)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._bias_for(mask, n, q.dtype)
        windows = bias.shape[0]
        if windows == 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[i : i + windows], k[i : i + windows], v[i : i + windows], attn_mask=bias, scale=self.scale
                    )
                    for i in range(0, b, windows)
                ]
            )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    def _fused_training_applies(self, x: torch.Tensor) -> bool:
        return (
            self.fused_training
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and not self.attn_drop.p
            and not torch.jit.is_scripting()
        )

    def _fused_training_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """MONAI's training attention, computed by ``WindowAttentionFunction``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)
        mask = None if mask is None else mask.to(device=x.device, dtype=bias.dtype)
        out = WindowAttentionFunction.apply(q, k, v, bias, mask, self.scale, HARD_MASK_SCALE)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    def _bias_for(self, mask: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Relative position bias plus ``mask``, ``[windows or 1, heads, n, n]`` in ``dtype``, built once per key."""
        table = self.relative_position_bias_table
        key = (n, dtype, table.device, table.data_ptr(), table._version)
        # the mask object itself (kept alive here) is part of the key, so a new mask never hits a stale entry
        if key == self._bias_key and mask is self._bias_mask:
            return self._bias
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = table[index].reshape(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)
        self._bias_key, self._bias_mask, self._bias = key, mask, bias.to(dtype).contiguous()
        return self._bias


def fast_window_attention(network: nn.Module, enabled: bool = True) -> nn.Module:
    """``network``, its window attention converted for inference and CPU training (in place) if ``enabled``.

    The conversion (in place, same state dict) is ``reuse_attention_masks`` plus, in every attention
    block, ``WindowAttentionFunction`` while gradients are recorded on a CPU (see the module doc).
    """
    if not enabled:
        return network
    reuse_attention_masks(network)
    for module in network.modules():
        if isinstance(module, MaskReusingWindowAttention):
            module.fused_training = True
    return network


def reuse_attention_masks(network: nn.Module) -> int:
    """Convert ``network``'s 3D Swin stages and window attention in place (see the module doc); return how many.

    Idempotent; the state dict and the trained function are unchanged.
    """
    converted = 0
    for module in network.modules():
        if type(module) is BasicLayer:
            module.__class__ = MaskReusingBasicLayer
            converted += 1
        elif type(module) is WindowAttention:
            module.__class__ = MaskReusingWindowAttention
            converted += 1
        elif isinstance(module, (MaskReusingBasicLayer, MaskReusingWindowAttention)):
            converted += 1
    return converted


def trains_fused(network: nn.Module) -> bool:
    """Whether ``network``'s window attention trains through ``WindowAttentionFunction`` on a CPU."""
    return any(getattr(module, "fused_training", False) for module in network.modules())
