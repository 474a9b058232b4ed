"""Tests of tools/leaderboard/label_efficiency.py: subsets, budget, outputs, and real bundle runs on tiny phantoms.

One real training step of the small network takes about 20 s on a 2-core CPU, so the default suite
does a single real 1-iteration run (the Dice and budget read back from its TensorBoard events) and
the orchestration with a stand-in for the bundle subprocess; the full 4-run study is ``slow``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PHANTOM_SHAPE, PHANTOM_SPACING, REPO, SMALL, bundle_on_path
from tools.leaderboard import label_efficiency as le

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Five tiny phantoms: 4 training cases, 1 validation case, datalist paths relative to the folder."""
    from tools.data.make_phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("le_phantoms")
    pairs = write_phantom_dataset(root, num_cases=5, seed=11, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    items = [
        {"image": str(Path(image).relative_to(root)), "label": str(Path(label).relative_to(root))}
        for image, label in pairs
    ]
    (root / "datalist.json").write_text(json.dumps({"training": items[:4], "validation": items[4:]}, indent=2))
    return root


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """An SSL-format encoder export of a fresh feature-size-12 SwinUNETR, written by the bundle's save_encoder."""
    import torch
    from monai.networks.nets import SwinUNETR

    path = tmp_path_factory.mktemp("le_ssl") / "ssl_encoder.pt"
    torch.manual_seed(0)
    with bundle_on_path():
        from scripts.encoder_weights import save_encoder

        save_encoder(SwinUNETR(1, 14, feature_size=12, downsample="merging"), str(path))
    return path


# ------------------------------------------------------------------------------ pure functions


def test_subsets_nested_seeded_at_least_one():
    subsets = le.nested_subsets(24, [1.0, 0.1, 0.3], seed=5)
    assert list(subsets) == [0.1, 0.3, 1.0]
    assert [len(s) for s in subsets.values()] == [2, 7, 24]
    assert set(subsets[0.1]) <= set(subsets[0.3]) <= set(subsets[1.0]) == set(range(24))
    assert subsets == le.nested_subsets(24, [0.1, 0.3, 1.0], seed=5)  # seeded
    assert subsets[0.3] != le.nested_subsets(24, [0.3], seed=6)[0.3]  # the seed matters
    for n in (1, 2, 3, 7):
        for f in (0.01, 0.1, 0.5, 0.99, 1.0):
            s = le.nested_subsets(n, [f], seed=0)[f]
            assert 1 <= len(s) <= n and len(set(s)) == len(s) and all(0 <= i < n for i in s)
    assert le.subset_size(0.5, 5) == 3 and le.subset_size(0.3, 10) == 3 and le.subset_size(0.7, 10) == 7
    assert le.parse_fractions("0.3,0.1,1") == le.parse_fractions("[0.1, 0.3, 1.0]") == [0.1, 0.3, 1.0]
    for bad in ([0.0], [1.5], [], "-0.1"):
        with pytest.raises(ValueError):
            le.parse_fractions(bad)


def test_budget_math():
    assert le.plan_budget(100) == {
        "iterations": 100,
        "epoch_length": 1,
        "max_epochs": 100,
        "val_interval": 100,
        "num_validations": 1,
    }
    b = le.plan_budget(120, epoch_length=4, val_interval=10)
    assert (b["max_epochs"], b["num_validations"]) == (30, 3)
    assert b["max_epochs"] * b["epoch_length"] == 120
    with pytest.raises(ValueError, match="multiple of epoch_length"):
        le.plan_budget(10, epoch_length=3)
    with pytest.raises(ValueError, match="must divide max_epochs"):
        le.plan_budget(10, val_interval=3)
    with pytest.raises(ValueError):
        le.plan_budget(0)


def test_overrides_parsing(tmp_path):
    assert le.parse_overrides('{"feature_size": 12, "roi_size": [64, 64, 64]}') == {
        "feature_size": 12,
        "roi_size": [64, 64, 64],
    }
    f = tmp_path / "o.json"
    f.write_text('{"use_checkpoint": false}')
    assert le.parse_overrides(str(f)) == {"use_checkpoint": False}
    assert le.parse_overrides(None) == {}
    # fire reads '{"use_checkpoint": false}' from the command line as {"use_checkpoint": "false"}
    assert le.parse_overrides({"use_checkpoint": "false", "a": ["null", "true"]}) == {
        "use_checkpoint": False,
        "a": [None, True],
    }
    with pytest.raises(ValueError, match="max_epochs"):
        le.parse_overrides({"max_epochs": 3})
    # the budget and data settings of a run are the runner's, the rest passes through
    o = le.run_overrides(Path("/r"), Path("/r/d.json"), Path("/d"), le.plan_budget(6, 2, 1), 3, None, {"x": 1})
    assert o["max_epochs"] == 3 and o["train#trainer#epoch_length"] == 2 and o["val_interval"] == 1
    assert "pretrained_path" not in o and o["x"] == 1 and o["seed"] == 3 and o["bundle_root"] == Path("/r")


# -------------------------------------------------------- orchestration with a stand-in bundle


def _cmd_overrides(cmd) -> dict[str, str]:
    i = cmd.index("--config_file") + 2
    return dict(zip(cmd[i::2], cmd[i + 1 :: 2]))


def _fake_bundle(calls):
    """A stand-in for the bundle subprocess: writes the events and model.pt a real run writes."""
    from torch.utils.tensorboard import SummaryWriter

    def run(cmd, run_dir):
        o = _cmd_overrides(cmd)
        calls.append(o)
        n = len(json.loads(Path(o["--datalist"]).read_text())["training"])
        epochs, length, every = int(o["--max_epochs"]), int(o["--train#trainer#epoch_length"]), int(o["--val_interval"])
        base = 0.1 * n + (0.3 if "--pretrained_path" in o else 0.0)
        writer = SummaryWriter(log_dir=o["--output_dir"])
        for it in range(1, epochs * length + 1):
            writer.add_scalar(le.LOSS_TAG, 1.0 / it, it)
        for ep in range(every, epochs + 1, every):
            writer.add_scalar(le.DICE_TAG, min(1.0, base + 0.01 * ep * (-1) ** ep), ep)
        writer.close()
        Path(o["--ckpt_dir"]).mkdir(parents=True)
        (Path(o["--ckpt_dir"]) / "model.pt").write_bytes(b"x")

    return run


def _check_outputs(out: Path, fractions, iterations, overrides, pretrained):
    rows = list(csv.DictReader(open(out / "label_efficiency.csv")))
    assert len(rows) == 2 * len(fractions)
    assert list(rows[0]) == list(le.CSV_FIELDS)
    assert sorted({(float(r["fraction"]), r["init"]) for r in rows}) == sorted(
        (f, i) for f in fractions for i in ("ssl", "scratch")
    )
    for r in rows:
        assert int(r["iterations"]) == iterations
        assert 0.0 <= float(r["best_val_dice"]) <= 1.0 and 0.0 <= float(r["final_val_dice"]) <= 1.0
        assert float(r["best_val_dice"]) >= float(r["final_val_dice"])
    record = json.loads((out / "label_efficiency.json").read_text())
    s = record["settings"]
    assert record["complete"] and len(record["results"]) == len(rows)
    assert s["overrides"] == overrides and s["budget"]["iterations"] == iterations
    assert s["pretrained_path"] == str(pretrained) and s["seed"] == 3 and s["machine"]["python"]
    md = (out / "label_efficiency.md").read_text()
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per run
    for text in (
        json.dumps(overrides, sort_keys=True),
        str(pretrained),
        f"{iterations} iterations",
        "seed: 3",
        "machine:",
        s["date"],
    ):
        assert text in md, text
    assert (out / "label_efficiency.png").read_bytes()[:8] == PNG_MAGIC
    return rows, record


def test_study_orchestration(phantoms, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(le, "run_bundle", _fake_bundle(calls))
    pretrained = tmp_path / "ssl.pt"
    pretrained.write_bytes(b"weights")
    overrides = {**SMALL, "spacing": [1.5, 1.5, 2.0]}
    out = tmp_path / "study"
    result = le.label_efficiency(
        str(phantoms / "datalist.json"),
        str(pretrained),
        iterations=6,
        output_dir=str(out),
        fractions=[0.5, 0.25, 1.0],
        seed=3,
        val_interval=2,
        overrides=json.dumps(overrides),
    )
    rows, record = _check_outputs(out, [0.25, 0.5, 1.0], 6, overrides, pretrained)
    assert len(result["rows"]) == 6

    # every run: the same budget and validation cadence, the ssl/scratch pair of a fraction on the same cases
    assert {(c["--max_epochs"], c["--train#trainer#epoch_length"], c["--val_interval"]) for c in calls} == {
        ("6", "1", "2")
    }
    assert [c.get("--pretrained_path") for c in calls] == [str(pretrained), None] * 3
    subsets = [json.loads(Path(c["--datalist"]).read_text()) for c in calls]
    images = [[d["image"] for d in s["training"]] for s in subsets]
    assert [len(i) for i in images] == [1, 1, 2, 2, 4, 4]
    assert images[0] == images[1] and images[2] == images[3] and set(images[0]) < set(images[2]) < set(images[4])
    assert all(s["validation"] == subsets[0]["validation"] for s in subsets)
    assert record["subsets"] == {"0.25": images[0], "0.5": images[2], "1": images[4]}
    for c in calls:
        assert c["--dataset_dir"] == str(phantoms) and c["--feature_size"] == "12" and c["--seed"] == "3"
        assert Path(c["--bundle_root"]).parent == out / "runs"
    curve = record["results"][0]["val_curve"]
    assert [i for i, _ in curve] == [2, 4, 6] and record["results"][0]["final_val_dice"] == curve[-1][1]


def test_run_failures_are_loud(phantoms, tmp_path, monkeypatch):
    calls = []
    fake = _fake_bundle(calls)

    def short_run(cmd, run_dir):  # trains one iteration fewer than asked
        cmd = list(cmd)
        cmd[cmd.index("--max_epochs") + 1] = "3"
        cmd[cmd.index("--val_interval") + 1] = "3"
        fake(cmd, run_dir)

    pretrained = tmp_path / "ssl.pt"
    pretrained.write_bytes(b"w")
    args = (str(phantoms / "datalist.json"), str(pretrained), 4, str(tmp_path / "o"))
    monkeypatch.setattr(le, "run_bundle", short_run)
    with pytest.raises(le.LabelEfficiencyError, match="trained 3 iteration"):
        le.label_efficiency(*args, fractions=[1.0])
    monkeypatch.setattr(le, "run_bundle", lambda cmd, run_dir: None)  # "succeeds" without results
    with pytest.raises(le.LabelEfficiencyError, match="no val_mean_dice"):
        le.label_efficiency(*args, fractions=[1.0])
    with pytest.raises(FileNotFoundError):
        le.label_efficiency(args[0], str(tmp_path / "missing.pt"), 4, args[3])


def test_failing_bundle_command_names_run(tmp_path, monkeypatch):
    """A non-zero exit of the bundle subprocess stops the study with the run and its log named."""
    monkeypatch.setattr(le, "bundle_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
    run_dir = tmp_path / "runs" / "f1_ssl"
    with pytest.raises(le.LabelEfficiencyError, match=r"f1_ssl.*code 3"):
        le.run_one(run_dir, [{"image": "a"}], [{"image": "b"}], tmp_path, le.plan_budget(1), 0, None, {})
    assert (run_dir / "train.log").is_file()


# --------------------------------------------------------------------------- real bundle runs


def test_real_run_ssl_one_iteration(phantoms, encoder_file, tmp_path):
    """One real bundle subprocess: SSL weights loaded, 1 iteration, Dice read back from the events."""
    data = json.loads((phantoms / "datalist.json").read_text())
    run_dir = tmp_path / "runs" / "f0.25_ssl"
    summary = le.run_one(
        run_dir, data["training"][:1], data["validation"], phantoms, le.plan_budget(1), 0, encoder_file, SMALL
    )
    assert 0.0 <= summary["best_val_dice"] <= 1.0
    assert summary["final_val_dice"] == summary["best_val_dice"] and summary["val_curve"][0][0] == 1
    log = (run_dir / "train.log").read_text()
    assert "loaded" in log and str(encoder_file) in log and "encoder tensors" in log
    assert (run_dir / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_cli_end_to_end(phantoms, encoder_file, tmp_path):
    """The whole study from the command line: fractions 0.5 and 1, 2 iterations, 4 real runs (minutes)."""
    out = tmp_path / "study"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools",
            "label_efficiency",
            "--datalist",
            str(phantoms / "datalist.json"),
            "--pretrained_path",
            str(encoder_file),
            "--iterations",
            "2",
            "--val_interval",
            "1",
            "--fractions",
            "[0.5,1.0]",
            "--seed",
            "3",
            "--output_dir",
            str(out),
            "--overrides",
            json.dumps(SMALL),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    rows, record = _check_outputs(out, [0.5, 1.0], 2, SMALL, encoder_file)
    assert [int(r["num_cases"]) for r in rows] == [2, 2, 4, 4]
    assert all([i for i, _ in r["val_curve"]] == [1, 2] for r in record["results"])
    assert "| fraction |" in proc.stdout
