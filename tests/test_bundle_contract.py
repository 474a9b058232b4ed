"""What every bundle of the project promises, checked the same way for the three of them.

Metadata valid against MONAI's schema, version = newest changelog entry, public knobs documented in
the model card, the run ids MONAI's tools call, workflow properties (``check_properties``), the
network against ``network_data_format`` (``verify_net_in_out``, where there is an inference config),
and the multi-GPU config extending, not replacing, the single-process ``setup``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.networks.nets import SwinUNETR

from tests.conftest import (
    BTCV_DIR,
    MSD_DIR,
    MSD_INFER_SMALL,
    MSD_SMALL,
    SCHEMA,
    SMALL,
    SSL_DIR,
    SSL_SMALL,
    btcv_workflow,
    bundle_on_path,
)
from tools.make_msd_tasks import write_msd_task

BUNDLES = {"btcv": BTCV_DIR, "msd": MSD_DIR, "ssl": SSL_DIR}
WITH_INFERENCE = ["btcv", "msd"]  # the pre-training bundle has no inference config: nothing to infer
MSD_TASK = "Task09_Spleen"

# Knobs a user overrides, named by each bundle's model card (beyond the literal-valued top-level keys).
PUBLIC_KNOBS = {
    "btcv": [
        "dataset_dir",
        "datalist",
        "output_dir",
        "device",
        "amp",
        "roi_size",
        "spacing",
        "feature_size",
        "sw_batch_size",
        "overlap",
        "num_workers",
        "learning_rate",
        "max_epochs",
        "val_interval",
        "pretrained_path",
    ],
    "msd": [
        "task",
        "dataset_dir",
        "dataset_json",
        "datalist",
        "fold",
        "num_folds",
        "split_seed",
        "output_dir",
        "ckpt_dir",
        "device",
        "amp",
        "spacing",
        "roi_size",
        "intensity",
        "augmentation",
        "feature_size",
        "pretrained_path",
        "patch_merging",
        "in_channel_rule",
        "resume_from",
        "batch_size",
        "num_samples",
        "num_workers",
        "learning_rate",
        "max_epochs",
        "val_interval",
        "sw_batch_size",
        "overlap",
    ],
    "ssl": [
        "dataset_dir",
        "datalist",
        "output_dir",
        "ckpt_dir",
        "device",
        "amp",
        "roi_size",
        "spacing",
        "hu_window",
        "feature_size",
        "pretrained_path",
        "patch_merging",
        "resume",
        "on_bad_volume",
        "dataset_type",
        "cache_dir",
        "batch_size",
        "num_samples",
        "cutout_fraction",
        "temperature",
        "inpaint_weight",
        "contrast_weight",
        "rotation_weight",
        "learning_rate",
        "warmup_steps",
        "num_steps",
        "accumulation_steps",
        "val_interval",
        "ckpt_metric",
    ],
}
# Knobs of the other configs: {config: knobs that it defines and the model card documents}
OTHER_CONFIG_KNOBS = {
    "btcv": {"evaluate.json": ["ckpt_path"]},
    "msd": {"inference.json": ["ckpt_path", "folds_dir", "tta_flips"]},
    "ssl": {"export.json": ["ckpt_path", "encoder_path"]},
}
BTCV_INFERENCE_KNOBS = [
    "dataset_dir",
    "datalist",
    "output_dir",
    "device",
    "amp",
    "roi_size",
    "spacing",
    "feature_size",
    "sw_batch_size",
    "overlap",
    "num_workers",
    "ckpt_path",
]
# Literal-valued top-level keys that are not knobs: MONAI's bundle root, and the network shape that
# the metadata fixes (checked against it below and in the per-bundle tests).
NOT_KNOBS = {"bundle_root", "in_channels", "num_classes"}


def _config(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES[bundle] / "configs" / name).read_text())


def _readme(bundle: str) -> str:
    return (BUNDLES[bundle] / "docs" / "README.md").read_text()


def _is_literal(value) -> bool:
    """A plain value a user overrides: not a component, reference, expression or macro."""
    if isinstance(value, list):
        return all(_is_literal(v) for v in value)
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    return isinstance(value, (bool, int, float)) or value is None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.fixture(scope="module")
def msd_task_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msd_contract")
    write_msd_task(root, MSD_TASK, num_training=3, num_test=1, seed=0, shape=(24, 24, 16))
    return root


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_metadata_passes_monai_schema_and_version_is_the_newest_changelog_entry(bundle, tmp_path):
    meta_file = BUNDLES[bundle] / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))  # raises on any schema error
    meta = json.loads(meta_file.read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["version"] == next(iter(meta["changelog"])) == max(meta["changelog"], key=_version)
    assert "required_packages_version" in meta


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_public_knobs_are_top_level_and_documented(bundle):
    readme = _readme(bundle)
    train = _config(bundle, "train.json")
    for knob in PUBLIC_KNOBS[bundle]:
        assert knob in train, knob
        assert f"`{knob}`" in readme, knob
    for name in ("train.json", "inference.json"):
        if (BUNDLES[bundle] / "configs" / name).exists():
            config = _config(bundle, name)
            literal = [k for k, v in config.items() if "#" not in k and k not in NOT_KNOBS and _is_literal(v)]
            assert [k for k in literal if f"`{k}`" not in readme] == [], name
    for name, knobs in OTHER_CONFIG_KNOBS[bundle].items():
        for knob in knobs:
            assert knob in _config(bundle, name) and f"`{knob}`" in readme, (name, knob)


def test_btcv_inference_shares_the_training_settings():
    train, infer = _config("btcv", "train.json"), _config("btcv", "inference.json")
    for knob in BTCV_INFERENCE_KNOBS:
        assert knob in infer, knob
    for shared in ("roi_size", "spacing", "hu_window", "feature_size", "num_classes"):
        assert train[shared] == infer[shared], shared


def test_msd_readme_names_every_task():
    from tools.make_msd_tasks import MSD_TASKS

    readme = _readme("msd")
    for task in MSD_TASKS:
        assert task in readme, task


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_run_ids_are_present(bundle):
    train, multi = _config(bundle, "train.json"), _config(bundle, "multi_gpu_train.json")
    assert {"run", "training", "setup"} <= set(train)
    assert {"run", "training", "+setup", "finalize"} <= set(multi)
    assert "setup" not in multi  # extends train.json's, never replaces it
    # no "initialize": MONAI resolves it before run() puts the bundle on sys.path, which would make
    # `import scripts` fail from another folder; the setup steps run first in "training" instead
    assert "initialize" not in train and "initialize" not in multi
    assert train["training"][0] == multi["training"][0] == "@setup"
    if bundle in WITH_INFERENCE:
        assert {"run", "inferring"} <= set(_config(bundle, "inference.json"))
        assert {"run", "evaluating"} <= set(_config(bundle, "evaluate.json"))


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_multi_gpu_setup_keeps_every_single_process_step(bundle):
    """Parsed as monai.bundle run merges the two files: train.json's steps first, then the DDP ones."""
    train = _config(bundle, "train.json")["setup"]
    merged = ConfigParser.load_config_files(
        [str(BUNDLES[bundle] / "configs" / name) for name in ("train.json", "multi_gpu_train.json")]
    )
    assert merged["setup"][: len(train)] == train
    assert "$scripts.allocator.reuse_freed_memory(@reuse_cpu_memory and torch.device(@device).type == 'cpu')" in train
    assert len(merged["setup"]) > len(train)
    # the process group is joined where the device is resolved, before any step reads @device
    assert merged["device"] == "$scripts.distributed.rank_device()"
    assert "$import torch.distributed as dist" in merged["imports"]
    # the network with its pre-trained encoder is defined once, in train.json
    assert merged["network"]["module"] == "$@network_with_encoder.to(@device)"
    assert _config(bundle, "train.json")["network"] == "$@network_with_encoder.to(@device)"


@pytest.mark.parametrize("bundle", WITH_INFERENCE)
def test_evaluation_inserts_the_original_label_copy_by_group_name(bundle, phantom_dir, msd_task_root, tmp_path):
    """evaluate.json's preprocessing is train.json's deterministic transforms plus one copy after loading."""
    overrides = (
        {"dataset_dir": str(phantom_dir), "datalist": str(phantom_dir / "datalist.json")}
        if bundle == "btcv"
        else {"task": MSD_TASK, "dataset_dir": str(msd_task_root / MSD_TASK), "num_folds": 3}
    )
    files = [str(BUNDLES[bundle] / "configs" / name) for name in ("train.json", "evaluate.json")]
    with bundle_on_path(BUNDLES[bundle]):
        parser = ConfigParser(ConfigParser.load_config_files(files))
        parser.update({"bundle_root": str(tmp_path), **overrides})
        train = [type(t).__name__ for t in parser.get_parsed_content("train#deterministic_transforms")]
        loading = parser.get_parsed_content("train#loading")
        evaluate = [type(t).__name__ for t in parser.get_parsed_content("validate#preprocessing").transforms]
    assert [type(t).__name__ for t in loading] == ["DicomLoadImaged", "EnsureChannelFirstd"]
    assert evaluate == train[:2] + ["CopyItemsd"] + train[2:]
    assert train[2:4] == ["Orientationd", "PathTolerantSpacingd"] and train[-1] == "EnsureTyped"


def _checkpoint(path: Path, in_channels: int, out_channels: int) -> str:
    torch.save({"model": SwinUNETR(in_channels, out_channels, feature_size=12).state_dict()}, path)
    return str(path)


def _settings(bundle: str, phantom_dir: Path, msd_task_root: Path, ssl_corpus: Path, tmp_path: Path) -> tuple:
    """(train overrides, inference overrides or None) for a small, fast workflow of ``bundle``."""
    if bundle == "btcv":
        data = {"dataset_dir": str(phantom_dir), "datalist": str(phantom_dir / "datalist.json")}
        infer = {
            **data,
            "ckpt_path": _checkpoint(tmp_path / "model.pt", 1, 14),
            **{k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")},
        }
        return {**data, **SMALL}, infer
    if bundle == "msd":
        data = {"task": MSD_TASK, "dataset_dir": str(msd_task_root / MSD_TASK)}
        infer = {**data, "ckpt_path": _checkpoint(tmp_path / "model.pt", 1, 2), **MSD_INFER_SMALL}
        return {**data, "num_folds": 3, **MSD_SMALL}, infer
    return {"dataset_dir": str(ssl_corpus), **SSL_SMALL}, None


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_train_and_infer_workflows_pass_check_properties(bundle, phantom_dir, msd_task_root, ssl_corpus, tmp_path):
    train_settings, infer_settings = _settings(bundle, phantom_dir, msd_task_root, ssl_corpus, tmp_path)
    with bundle_on_path(BUNDLES[bundle]):
        train = btcv_workflow(["train.json"], "train", BUNDLES[bundle], bundle_root=str(tmp_path), **train_settings)
        assert train.check_properties() in (None, [])
        for run_id in ("run", "training"):
            assert run_id in train.parser
        if infer_settings is not None:
            infer = btcv_workflow(
                ["inference.json"], "infer", BUNDLES[bundle], bundle_root=str(tmp_path), **infer_settings
            )
            assert infer.check_properties() in (None, [])


@pytest.mark.parametrize("bundle", WITH_INFERENCE)
def test_network_def_matches_network_data_format(bundle, msd_task_root, tmp_path):
    """monai.bundle.verify_net_in_out on inference.json's network_def (fs 12, CPU); SSL has no inference config."""
    configs = BUNDLES[bundle] / "configs"
    out_channels = json.loads((configs / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"][
        "num_channels"
    ]
    overrides = {"feature_size": 12, "ckpt_path": _checkpoint(tmp_path / "model.pt", 1, out_channels)}
    if bundle == "msd":
        overrides.update(task=MSD_TASK, dataset_dir=str(msd_task_root / MSD_TASK))
    with bundle_on_path(BUNDLES[bundle]):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(configs / "metadata.json"),
            config_file=str(configs / "inference.json"),
            device="cpu",
            **overrides,
        )


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_no_function_of_the_bundle_scripts_is_longer_than_120_lines(bundle):
    import ast

    long = []
    for path in sorted((BUNDLES[bundle] / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 120:
                long.append(f"{path.name}:{node.name}")
    assert long == []


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_bundle_scripts_import_one_way_and_at_module_level(bundle):
    """No import inside a function (e.g. to dodge a cycle), and the package's own imports form no cycle."""
    import ast

    graph, hidden = {}, []
    for path in sorted((BUNDLES[bundle] / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [
                    f"{path.name}:{func.name}"
                    for node in ast.walk(func)
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                ]
        if path.stem != "__init__":
            graph[path.stem] = {
                node.module.split(".")[0]
                for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
            }
    assert hidden == []
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join(stack + (module,))}"
        if module not in done:
            for dep in graph.get(module, ()):
                visit(dep, stack + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())
