"""The bundles run from any folder; ``device`` may be a string; the network takes the order of its weights.

Each test works on a copy of a bundle in ``tmp_path`` (weights and outputs land in the copy) and runs
from another, empty folder, which must stay empty.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, create_workflow
from monai.networks.nets import SwinUNETR

from tests.helpers import BTCV_DIR, MSD_DIR, SMALL, SSL_DIR, bundle_on_path, forget_scripts_modules, order_record

INFER_SMALL = {k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size", "num_workers")}
MSD_TASK = "Task09_Spleen"


def _copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "models", "eval", "runs"))
    return dest


def _save_model(bundle: Path, order: str = "current", seed: int = 0, path: Path | None = None) -> Path:
    """A random feature-size-12 BTCV network saved as the bundle saves model.pt (its state dict); returns the file."""
    with bundle_on_path(bundle):
        from scripts.patch_merging import resolve_downsample

        torch.manual_seed(seed)
        net = SwinUNETR(1, 14, feature_size=12, downsample=resolve_downsample(order))
    path = path or bundle / "models" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def btcv_copy(tmp_path) -> Path:
    bundle = _copy_bundle(BTCV_DIR, tmp_path / "swin_unetr_btcv_seg")
    _save_model(bundle)
    return bundle


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty working directory that is not the bundle's; ``scripts`` is not importable from it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    forget_scripts_modules()
    path_before = list(sys.path)
    # as in a fresh process: no bundle folder that an earlier test's workflow.run() left on sys.path
    sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "scripts" / "__init__.py").is_file()]
    yield cwd
    sys.path[:] = path_before  # ConfigWorkflow.run() puts the bundle on sys.path
    forget_scripts_modules()


def _segmentations(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*_seg.nii.gz"))


def _monai_bundle_run(cwd: Path, config_file: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _small_args(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k}", json.dumps(v))]


def test_monai_bundle_run_inference_from_another_folder(btcv_copy, phantom_dir, elsewhere):
    configs = btcv_copy / "configs"
    result = _monai_bundle_run(
        elsewhere,
        str(configs / "inference.json"),
        "--dataset_dir",
        str(phantom_dir),
        "--datalist",
        str(phantom_dir / "datalist.json"),
        "--device",
        "cpu",
        *_small_args(INFER_SMALL),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(_segmentations(btcv_copy / "eval")) == 1  # <bundle>/eval, the default output_dir
    assert list(elsewhere.iterdir()) == []


def test_monai_bundle_run_list_of_configs_with_meta_and_logging_files(btcv_copy, phantom_dir, elsewhere):
    configs = btcv_copy / "configs"
    files = [str(configs / "train.json"), str(configs / "evaluate.json")]
    result = _monai_bundle_run(
        elsewhere,
        json.dumps(files),
        "--meta_file",
        str(configs / "metadata.json"),
        "--logging_file",
        str(configs / "logging.conf"),
        "--dataset_dir",
        str(phantom_dir),
        "--datalist",
        str(phantom_dir / "datalist.json"),
        *_small_args({**SMALL, "cache_rate": 0.0}),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((btcv_copy / "eval" / "metrics_summary.json").read_text())
    assert len(summary["cases"]) == 2
    assert list(elsewhere.iterdir()) == []


def test_create_workflow_inference_from_another_folder_with_a_string_device(btcv_copy, phantom_dir, elsewhere):
    workflow = create_workflow(
        config_file=str(btcv_copy / "configs" / "inference.json"),
        workflow_type="infer",
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        device="cpu",
        **INFER_SMALL,
    )
    workflow.run()  # MONAI puts the bundle on sys.path here: resolve items before it only with the bundle on sys.path
    workflow.finalize()
    assert workflow.check_properties() in (None, [])
    assert Path(workflow.parser.get_parsed_content("bundle_root")) == btcv_copy
    assert len(_segmentations(btcv_copy / "eval")) == 1
    assert list(elsewhere.iterdir()) == []


def test_explicit_bundle_root_still_wins(btcv_copy, phantom_dir, elsewhere, tmp_path):
    root = tmp_path / "given_root"
    _save_model(btcv_copy, path=root / "models" / "model.pt")
    workflow = create_workflow(
        config_file=str(btcv_copy / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(root),
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        device="cpu",
        **INFER_SMALL,
    )
    workflow.run()
    assert len(_segmentations(root / "eval")) == 1
    assert not (btcv_copy / "eval").exists()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("device", ["cpu", "torch.device"])
def test_training_one_iteration_with_a_string_or_torch_device_from_another_folder(
    btcv_copy, phantom_dir, elsewhere, device
):
    workflow = create_workflow(
        config_file=str(btcv_copy / "configs" / "train.json"),
        workflow_type="train",
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        device="cpu" if device == "cpu" else "$torch.device('cpu')",
        max_epochs=1,
        cache_rate=0.0,
        **{"train#trainer#epoch_length": 1},
        **SMALL,
    )
    workflow.run()  # the setup steps (allocator: torch.device(@device).type) run first
    assert workflow.parser.get_parsed_content("train#trainer").state.iteration == 1
    last = btcv_copy / "models" / "checkpoint_last.pt"
    saved = torch.load(last, weights_only=True)
    records = {k: v for k, v in saved["model"].items() if k.endswith("downsample._extra_state")}
    assert len(records) == 4 and all(torch.equal(r, order_record("current")) for r in records.values())
    assert list(elsewhere.iterdir()) == []


def test_network_def_builds_without_any_weights_file(tmp_path, phantom_dir):
    """As the model zoo's CI and MONAI Deploy build it: from the configs alone, no models/ folder."""
    from tools.data.make_msd_tasks import write_msd_task

    write_msd_task(tmp_path / "msd", MSD_TASK, num_training=3, num_test=1, seed=0, shape=(24, 24, 16))
    cases = [
        (BTCV_DIR, ["inference.json"], {}),
        (BTCV_DIR, ["train.json", "evaluate.json"], {}),
        (MSD_DIR, ["inference.json"], {"task": MSD_TASK, "dataset_dir": str(tmp_path / "msd" / MSD_TASK)}),
        (MSD_DIR, ["train.json", "evaluate.json"], {"task": MSD_TASK, "dataset_dir": str(tmp_path / "msd" / MSD_TASK)}),
    ]
    for bundle, configs, overrides in cases:
        empty = tmp_path / f"empty_{bundle.name}_{len(configs)}"
        with bundle_on_path(bundle):
            from scripts.patch_merging import merging_order_of

            parser = ConfigParser()
            parser.read_config([str(bundle / "configs" / c) for c in configs])
            parser.update({"bundle_root": str(empty), "feature_size": 12, **overrides})
            net = parser.get_parsed_content("network_def")
            assert merging_order_of(net) == "current", (bundle.name, configs)
        assert not empty.exists()


def _predict(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("loader", ["CheckpointLoader", "load_state_dict"])
def test_legacy_weights_give_a_legacy_network_whatever_loads_them(btcv_copy, tmp_path, loader):
    """The MONAI Label case: training's network is built without the file (current order), then model.pt is loaded."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    path = _save_model(btcv_copy, "legacy", seed=3, path=tmp_path / "legacy" / "model.pt")
    x = torch.rand(1, 1, 32, 64, 64)  # the smallest input whose bottleneck holds more than one voxel
    with bundle_on_path(btcv_copy):
        from scripts.patch_merging import LegacyPatchMerging, merging_order_of

        reference = SwinUNETR(1, 14, feature_size=12, downsample=LegacyPatchMerging)
        reference.load_state_dict(torch.load(path, weights_only=True))
        parser = ConfigParser()
        parser.read_config(str(btcv_copy / "configs" / "train.json"))
        parser.update({"bundle_root": str(tmp_path / "run"), "feature_size": 12, "use_checkpoint": False})
        net = parser.get_parsed_content("network_def")
        assert merging_order_of(net) == "current"
        if loader == "CheckpointLoader":
            engine = Engine(lambda e, b: None)
            CheckpointLoader(load_path=str(path), load_dict={"model": net}, strict=False).attach(engine)
            engine.run([0], max_epochs=1)
        else:
            net.load_state_dict(torch.load(path, weights_only=True), strict=False)
        assert merging_order_of(net) == "legacy"
        assert torch.allclose(_predict(net, x), _predict(reference, x), atol=1e-5)  # flash attention or not
        # the same weights in the current order are another function: the order matters here
        current = SwinUNETR(1, 14, feature_size=12, downsample="merging")
        current.load_state_dict(torch.load(path, weights_only=True), strict=False)
        assert (_predict(current, x) - _predict(reference, x)).abs().max() > 1e-3


def test_files_written_before_the_layers_recorded_their_order_still_load_in_their_order(btcv_copy, tmp_path):
    """A model.pt with only the top-level network_record: inference reads the order from the file it names."""
    path = _save_model(btcv_copy, "legacy", seed=4, path=tmp_path / "old" / "model.pt")
    state = torch.load(path, weights_only=True)
    record = {"patch_merging": "legacy", "feature_size": 12, "format_version": 1}
    old = {"model": {k: v for k, v in state.items() if not k.endswith("_extra_state")}, "network_record": record}
    torch.save(old, path)
    with bundle_on_path(btcv_copy):
        from scripts.patch_merging import merging_order_of

        parser = ConfigParser()
        parser.read_config(str(btcv_copy / "configs" / "inference.json"))
        parser.update({"ckpt_path": str(path), "feature_size": 12})
        net = parser.get_parsed_content("network_def")
        assert merging_order_of(net) == "legacy"
        result = net.load_state_dict(old["model"], strict=True)  # a record-less state dict loads strictly
        assert not result.missing_keys and not result.unexpected_keys
        assert merging_order_of(net) == "legacy"


@pytest.mark.parametrize(
    "bundle, configs",
    [
        (BTCV_DIR, ["train.json"]),
        (BTCV_DIR, ["train.json", "evaluate.json"]),
        (BTCV_DIR, ["inference.json"]),
        (MSD_DIR, ["train.json"]),
        (MSD_DIR, ["inference.json"]),
        (SSL_DIR, ["train.json"]),
        (SSL_DIR, ["export.json"]),
        (SSL_DIR, ["inference.json"]),
    ],
)
def test_every_default_path_is_under_the_bundle_folder(bundle, configs, elsewhere):
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / c) for c in configs])
        assert Path(parser.get_parsed_content("bundle_root")) == bundle
        for key in ("output_dir", "ckpt_dir", "ckpt_path", "folds_dir", "cache_dir", "encoder_path"):
            if key in parser and parser[key]:
                assert Path(parser.get_parsed_content(key)).is_relative_to(bundle), key
