"""configs/inference_deploy.json: the BTCV inference pipeline with MONAI's own classes only, for a model.ts in Deploy.

A TorchScript archive carries the configs but not the bundle's ``scripts`` package, so every component that
MONAI Deploy instantiates from it (preprocessing, inferer, postprocessing) must come from MONAI. The overlay must
stay the same pipeline as inference.json apart from the classes it replaces.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tools.common.bundles import BTCV_DIR, use_bundle_scripts

CONFIGS = BTCV_DIR / "configs"
# inference.json class -> the MONAI class the overlay uses instead (each is a subclass of the other's base)
REPLACED = {"scripts.transforms.DicomLoadImaged": "LoadImaged", "scripts.transforms.PathTolerantSpacingd": "Spacingd"}
# Deploy removes LoadImage*/SaveImage* after instantiating them, and a SaveImaged would resolve output_dir, i.e.
# bundle_root (scripts.BUNDLE_ROOT), which an archive does not have: the overlay ends with the label map.
DROPPED = {"SaveImaged", "scripts.outputs.RecordOutputd"}
# lcc_labels (off by default) is checked by the bundle's scripts and needs scikit-image: not applied in Deploy
DROPPED.add("KeepLargestConnectedComponentd")
DEPLOY_IDS = ("preprocessing", "inferer", "postprocessing")


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_the_overlay_names_no_bundle_code():
    overlay = _load("inference_deploy.json")
    assert set(overlay) == set(DEPLOY_IDS)
    assert not [s for s in _strings(overlay) if "scripts" in s]


def test_the_overlay_is_inference_json_with_monai_classes():
    infer, overlay = _load("inference.json"), _load("inference_deploy.json")
    for compose in ("preprocessing", "postprocessing"):
        expected = []
        for t in infer[compose]["transforms"]:
            if t["_target_"] in DROPPED:
                continue
            expected.append({**t, "_target_": REPLACED.get(t["_target_"], t["_target_"])})
        assert overlay[compose]["transforms"] == expected, compose
    scripts = use_bundle_scripts(BTCV_DIR)
    from monai import transforms

    for name, base in REPLACED.items():
        assert issubclass(getattr(scripts.transforms, name.rsplit(".", 1)[1]), getattr(transforms, base))
    inferer = {
        k: v
        for k, v in infer["inferer"].items()
        if k not in ("autocast", "channels_last", "reuse_cpu_memory", "reuse_attention_masks")
    }
    assert overlay["inferer"] == {**inferer, "_target_": "SlidingWindowInferer"}


def test_the_overlay_parses_without_the_bundle_on_sys_path(tmp_path):
    """As Deploy reads a model.ts: both configs and the metadata, from another folder, no ``scripts`` importable."""
    code = f"""
import sys
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config([{str(CONFIGS / "inference.json")!r}, {str(CONFIGS / "inference_deploy.json")!r}])
parser.read_meta({str(CONFIGS / "metadata.json")!r})
for name in {DEPLOY_IDS!r}:
    print(name, type(parser.get_parsed_content(name)).__name__)
assert "scripts" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["preprocessing", "Compose", "inferer", "SlidingWindowInferer"] + [
        "postprocessing",
        "Compose",
    ]
