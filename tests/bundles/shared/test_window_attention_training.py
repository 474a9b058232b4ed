"""CPU training through the fused window attention: MONAI's gradients, one score tensor per call, a knob."""

from __future__ import annotations

import copy
import statistics
from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import SwinUNETR

from tests.helpers import SSL_DIR, SSL_SMALL, bundle_on_path, forget_scripts_modules
from tools.common.bundles import bundle_parser


def _function():
    with bundle_on_path():
        from scripts.window_attention import HARD_MASK_SCALE, WindowAttentionFunction, fast_window_attention
    return WindowAttentionFunction, fast_window_attention, HARD_MASK_SCALE


def _forward_backward(network: torch.nn.Module, x: torch.Tensor, bf16: bool = False):
    network.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = network(x)
    (out if out.dtype == torch.float64 else out.float()).square().mean().backward()
    return (out if out.dtype == torch.float64 else out.float()).detach(), {
        name: p.grad.clone() for name, p in network.named_parameters()
    }


def test_the_function_s_gradients_are_right_in_float64():
    """gradcheck: q, k, v and the relative position bias, with and without a shifted-window mask."""
    function, _, _ = _function()
    g = torch.Generator().manual_seed(0)
    samples, windows, heads, tokens, dim = 2, 3, 2, 8, 4

    def inputs():
        qkv = [
            torch.randn(samples * windows, heads, tokens, dim, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(3)
        ]
        bias = torch.randn(heads, tokens, tokens, generator=g, dtype=torch.float64).requires_grad_()
        return qkv, bias

    mask = torch.zeros(windows, tokens, tokens, dtype=torch.float64)
    mask[1:, : tokens // 2, tokens // 2 :] = -1.0  # masked pairs, as compute_mask's -100 scaled down
    for m in (mask, None):
        (q, k, v), bias = inputs()
        assert torch.autograd.gradcheck(lambda *a, m=m: function.apply(*a, m, 0.5, 3.0), (q, k, v, bias))


def test_fused_training_gives_monai_s_output_and_gradients(monkeypatch):
    """Same network and weights, with checkpointing and a non-power-of-two scale: outputs and every gradient agree.

    In float64, so that only the mathematics is compared (in float32 the network amplifies rounding to ~1e-3
    of a gradient).
    """
    function, fast_window_attention, _ = _function()
    torch.manual_seed(0)
    reference = SwinUNETR(
        in_channels=1, out_channels=3, feature_size=24, use_checkpoint=True, use_flash_attention=True
    ).double()
    fast = fast_window_attention(copy.deepcopy(reference))
    assert fast.state_dict().keys() == reference.state_dict().keys()
    calls = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    x = torch.rand(1, 1, 64, 64, 64, dtype=torch.float64)
    out, grads = _forward_backward(fast, x)
    monkeypatch.undo()
    expected, expected_grads = _forward_backward(reference, x)
    # 4 stages x 2 blocks, each run twice (forward, then recomputed by checkpointing in backward)
    assert len(calls) == 16
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-9, atol=1e-15, msg=name)


def test_bf16_fused_training_is_as_close_to_float32_as_monai_s_bf16():
    """Under bf16 autocast the fused path's gradients are no further from float32 than MONAI's own bf16 ones."""
    _, fast_window_attention, _ = _function()
    torch.manual_seed(0)
    reference = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, use_checkpoint=True, use_flash_attention=True)
    fast = fast_window_attention(copy.deepcopy(reference))
    x = torch.rand(2, 1, 64, 64, 64)
    out32, grads32 = _forward_backward(reference, x)

    def error(network):
        out, grads = _forward_backward(network, x, bf16=True)
        grad_errors = [((grads[k] - grads32[k]).norm() / (grads32[k].norm() + 1e-12)).item() for k in grads]
        return ((out - out32).norm() / out32.norm()).item(), statistics.median(grad_errors)

    (monai_out, monai_grad), (fast_out, fast_grad) = error(reference), error(fast)
    assert fast_out <= 1.1 * monai_out + 1e-3
    assert fast_grad <= 1.1 * monai_grad + 1e-3


def test_masked_pairs_get_no_weight():
    """MONAI's -100 mask leaves subnormal weights (slow softmax); the fused path gives masked pairs exactly 0."""
    function, _, hard_mask_scale = _function()
    q = k = torch.zeros(2, 1, 4, 2)
    v = torch.arange(8.0).reshape(1, 1, 4, 2).expand(2, 1, 4, 2).contiguous()
    mask = torch.zeros(2, 4, 4)
    mask[1, :, 2:] = -100.0  # window 1: its last two tokens hidden from every query
    out = function.apply(q, k, v, torch.zeros(1, 4, 4), mask, 1.0, hard_mask_scale)
    torch.testing.assert_close(out[0, 0], v[0, 0].mean(0).expand(4, 2))  # uniform over 4 tokens
    assert torch.equal(out[1, 0], v[1, 0, :2].mean(0).expand(4, 2))  # exactly the first two


def test_the_fused_path_is_for_cpu_gradients_only(monkeypatch):
    """Inference keeps the mask-reusing path; attention dropout and the knob off keep MONAI's code."""
    function, fast_window_attention, _ = _function()
    torch.manual_seed(0)
    network = fast_window_attention(
        SwinUNETR(in_channels=1, out_channels=3, feature_size=12, use_flash_attention=True, attn_drop_rate=0.1)
    )
    plain = fast_window_attention(SwinUNETR(in_channels=1, out_channels=3, feature_size=12), enabled=False)
    assert not any(hasattr(m, "fused_training") for m in plain.modules())
    calls = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.rand(1, 1, 64, 64, 64)
    network(x).sum().backward()  # attention dropout: MONAI's code
    with torch.no_grad():
        network.eval()(x)
    assert calls == []


def _ssl_step(fast: bool, images: torch.Tensor) -> tuple[dict, torch.nn.Module]:
    overrides = {k: SSL_SMALL[k] for k in ("feature_size", "roi_size")}
    parser = bundle_parser(
        SSL_DIR,
        "train.json",
        {
            **overrides,
            "use_checkpoint": True,
            "device": "$torch.device('cpu')",
            "pretrained_path": "",
            "amp_cpu_training": False,
            "fast_window_attention": fast,
        },
    )
    torch.manual_seed(0)
    network = parser.get_parsed_content("network")
    iteration = parser.get_parsed_content("train#iteration")
    iteration.proxy_tasks.set_random_state(7)
    iteration.lr_scheduler = None
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    engine = SimpleNamespace(
        state=SimpleNamespace(iteration=1, device=torch.device("cpu")), network=network, optimizer=optimizer
    )
    return iteration(engine, {"image": images}), network


def test_ssl_train_json_knob_switches_the_fused_attention_and_the_losses_agree(caplog):
    """train.json's ``fast_window_attention`` (default true) changes the speed of a step, not its losses."""
    images = torch.rand((2, 1, *SSL_SMALL["roi_size"]), generator=torch.Generator().manual_seed(3))
    caplog.set_level("INFO", logger="swin_unetr_ssl_pretrain")
    try:
        default = bundle_parser(SSL_DIR, "train.json", {})
        assert default["fast_window_attention"] is True
        fast, fast_net = _ssl_step(True, images)
        plain, plain_net = _ssl_step(False, images)
    finally:
        forget_scripts_modules()
    assert {type(m).__name__ for m in fast_net.modules()} >= {"MaskReusingWindowAttention"}
    assert "MaskReusingWindowAttention" not in {type(m).__name__ for m in plain_net.modules()}
    for term in ("loss", "inpaint_loss", "contrast_loss", "rotation_loss"):
        assert fast[term] == pytest.approx(plain[term], rel=1e-4, abs=1e-5), term
    # the first step says how the forward runs
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pre-training forward on cpu")]
    assert told == [
        "pre-training forward on cpu in float32; fused window attention; all views in one call",
        "pre-training forward on cpu in float32; MONAI's window attention; all views in one call",
    ]
