"""The bundles' shared modules and configs are generated copies of bundles/common (python -m tools sync_bundle_code)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.helpers import REPO
from tools.release.sync_bundle_code import (
    HEADER_START,
    check,
    expected_copies,
    load_config_manifest,
    load_manifest,
    main,
    sync,
)

BTCV, MSD, SSL = "swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain"
# The modules that were kept identical by hand before the manifest: they must stay shared.
SHARED_WITH_BTCV = {
    MSD: (
        "allocator.py",
        "checkpoints.py",
        "checks.py",
        "datalists.py",
        "encoder_weights.py",
        "inferers.py",
        "metrics.py",
        "patch_merging.py",
        "transforms.py",
    ),
    SSL: ("allocator.py", "checkpoints.py", "encoder_weights.py", "patch_merging.py"),
}


def _tmp_tree(tmp_path):
    """A copy of the repository's bundles/ folder (scripts, configs and the manifest only)."""
    for src in [*(REPO / "bundles").glob("*/scripts/*.py"), *(REPO / "bundles").glob("*/configs/*")]:
        if not src.is_file():
            continue
        dst = tmp_path / src.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    shutil.copyfile(REPO / "bundles" / "common" / "manifest.json", tmp_path / "bundles" / "common" / "manifest.json")
    return tmp_path


def test_every_copy_in_the_repository_is_in_sync():
    assert check(REPO) == []
    result = subprocess.run(
        [sys.executable, "-m", "tools", "sync_bundle_code", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_modules_shared_with_the_btcv_bundle_are_identical():
    manifest = load_manifest()
    for bundle, modules in SHARED_WITH_BTCV.items():
        for module in modules:
            assert {BTCV, bundle} <= set(manifest[module]), (bundle, module)
            text = (REPO / "bundles" / bundle / "scripts" / module).read_text()
            assert text == (REPO / "bundles" / BTCV / "scripts" / module).read_text(), (bundle, module)


def test_each_copy_names_its_source_in_a_header():
    for path, text in expected_copies().items():
        if path.suffix == ".json":  # no comments in JSON: the manifest and the tool's docstring name the source
            assert text == (REPO / "bundles" / "common" / "configs" / path.name).read_text(), path
            continue
        first = path.read_text().splitlines()[0]
        source = f"bundles/common/{path.parent.name}/{path.name}"
        assert first.startswith(HEADER_START) and source in first, path


def test_configs_equal_by_intent_have_one_source():
    """The multi-GPU overlay and logging.conf are the same in every bundle, generated from bundles/common/configs."""
    configs = load_config_manifest()
    for name in ("multi_gpu_train.json", "logging.conf"):
        assert set(configs[name]) == {BTCV, MSD, SSL}, name
        texts = {(REPO / "bundles" / b / "configs" / name).read_text() for b in (BTCV, MSD, SSL)}
        assert len(texts) == 1, name
    # DDP validation pads only when there are fewer validation cases than ranks (MSD's fix, now everywhere)
    multi = (REPO / "bundles" / "common" / "configs" / "multi_gpu_train.json").read_text()
    assert '"even_divisible": "$len(@validate#dataset) < dist.get_world_size()"' in multi


def test_a_drifted_or_missing_copy_is_named_and_sync_repairs_it(tmp_path, capsys):
    root = _tmp_tree(tmp_path)
    drifted = root / "bundles" / MSD / "scripts" / "checks.py"
    drifted.write_text(drifted.read_text() + "# a local edit\n")
    missing = root / "bundles" / SSL / "scripts" / "patch_merging.py"
    missing.unlink()
    stale = root / "bundles" / SSL / "scripts" / "old_shared.py"
    stale.write_text(f"{HEADER_START}bundles/common/scripts/old_shared.py by tools/sync_bundle_code.py\n")
    drifted_config = root / "bundles" / BTCV / "configs" / "multi_gpu_train.json"
    drifted_config.write_text(
        drifted_config.read_text().replace('"even_divisible": "$len', '"even_divisible": "$0 and len')
    )
    assert check(root) == [
        f"differs from its source: bundles/{MSD}/scripts/checks.py",
        f"missing: bundles/{SSL}/scripts/patch_merging.py",
        f"differs from its source: bundles/{BTCV}/configs/multi_gpu_train.json",
        f"not in the manifest: bundles/{SSL}/scripts/old_shared.py",
    ]
    assert main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr()
    assert f"bundles/{MSD}/scripts/checks.py" in out.out and "out of sync" in out.err
    assert sorted(p.name for p in sync(root)) == ["checks.py", "multi_gpu_train.json", "patch_merging.py"]
    stale.unlink()
    assert check(root) == [] and main(["--check", "--root", str(root)]) == 0
