"""package_bundle: the zip that ``monai.bundle download`` unpacks, unpacked by MONAI and run from there."""

from __future__ import annotations

import importlib
import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import download, load
from monai.networks.nets import SwinUNETR

from tests.helpers import BTCV_DIR, MSD_DIR, SMALL, SSL_DIR, btcv_workflow, bundle_on_path, recorded
from tools.release.package_bundle import large_files_yaml, md5_of, package_bundle

BUNDLES = [BTCV_DIR, MSD_DIR, SSL_DIR]


def _version(bundle_dir: Path) -> str:
    return json.loads((bundle_dir / "configs" / "metadata.json").read_text())["version"]


def _names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        return zf.namelist()


@pytest.fixture(scope="module")
def btcv_weights(tmp_path_factory) -> Path:
    """A BTCV model.pt as the bundle saves it (the state dict, its order recorded inside), feature size 12, legacy."""
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.manual_seed(0)
    torch.save(recorded(SwinUNETR(1, 14, feature_size=12).state_dict(), "legacy"), path)
    return path


@pytest.mark.parametrize("bundle_dir", BUNDLES, ids=lambda p: p.name)
def test_zip_holds_one_bundle_folder_named_by_version_without_outputs(bundle_dir, tmp_path):
    """A used bundle folder (caches, outputs, local weights, stray docs) packs to exactly its configs, scripts, LICENSE
    and the docs its card links inside the bundle (README.md, data_license.txt): no measurement JSON, no guide."""
    used = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, used, ignore=shutil.ignore_patterns("__pycache__"))
    for junk in ("scripts/__pycache__/a.cpython-311.pyc", "eval/x_seg.nii.gz", "runs/events", "models/model.pt"):
        (used / junk).parent.mkdir(parents=True, exist_ok=True)
        (used / junk).write_bytes(b"x")
    (used / "docs" / "__pycache__").mkdir()
    (used / "docs" / "__pycache__" / "b.pyc").write_bytes(b"x")
    for stray in ("docs/benchmark_cpu.json", "docs/figures/profile.json", "docs/guide.md"):  # belong in <repo>/docs
        (used / stray).parent.mkdir(parents=True, exist_ok=True)
        (used / stray).write_text("{}")

    zip_path = package_bundle(str(used), out_dir=str(tmp_path / "dist"))

    assert zip_path.name == f"{bundle_dir.name}_v{_version(bundle_dir)}.zip"
    names = _names(zip_path)
    expected = sorted(
        f"{bundle_dir.name}/{p.relative_to(bundle_dir).as_posix()}"
        for top in ("configs", "scripts")
        for p in (bundle_dir / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    shipped_docs = [f"{bundle_dir.name}/docs/README.md", f"{bundle_dir.name}/docs/data_license.txt"]
    assert sorted(names) == sorted(expected + shipped_docs + [f"{bundle_dir.name}/LICENSE"])
    allowed = ("configs/", "scripts/", "LICENSE", "large_files.yml", "models/model.pt", "docs/README.md", "docs/data_")
    assert [n for n in names if not n.split("/", 1)[1].startswith(allowed)] == []
    assert [n for n in names if "/docs/" in n and n.endswith(".json")] == []
    assert f"{bundle_dir.name}/configs/metadata.json" in names
    assert f"{bundle_dir.name}/docs/data_license.txt" in names
    assert not [n for n in names if n.endswith(".pyc") or "/models/" in n or "/eval/" in n or "/runs/" in n]
    assert [p.name for p in zip_path.parent.iterdir()] == [zip_path.name]  # no temporary left


def test_existing_zip_is_kept_unless_overwrite(tmp_path):
    zip_path = package_bundle(str(BTCV_DIR), out_dir=str(tmp_path))
    zip_path.write_bytes(b"earlier release")
    with pytest.raises(FileExistsError, match="--overwrite"):
        package_bundle(str(BTCV_DIR), out_dir=str(tmp_path))
    assert zip_path.read_bytes() == b"earlier release"
    package_bundle(str(BTCV_DIR), out_dir=str(tmp_path), overwrite=True)
    assert zipfile.is_zipfile(zip_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [zip_path.name]


def test_hosted_weights_are_named_in_large_files_yml_with_their_md5(btcv_weights, tmp_path):
    import yaml

    url = "https://example.org/releases/swin_unetr_btcv_seg/model.pt"
    zip_path = package_bundle(str(BTCV_DIR), out_dir=str(tmp_path), weights=str(btcv_weights), weights_url=url)
    names = _names(zip_path)
    assert "swin_unetr_btcv_seg/large_files.yml" in names
    assert not [n for n in names if "/models/" in n]  # hosted, not shipped
    with zipfile.ZipFile(zip_path) as zf:
        listed = yaml.safe_load(zf.read("swin_unetr_btcv_seg/large_files.yml"))
    assert listed == {
        "large_files": [{"path": "models/model.pt", "url": url, "hash_val": md5_of(btcv_weights), "hash_type": "md5"}]
    }
    # the layout of the model zoo's own files
    assert large_files_yaml([listed["large_files"][0]]).startswith('large_files:\n  - path: "models/model.pt"\n')


def test_weights_url_without_the_file_and_unloadable_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--weights"):
        package_bundle(str(BTCV_DIR), out_dir=str(tmp_path), weights_url="https://example.org/model.pt")
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(bad)):
        package_bundle(str(BTCV_DIR), out_dir=str(tmp_path / "dist"), weights=str(bad))
    # the model.pt of earlier versions: the zoo's CI would call ckpt_export on it without key_in_ckpt and fail
    wrapped = tmp_path / "earlier_model.pt"
    torch.save({"model": recorded(SwinUNETR(1, 14, feature_size=12).state_dict()), "network_record": {}}, wrapped)
    with pytest.raises(ValueError) as info:
        package_bundle(str(BTCV_DIR), out_dir=str(tmp_path / "dist"), weights=str(wrapped))
    assert f"{wrapped}: expected a plain state dict" in str(info.value) and "state dict under 'model'" in str(
        info.value
    )
    assert f"python -m tools convert_checkpoint --input {wrapped}" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        package_bundle(str(tmp_path), out_dir=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == []


def test_monai_download_unpacks_the_zip_and_the_bundle_runs_from_there(
    btcv_weights, phantom_dir, tmp_path, monkeypatch
):
    """``monai.bundle download --url file://...`` then ``load`` (no key_in_ckpt, as the zoo calls it) and one
    inference, from the unpacked folder."""
    zip_path = package_bundle(str(BTCV_DIR), out_dir=str(tmp_path / "dist"), weights=str(btcv_weights))
    bundles = tmp_path / "downloaded"
    download(name="swin_unetr_btcv_seg", url=zip_path.resolve().as_uri(), bundle_dir=str(bundles), progress=False)
    unpacked = bundles / "swin_unetr_btcv_seg"
    assert (unpacked / "models" / "model.pt").read_bytes() == btcv_weights.read_bytes()
    assert (unpacked / "scripts" / "__init__.py").is_file()

    monkeypatch.chdir(unpacked)  # the bundle's paths start at "." = its folder, as a downloaded bundle is used
    with bundle_on_path(unpacked):
        network = load(
            name="swin_unetr_btcv_seg",
            bundle_dir=str(bundles),
            workflow_type="inference",
            # built in the current order: loading the file's records must switch it to legacy
            net_override={"feature_size": 12, "downsample": "$scripts.patch_merging.resolve_downsample('current')"},
            device="cpu",
        )  # no copy_model_args: monai's copy_model_state copies the patch-merging records like any tensor
        assert importlib.import_module("scripts.patch_merging").merging_order_of(network) == "legacy"
        saved = torch.load(btcv_weights, map_location="cpu", weights_only=True)
        loaded = network.state_dict()
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():  # the tensors, and the layers' order records
            assert torch.equal(loaded[key], value), key

        out = tmp_path / "predictions"
        workflow = btcv_workflow(
            ["inference.json"],
            "infer",
            unpacked,
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            output_dir=str(out),
            num_workers=0,
            **{k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")},
        )
        assert workflow.check_properties() in (None, [])
        workflow.initialize()
        workflow.run()
        # the network monai.bundle.load returned predicts like the bundle's own (ckpt_path loaded by the workflow)
        bundle_network = workflow.parser.get_parsed_content("network").eval()
        torch.manual_seed(4)
        x = torch.randn(1, 1, *SMALL["roi_size"])
        with torch.no_grad():
            # equal up to rounding (the bundle's network may use another attention kernel); a wrong order: far more
            assert torch.allclose(network.eval()(x), bundle_network(x), atol=1e-4, rtol=0)
        workflow.finalize()
    image = phantom_dir / json.loads((phantom_dir / "datalist.json").read_text())["testing"][0]["image"]
    pred = nib.load(out / image.name.replace(".nii.gz", "_seg.nii.gz"))
    assert pred.shape == nib.load(image).shape
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(14))


@pytest.mark.parametrize("bundle_dir", BUNDLES, ids=lambda p: p.name)
def test_bundle_docs_hold_only_what_the_card_links(bundle_dir):
    """Measurements and guides live in the repository's docs/ (docs/figures/, docs/*.md), not in a bundle."""
    docs = sorted(p.relative_to(bundle_dir).as_posix() for p in (bundle_dir / "docs").rglob("*") if p.is_file())
    assert docs == ["docs/README.md", "docs/data_license.txt"]
