"""The proxy tasks, loss and network of the pre-training bundle, checked against their definitions."""

from __future__ import annotations

import pytest
import torch
from monai.losses import ContrastiveLoss
from monai.networks.nets import SwinUNETR

from tests.helpers import SSL_DIR, bundle_on_path


@pytest.fixture(scope="module")
def ssl_scripts():
    """The pre-training bundle's ``scripts`` package, imported as running from the bundle folder does."""
    with bundle_on_path(SSL_DIR):
        import scripts

        yield scripts


def _crop(seed: int = 0, shape=(1, 8, 12, 12)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_rotating_back_by_the_returned_class_restores_the_input_and_all_classes_occur(ssl_scripts):
    pt = ssl_scripts.proxy_tasks
    rotate = pt.RandRotate90Class().set_random_state(3)
    crop = _crop(shape=(1, 8, 10, 10))
    classes = set()
    for _ in range(40):
        rotated, k = rotate(crop)
        classes.add(k)
        assert torch.equal(pt.rotate90(rotated, -k), crop)
        assert torch.equal(rotated, torch.rot90(crop, k, dims=(2, 3)))
    assert classes == {0, 1, 2, 3}

    # the same through ProxyTaskViews, which train.json's proxy_tasks runs: each view rotates back to its crop
    views = pt.ProxyTaskViews().set_random_state(5)
    seen = set()
    for _ in range(10):
        out = views(crop[None])
        for row in range(2):
            k = int(out["rotations"][row])
            seen.add(k)
            assert torch.equal(pt.rotate90(out["targets"][row], -k), crop)
    assert len(seen) > 1


@pytest.mark.parametrize("fraction", [(0.1, 0.3), (0.0, 0.05), (0.25, 0.25)])
def test_cutout_masks_a_share_within_the_bounds_and_keeps_the_unmasked_target(ssl_scripts, fraction):
    pt = ssl_scripts.proxy_tasks
    # RandBoxCutout is the cutout ProxyTaskViews (train.json's proxy_tasks) applies with cutout_mode bundle
    cutout = pt.RandBoxCutout(fraction=fraction).set_random_state(1)
    crop = _crop(shape=(1, 32, 32, 16)) * 0.5 + 2.0  # outside the noise range, so every masked voxel changes
    target = crop.clone()
    shares = []
    for _ in range(25):
        image = cutout(crop)
        mask = cutout.mask
        share = float(mask.float().mean())
        shares.append(share)
        assert fraction[0] - 1e-9 <= share <= fraction[1] + 1e-9
        assert torch.equal(crop, target)  # the un-masked crop, the reconstruction target, is left as it was
        masked = image[0][mask]
        assert torch.equal(image[0][~mask], crop[0][~mask])
        assert masked.numel() == 0 or (masked.min() >= 0.0 and masked.max() <= 1.0)
    if fraction[1] > fraction[0]:
        assert max(shares) - min(shares) > 0.01  # the share is drawn, not fixed


def test_cutout_rejects_bounds_outside_zero_one(ssl_scripts):
    with pytest.raises(ValueError, match="fraction"):
        ssl_scripts.proxy_tasks.RandBoxCutout(fraction=(0.3, 0.1))


def test_proxy_task_views_are_seeded_and_pair_two_views_of_each_crop(ssl_scripts):
    pt = ssl_scripts.proxy_tasks
    images = torch.stack([_crop(1), _crop(2)]) + 2.0
    first = pt.ProxyTaskViews().set_random_state(7)(images)
    again = pt.ProxyTaskViews().set_random_state(7)(images)
    other = pt.ProxyTaskViews().set_random_state(8)(images)
    for key in ("inputs", "targets", "rotations"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["inputs"], other["inputs"])
    assert first["inputs"].shape == (4, 1, 8, 12, 12) and first["rotations"].shape == (4,)
    for row in range(4):  # rows 0, 1 are view 1 of crops 0, 1; rows 2, 3 view 2
        crop = images[row % 2]
        assert torch.equal(pt.rotate90(first["targets"][row], -int(first["rotations"][row])), crop)
        changed = first["inputs"][row] != first["targets"][row]
        assert 0.1 - 1e-6 <= float(changed.float().mean()) <= 0.3 + 1e-6

    with pytest.raises(ValueError, match="not square in the rotation plane"):
        pt.ProxyTaskViews()(torch.rand(2, 1, 8, 12, 16))

    single = pt.ProxyTaskViews().set_random_state(7)(images[:1])  # one crop: its two views
    assert single["inputs"].shape == (2, 1, 8, 12, 12) and single["rotations"].shape == (2,)


def test_loss_terms_equal_their_definitions_and_monai_contrastive_loss(ssl_scripts):
    outputs = ssl_scripts.model.SSLOutputs(
        rotation=torch.randn(6, 4), contrastive=torch.randn(6, 32), reconstruction=torch.rand(6, 1, 8, 8, 8)
    )
    targets, rotations = torch.rand(6, 1, 8, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    loss = ssl_scripts.losses.SSLLoss(inpaint_weight=2.0, contrast_weight=0.5, rotation_weight=3.0, temperature=0.3)
    terms = loss(outputs, targets, rotations)
    expected_contrast = ContrastiveLoss(temperature=0.3)(outputs.contrastive[:3], outputs.contrastive[3:])
    assert torch.allclose(terms["contrast_loss"], expected_contrast)
    assert torch.allclose(terms["inpaint_loss"], (outputs.reconstruction - targets).abs().mean())
    assert torch.allclose(terms["rotation_loss"], torch.nn.functional.cross_entropy(outputs.rotation, rotations))
    weighted = 2.0 * terms["inpaint_loss"] + 0.5 * terms["contrast_loss"] + 3.0 * terms["rotation_loss"]
    assert torch.allclose(terms["loss"], weighted)


def test_network_heads_follow_feature_size_and_the_encoder_drops_into_swin_unetr(ssl_scripts):
    net = ssl_scripts.model.SwinSSLNet(feature_size=12)
    assert (net.rotation_head.in_features, net.rotation_head.out_features) == (192, 4)
    assert (net.contrastive_head.in_features, net.contrastive_head.out_features) == (192, 512)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 32, 64, 64))
    assert out.rotation.shape == (2, 4) and out.contrastive.shape == (2, 512)
    assert out.reconstruction.shape == (2, 1, 32, 64, 64)
    encoder = {k[len("swinViT.") :]: v.shape for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    reference = {
        k: v.shape for k, v in SwinUNETR(in_channels=1, out_channels=14, feature_size=12).swinViT.state_dict().items()
    }
    assert encoder == reference
    with pytest.raises(ValueError, match="2 tokens"):
        net(torch.rand(1, 1, 32, 32, 32))


def test_full_size_network_has_the_papers_parameter_count(ssl_scripts):
    net = ssl_scripts.model.SwinSSLNet(feature_size=48)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(19.1e6, rel=0.01)
    assert net.rotation_head.in_features == 768
