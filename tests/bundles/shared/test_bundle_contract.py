"""What every bundle of the project promises, checked the same way for the three of them.

Metadata valid against MONAI's schema, version = newest changelog entry, public knobs documented in
the model card, the run ids MONAI's tools call, workflow properties (``check_properties``), the
network against ``network_data_format`` (``verify_net_in_out``, where there is an inference config),
and the multi-GPU config extending, not replacing, the single-process ``setup``.
"""

from __future__ import annotations

import io
import json
import tokenize
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from tests.helpers import (
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
    monai_swin_unetr,
)
from tools.data.make_msd_tasks import write_msd_task

BUNDLES = {"btcv": BTCV_DIR, "msd": MSD_DIR, "ssl": SSL_DIR}
SEGMENTATION = ["btcv", "msd"]  # segment, evaluate and serve MONAI Label/Deploy; the pre-training bundle reconstructs
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
        "resume_from",
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
    "btcv": {"evaluate.json": ["ckpt_path", "folds_dir", "tta_flips"], "inference.json": ["folds_dir", "tta_flips"]},
    "msd": {
        "inference.json": ["ckpt_path", "folds_dir", "tta_flips"],
        "evaluate.json": ["ckpt_path", "folds_dir", "tta_flips"],
    },
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
# resume: the pre-training bundle's former name of resume_from, kept only to refuse it with the new name
NOT_KNOBS = {"bundle_root", "in_channels", "num_classes", "resume"}


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
    from tools.data.make_msd_tasks import MSD_TASKS

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
    assert {"run", "inferring"} <= set(_config(bundle, "inference.json"))
    if bundle in SEGMENTATION:
        assert {"run", "evaluating"} <= set(_config(bundle, "evaluate.json"))


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_multi_gpu_setup_keeps_every_single_process_step(bundle):
    """Parsed as monai.bundle run merges the two files: train.json's steps first, then the DDP ones."""
    train = _config(bundle, "train.json")["setup"]
    merged = ConfigParser.load_config_files(
        [str(BUNDLES[bundle] / "configs" / name) for name in ("train.json", "multi_gpu_train.json")]
    )
    assert merged["setup"][: len(train)] == train
    assert "$scripts.allocator.reuse_cpu_memory(@reuse_cpu_memory and torch.device(@device).type == 'cpu')" in train
    assert len(merged["setup"]) > len(train)
    # the process group is joined where the device is resolved, before any step reads @device
    assert merged["device"] == "$scripts.distributed.rank_device()"
    assert "$import torch.distributed as dist" in merged["imports"]
    # the network with its pre-trained encoder and fused attention is defined once, in train.json; DDP wraps it
    module = (
        "$scripts.window_attention.fast_window_attention(@network_with_encoder, @fast_window_attention).to(@device)"
    )
    assert _config(bundle, "train.json")["network_module"] == module
    assert _config(bundle, "train.json")["network"] == "@network_module"
    assert merged["network"]["module"] == "@network_module"


@pytest.mark.parametrize("bundle", SEGMENTATION)
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
    """A MONAI SwinUNETR of today (current patch-merging order, no record: configs set ``patch_merging``)."""
    network = monai_swin_unetr(in_channels=in_channels, out_channels=out_channels, feature_size=12)
    torch.save({"model": network.state_dict()}, path)
    return str(path)


def _settings(bundle: str, phantom_dir: Path, msd_task_root: Path, ssl_corpus: Path, tmp_path: Path) -> tuple:
    """(train overrides, inference overrides) for a small, fast workflow of ``bundle``."""
    if bundle == "btcv":
        data = {"dataset_dir": str(phantom_dir), "datalist": str(phantom_dir / "datalist.json")}
        infer = {
            **data,
            "ckpt_path": _checkpoint(tmp_path / "model.pt", 1, 14),
            "patch_merging": "current",
            **{k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")},
        }
        return {**data, **SMALL}, infer
    if bundle == "msd":
        data = {"task": MSD_TASK, "dataset_dir": str(msd_task_root / MSD_TASK)}
        infer = {
            **data,
            "ckpt_path": _checkpoint(tmp_path / "model.pt", 1, 2),
            "patch_merging": "current",
            **MSD_INFER_SMALL,
        }
        return {**data, "num_folds": 3, **MSD_SMALL}, infer
    infer = {
        "dataset_dir": str(ssl_corpus),
        "datalist": str(ssl_corpus / "datalist.json"),
        "ckpt_path": str(_bundle_weights(bundle, tmp_path / "model.pt")),
        **{k: SSL_SMALL[k] for k in ("feature_size", "roi_size", "num_workers")},
    }
    return {"dataset_dir": str(ssl_corpus), **SSL_SMALL}, infer


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_train_and_infer_workflows_pass_check_properties(bundle, phantom_dir, msd_task_root, ssl_corpus, tmp_path):
    train_settings, infer_settings = _settings(bundle, phantom_dir, msd_task_root, ssl_corpus, tmp_path)
    with bundle_on_path(BUNDLES[bundle]):
        train = btcv_workflow(["train.json"], "train", BUNDLES[bundle], bundle_root=str(tmp_path), **train_settings)
        assert train.check_properties() in (None, [])
        for run_id in ("run", "training"):
            assert run_id in train.parser
        infer = btcv_workflow(["inference.json"], "infer", BUNDLES[bundle], bundle_root=str(tmp_path), **infer_settings)
        assert infer.check_properties() in (None, [])


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_network_def_matches_network_data_format(bundle, tmp_path):
    """monai.bundle.verify_net_in_out on inference.json's network_def (fs 12, CPU), as the zoo runs it: from the
    bundle's configs and a checkpoint only (MSD: no dataset.json). SSL's inference.json returns the reconstruction."""
    configs = BUNDLES[bundle] / "configs"
    overrides = {"feature_size": 12, "ckpt_path": str(_bundle_weights(bundle, tmp_path / "model.pt"))}
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


# ---- The model zoo's CI (ci/verify_bundle.py min and full mode, pre-commit rules), checked our way ----

ZOO_HASH_TYPES = {"md5", "sha1", "sha256", "sha512"}
# tokens that are not code for check-docstring-first (pre-commit-hooks v4.6.0)
NON_CODE_TOKENS = frozenset({tokenize.COMMENT, tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL, tokenize.ENCODING})


def _zoo_directory_problems(bundle_dir: Path) -> list[str]:
    """What the zoo's directory check would refuse: LICENSE, metadata, an inference config, and weights
    (``models/model.pt`` or a ``large_files.yml`` naming it with url and hash)."""
    import yaml

    problems = [f"missing {r}" for r in ("LICENSE", "configs/metadata.json") if not (bundle_dir / r).is_file()]
    if not (bundle_dir / "configs" / "inference.json").is_file():
        problems.append("missing configs/inference.json")
    large = bundle_dir / "large_files.yml"
    hosted = []
    if large.is_file():
        entries = (yaml.safe_load(large.read_text()) or {}).get("large_files") or []
        for entry in entries:
            if not (str(entry.get("url", "")).startswith("https://") and entry.get("hash_val")):
                problems.append(f"large_files.yml entry without https url and hash: {entry}")
            elif entry.get("hash_type") not in ZOO_HASH_TYPES:
                problems.append(f"large_files.yml entry with unknown hash_type: {entry}")
            else:
                hosted.append(entry.get("path"))
    if not (bundle_dir / "models" / "model.pt").is_file() and "models/model.pt" not in hosted:
        problems.append("no models/model.pt and no large_files.yml naming it")
    return problems


# The zoo's key rules (CONTRIBUTING.md "Preferred Files and Keys"; ci/verify_bundle.py verify_bundle_keys until
# it moved to per-app property checks): top-level keys, and {section: [keys]} with {section#part#arg: key it needs}.
ZOO_TOP_KEYS = {
    # output_dir: "if there are any output files"; every inference and training config here writes some
    "inference.json": ["bundle_root", "device", "network_def", "inferer", "output_dir"],
    "train.json": ["bundle_root", "device", "dataset_dir", "output_dir"],
}
ZOO_SECTION_KEYS = {"train": ["trainer", "dataset", "handlers"], "validate": ["evaluator", "dataset", "handlers"]}
ZOO_PART_KEYS = {"train": ["trainer#max_epochs", "dataset#data"], "validate": ["dataset#data"]}
ZOO_ARG_KEYS = {  # an engine or dataset argument given means the section names it with this key
    "train": {"trainer#postprocessing": "postprocessing", "dataset#transform": "preprocessing"}
    | {"trainer#key_train_metric": "key_metric"},
    "validate": {"evaluator#postprocessing": "postprocessing", "dataset#transform": "preprocessing"}
    | {"evaluator#inferer": "inferer", "evaluator#key_val_metric": "key_metric"},
}


def _zoo_key_problems(configs_dir: Path) -> list[str]:
    """What the zoo's key rules refuse in a bundle's inference.json and train.json (names as written, not parsed)."""
    problems = []
    for name, keys in ZOO_TOP_KEYS.items():
        config = json.loads((configs_dir / name).read_text())
        problems += [f"{name}: missing key {key!r}" for key in keys if key not in config]
        if name != "train.json":
            continue
        for section in (s for s in ZOO_SECTION_KEYS if s in config):
            missing = [k for k in ZOO_SECTION_KEYS[section] if k not in config[section]]
            problems += [f"{name}: missing {section}#{k}" for k in missing]
            for part in ZOO_PART_KEYS[section]:
                head, key = part.split("#")
                if key not in config[section].get(head, {}):
                    problems.append(f"{name}: missing {section}#{part}")
            for arg, key in ZOO_ARG_KEYS[section].items():
                head, argument = arg.split("#")
                if argument in config[section].get(head, {}) and key not in config[section]:
                    problems.append(f"{name}: {section}#{arg} given but no {section}#{key}")
        for handler in config.get("train", {}).get("handlers", []):
            if handler.get("_target_") == "ValidationHandler" and handler.get("interval") != "@val_interval":
                problems.append(f"{name}: ValidationHandler interval is {handler.get('interval')!r}, not @val_interval")
    return problems


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_configs_have_the_keys_the_zoo_requires(bundle):
    assert _zoo_key_problems(BUNDLES[bundle] / "configs") == []


def test_zoo_key_rules_catch_a_missing_inferer_and_output_dir(tmp_path):
    for name in ZOO_TOP_KEYS:
        config = _config("ssl", name)
        if name == "inference.json":
            config = {k: v for k, v in config.items() if k not in ("inferer", "output_dir")}
        (tmp_path / name).write_text(json.dumps(config))
    expected = ["inference.json: missing key 'inferer'", "inference.json: missing key 'output_dir'"]
    assert _zoo_key_problems(tmp_path) == expected


def _bundle_weights(bundle: str, path: Path) -> Path:
    """A small (feature size 12) ``model.pt`` of ``bundle``'s inference network as the bundle saves it (state dict)."""
    with bundle_on_path(BUNDLES[bundle]):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES[bundle] / "configs" / "inference.json"))
        parser.update({"feature_size": 12, "patch_merging": "current", "ckpt_path": ""})
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_released_bundle_has_weights_or_names_hosted_ones(bundle, tmp_path):
    """The zoo needs models/model.pt after its large-file download. The git folder ships no weights (only that
    is missing); the packaging tool's zip has them, or a large_files.yml with url and md5 for hosted ones."""
    import zipfile

    from tools.release.package_bundle import package_bundle

    assert _zoo_directory_problems(BUNDLES[bundle]) == ["no models/model.pt and no large_files.yml naming it"]
    weights = _bundle_weights(bundle, tmp_path / "model.pt")
    url = f"https://example.org/{BUNDLES[bundle].name}/model.pt"
    for name, options in {"shipped": {}, "hosted": {"weights_url": url}}.items():
        zip_path = package_bundle(str(BUNDLES[bundle]), out_dir=str(tmp_path / name), weights=str(weights), **options)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp_path / name)
        assert _zoo_directory_problems(tmp_path / name / BUNDLES[bundle].name) == [], name


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_network_def_builds_from_the_configs_alone(bundle, tmp_path):
    """As the zoo builds it: the bundle's own files only (no models/, no dataset.json), another working folder."""
    import shutil

    copy = tmp_path / BUNDLES[bundle].name
    for part in ("configs", "scripts"):
        shutil.copytree(BUNDLES[bundle] / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    meta = json.loads((copy / "configs" / "metadata.json").read_text())["network_data_format"]
    with bundle_on_path(copy):
        parser = ConfigParser()
        parser.read_config(str(copy / "configs" / "inference.json"))
        parser.read_meta(str(copy / "configs" / "metadata.json"))
        parser.update({"bundle_root": str(copy), "feature_size": 12})
        network = parser.get_parsed_content("network_def")
    x = torch.rand(1, meta["inputs"]["image"]["num_channels"], 64, 64, 64)
    with torch.no_grad():
        y = network.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, meta["outputs"]["pred"]["num_channels"], 64, 64, 64)


# BTCV's export is also tested in the default suite on a trained model (test_btcv_evaluate_infer.py)
@pytest.mark.parametrize("bundle", [pytest.param("btcv", marks=pytest.mark.slow), "msd", "ssl"])
def test_traced_torchscript_export_from_the_bundle_checkpoint_matches_the_eager_network(bundle, tmp_path):
    """``monai.bundle ckpt_export --use_trace True`` (the model card's command) at a small size, without
    ``key_in_ckpt`` as the model zoo's CI calls it.

    torch's own trace check (rerunning the network, about 50 s here) is off: the traced model is compared with
    the eager network below."""
    import os
    import subprocess
    import sys

    weights = _bundle_weights(bundle, tmp_path / "model.pt")
    ts_path = tmp_path / "model.ts"
    configs = BUNDLES[bundle] / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_path)]
    cmd += ["--ckpt_file", str(weights), "--ckpt_path", str(weights)]
    cmd += ["--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json")]
    cmd += ["--use_trace", "True", "--input_shape", "[1,1,64,64,64]", "--feature_size", "12"]
    cmd += ["--converter_kwargs", "{'check_trace': False}"]
    env = {**os.environ, "PYTHONPATH": str(BUNDLES[bundle])}
    result = subprocess.run(cmd, cwd=BUNDLES[bundle], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    traced = torch.jit.load(str(ts_path))
    with bundle_on_path(BUNDLES[bundle]):
        parser = ConfigParser()
        parser.read_config(str(configs / "inference.json"))
        parser.update({"feature_size": 12, "ckpt_path": str(weights)})
        eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), eager.eval()(x), atol=1e-4, rtol=1e-4)


def _released_files() -> list[Path]:
    """The files the packaging tool puts into the bundles' zips (no run outputs), and bundles/common."""
    from tools.common.bundles import bundle_files

    common = [p for p in sorted((BUNDLES["btcv"].parent / "common").rglob("*")) if "__pycache__" not in p.parts]
    return [path for bundle in BUNDLES.values() for path, _ in bundle_files(bundle)] + [
        p for p in common if p.is_file()
    ]


def _docstring_first_problem(text: str) -> str | None:
    """pre-commit-hooks' ``check-docstring-first`` rule: a string token at column 0 counts as a docstring; only
    one may exist, and before any code (so no attribute docstring under a module-level constant)."""
    docstring_line = code_line = None
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING and token.start[1] == 0:
            if docstring_line is not None:
                return f"line {token.start[0]}: multiple module docstrings (first on line {docstring_line})"
            if code_line is not None:
                return f"line {token.start[0]}: module docstring after code (line {code_line})"
            docstring_line = token.start[0]
        elif token.type not in NON_CODE_TOKENS and code_line is None:
            code_line = token.start[0]
    return None


def test_docstring_first_rule_catches_a_second_string_at_column_0():
    assert _docstring_first_problem('"""Module."""\n\nX = 1\n"""About X."""\n').startswith("line 4: multiple")
    assert _docstring_first_problem('import os\n"""Late."""\n').startswith("line 2: module docstring after code")
    assert _docstring_first_problem('"""Module."""\n\nX = 1  # about X\n\n\ndef f():\n    """Doc."""\n') is None


def test_bundle_files_follow_the_zoo_pre_commit_rules():
    """JSON with 4-space indent; every text file ends in exactly one newline, no trailing whitespace; no file
    over 1024 KB; a Python file starts with its docstring and has no other string at column 0 (the zoo's
    check-docstring-first)."""
    import ast

    problems = []
    for path in _released_files():
        if path.stat().st_size > 1024 * 1024:
            problems.append(f"{path}: over 1024 KB")
        if path.suffix in {".png", ".jpg", ".pt", ".ts", ".zip", ".gz"}:
            continue
        text = path.read_text()
        if not text.endswith("\n") or text.endswith("\n\n"):
            problems.append(f"{path}: must end with exactly one newline")
        if any(line != line.rstrip() for line in text.splitlines()):
            problems.append(f"{path}: trailing whitespace")
        if path.suffix == ".json" and json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n" != text:
            problems.append(f"{path}: not 4-space indented JSON")
        if path.suffix == ".py" and text.strip():
            first = ast.parse(text).body[0]
            if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
                problems.append(f"{path}: does not start with a docstring")
            problem = _docstring_first_problem(text)
            if problem:
                problems.append(f"{path}: {problem}")
    assert problems == []


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_model_card_data_licence_and_export_lines(bundle):
    """docs/data_license.txt, and the card says how to export TorchScript, that scripting is unsupported,
    and what is known about TensorRT."""
    docs = BUNDLES[bundle] / "docs"
    assert len((docs / "data_license.txt").read_text().strip()) > 200
    readme = _readme(bundle)
    assert "ckpt_export network_def" in readme and "--use_trace True" in readme
    assert "cannot be scripted" in readme
    assert "TensorRT" in readme


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_required_packages_are_what_the_bundle_imports_pinned_for_python_3_10(bundle):
    """What the zoo installs (``pip install name==version`` on Python 3.10): the bundle's own needs, at versions
    that exist for 3.10 (checked with ``pip download --python-version 3.10 --only-binary :all:`` when pinned)."""
    meta = json.loads((BUNDLES[bundle] / "configs" / "metadata.json").read_text())
    required = meta["required_packages_version"]
    needed = {"pytorch-ignite", "nibabel", "itk", "einops", "pydicom", "tensorboard", "fire"}
    if bundle in SEGMENTATION:
        needed.add("scipy")  # Hausdorff distance and surface Dice (monai's distance transform)
    if bundle == "btcv":
        needed.add("scikit-image")  # lcc_labels: monai's KeepLargestConnectedComponentd labels components with it
    assert set(required) == needed
    # numpy 2.3+ and scipy 1.16+ need Python 3.11: the zoo's runners would fail to install them
    assert _version(meta["numpy_version"]) < (2, 3)
    assert "scipy" not in required or _version(required["scipy"]) < (1, 16)
    assert "scikit-image" not in required or _version(required["scikit-image"]) < (0, 26)  # 0.26 needs 3.11


@pytest.mark.parametrize("bundle", SEGMENTATION)
def test_supported_apps_pass_the_property_check_of_each_app(bundle, phantom_dir, msd_task_root, tmp_path):
    """The zoo checks an inference workflow's properties per app in ``supported_apps``; here each app's own needs.

    MONAI's ``dataset`` property is parsed, which checks the input folder: a folder that exists is given."""
    from monai.bundle.properties import InferProperties, MetaProperties

    needs = {
        # ids and metadata MONAI Label reads from a bundle (reference: "Clients of a bundle")
        "monai-label": ["network_def", "preprocessing", "postprocessing", "inferer", "device"],
        # MONAI Deploy's bundle operator
        "monai-deploy-app-sdk": ["network_def", "preprocessing", "postprocessing", "inferer", "device"],
    }
    meta = json.loads((BUNDLES[bundle] / "configs" / "metadata.json").read_text())
    apps = meta["supported_apps"]
    assert apps and set(apps) <= set(needs) and all(apps.values())  # named with the version tested
    overrides = (
        {"task": MSD_TASK, "dataset_dir": str(msd_task_root / MSD_TASK)}
        if bundle == "msd"
        else {"dataset_dir": str(phantom_dir), "datalist": str(phantom_dir / "datalist.json")}
    )
    overrides.update(feature_size=12, ckpt_path=str(_bundle_weights(bundle, tmp_path / "model.pt")))
    for app in apps:
        ids = needs[app]
        with bundle_on_path(BUNDLES[bundle]):
            workflow = btcv_workflow(
                ["inference.json"],
                "infer",
                BUNDLES[bundle],
                meta_file=str(BUNDLES[bundle] / "configs" / "metadata.json"),
                bundle_root=str(tmp_path),
                **overrides,
            )
            workflow.properties = {**MetaProperties, **InferProperties}
            assert workflow.check_properties() in (None, []), app
            for key in ids:
                assert workflow.parser.get_parsed_content(key) is not None, (app, key)
            channel_def = workflow.parser.get_parsed_content("_meta_#network_data_format#outputs#pred#channel_def")
            assert len(channel_def) == meta["network_data_format"]["outputs"]["pred"]["num_channels"], app
