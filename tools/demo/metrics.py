"""The demo's Markdown: the pre-training summary and the per-case metrics table (``<out>/metrics.md``)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.demo.ssl_figures import LOSS_TERMS, SHORT_NAMES, TOTAL

META_FILE = BUNDLE_DIR / "configs" / "metadata.json"
SSL_NOTE = (
    "Pre-training here is a few hundred steps of a feature-size-12 encoder on a handful of volumes: it shows the "
    "three proxy-task losses falling and the export feeding fine-tuning, not a useful pre-trained encoder."
)
AGREEMENT_NOTE = (
    "Dice/HD95 on the sample CT (example_ct) measure agreement with TotalSegmentator's predicted labels, "
    "not accuracy against manual ground truth; the sample CT is also in the training list. "
    "Phantom scores are against the phantoms' exact synthetic labels."
)


def organ_names(meta_file: Path = META_FILE) -> dict[int, str]:
    """BTCV id -> organ name, from the bundle metadata (``network_data_format.outputs.pred.channel_def``)."""
    meta = json.loads(Path(meta_file).read_text())
    return {int(k): str(v) for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}


def _read_per_case_csv(path: Path) -> dict[str, dict[str, float | None]]:
    """{case: {organ: value or None}} from the bundle's ``<metric>_per_case.csv``."""

    out: dict[str, dict[str, float | None]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            case = row.pop("case")
            row.pop("mean", None)
            out[case] = {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
    return out


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def _case_label(case: str) -> str:
    name = case[:-7] if case.endswith(".nii.gz") else os.path.splitext(case)[0]
    return f"{name} (vs TotalSegmentator)" if name == "example_ct" else f"{name} (phantom)"


def pretraining_markdown(ssl: dict) -> str:
    """Markdown section on the pre-training stage: settings, loss drops, validation losses, figures.

    ``ssl`` is the demo's pre-training record: ``settings`` (dict), ``drops`` (from
    ``tools.demo.ssl_figures.loss_drops``), ``validation`` ({tag: [(step, value), ...]}), ``figures``
    ({caption: relative path}), ``encoder`` (relative path) and ``encoder_tensors`` (int); or
    ``skipped`` with the reason.
    """
    lines = ["# Self-supervised pre-training", ""]
    if ssl.get("skipped"):
        return "\n".join(lines + [f"Skipped: {ssl['skipped']}", ""]) + "\n"
    settings = ssl.get("settings", {})
    lines += [", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "", f"> {SSL_NOTE}", ""]
    drops = ssl.get("drops", {})
    if drops:
        w = next(iter(drops.values()))["window"]
        lines += [
            "## Training losses",
            "",
            f"| loss | mean of the first {w} steps | mean of the last {w} steps | change | fell |",
            "|---|---|---|---|---|",
        ]
        for tag in (*LOSS_TERMS, TOTAL):
            if tag in drops:
                d = drops[tag]
                lines.append(
                    f"| {SHORT_NAMES[tag]} | {d['first']:.4f} | {d['last']:.4f} | "
                    f"{-100 * d['relative_drop']:+.1f}% | {'yes' if d['fell'] else '**no**'} |"
                )
    validation = ssl.get("validation", {})
    val_tags = [t for t in (TOTAL, *LOSS_TERMS) if validation.get(f"val_{t}")]
    if val_tags:
        steps = sorted({s for t in val_tags for s, _ in validation[f"val_{t}"]})
        lines += [
            "",
            "## Validation losses (fixed views of the validation volumes)",
            "",
            "Validation pairs held-out phantoms only, which look alike; most training pairs hold the real "
            "CT and a phantom, so the training contrastive loss falls much faster than this one.",
            "",
            "| step | " + " | ".join(SHORT_NAMES[t] for t in val_tags) + " |",
            "|---|" + "---|" * len(val_tags),
        ]
        for step in steps:
            vals = [dict(validation[f"val_{t}"]).get(step) for t in val_tags]
            lines.append(f"| {step} | " + " | ".join(_cell(v, ".4f") for v in vals) + " |")
    figures = ssl.get("figures", {})
    if figures:
        lines += ["", "## Figures", ""] + [f"- {caption}: `{path}`" for caption, path in figures.items()]
    if ssl.get("encoder"):
        lines += [
            "",
            f"Exported encoder: `{ssl['encoder']}` ({ssl.get('encoder_tensors', '?')} tensors), "
            "loaded by the fine-tuning (tables above).",
        ]
    return "\n".join(lines) + "\n"


def metrics_markdown(eval_dir: Path, meta_file: Path = META_FILE, pretraining: dict | None = None) -> str:
    """Markdown tables of per-organ Dice and HD95 (mm) from the evaluation outputs.

    Columns: organ id and name (from the bundle metadata), one column per validation case
    (from ``val_*_per_case.csv``) and the mean over cases (from ``metrics_summary.json``).
    With ``pretraining`` (see :func:`pretraining_markdown`), a section on the pre-training stage
    follows the tables.
    """
    summary = json.loads((eval_dir / "metrics_summary.json").read_text())
    names = organ_names(meta_file)
    organs = [(i, names[i]) for i in sorted(names) if i != 0]
    metrics = summary["metrics"]
    lines = [
        "# Demo metrics (validation list)",
        "",
        f"Cases: {', '.join(summary.get('cases', []))}.",
        "",
        f"> {AGREEMENT_NOTE}",
        "",
        "> A few epochs of fine-tuning a feature-size-12 Swin UNETR (from a few hundred pre-training steps at "
        "most): these numbers show the pipeline "
        "working, not the model's capability (BTCV reference: mean Dice about 0.82 for the full recipe).",
        "",
        "'n/a': undefined (organ absent from the reference or, for HD95, from the prediction).",
    ]
    for key, title, fmt in (("val_mean_dice", "Dice", ".3f"), ("val_hd95", "HD95 (mm)", ".1f")):
        if key not in metrics:
            continue
        per_case = _read_per_case_csv(eval_dir / f"{key}_per_case.csv")
        cases = list(per_case)
        header = ["id", "organ"] + [_case_label(c) for c in cases] + ["mean over cases"]
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, organ in organs:
            row = [str(i), organ]
            row += [_cell(per_case[c].get(organ), fmt) for c in cases]
            row.append(_cell(metrics[key]["per_organ"].get(organ), fmt))
            lines.append("| " + " | ".join(row) + " |")
        case_means = metrics[key].get("per_case_mean", {})
        lines.append(
            "| | **mean over organs** | "
            + " | ".join(_cell(case_means.get(c), fmt) for c in cases)
            + f" | **{_cell(metrics[key].get('mean'), fmt)}** |"
        )
    text = "\n".join(lines) + "\n"
    if pretraining:
        text += "\n" + pretraining_markdown(pretraining)
    return text
