"""SSL pre-training's ``view_chunk_size``: views through the network in chunks give the same loss and gradients.

The objects come from the bundle's train.json (network, loss, proxy tasks, train#iteration with
the knob), run in float64 so that only the order of floating-point sums may differ.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import SSL_DIR, SSL_SMALL, error_text, forget_scripts_modules
from tools.common.bundles import bundle_parser

CROPS = 2  # 4 views: chunks of 3 leave a last chunk of 1


def _one_step(chunk: int, images: torch.Tensor, key: str = "train#iteration") -> tuple[dict, dict, torch.nn.Module]:
    """One iteration of the parsed ``key`` with ``view_chunk_size`` = ``chunk``; (output, gradients, network)."""
    overrides = {k: SSL_SMALL[k] for k in ("feature_size", "roi_size", "use_checkpoint")}
    parser = bundle_parser(
        SSL_DIR,
        "train.json",
        {**overrides, "device": "$torch.device('cpu')", "pretrained_path": "", "view_chunk_size": chunk},
    )
    torch.manual_seed(0)
    network = parser.get_parsed_content("network").double()
    iteration = parser.get_parsed_content(key)
    assert iteration.view_chunk_size == chunk
    iteration.proxy_tasks.set_random_state(7)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)  # the step leaves the weights as they are
    if key == "train#iteration":
        iteration.lr_scheduler = None
    engine = SimpleNamespace(
        state=SimpleNamespace(iteration=1, device=torch.device("cpu")), network=network, optimizer=optimizer
    )
    output = iteration(engine, {"image": images})
    grads = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    return output, grads, network


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(3)
    return torch.rand((CROPS, 1, *SSL_SMALL["roi_size"]), generator=generator, dtype=torch.float64)


def test_chunked_views_give_the_same_loss_and_gradients(images):
    try:
        whole, whole_grads, _ = _one_step(0, images)
        chunked, chunked_grads, network = _one_step(3, images)
    finally:
        forget_scripts_modules()
    for term in ("loss", "inpaint_loss", "contrast_loss", "rotation_loss"):
        assert chunked[term] == pytest.approx(whole[term], rel=1e-10, abs=1e-12), term
    assert chunked["masked_fraction"] == whole["masked_fraction"]  # the same proxy-task draws
    # every parameter that takes part has a gradient, the same one
    assert whole_grads.keys() == chunked_grads.keys() == {n for n, p in network.named_parameters() if p.requires_grad}
    for name, grad in whole_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-9, atol=1e-12), name
    assert any(g.abs().sum() > 0 for g in whole_grads.values())


def test_chunked_validation_gives_the_same_losses(images):
    try:
        whole, _, _ = _one_step(0, images, "validate#iteration")
        chunked, _, _ = _one_step(2, images, "validate#iteration")
    finally:
        forget_scripts_modules()
    for term in ("loss", "inpaint_loss", "contrast_loss", "rotation_loss"):
        assert chunked[term] == pytest.approx(whole[term], rel=1e-10, abs=1e-12), term


def test_negative_chunk_size_is_refused():
    try:
        with pytest.raises(Exception) as info:
            bundle_parser(
                SSL_DIR, "train.json", {"device": "$torch.device('cpu')", "view_chunk_size": -1}
            ).get_parsed_content("train#iteration")
        assert "view_chunk_size must be >= 0" in error_text(info.value)
    finally:
        forget_scripts_modules()
