"""Tests of the Swin UNETR BTCV bundle's encoder-weight handling (scripts/patch_merging.py, scripts/encoder_weights.py).

The official model_swinvit.pt cannot be downloaded here, so official-format files are built in the
tests from randomly initialised MONAI encoders, renamed to the official layout. The monai<=1.4
patch-merging order is re-implemented independently below (ReferenceLegacyMerging) to check the
bundle's LegacyPatchMerging against.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2
from torch import nn

from tests.helpers import BTCV_DIR as BUNDLE_DIR
from tests.helpers import bundle_on_path, order_record

LOGGER = "swin_unetr_btcv_seg"
N_ENCODER = 126


@pytest.fixture(scope="module")
def bundle():
    """The bundle's scripts modules, imported from the bundle folder (other bundles also have `scripts`)."""
    with bundle_on_path(BUNDLE_DIR):
        pm = importlib.import_module("scripts.patch_merging")
        ew = importlib.import_module("scripts.encoder_weights")
        wf = importlib.import_module("scripts.weights_format")
        kc = importlib.import_module("scripts.known_checkpoints")
        yield SimpleNamespace(pm=pm, ew=ew, wf=wf, kc=kc)


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


class ReferenceLegacyMerging(nn.Module):
    """Independent re-implementation of monai<=1.4 PatchMerging (3D), for comparison only."""

    def __init__(self, dim, norm_layer=nn.LayerNorm, spatial_dims=3):
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x):
        _, d, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 0::2, 1::2, :]
        x5 = x[:, 0::2, 1::2, 0::2, :]
        x6 = x[:, 0::2, 0::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


def _net(fs, downsample="merging", in_channels=1, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return SwinUNETR(in_channels, 14, feature_size=fs, downsample=downsample).eval()


def _official_state(swin_state, fs, heads=True):
    """A MONAI swinViT state dict renamed to the official model_swinvit.pt layout (+ 8 SSL head tensors)."""
    state = {}
    for k, v in swin_state.items():
        k = k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{k}"] = v.clone()
    if heads:
        dim = 16 * fs
        state["module.norm.weight"] = torch.ones(dim)
        state["module.norm.bias"] = torch.zeros(dim)
        state["module.rotation_head.weight"] = torch.randn(4, dim)
        state["module.rotation_head.bias"] = torch.randn(4)
        state["module.contrastive_head.weight"] = torch.randn(512, dim)
        state["module.contrastive_head.bias"] = torch.randn(512)
        # the real head is a ConvTranspose3d(dim, 1, 32, stride 32); a smaller kernel keeps the file small
        state["module.convTrans3d.weight"] = torch.randn(dim, 1, 4, 4, 4)
        state["module.convTrans3d.bias"] = torch.randn(1)
    return state


def _tensors(state):
    """A state dict without the patch-merging layers' order records (``<layer>._extra_state``)."""
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _assert_encoder_equals(encoder, state):
    got, state = _tensors(encoder.state_dict()), _tensors(state)
    assert set(got) == set(state) and len(got) == N_ENCODER
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def _loaded_count(caplog):
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def fs48(tmp_path_factory):
    """Random fs48 encoder weights and the official-format file made from them."""
    state = {k: v.clone() for k, v in _net(48, seed=0).swinViT.state_dict().items()}
    path = tmp_path_factory.mktemp("official") / "model_swinvit.pt"
    torch.save({"state_dict": _official_state(state, 48)}, path)
    return SimpleNamespace(state=state, path=str(path))


@pytest.fixture(scope="module")
def fs12(tmp_path_factory):
    """Random fs12 SwinUNETR, its encoder weights, and an official-format file of them."""
    net = _net(12, seed=1)
    state = {k: v.clone() for k, v in net.swinViT.state_dict().items()}
    path = tmp_path_factory.mktemp("official12") / "model_swinvit_fs12.pt"
    torch.save({"state_dict": _official_state(state, 12)}, path)
    return SimpleNamespace(net=net, state=state, path=str(path))


# ------------------------------------------------------------------------------- patch merging


def test_recorded_patch_merging_in_the_current_order_is_monais_patch_merging(bundle):
    """The bundle's own table of the monai >= 1.5 order computes exactly MONAI's PatchMerging."""
    torch.manual_seed(3)
    recorded, monai_current = bundle.pm.RecordedPatchMerging(dim=12), PatchMerging(dim=12)
    monai_current.load_state_dict(recorded.state_dict(), strict=False)
    for shape in [(2, 5, 6, 7, 12), (1, 4, 6, 8, 12)]:  # odd sizes exercise the padding
        x = torch.randn(shape)
        assert torch.equal(recorded(x), monai_current(x))


def test_legacy_patch_merging_matches_reference(bundle):
    pm = bundle.pm
    torch.manual_seed(2)
    legacy = pm.LegacyPatchMerging(dim=12)
    assert isinstance(legacy, PatchMergingV2)
    # monai's tensors with monai's names, plus the layer's patch-merging record
    assert sorted(legacy.state_dict()) == sorted([*PatchMerging(dim=12).state_dict(), "_extra_state"])
    assert torch.equal(legacy.state_dict()["_extra_state"], order_record("legacy"))
    ref, current = ReferenceLegacyMerging(12), PatchMerging(12)
    ref.load_state_dict(legacy.state_dict(), strict=False)
    current.load_state_dict(legacy.state_dict(), strict=False)
    for shape in [(2, 5, 6, 7, 12), (1, 4, 6, 8, 12), (1, 3, 3, 3, 12)]:  # odd sizes exercise the padding
        x = torch.randn(shape)
        out = legacy(x)
        assert out.shape == (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, (shape[3] + 1) // 2, 24)
        assert torch.allclose(out, ref(x), atol=1e-6, rtol=0)
        assert (out - current(x)).abs().max() > 0.1  # monai>=1.5 order is a different function
    # 4D input (2D spatial) is the parent's
    legacy2d, v2 = pm.LegacyPatchMerging(dim=12, spatial_dims=2), PatchMergingV2(dim=12, spatial_dims=2)
    v2.load_state_dict(legacy2d.state_dict(), strict=False)
    x = torch.randn(1, 5, 6, 12)
    assert torch.equal(legacy2d(x), v2(x))


def test_merging_order_of(bundle):
    pm = bundle.pm
    assert pm.merging_order_of(_net(12, pm.LegacyPatchMerging)) == pm.LEGACY == "legacy"
    assert pm.merging_order_of(_net(12, "merging")) == pm.CURRENT == "current"
    assert pm.merging_order_of(_net(12, "merging").swinViT) == "current"
    with pytest.raises(ValueError, match="mergingv2"):
        pm.merging_order_of(_net(12, "mergingv2"))
    mixed = _net(12, pm.LegacyPatchMerging)
    mixed.swinViT.layers2[0].downsample = PatchMerging(24)
    with pytest.raises(ValueError, match="mixes"):
        pm.merging_order_of(mixed)
    with pytest.raises(ValueError, match="no Swin downsample"):
        pm.merging_order_of(nn.Conv3d(1, 2, 3))


def test_resolve_downsample_explicit_and_empty(bundle, log):
    pm = bundle.pm
    assert pm.resolve_downsample("legacy") is pm.LegacyPatchMerging
    assert pm.resolve_downsample("current", "/nonexistent/file.pt") is pm.RecordedPatchMerging  # file not read
    assert pm.resolve_downsample("auto", "") is pm.RecordedPatchMerging
    assert pm.resolve_downsample("auto", None) is pm.RecordedPatchMerging
    assert pm.resolve_downsample() is pm.RecordedPatchMerging
    assert pm.merging_order_of(_net(12, pm.resolve_downsample())) == "current"
    messages = [r.getMessage() for r in log.records]
    assert any("legacy = monai<=1.4 order" in m and "explicitly" in m for m in messages)
    assert any("no weights file" in m for m in messages)
    with pytest.raises(ValueError, match="patch_merging"):
        pm.resolve_downsample("mergingv2")
    # a file that does not exist yet: built in the current order, the weights loaded later set theirs
    log.clear()
    assert pm.resolve_downsample("auto", "/nonexistent/missing.pt") is pm.RecordedPatchMerging
    assert any("no weights file at /nonexistent/missing.pt yet" in r.getMessage() for r in log.records)


# ---------------------------------------------------------------------------- official weights


def test_official_file_loads_and_computes_the_legacy_function(bundle, fs48, log):
    pm, ew = bundle.pm, bundle.ew
    assert ew.detect_weights_format(torch.load(fs48.path), fs48.path) == "official"
    assert ew.detect_merging_order(fs48.path) == "legacy"
    state, info = ew.encoder_state_dict_from_file(fs48.path)
    assert len(state) == N_ENCODER and info["num_tensors"] == N_ENCODER
    assert (info["format"], info["patch_merging"], info["dropped_head_tensors"]) == ("official", "legacy", 8)
    assert (info["feature_size"], info["in_channels"]) == (48, 1)

    downsample = pm.resolve_downsample("auto", fs48.path)
    assert downsample is pm.LegacyPatchMerging
    net = _net(48, downsample, seed=3)
    log.clear()
    assert ew.load_pretrained_encoder(net, fs48.path) is net
    line = _loaded_count(log)
    assert line.startswith(f"loaded {N_ENCODER}/{N_ENCODER} encoder tensors from {fs48.path}")
    assert "official model_swinvit.pt" in line and "legacy = monai<=1.4 order" in line
    assert "dropped 8 head tensors" in line
    _assert_encoder_equals(net.swinViT, fs48.state)

    reference = _net(48, ReferenceLegacyMerging)
    reference.swinViT.load_state_dict(fs48.state)
    plain = _net(48, "merging")
    plain.swinViT.load_state_dict(fs48.state)  # what naive loading into monai>=1.5 "merging" gives
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, ref, naive = net.swinViT(x), reference.swinViT(x), plain.swinViT(x)
    assert [tuple(o.shape) for o in out] == [(1, 48 * 2**i, 32 // 2**i, 32 // 2**i, 32 // 2**i) for i in range(5)]
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.equal(out[0], naive[0])  # patch embedding: no merging yet
    for a, b in zip(out[1:], naive[1:]):
        assert (a - b).abs().max() > 1.0  # every later stage differs clearly (about 4 here)


def test_research_style_loading_of_official_file_would_fit_nothing(fs48):
    """Documents the bug the loader guards against: stripping `module.` and strict=False loads 0 tensors."""
    net = _net(48)
    official = torch.load(fs48.path)["state_dict"]
    stripped = {k.replace("module.", ""): v for k, v in official.items()}
    result = net.load_state_dict(stripped, strict=False)
    assert len(result.unexpected_keys) == len(official)  # nothing matched


# ------------------------------------------------------------------------------- MONAI-native


@pytest.mark.parametrize(
    "variant", ["swinViT", "module.swinViT", "bare swinViT", "full in state_dict", "full module. in model"]
)
def test_monai_native_files_load_all_tensors(bundle, fs12, tmp_path, log, variant):
    pm, ew = bundle.pm, bundle.ew
    full = fs12.net.state_dict()
    obj = {
        "swinViT": {f"swinViT.{k}": v for k, v in fs12.state.items()},
        "module.swinViT": {f"module.swinViT.{k}": v for k, v in fs12.state.items()},
        "bare swinViT": dict(fs12.state),
        "full in state_dict": {"state_dict": full},
        "full module. in model": {"model": {f"module.{k}": v for k, v in full.items()}, "epoch": 3},
    }[variant]
    path = str(tmp_path / "monai.pt")
    torch.save(obj, path)
    assert ew.detect_weights_format(torch.load(path), path) == "monai"
    # no record, not a published file: 'auto' refuses it, naming the file and both settings
    for refuse in (
        lambda: ew.detect_merging_order(path),
        lambda: pm.resolve_downsample("auto", path),
        lambda: ew.load_pretrained_encoder(_net(12, "merging"), path),
    ):
        with pytest.raises(bundle.wf.UnrecordedOrderError) as err:
            refuse()
        message = str(err.value)
        assert path in message and "'legacy' (trained with monai <= 1.4)" in message
        assert "'current' (trained with monai >= 1.5)" in message and "convert_checkpoint" in message
    assert ew.detect_merging_order(path, "current") == "current"
    assert pm.resolve_downsample("current", path) is pm.RecordedPatchMerging

    net = _net(12, "merging", seed=5)
    decoder_before = net.encoder1.layer.conv1.conv.weight.clone()
    log.clear()
    ew.load_pretrained_encoder(net, path, patch_merging="current")
    line = _loaded_count(log)
    assert line.startswith(f"loaded {N_ENCODER}/{N_ENCODER} encoder tensors") and "from setting" in line
    _assert_encoder_equals(net.swinViT, fs12.state)
    if variant.startswith("full"):  # a whole fine-tuned network of the same shape: its decoder loads too
        assert "and 33/33 decoder tensors" in line
        got, want = _tensors(net.state_dict()), _tensors(full)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    else:
        assert torch.equal(net.encoder1.layer.conv1.conv.weight, decoder_before)  # only the encoder is loaded


def test_whole_network_with_other_out_channels_loads_the_encoder_only(bundle, fs12, tmp_path, log):
    """A research-code style whole network (14 classes) as pretrained_path of a 3-class network."""
    ew = bundle.ew
    path = str(tmp_path / "research.pt")
    torch.save({"state_dict": fs12.net.state_dict(), "epoch": 5000, "best_acc": 0.8}, path)
    torch.manual_seed(17)
    net = SwinUNETR(1, 3, feature_size=12).eval()
    before = {k: v.clone() for k, v in _tensors(net.state_dict()).items() if not k.startswith("swinViT.")}
    log.clear()
    ew.load_pretrained_encoder(net, path, patch_merging="current")
    line = _loaded_count(log)
    assert line.startswith(f"loaded {N_ENCODER}/{N_ENCODER} encoder tensors")
    assert "decoder NOT loaded" in line and "out.conv.conv.weight (14, 12, 1, 1, 1) vs (3, 12, 1, 1, 1)" in line
    _assert_encoder_equals(net.swinViT, fs12.state)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the decoder keeps its initialisation


def test_hash_listed_file_uses_its_listed_order(bundle, fs12, tmp_path, log, monkeypatch):
    """A published file without a record, identified by md5 (registered here for a test file), is legacy."""
    ew, pm, kc = bundle.ew, bundle.pm, bundle.kc
    path = str(tmp_path / "published.pt")
    torch.save({f"swinViT.{k}": v for k, v in fs12.state.items()}, path)
    with pytest.raises(bundle.wf.UnrecordedOrderError):
        ew.detect_merging_order(path)
    entry = {"name": "published.pt", "what": "test file", "source": "this test", "patch_merging": "legacy"}
    monkeypatch.setitem(kc.KNOWN_CHECKPOINTS, kc.file_md5(path), entry)
    assert "50dd67a01b28a1d5487fd9ac27e682fb" in kc.KNOWN_CHECKPOINTS  # the model zoo's BTCV model.pt
    assert ew.detect_merging_order(path) == "legacy"
    assert pm.resolve_downsample("auto", path) is pm.LegacyPatchMerging
    net = _net(12, pm.resolve_downsample("auto", path), seed=18)
    log.clear()
    ew.load_pretrained_encoder(net, path)
    assert "legacy = monai<=1.4 order from published" in _loaded_count(log)
    _assert_encoder_equals(net.swinViT, fs12.state)


def test_monai_native_file_order_can_be_overridden(bundle, fs12, tmp_path, log):
    ew, pm = bundle.ew, bundle.pm
    path = str(tmp_path / "old_monai.pt")
    torch.save({f"swinViT.{k}": v for k, v in fs12.state.items()}, path)
    net = _net(12, pm.resolve_downsample("legacy"))
    with pytest.raises(ValueError, match="does not record the patch-merging order"):
        ew.load_pretrained_encoder(net, path)  # 'auto' never guesses
    with pytest.raises(ValueError, match="different function"):
        ew.load_pretrained_encoder(net, path, patch_merging="current")  # current != legacy network
    ew.load_pretrained_encoder(net, path, patch_merging="legacy")
    assert "legacy = monai<=1.4 order" in _loaded_count(log)
    _assert_encoder_equals(net.swinViT, fs12.state)


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("order", ["legacy", "current"])
def test_export_round_trip(bundle, tmp_path, log, order):
    pm, ew = bundle.pm, bundle.ew
    src = _net(24, pm.resolve_downsample(order), seed=6)
    path = tmp_path / "export" / "encoder.pt"
    assert ew.save_encoder(src, str(path)) == str(path)
    assert os.listdir(path.parent) == ["encoder.pt"]  # no temp file left

    obj = torch.load(path)  # weights_only (the torch default) can read it
    assert {k: obj[k] for k in ("format", "format_version", "patch_merging", "feature_size", "in_channels")} == {
        "format": "swin_ssl_encoder",
        "format_version": 1,
        "patch_merging": order,
        "feature_size": 24,
        "in_channels": 1,
    }
    keys = list(obj["state_dict"])
    assert len(keys) == N_ENCODER and all(k.startswith("module.") for k in keys)
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in keys and not any("linear1" in k for k in keys)
    assert ew.detect_weights_format(obj, str(path)) == "swin_ssl_encoder"
    assert ew.detect_merging_order(str(path)) == order

    dst = _net(24, pm.resolve_downsample("auto", str(path)), seed=7)
    assert pm.merging_order_of(dst) == order
    log.clear()
    ew.load_pretrained_encoder(dst, str(path))
    line = _loaded_count(log)
    assert line.startswith(f"loaded {N_ENCODER}/{N_ENCODER}") and "swin_ssl_encoder v1 export" in line
    _assert_encoder_equals(dst.swinViT, src.swinViT.state_dict())
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for a, b in zip(src.swinViT(x), dst.swinViT(x)):
            assert torch.equal(a, b)

    # official layout: monai's own loader for model_swinvit.pt accepts the export
    other = _net(24, pm.resolve_downsample(order), seed=9)
    other.load_from(torch.load(path))
    _assert_encoder_equals(other.swinViT, src.swinViT.state_dict())


def test_export_rejects_contradicting_order_and_is_atomic(bundle, tmp_path, monkeypatch):
    pm, ew = bundle.pm, bundle.ew
    net = _net(12, pm.LegacyPatchMerging)
    with pytest.raises(ValueError, match="contradicts"):
        ew.save_encoder(net, str(tmp_path / "x.pt"), patch_merging="current")
    target = tmp_path / "enc.pt"
    target.write_bytes(b"previous complete file")

    def broken_save(obj, f):
        f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ew.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        ew.save_encoder(net, str(target))
    assert target.read_bytes() == b"previous complete file"
    assert sorted(os.listdir(tmp_path)) == ["enc.pt"]


# ------------------------------------------------------------------------------------- errors


def test_feature_size_mismatch(bundle, tmp_path):
    pm, ew = bundle.pm, bundle.ew
    path = str(tmp_path / "fs24_swinvit.pt")
    torch.save({"state_dict": _official_state(_net(24, seed=10).swinViT.state_dict(), 24)}, path)
    net = _net(48, pm.resolve_downsample("auto", path))
    with pytest.raises(ValueError) as err:
        ew.load_pretrained_encoder(net, path)
    msg = str(err.value)
    assert path in msg
    assert "feature_size 48 network vs file made for feature_size 24" in msg
    assert "swinViT.patch_embed.proj.weight expected (48, 1, 2, 2, 2) got (24, 1, 2, 2, 2)" in msg


def test_in_channels_mismatch(bundle, fs12):
    pm, ew = bundle.pm, bundle.ew
    net = _net(12, pm.LegacyPatchMerging, in_channels=2)
    with pytest.raises(ValueError, match="in_channels 2 network vs file made for in_channels 1") as err:
        ew.load_pretrained_encoder(net, fs12.path)
    assert fs12.path in str(err.value)


def test_missing_tensor_is_listed_and_nothing_is_loaded(bundle, fs12, tmp_path):
    pm, ew = bundle.pm, bundle.ew
    official = _official_state(fs12.state, 12)
    del official["module.layers3.0.blocks.1.attn.qkv.bias"]
    path = str(tmp_path / "incomplete.pt")
    torch.save({"state_dict": official}, path)
    net = _net(12, pm.LegacyPatchMerging, seed=11)
    before = {k: v.clone() for k, v in _tensors(net.swinViT.state_dict()).items()}
    with pytest.raises(ValueError) as err:
        ew.load_pretrained_encoder(net, path)
    assert path in str(err.value)
    assert "1 encoder tensor(s) missing" in str(err.value)
    assert "swinViT.layers3.0.blocks.1.attn.qkv.bias" in str(err.value)
    _assert_encoder_equals(net.swinViT, before)


def test_unexpected_key_is_named(bundle, fs12, tmp_path):
    ew = bundle.ew
    official = _official_state(fs12.state, 12)
    official["module.layers1.0.blocks.0.attn.extra_scale"] = torch.ones(3)
    path = str(tmp_path / "extra.pt")
    torch.save({"state_dict": official}, path)
    with pytest.raises(ValueError, match="module.layers1.0.blocks.0.attn.extra_scale") as err:
        ew.encoder_state_dict_from_file(path)
    assert path in str(err.value)


def test_unrelated_state_dict_is_rejected(bundle, tmp_path):
    pm, ew = bundle.pm, bundle.ew
    conv_net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Conv3d(4, 2, 1))
    path = str(tmp_path / "conv.pt")
    torch.save({"state_dict": conv_net.state_dict()}, path)
    with pytest.raises(ValueError, match="not Swin encoder weights") as err:
        ew.load_pretrained_encoder(_net(12), path)
    assert path in str(err.value) and "0.weight" in str(err.value)
    with pytest.raises(ValueError, match="not Swin encoder weights"):
        pm.resolve_downsample("auto", path)
    with pytest.raises(ValueError, match="not Swin encoder weights"):
        ew.detect_weights_format({"epoch": 3, "lr": 0.1}, "x.pt")


def test_current_network_refuses_legacy_file(bundle, fs12):
    pm, ew = bundle.pm, bundle.ew
    net = _net(12, pm.resolve_downsample("current", fs12.path), seed=12)
    before = {k: v.clone() for k, v in _tensors(net.swinViT.state_dict()).items()}
    with pytest.raises(ValueError, match="different function") as err:
        ew.load_pretrained_encoder(net, fs12.path)
    assert fs12.path in str(err.value) and "'auto'" in str(err.value)
    with pytest.raises(ValueError, match="contradicts"):
        ew.load_pretrained_encoder(net, fs12.path, patch_merging="current")
    _assert_encoder_equals(net.swinViT, before)


def test_missing_and_empty_paths(bundle, log):
    ew = bundle.ew
    net = _net(12, seed=13)
    with pytest.raises(FileNotFoundError, match="no_such_model_swinvit.pt"):
        ew.load_pretrained_encoder(net, "/nonexistent/no_such_model_swinvit.pt")
    before = {k: v.clone() for k, v in _tensors(net.state_dict()).items()}
    for empty in ("", None):
        log.clear()
        assert ew.load_pretrained_encoder(net, empty) is net
        assert [r.getMessage() for r in log.records] == ["no pretrained_path: training from scratch"]
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------ network record


def test_network_record_round_trip_through_an_ignite_checkpoint(bundle, fs12, tmp_path, log):
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, DiskSaver

    pm, ew = bundle.pm, bundle.ew
    net = _net(12, pm.LegacyPatchMerging, seed=14)
    record = ew.NetworkRecord(net)
    assert record.state_dict() == {"patch_merging": "legacy", "feature_size": 12, "format_version": 1}

    saver = Checkpoint({"model": net, "network_record": record}, DiskSaver(str(tmp_path), require_empty=False))
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, saver)
    engine.run([0], max_epochs=1)
    (ckpt,) = [str(p) for p in tmp_path.glob("*.pt")]
    saved = torch.load(ckpt)
    assert set(saved) == {"model", "network_record"}
    assert saved["network_record"] == record.state_dict()

    assert ew.detect_merging_order(ckpt) == "legacy"
    assert pm.resolve_downsample("auto", ckpt) is pm.LegacyPatchMerging

    # inference rebuilds the right order from the record and can resume the record
    fresh = _net(12, pm.resolve_downsample("auto", ckpt), seed=15)
    fresh_record = ew.NetworkRecord(fresh)
    Checkpoint.load_objects({"model": fresh, "network_record": fresh_record}, saved)
    assert fresh_record.state_dict() == record.state_dict()
    _assert_encoder_equals(fresh.swinViT, net.swinViT.state_dict())
    with pytest.raises(ValueError, match="network_record"):
        ew.NetworkRecord(_net(12, "merging")).load_state_dict(saved["network_record"])

    # the fine-tuned checkpoint also serves as a pretrained encoder, order taken from its record
    target = _net(12, pm.LegacyPatchMerging, seed=16)
    log.clear()
    ew.load_pretrained_encoder(target, ckpt)
    assert _loaded_count(log).startswith(f"loaded {N_ENCODER}/{N_ENCODER}")
    with pytest.raises(ValueError, match="different function"):
        ew.load_pretrained_encoder(_net(12, "merging"), ckpt)
