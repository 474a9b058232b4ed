"""tools/benchmarks/profile_ops.py: per-operator profiles of the bundle's network, inference and training."""

from __future__ import annotations

import json

import pytest
import torch

from tools.benchmarks import profile_ops

NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_profile_names_where_the_time_goes(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    result = profile_ops.run_profile(
        mode=mode,
        feature_size=12,
        roi_size=64,
        precisions="auto",
        device="cpu",
        warmup=0,
        calls=1,
        top=40,
        output_json=str(out),
    )
    assert json.loads(out.read_text()) == {k: v for k, v in result.items() if k != "output"}
    assert result["output"] == str(out) and result["peak"]["kind"] == "cpu"
    (run,) = result["runs"]
    assert run["precision"] == ("bfloat16" if NATIVE_BF16 else "float32")
    assert run["seconds_per_call"] > 0
    ops = {o["op"]: o for o in run["ops"]}
    assert "aten::mkldnn_convolution" in ops or "aten::convolution" in ops or "aten::_convolution" in ops
    shares = [o["share"] for o in run["ops"]]
    assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1.0 + 1e-6
    assert shares == sorted(shares, reverse=True)
    if mode == "inference":
        # the bundle's inference settings: flash attention, masks reused, channels-last on CPU
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
        assert run["reuse_attention_masks"] is True and run["channels_last"] is True and run["windows_per_call"] == 4
    else:
        assert run["use_checkpoint"] is True and any("backward" in name for name in ops)
    text = out.with_suffix(".md").read_text()
    assert f"{mode}, {run['precision']}" in text and "| operator | self ms | share | calls |" in text


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU has native bf16 kernels")
def test_bf16_is_refused_where_the_bundle_would_not_use_it():
    with pytest.raises(ValueError, match="no native kernels"):
        profile_ops.resolve_precision("bfloat16", torch.device("cpu"))
