"""Label-efficiency study: fine-tune the BTCV bundle on a fraction of the labelled cases, SSL vs scratch.

For each fraction (default 10 %, 30 %, 100 % of the ``training`` list) the BTCV bundle
(``bundles/swin_unetr_btcv_seg``, ``configs/train.json``) is fine-tuned twice on the same subset:
from the SSL encoder weights (``pretrained_path``) and from scratch. Every run validates on the
full ``validation`` list; the table and plot report validation mean Dice (``val_mean_dice``, the
bundle's key metric).

Subsets: one seeded permutation of the training list (``random.Random(seed)``); a fraction ``f``
takes its first ``max(1, round(f * n))`` cases (half up), so the subsets are nested (the 10 %
subset lies inside the 30 % one) and the SSL and scratch runs of a fraction share theirs.

Budget (the same for every run, whatever the subset size): exactly ``iterations`` optimiser steps
(one step = one batch of ``batch_size`` cases x ``num_samples`` crops). The runner overrides the
trainer's ``epoch_length`` (``train#trainer#epoch_length``) to ``epoch_length`` iterations
(default 1) and sets ``max_epochs = iterations / epoch_length``. Ignite keeps the shuffled data
iterator across these short "epochs" and reshuffles after each full pass over the subset, so a
10 % subset is simply seen about 10x more often than the full set. As a bundle epoch is the same
number of iterations in every run, the learning-rate schedule (``warmup_epochs``, cosine decay
over ``max_epochs``; both count bundle epochs) and the validation cadence (every ``val_interval``
bundle epochs = ``val_interval * epoch_length`` iterations, always including the last iteration)
are identical across runs. After each run the number of ``train_loss`` steps in its TensorBoard
events is checked against the budget.

Each run is a subprocess ``python -m monai.bundle run training --config_file configs/train.json``
from the bundle folder (as ``tools.demo.demo`` runs it: isolated logging and ``scripts`` imports), with
its own ``bundle_root`` under ``<output_dir>/runs/<run>``; its output is streamed and saved in
``train.log`` there. Best and final validation Dice and the per-validation curve are read from the
run's TensorBoard events. A failing run, or one without a finite Dice, stops the study.

Outputs in ``output_dir`` (rewritten after every run, so an interrupted study keeps its results):
``label_efficiency.csv``, ``label_efficiency.md`` (table + settings), ``label_efficiency.json``
(settings, subsets, results with curves and commands) and ``label_efficiency.png``.

Command line (from the repository root)::

    python -m tools label_efficiency --datalist D.json --pretrained_path ssl_encoder.pt \
        --iterations 2000 --output_dir le_out [--dataset_dir DIR] [--fractions "[0.1,0.3,1.0]"] \
        [--val_interval 200] [--epoch_length 1] [--seed 0] [--overrides '{"feature_size": 48}']
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.common.bundles import bundle_command
from tools.common.machine import machine_info
from tools.common.processes import run_streamed, shell_quote
from tools.common.scalars import scalar_series

logger = logging.getLogger("tools.leaderboard.label_efficiency")

DEFAULT_FRACTIONS = (0.1, 0.3, 1.0)
INITS = ("ssl", "scratch")
STEM = "label_efficiency"
CSV_FIELDS = ("fraction", "num_cases", "init", "iterations", "best_val_dice", "final_val_dice")
DICE_TAG = "val_mean_dice"
LOSS_TAG = "train_loss"
# bundle settings the runner sets itself; they cannot come through --overrides
RESERVED = frozenset(
    {
        "dataset_dir",
        "datalist",
        "bundle_root",
        "output_dir",
        "ckpt_dir",
        "max_epochs",
        "val_interval",
        "pretrained_path",
        "seed",
        "resume_from",
        "train#trainer#epoch_length",
        "train#trainer#max_epochs",
    }
)


class LabelEfficiencyError(RuntimeError):
    """A run failed or produced no usable validation Dice."""


# ------------------------------------------------------------------------------ subsets and budget


def parse_fractions(fractions: Any) -> list[float]:
    """Sorted unique fractions in (0, 1] from a sequence or a string like "0.1,0.3,1" / "[0.1, 1]"."""
    if isinstance(fractions, str):
        fractions = [f for f in fractions.strip("[]() ").split(",") if f.strip()]
    if isinstance(fractions, (int, float)):
        fractions = [fractions]
    values = sorted({float(f) for f in fractions})
    if not values or any(not (0.0 < f <= 1.0) for f in values):
        raise ValueError(f"fractions must be a non-empty list of numbers in (0, 1], got {fractions!r}")
    return values


def subset_size(fraction: float, num_items: int) -> int:
    """Cases for ``fraction`` of ``num_items``: round half up, at least 1, at most ``num_items``."""
    if num_items < 1:
        raise ValueError("no training cases")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(num_items, max(1, math.floor(fraction * num_items + 0.5 + 1e-9)))


def nested_subsets(num_items: int, fractions: Sequence[float], seed: int) -> dict[float, list[int]]:
    """{fraction: sorted indices}: prefixes of one seeded permutation, so smaller subsets nest in larger ones."""
    order = list(range(num_items))
    random.Random(seed).shuffle(order)
    return {f: sorted(order[: subset_size(f, num_items)]) for f in parse_fractions(fractions)}


def plan_budget(iterations: int, epoch_length: int = 1, val_interval: int | None = None) -> dict[str, int]:
    """Bundle settings that give exactly ``iterations`` steps with validation at the last one.

    Returns ``{"iterations", "epoch_length", "max_epochs", "val_interval", "num_validations"}``;
    ``val_interval`` (bundle epochs) defaults to ``max_epochs`` (one validation, at the end).
    """
    iterations, epoch_length = int(iterations), int(epoch_length)
    if iterations < 1 or epoch_length < 1:
        raise ValueError(f"iterations and epoch_length must be >= 1, got {iterations} and {epoch_length}")
    if iterations % epoch_length:
        raise ValueError(f"iterations ({iterations}) must be a multiple of epoch_length ({epoch_length})")
    max_epochs = iterations // epoch_length
    val_interval = max_epochs if val_interval is None else int(val_interval)
    if val_interval < 1 or max_epochs % val_interval:
        raise ValueError(
            f"val_interval ({val_interval} bundle epochs of {epoch_length} iteration(s)) must divide max_epochs "
            f"({max_epochs}) so that the last iteration is validated"
        )
    return {
        "iterations": iterations,
        "epoch_length": epoch_length,
        "max_epochs": max_epochs,
        "val_interval": val_interval,
        "num_validations": max_epochs // val_interval,
    }


def parse_overrides(overrides: Any) -> dict[str, Any]:
    """Bundle overrides from a mapping, a JSON string or a JSON file; reserved keys are refused."""
    if overrides in (None, ""):
        return {}
    if isinstance(overrides, str):
        text = Path(overrides).read_text() if Path(overrides).is_file() else overrides
        overrides = json.loads(text)
    if not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a JSON object / dict, got {type(overrides).__name__}")
    clash = sorted(set(overrides) & RESERVED)
    if clash:
        raise ValueError(f"overrides may not set {clash}: the label-efficiency runner sets them")
    return {str(k): _json_words(v) for k, v in overrides.items()}


def _json_words(value: Any) -> Any:
    """Undo fire's reading of JSON ``true``/``false``/``null`` as strings (fire parses Python literals)."""
    if isinstance(value, str) and value in _JSON_WORDS:
        return _JSON_WORDS[value]
    if isinstance(value, (list, tuple)):
        return [_json_words(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json_words(v) for k, v in value.items()}
    return value


_JSON_WORDS = {"true": True, "false": False, "null": None}


# ------------------------------------------------------------------------------------- one run


def run_summary(run_dir: Path, budget: Mapping[str, int]) -> dict[str, Any]:
    """Best/final validation Dice and the curve of a finished run; raise if the run is unusable."""
    events = run_dir / "eval"
    curve = [(step * budget["epoch_length"], dice) for step, dice in scalar_series(events, DICE_TAG)]
    if not curve:
        raise LabelEfficiencyError(f"run {run_dir.name} logged no {DICE_TAG} in {events}")
    bad = [(i, d) for i, d in curve if not (math.isfinite(d) and 0.0 <= d <= 1.0)]
    if bad:
        raise LabelEfficiencyError(f"run {run_dir.name}: invalid {DICE_TAG} values {bad}")
    steps = [s for s, _ in scalar_series(events, LOSS_TAG)]
    if len(steps) != budget["iterations"] or (steps and steps[-1] != budget["iterations"]):
        raise LabelEfficiencyError(
            f"run {run_dir.name} trained {len(steps)} iteration(s) (last {steps[-1] if steps else None}), "
            f"the budget is {budget['iterations']}"
        )
    if curve[-1][0] != budget["iterations"]:
        raise LabelEfficiencyError(
            f"run {run_dir.name}: last validation at iteration {curve[-1][0]}, not at the end ({budget['iterations']})"
        )
    if not (run_dir / "models" / "model.pt").is_file():
        raise LabelEfficiencyError(f"run {run_dir.name} wrote no models/model.pt")
    best_it, best = max(curve, key=lambda p: p[1])
    return {
        "best_val_dice": best,
        "best_iteration": best_it,
        "final_val_dice": curve[-1][1],
        "val_curve": [[i, d] for i, d in curve],
    }


def run_overrides(
    run_dir: Path,
    datalist: Path,
    dataset_dir: Path,
    budget: Mapping[str, int],
    seed: int,
    pretrained_path: Path | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The bundle overrides of one run (``pretrained_path`` None: from scratch, the bundle default "")."""
    overrides = {
        **extra,
        "dataset_dir": dataset_dir,
        "datalist": datalist,
        "bundle_root": run_dir,
        "output_dir": run_dir / "eval",
        "ckpt_dir": run_dir / "models",
        "seed": seed,
        "max_epochs": budget["max_epochs"],
        "val_interval": budget["val_interval"],
        "train#trainer#epoch_length": budget["epoch_length"],
    }
    if pretrained_path is not None:
        overrides["pretrained_path"] = pretrained_path
    return overrides


def run_bundle(cmd: Sequence[str], run_dir: Path) -> None:
    """Run the bundle command from the bundle folder, streaming output to the console and ``train.log``."""
    run_streamed(
        cmd, BUNDLE_DIR, run_dir / "train.log", f"label-efficiency run {run_dir.name}", error=LabelEfficiencyError
    )


def run_one(
    run_dir: Path,
    training: list[dict],
    validation: list[dict],
    dataset_dir: Path,
    budget: Mapping[str, int],
    seed: int,
    pretrained_path: Path | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Fine-tune on ``training`` (fresh ``run_dir``), validate on ``validation``; return the run summary."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale run must not pass for this one
    run_dir.mkdir(parents=True)
    datalist = run_dir / "datalist.json"
    datalist.write_text(json.dumps({"training": training, "validation": validation}, indent=2) + "\n")
    overrides = run_overrides(run_dir, datalist, dataset_dir, budget, seed, pretrained_path, extra)
    cmd = bundle_command("training", ["configs/train.json"], overrides)
    t0 = time.perf_counter()
    run_bundle(cmd, run_dir)
    summary = run_summary(run_dir, budget)
    summary.update(
        seconds=round(time.perf_counter() - t0, 1),
        run_dir=str(run_dir),
        command=f"cd {BUNDLE_DIR} && {shell_quote(cmd)}",
    )
    return summary


# ------------------------------------------------------------------------------------- outputs


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The results table, one line per run, columns ``CSV_FIELDS``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown(settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], total_runs: int) -> str:
    """Markdown table of the results and the settings that produced them."""
    budget = settings["budget"]
    lines = [f"# Label efficiency: validation mean Dice, SSL vs scratch ({settings['date']})", ""]
    if len(rows) < total_runs:
        lines += [f"**Partial: {len(rows)} of {total_runs} runs finished.**", ""]
    lines += [
        "| fraction | cases | init | iterations | best val Dice | final val Dice |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['fraction']:g} | {r['num_cases']} | {r['init']} | {r['iterations']} | "
            f"{r['best_val_dice']:.4f} | {r['final_val_dice']:.4f} |"
        )
    lines += [
        "",
        "## Settings",
        "",
        f"- datalist: `{settings['datalist']}` ({settings['num_training']} training, "
        f"{settings['num_validation']} validation cases); dataset_dir: `{settings['dataset_dir']}`",
        f"- pretrained_path (ssl runs): `{settings['pretrained_path']}`; scratch runs: none",
        f"- fractions: {settings['fractions']}; seed: {settings['seed']} (subsets and bundle seed)",
        f"- budget: {budget['iterations']} iterations per run = max_epochs {budget['max_epochs']} x "
        f"epoch_length {budget['epoch_length']} (train#trainer#epoch_length); validation every "
        f"{budget['val_interval']} bundle epoch(s) ({budget['num_validations']} validation(s), the last at the "
        f"final iteration)",
        f"- bundle overrides (all runs): `{json.dumps(settings['overrides'], sort_keys=True)}`",
        f"- bundle: `{settings['bundle']}` (configs/train.json)",
        f"- machine: {json.dumps(settings['machine'])}",
        f"- date: {settings['date']}",
        "",
        f"How the budget is matched: {settings['budget_note']}",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Best validation Dice vs fraction of labelled cases, one line per init (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for init, marker in zip(INITS, ("o", "s")):
        pts = sorted((r["fraction"], r["best_val_dice"]) for r in rows if r["init"] == init)
        if pts:
            ax.plot([100 * f for f, _ in pts], [d for _, d in pts], marker=marker, label=init)
    ticks = sorted({(r["fraction"], r["num_cases"]) for r in rows})
    ax.set_xticks([100 * f for f, _ in ticks], [f"{100 * f:g}%\n(n={n})" for f, n in ticks])
    ax.set_xlabel("labelled training cases used")
    ax.set_ylabel("best validation mean Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="init")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(
    out: Path, settings: Mapping[str, Any], subsets: Mapping, rows: list[dict], total_runs: int
) -> dict[str, str]:
    """Write the CSV, Markdown, JSON and PNG outputs; return {kind: path}."""
    paths = {ext: out / f"{STEM}.{ext}" for ext in ("csv", "md", "json", "png")}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown(settings, rows, total_runs))
    record = {"settings": settings, "subsets": subsets, "results": rows, "complete": len(rows) == total_runs}
    paths["json"].write_text(json.dumps(record, indent=4) + "\n")
    b = settings["budget"]
    plot(rows, paths["png"], f"Swin UNETR BTCV: {b['iterations']} iterations per run, seed {settings['seed']}")
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------- study


def label_efficiency(
    datalist: str,
    pretrained_path: str,
    iterations: int,
    output_dir: str,
    dataset_dir: str | None = None,
    fractions: Any = DEFAULT_FRACTIONS,
    seed: int = 0,
    val_interval: int | None = None,
    epoch_length: int = 1,
    overrides: Any = None,
) -> dict[str, Any]:
    """Label-efficiency study of the BTCV bundle (SSL vs scratch): 2 runs per fraction; write its outputs.

    Returns {"rows", "outputs", "settings"}; the command line prints the table and exits with code 1
    on a failed run.

    Args:
        datalist: BTCV-style JSON with ``training`` and ``validation`` lists.
        pretrained_path: SSL encoder weights for the ssl runs (any file the bundle's pretrained_path reads).
        iterations: training iterations (optimiser steps) of every run.
        output_dir: where the runs (``runs/<run>``) and the outputs go.
        dataset_dir: base folder of the datalist's relative paths (default: the datalist's folder).
        fractions: fractions of the training list, e.g. "[0.1,0.3,1.0]" (default).
        seed: seed of the subset draw and of the bundle (``seed``: shuffling, crops, initialisation).
        val_interval: validate every this many bundle epochs (default: once, at the end).
        epoch_length: iterations per bundle epoch (the unit of val_interval and warmup_epochs).
        overrides: bundle overrides for every run, e.g. '{"feature_size": 12, "roi_size": [64,64,64]}'
            (a dict, JSON or a Python dict literal, or a JSON file).
    """
    datalist_path = Path(datalist).resolve()
    data = json.loads(datalist_path.read_text())
    training, validation = list(data.get("training") or []), list(data.get("validation") or [])
    if not training or not validation:
        raise ValueError(f"{datalist_path} needs non-empty 'training' and 'validation' lists")
    ssl_path = Path(pretrained_path).resolve()
    if not ssl_path.is_file():
        raise FileNotFoundError(f"pretrained_path {ssl_path} does not exist")
    base = Path(dataset_dir).resolve() if dataset_dir else datalist_path.parent
    fracs = parse_fractions(fractions)
    budget = plan_budget(iterations, epoch_length, val_interval)
    extra = parse_overrides(overrides)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    subsets = nested_subsets(len(training), fracs, seed)
    settings = {
        "datalist": str(datalist_path),
        "dataset_dir": str(base),
        "pretrained_path": str(ssl_path),
        "fractions": fracs,
        "seed": int(seed),
        "budget": budget,
        "overrides": _jsonable(extra),
        "num_training": len(training),
        "num_validation": len(validation),
        "bundle": str(BUNDLE_DIR),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "budget_note": (
            f"every run trains exactly {budget['iterations']} iterations whatever its subset size: the trainer's "
            f"epoch_length is set to {budget['epoch_length']} iteration(s) and max_epochs to {budget['max_epochs']}; "
            "the data iterator carries over between these bundle epochs and reshuffles after each full pass over "
            "the subset; warmup_epochs, the cosine schedule and val_interval count bundle epochs, hence are "
            "identical across runs; the train_loss steps in each run's events are checked against the budget."
        ),
    }
    subset_record = {f"{f:g}": [_case_name(training[i]) for i in idx] for f, idx in subsets.items()}
    total = len(fracs) * len(INITS)
    rows: list[dict] = []
    outputs: dict[str, str] = {}
    for f, idx in subsets.items():
        for init in INITS:
            name = f"f{f:g}_{init}"
            print(
                f"\n=== run {len(rows) + 1}/{total}: {name}: {len(idx)} of {len(training)} training cases, "
                f"{budget['iterations']} iterations, init {init} ===",
                flush=True,
            )
            summary = run_one(
                out / "runs" / name,
                [training[i] for i in idx],
                validation,
                base,
                budget,
                seed,
                ssl_path if init == "ssl" else None,
                extra,
            )
            rows.append(
                {"fraction": f, "num_cases": len(idx), "init": init, "iterations": budget["iterations"], **summary}
            )
            print(
                f"=== {name}: best val Dice {summary['best_val_dice']:.4f}, final {summary['final_val_dice']:.4f}"
                f" ({summary['seconds']} s) ===",
                flush=True,
            )
            outputs = write_outputs(out, settings, subset_record, rows, total)
    return {"rows": rows, "outputs": outputs, "settings": settings}


def _case_name(item: Mapping[str, Any]) -> str:
    image = item.get("image")
    return str(image[0] if isinstance(image, (list, tuple)) else image)


def _jsonable(obj: Any) -> Any:
    """``obj`` with paths and tuples turned into JSON types."""
    return json.loads(json.dumps(obj, default=str))


def report(result: dict[str, Any]) -> str:
    """The command line's printout: the Markdown table and the output files."""
    return (
        "\n"
        + Path(result["outputs"]["md"]).read_text()
        + "\n"
        + "\n".join(f"{k}: {v}" for k, v in result["outputs"].items())
    )


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(
        label_efficiency,
        report=report,
        errors=(LabelEfficiencyError, ValueError, FileNotFoundError),
        failure="LABEL-EFFICIENCY STUDY FAILED",
    )
