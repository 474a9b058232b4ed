"""Gather the BTCV bundle's cross-validation metrics: per organ, each fold's value, the mean and SD over folds.

Each fold k is evaluated on its own validation cases with its own model (from the bundle folder)::

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --fold k

which writes ``eval/fold<k>/metrics_summary.json``. This tool reads every fold's summary and writes
``cv_metrics.md``, ``cv_metrics.json`` and ``cv_metrics.csv``: for Dice (``val_mean_dice``, organs
only) and HD95 in mm (``val_hd95``), one row per organ (names from the bundle's metadata
``channel_def``) with each fold's mean over its validation cases, the mean over folds and the sample
SD over folds (ddof 1), then the mean over organs (``mean Dice``) the same way. An organ with no
defined value in a fold (absent from all its validation cases) is left out of that organ's mean and
SD; ``n`` counts the folds used. A missing fold folder, a missing or unreadable summary, or one whose
organs differ from ``channel_def`` is an error naming the folder or file.

    python -m tools cv_metrics --eval_dir bundles/swin_unetr_btcv_seg/eval [--num_folds 5] [--output_dir DIR]
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tools.common.bundles import BTCV_DIR
from tools.common.folds import CrossValidationError, fold_dirs, mean_sd, organ_names, read_json
from tools.common.stats import num

__all__ = ["METRICS", "gather", "write_tables", "main"]

METRICS = {"val_mean_dice": "Dice", "val_hd95": "HD95 (mm)"}
"""The per-organ metrics of evaluate.json that the table gathers, with their column titles."""
SUMMARY = "metrics_summary.json"


def _fold_metrics(summary_file: Path, organs: list[str]) -> dict:
    """``{metric: {"per_organ": {organ: value}, "mean": value}}`` of one fold; malformed is an error naming the file."""
    summary = read_json(summary_file, "fold metrics summary")
    if not isinstance(summary, dict) or summary.get("organs") != organs:
        found = summary.get("organs") if isinstance(summary, dict) else type(summary).__name__
        raise CrossValidationError(f"{summary_file}: organs {found} differ from the bundle's channel_def {organs}")
    out = {}
    for name in METRICS:
        metric = summary.get("metrics", {}).get(name)
        if not isinstance(metric, dict) or not isinstance(metric.get("per_organ"), dict):
            raise CrossValidationError(f"{summary_file}: no per-organ '{name}' (was it written by evaluate.json?)")
        if sorted(metric["per_organ"]) != sorted(organs):
            raise CrossValidationError(f"{summary_file}: '{name}' per_organ does not list the {len(organs)} organs")
        out[name] = {"per_organ": metric["per_organ"], "mean": metric.get("mean")}
    return out


def gather(eval_dir: str | Path, num_folds: int | None = None, bundle_dir: str | Path = BTCV_DIR) -> dict:
    """The cross-validation table of ``eval_dir/fold*/metrics_summary.json`` as a JSON-ready dict."""
    organs = list(organ_names(bundle_dir).values())
    dirs = fold_dirs(eval_dir, num_folds)
    folds = [_fold_metrics(d / SUMMARY, organs) for d in dirs]
    table = {"eval_dir": str(eval_dir), "folds": [str(d) for d in dirs], "organs": organs, "metrics": {}}
    for name in METRICS:
        rows = {}
        for organ in organs:
            values = [f[name]["per_organ"][organ] for f in folds]
            rows[organ] = {"folds": values, **mean_sd(values)}
        fold_means = [f[name]["mean"] for f in folds]
        table["metrics"][name] = {"per_organ": rows, "mean_over_organs": {"folds": fold_means, **mean_sd(fold_means)}}
    return table


def _rows(table: dict, name: str) -> list[tuple[str, dict]]:
    metric = table["metrics"][name]
    return list(metric["per_organ"].items()) + [(f"mean {METRICS[name]}", metric["mean_over_organs"])]


def _markdown(table: dict) -> str:
    k = len(table["folds"])
    lines = [f"# Cross-validation, {k} folds ({table['eval_dir']})", ""]
    for name, title in METRICS.items():
        lines += [
            f"## {title} (`{name}`): each fold's mean over its validation cases; mean and SD over folds",
            "",
            "| organ | " + " | ".join(f"fold {i}" for i in range(k)) + " | mean | SD | folds |",
            "|---" * (k + 4) + "|",
        ]
        for organ, row in _rows(table, name):
            cells = [num(v, ".4f") for v in row["folds"]] + [num(row["mean"], ".4f"), num(row["sd"], ".4f")]
            lines.append(f"| {organ} | " + " | ".join(cells) + f" | {row['n']} |")
        lines.append("")
    return "\n".join(lines)


def write_tables(table: dict, output_dir: str | Path) -> list[Path]:
    """Write ``cv_metrics.md``, ``.json`` and ``.csv`` into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"cv_metrics.{ext}" for ext in ("md", "json", "csv")]
    paths[0].write_text(_markdown(table))
    paths[1].write_text(json.dumps(table, indent=2) + "\n")
    with open(paths[2], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "organ"] + [f"fold{i}" for i in range(len(table["folds"]))] + ["mean", "sd", "n"])
        for name in METRICS:
            for organ, row in _rows(table, name):
                values = row["folds"] + [row["mean"], row["sd"]]
                writer.writerow([name, organ] + ["" if v is None else f"{v:.6f}" for v in values] + [row["n"]])
    return paths


def main(eval_dir: str = str(BTCV_DIR / "eval"), num_folds: int | None = None, output_dir: str | None = None) -> str:
    """Command line: gather ``eval_dir/fold*`` into tables in ``output_dir`` (default ``eval_dir``).

    Args:
        eval_dir: the folder holding ``fold0``, ``fold1``, ... as evaluate.json wrote them.
        num_folds: folds expected (default: one more than the highest ``fold<k>`` found); a missing one is an error.
        output_dir: where the tables go (default ``eval_dir``).
    """
    table = gather(eval_dir, num_folds)
    paths = write_tables(table, output_dir or eval_dir)
    return _markdown(table) + "\nwritten: " + ", ".join(str(p) for p in paths)


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main, report=str, errors=(CrossValidationError,))
