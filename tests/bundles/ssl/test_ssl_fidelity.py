"""Fidelity of the pre-training bundle to the research code's recipe (issue 15).

The research code's cutout is re-implemented here from its description (a box budget of U(0, 0.3) of
the volume counted with overlaps, box sides 5 %..25 % of the crop side, Gaussian-noise fill, then with
probability (B-1)/B a pass that pastes boxes of another crop of the batch), and the bundle's
``ResearchBoxCutout`` is compared with it over many draws. The fidelity table (docs/pretraining.md, moved
there from the model card) is kept in step with ``configs/train.json``.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tests.fidelity_tables import fidelity_knobs, section
from tests.helpers import REPO, SSL_DIR, bundle_on_path

TRAIN = json.loads((SSL_DIR / "configs" / "train.json").read_text())
README = (REPO / "docs" / "pretraining.md").read_text()  # the fidelity table, moved from the model card
SHAPE = (40, 40, 40)
BATCH = 4


@pytest.fixture(scope="module")
def ssl_scripts():
    """The pre-training bundle's ``scripts`` package, imported as running from the bundle folder does."""
    with bundle_on_path(SSL_DIR):
        import scripts

        yield scripts


def _reference_pass(shape, rng, max_drop=0.3, largest=0.25, smallest=0.05):
    """One cutout pass of the research rule, written from its description: a list of boxes (start, stop per axis)."""
    budget = rng.uniform(0.0, max_drop) * np.prod(shape)
    boxes, used = [], 0
    while used < budget:
        box = []
        for side in shape:
            low, high = max(int(smallest * side), 1), int(largest * side)
            start = rng.integers(0, side - low)
            box.append((start, min(start + rng.integers(low, high), side)))
        boxes.append(box)
        used += np.prod([b - a for a, b in box])
    return boxes


def _reference_shares(shape, batch, draws, seed):
    """Masked and pasted-tissue shares per crop under the research rule (numpy, its own random stream)."""
    rng = np.random.default_rng(seed)
    masked, tissue = [], []
    for _ in range(draws):
        held = np.stack([np.full(shape, i) for i in range(batch)])  # whose tissue each voxel holds; -1 noise
        for i in range(batch):
            for box in _reference_pass(shape, rng):
                held[(i, *(slice(a, b) for a, b in box))] = -1
            j = rng.integers(0, batch)
            if j == i:
                continue
            for box in _reference_pass(shape, rng):
                region = tuple(slice(a, b) for a, b in box)
                held[(i, *region)] = held[(j, *region)]
        own = np.arange(batch).reshape(-1, 1, 1, 1)
        masked += [float(m.mean()) for m in held != own]
        other = (held >= 0) & (held != own)
        tissue += [float(t.mean()) for t in other]
    return np.array(masked), np.array(tissue)


def _bundle_shares(ssl_scripts, shape, batch, draws, seed):
    cutout = ssl_scripts.proxy_tasks.ResearchBoxCutout().set_random_state(seed)
    images = torch.zeros(batch, 1, *shape)
    masked, tissue = [], []
    for _ in range(draws):
        cutout(images)
        masked += [float(m.mean()) for m in cutout.mask]
        tissue += [float(t.mean()) for t in cutout.foreign]
    return np.array(masked), np.array(tissue)


def test_research_cutout_share_matches_the_research_rule_over_many_draws(ssl_scripts):
    ref_masked, ref_tissue = _reference_shares(SHAPE, BATCH, draws=60, seed=0)
    masked, tissue = _bundle_shares(ssl_scripts, SHAPE, BATCH, draws=60, seed=0)
    # 240 crops each: the standard error of a mean share is about 0.007
    assert abs(masked.mean() - ref_masked.mean()) < 0.03, (masked.mean(), ref_masked.mean())
    assert abs(tissue.mean() - ref_tissue.mean()) < 0.03, (tissue.mean(), ref_tissue.mean())
    assert 0.15 < masked.mean() < 0.27 and 0.04 < tissue.mean() < 0.14
    for shares in (masked, ref_masked):  # the budget starts at 0, and the paste pass can pass 0.3
        assert shares.min() < 0.03 and 0.3 < shares.max() < 0.62


def test_without_another_crop_there_is_no_paste_pass(ssl_scripts):
    cutout = ssl_scripts.proxy_tasks.ResearchBoxCutout().set_random_state(2)
    shares = []
    for _ in range(30):
        cutout(torch.zeros(1, 1, *SHAPE))
        assert cutout.sources == [-1] and not cutout.foreign.any()
        shares.append(float(cutout.mask.mean()))
    assert max(shares) < 0.3 + 0.03  # the budget, plus at most one box past it


def test_pasted_regions_hold_another_crops_voxels_and_noise_stays_in_range(ssl_scripts):
    cutout = ssl_scripts.proxy_tasks.ResearchBoxCutout().set_random_state(5)
    values = torch.tensor([2.0, 3.0, 4.0])  # outside the noise range 0..1: each voxel tells where it came from
    images = values.view(3, 1, 1, 1, 1).expand(3, 1, *SHAPE).clone()
    pasted = 0
    for _ in range(10):
        out = cutout(images)
        assert torch.equal(images, values.view(3, 1, 1, 1, 1).expand(3, 1, *SHAPE))  # the input is not touched
        for i in range(3):
            crop, mask = out[i, 0], torch.from_numpy(cutout.mask[i])
            foreign = torch.from_numpy(cutout.foreign[i])
            assert torch.all(crop[~mask] == values[i])
            noise = mask & ~foreign
            assert torch.all((crop[noise] >= 0.0) & (crop[noise] <= 1.0))
            others = [v for k, v in enumerate(values) if k != i]
            assert torch.all(sum(crop[foreign] == v for v in others).bool())
            if cutout.sources[i] > i:  # a later crop is pasted before its own cutout: all of it is tissue
                assert torch.all(crop[foreign] == values[cutout.sources[i]])
            pasted += int(foreign.sum())
    assert pasted > 0


def test_research_views_keep_the_unmasked_rotated_crop_as_target(ssl_scripts):
    pt = ssl_scripts.proxy_tasks
    images = torch.rand(3, 1, 16, 24, 24, generator=torch.Generator().manual_seed(0)) + 2.0
    views = pt.ProxyTaskViews(cutout_mode="research").set_random_state(3)
    again = pt.ProxyTaskViews(cutout_mode="research").set_random_state(3)(images)
    out = views(images)
    assert torch.equal(out["inputs"], again["inputs"])
    assert out["inputs"].shape == (6, 1, 16, 24, 24)
    for row in range(6):
        k = int(out["rotations"][row])
        assert torch.equal(pt.rotate90(out["targets"][row], -k), images[row % 3])
    assert 0.0 < float(out["masked_fraction"]) < 0.62
    with pytest.raises(ValueError, match="cutout_mode"):
        pt.ProxyTaskViews(cutout_mode="paper")


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(SSL_DIR / "configs" / "train.json"))
    parser.update(overrides)
    return parser


def test_config_defaults_follow_the_research_recipe(ssl_scripts):
    with bundle_on_path(SSL_DIR):
        parser = _parser()
        for name in ("proxy_tasks", "validate#proxy_tasks"):
            tasks = parser.get_parsed_content(name)
            assert tasks.cutout_mode == "research" and tasks.cutout.fraction == (0.0, 0.3)
        names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing")]
        assert "Spacingd" not in names and names.index("Orientationd") < names.index("ScaleIntensityRanged")
        resampled = _parser(spacing=[1.5, 1.5, 2.0])
        spacing = [t for t in resampled.get_parsed_content("preprocessing") if type(t).__name__ == "Spacingd"]
        assert len(spacing) == 1
        bundle = _parser(cutout_mode="bundle").get_parsed_content("proxy_tasks")
        assert bundle.cutout.fraction == (0.1, 0.3) and not hasattr(bundle.cutout, "foreign")


def test_corpus_check_uses_the_native_size_when_spacing_is_null(ssl_scripts, tmp_path):
    """At 0.7 mm a (40, 72, 68) volume holds a (32, 64, 64) ROI; resampled to 1.5 x 1.5 x 2 mm it would not."""
    volume = np.full((40, 72, 68), -1000.0, np.float32)
    volume[5:35, 10:60, 10:60] = 40.0
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 0.7, 1.0])), str(path))
    items = [{"image": str(path)}]
    assert ssl_scripts.corpus.check_corpus(items, roi_size=(32, 64, 64), spacing=None) == items
    with pytest.raises(ssl_scripts.corpus.CorpusError, match="smaller than the ROI"):
        ssl_scripts.corpus.check_corpus(items, roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0))


def test_ckpt_metric_research_preset_is_the_validation_l1(ssl_scripts):
    metrics = ssl_scripts.iteration.validation_metrics
    assert list(metrics("research")[0]) == ["val_inpaint_loss"]
    assert list(metrics("bundle")[0]) == ["val_loss"]
    with pytest.raises(ValueError, match="research"):
        metrics("val_dice")


def test_fidelity_table_states_the_configs_defaults():
    named = fidelity_knobs(section(README, "Fidelity to the paper's recipe"))
    for knob, value in named.items():
        assert knob in TRAIN, knob
        assert value == TRAIN[knob], (knob, value, TRAIN[knob])
    must = {
        "cutout_mode",
        "cutout_fraction",
        "cutout_max_box_size",
        "spacing",
        "hu_window",
        "roi_size",
        "temperature",
        "inpaint_weight",
        "contrast_weight",
        "rotation_weight",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "num_steps",
        "batch_size",
        "num_samples",
        "ckpt_metric",
        "amp",
        "feature_size",
        "lr_scaling",
    }
    assert must <= set(named), must - set(named)
