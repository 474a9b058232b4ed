"""SSL pre-training on a CPU with native bf16: the forward in bfloat16, the losses in float32, the same losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import SSL_DIR, SSL_SMALL, forget_scripts_modules
from tools.common.bundles import bundle_parser

NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _one_step(amp_cpu_training: bool, images: torch.Tensor) -> tuple[dict, set]:
    """One train#iteration step; (its output, the dtypes the first linear layer saw)."""
    overrides = {k: SSL_SMALL[k] for k in ("feature_size", "roi_size", "use_checkpoint")}
    parser = bundle_parser(
        SSL_DIR,
        "train.json",
        {**overrides, "device": "$torch.device('cpu')", "pretrained_path": "", "amp_cpu_training": amp_cpu_training},
    )
    torch.manual_seed(0)
    network = parser.get_parsed_content("network")
    iteration = parser.get_parsed_content("train#iteration")
    assert iteration.cpu_autocast is amp_cpu_training  # train.json: amp and amp_cpu_training
    iteration.proxy_tasks.set_random_state(7)
    iteration.lr_scheduler = None
    seen = set()
    linear = next(m for m in network.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    engine = SimpleNamespace(
        state=SimpleNamespace(iteration=1, device=torch.device("cpu")), network=network, optimizer=optimizer
    )
    return iteration(engine, {"image": images}), seen


def test_cpu_training_forward_is_bf16_only_where_native_and_the_losses_agree():
    images = torch.rand((2, 1, *SSL_SMALL["roi_size"]), generator=torch.Generator().manual_seed(3))
    try:
        fast, fast_dtypes = _one_step(True, images)
        reference, reference_dtypes = _one_step(False, images)
    finally:
        forget_scripts_modules()
    assert reference_dtypes == {torch.float32}
    assert fast_dtypes == ({torch.bfloat16} if NATIVE_BF16 else {torch.float32})
    for term in ("loss", "inpaint_loss", "contrast_loss", "rotation_loss"):
        assert torch.isfinite(torch.tensor(fast[term])), term
        if NATIVE_BF16:
            assert fast[term] == pytest.approx(reference[term], rel=0.05, abs=0.02), term
        else:
            assert fast[term] == reference[term], term
    assert fast["masked_fraction"] == reference["masked_fraction"]
