"""Swin attention masks built once per input size: the same function as MONAI's, far fewer full-size copies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR

from tests.helpers import SMALL, bundle_on_path, run_workflow

INFER_SMALL = {k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")}


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    reference = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
    converted = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
    converted.load_state_dict(reference.state_dict())
    return reference, converted


def test_reused_masks_give_monai_s_output_exactly_in_float32_and_bf16():
    with bundle_on_path():
        from scripts.window_attention import MaskReusingBasicLayer, reuse_attention_masks

    reference, converted = _pair()
    keys = reference.state_dict().keys()
    converted_layers = reuse_attention_masks(converted)
    # 4 Swin stages + 2 blocks each (feature size 12 has depths 2, 2, 2, 2)
    assert converted_layers == 12
    assert reuse_attention_masks(converted) == 12  # idempotent
    assert converted.state_dict().keys() == keys
    converted.load_state_dict(reference.state_dict(), strict=True)

    x = torch.rand(2, 1, 64, 64, 64)  # 2 samples: attention runs sample by sample against one mask
    with torch.no_grad():
        expected = reference(x)
        first, second = converted(x), converted(x)
        assert torch.equal(first, expected) and torch.equal(second, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16, got_bf16 = reference(x), converted(x)
    assert torch.equal(got_bf16, expected_bf16)

    stage = next(m for m in converted.modules() if isinstance(m, MaskReusingBasicLayer))
    attention = stage.blocks[1].attn  # the shifted block: its bias holds the mask
    assert attention._bias.dtype == torch.bfloat16  # kept in the activations' dtype
    with torch.no_grad():
        converted(x)
        mask, bias = stage._mask, attention._bias
        converted(x)
    assert stage._mask is mask and attention._bias is bias  # built once, reused
    assert bias.dtype == torch.float32 and bias.shape[0] == mask.shape[0] > 1


def test_a_new_input_size_or_new_weights_never_reuse_a_stale_mask():
    with bundle_on_path():
        from scripts.window_attention import reuse_attention_masks

    reference, converted = _pair()
    reuse_attention_masks(converted)
    with torch.no_grad():
        converted(torch.rand(1, 1, 64, 64, 64))
        other_size = torch.rand(1, 1, 64, 96, 64)
        assert torch.equal(converted(other_size), reference(other_size))
        for model in (reference, converted):  # new weights in place (as an optimiser step would)
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.add_(0.5)
        x = torch.rand(1, 1, 64, 64, 64)
        assert torch.equal(converted(x), reference(x))


def test_under_autograd_the_layers_run_monai_s_code_and_drop_their_caches():
    with bundle_on_path():
        from scripts.window_attention import MaskReusingWindowAttention, reuse_attention_masks

    reference, converted = _pair()
    reuse_attention_masks(converted)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        converted(x)
    attention = [m for m in converted.modules() if isinstance(m, MaskReusingWindowAttention)]
    assert all(m._bias is not None for m in attention)
    out, expected = converted(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    assert all(m._bias is None for m in attention)
    assert converted.swinViT.layers1[0].blocks[0].attn.qkv.weight.grad is not None


def test_bundle_inference_with_and_without_mask_reuse_labels_alike(trained, phantom_dir, tmp_path):
    """The knob ``reuse_attention_masks`` (default true) changes speed, not the labels."""
    labels = {}
    for reuse in (True, False):
        out = tmp_path / f"reuse_{reuse}"
        workflow = run_workflow(
            ["inference.json"],
            "infer",
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            ckpt_path=str(trained["model"]),
            output_dir=str(out),
            num_workers=0,
            amp=False,
            reuse_attention_masks=reuse,
            **INFER_SMALL,
        )
        network = workflow.parser.get_parsed_content("network")
        kinds = {type(m).__name__ for m in network.modules()}
        assert ("MaskReusingWindowAttention" in kinds) is reuse
        (path,) = out.glob("*.nii.gz")
        labels[reuse] = np.asarray(nib.load(path).dataobj)
    assert np.array_equal(labels[True], labels[False])


NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not NATIVE_BF16, reason="the bundle autocasts on CPU only where bf16 is native (AVX-512 bf16/AMX)")
def test_bf16_inference_casts_the_weights_once_per_volume_not_per_window():
    """Under the bundle's inferer (no_grad, one autocast context per volume) weights are cast to bf16 once."""
    from torch.profiler import ProfilerActivity, profile

    with bundle_on_path():
        from scripts.inferers import AutocastSlidingWindowInferer

    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
    inferer = AutocastSlidingWindowInferer(
        roi_size=(64, 64, 64), sw_batch_size=1, overlap=0.0, autocast=True, channels_last=True
    )
    image = torch.rand(1, 1, 64, 64, 192)  # 3 windows, one network call each
    weight_shapes = {tuple(p.shape) for p in network.parameters() if p.dim() > 1}
    with torch.no_grad():
        inferer(image, network)  # the first call also converts the network (layout, mask reuse)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = inferer(image, network)
    assert out.dtype == torch.float32 and out.shape == (1, 14, 64, 64, 192)
    weight_casts = sum(
        1
        for e in prof.events()
        if e.name == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in weight_shapes
    )
    matrices = sum(1 for p in network.parameters() if p.dim() > 1)
    assert 0 < weight_casts <= matrices, (weight_casts, matrices)  # not 3 x matrices
