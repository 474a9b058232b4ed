"""The bundles' shared modules are generated copies of bundles/common/scripts (tools/release/sync_bundle_code.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO
from tools.release.sync_bundle_code import HEADER_START, check, expected_copies, load_manifest, main, sync

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
    """A copy of the repository's bundles/ folder (scripts and the manifest only)."""
    for src in (REPO / "bundles").glob("*/scripts/*.py"):
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
        first = path.read_text().splitlines()[0]
        assert first.startswith(HEADER_START) and f"bundles/common/scripts/{path.name}" in first, path


def test_a_drifted_or_missing_copy_is_named_and_sync_repairs_it(tmp_path, capsys):
    root = _tmp_tree(tmp_path)
    drifted = root / "bundles" / MSD / "scripts" / "checks.py"
    drifted.write_text(drifted.read_text() + "# a local edit\n")
    missing = root / "bundles" / SSL / "scripts" / "patch_merging.py"
    missing.unlink()
    stale = root / "bundles" / SSL / "scripts" / "old_shared.py"
    stale.write_text(f"{HEADER_START}bundles/common/scripts/old_shared.py by tools/sync_bundle_code.py\n")
    assert check(root) == [
        f"differs from its source: bundles/{MSD}/scripts/checks.py",
        f"missing: bundles/{SSL}/scripts/patch_merging.py",
        f"not in the manifest: bundles/{SSL}/scripts/old_shared.py",
    ]
    assert main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr()
    assert f"bundles/{MSD}/scripts/checks.py" in out.out and "out of sync" in out.err
    assert sorted(p.name for p in sync(root)) == ["checks.py", "patch_merging.py"]
    stale.unlink()
    assert check(root) == [] and main(["--check", "--root", str(root)]) == 0
