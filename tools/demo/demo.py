"""End-to-end demo: self-supervised pre-training, then BTCV fine-tuning, on a small embedded data set, on CPU.

Nine steps, each announced with a progress line and timed:

1. data: the real sample CT (``tools.data.fetch_sample_ct``: TotalSegmentator's example abdomen CT with
   BTCV-id labels *predicted by TotalSegmentator*) and a few seeded synthetic phantoms
   (``tools.data.make_phantoms``, 4 by default) under ``<out>/data``;
2. datalists: the pre-training corpus ``<out>/data/ssl_datalist.json`` (``tools.data.ssl_datalist``,
   images only: the phantoms and a copy of the sample CT; 40 % of the phantoms held out for
   validation, the sample CT always in training), and the fine-tuning list: training = phantoms +
   the sample CT, validation = 2 held-out phantoms (1 with ``--quick``) + the sample CT, testing =
   the sample CT + one held-out phantom;
3. pre-training: ``python -m monai.bundle run training --config_file configs/train.json ...`` in
   the ``swin_unetr_ssl_pretrain`` folder exactly as a user would, with a small configuration
   (feature size 12, 64 x 32 x 32 crops at 2 mm, 2 volumes x 1 crop x 2 views per step, 200 steps,
   validation every 50) into ``<out>/ssl``;
4. export of the best checkpoint's encoder with ``configs/export.json`` to
   ``<out>/ssl/models/model_swinvit.pt`` (official layout, 126 tensors);
5. figures (``tools.demo.ssl_figures``): ``<out>/figures/ssl_loss_curves.png`` (each loss per step, with
   the validation losses) and ``<out>/figures/ssl_inpainting_example.png`` (the sample CT's centre
   crop: input with holes | reconstruction | target), and each loss's mean over the first vs the
   last 20 steps, with a loud warning if one fell by less than 5 %;
6. fine-tuning of the BTCV bundle from the exported encoder (``--pretrained_path``; the log must say
   it loaded the encoder), with a small configuration (feature size 12, 64^3 crops, a few epochs,
   validating at least once), its output streamed to the console;
7. evaluation with ``configs/evaluate.json`` on the validation list (Dice, HD95 in mm per organ);
8. inference with ``configs/inference.json`` on the sample CT and one phantom (label maps in the
   input geometry);
9. PNG overlays (``tools.demo.overlays``) and a Markdown metrics table ``<out>/metrics.md`` (with a
   pre-training section: loss drops, validation losses, figures).

``--pretrained_path FILE`` skips steps 3-5 and fine-tunes from an existing encoder (the official
``model_swinvit.pt`` or an earlier export); ``--ssl_steps 0`` skips them and fine-tunes from scratch.

A Dice against the sample CT's labels measures agreement with TotalSegmentator, not accuracy;
phantom Dice measures how well the tiny model learned synthetic shapes. A few hundred pre-training
steps on 5 volumes and a few epochs of fine-tuning of a feature-size-12 network are far from the
published numbers: the demo shows the pipeline working end to end, not a trained model.

Pre-training settings, chosen for a 2-core CPU: the smallest usable crop, 64 x 32 x 32. The
rotation task turns crops in the plane of spatial axes 1 and 2, which must be square, and the
rotation and contrastive heads need 2 bottleneck tokens (crop / 32). At 2 mm every phantom (134 mm
wide) is at least 64 voxels along the first axis (at 3 mm it would not be, and the bundle's corpus
check would refuse it). Each step takes one crop from each of 2 volumes (``drop_last`` keeps both):
the contrastive loss needs the other volume's crop as its negative, 2 crops of one volume barely
separate. Learning rate 4e-4 (the bundle's), warm-up 10 steps, cosine decay to 0 at the last step.

Fine-tuning geometry: the recipe's 1.5 x 1.5 x 2 mm spacing makes the sample CT 210 windows at
overlap 0.5 (80 at 0.25), and it is run three times (validation, evaluation, inference); the demo
therefore resamples to 3 mm isotropic, the sample CT's own voxel size: 12 windows at overlap 0.25,
8 at 0. ``--spacing "[1.5,1.5,2.0]"`` gives the recipe's geometry at several times the cost.

How long the demo takes is measured in the top-level README.md and the model cards
(``bundles/*/docs/README.md``); on a CPU shared with other jobs, fewer ``--ssl_steps`` keep it short.

Command line (from the repository root)::

    python -m tools demo [--output_dir demo_output] [--ssl_steps 200] [--epochs 4] [--quick]
        [--pretrained_path model_swinvit.pt]
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.common.bundles import REPO_ROOT, bundle_command
from tools.common.bundles import SSL_DIR as SSL_BUNDLE_DIR
from tools.common.processes import run_streamed
from tools.common.scalars import read_scalars
from tools.demo.ssl_figures import LOSS_TERMS, SHORT_NAMES, TOTAL, format_loss_drops

META_FILE = BUNDLE_DIR / "configs" / "metadata.json"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "demo_output"
NUM_STEPS = 9
# Pre-training defaults (see the module docstring for the reasons)
SSL_STEPS, SSL_STEPS_QUICK = 200, 30
SSL_ROI_SIZE = (64, 32, 32)
SSL_SPACING = (2.0, 2.0, 2.0)
SSL_LEARNING_RATE = 4e-4
SSL_VAL_FRACTION = 0.4
SSL_MIN_DROP = 0.05  # a loss "fell" when its last-20-step mean is at least 5 % below its first-20-step mean
SSL_NOTE = (
    "Pre-training here is a few hundred steps of a feature-size-12 encoder on a handful of volumes: it shows the "
    "three proxy-task losses falling and the export feeding fine-tuning, not a useful pre-trained encoder."
)
AGREEMENT_NOTE = (
    "Dice/HD95 on the sample CT (example_ct) measure agreement with TotalSegmentator's predicted labels, "
    "not accuracy against manual ground truth; the sample CT is also in the training list. "
    "Phantom scores are against the phantoms' exact synthetic labels."
)

logger = logging.getLogger("tools.demo.demo")


class DemoError(RuntimeError):
    """A demo step failed; the message names the step."""


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


class _Steps:
    """Announce numbered steps and record their wall times."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.times: list[tuple[str, float]] = []
        self.current = ""

    def start(self, index: int, title: str) -> float:
        self.current = f"[{index}/{self.total}] {title}"
        _say(f"\n{'=' * 78}\n{self.current} ...\n{'=' * 78}")
        return time.perf_counter()

    def done(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.times.append((self.current, dt))
        _say(f"--- {self.current}: done in {_hms(dt)} ({dt:.1f} s)")


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def organ_names(meta_file: Path = META_FILE) -> dict[int, str]:
    """BTCV id -> organ name, from the bundle metadata (``network_data_format.outputs.pred.channel_def``)."""
    meta = json.loads(Path(meta_file).read_text())
    return {int(k): str(v) for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}


def _read_per_case_csv(path: Path) -> dict[str, dict[str, float | None]]:
    """{case: {organ: value or None}} from the bundle's ``<metric>_per_case.csv``."""
    import csv

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


def _check_label_map(pred: Path, image: Path) -> tuple[int, ...]:
    """Fail unless ``pred`` exists and has the spatial shape of ``image``; return the shape."""
    import nibabel as nib

    if not pred.is_file():
        raise DemoError(f"inference did not write {pred}")
    p_shape = tuple(nib.load(str(pred)).shape[:3])
    i_shape = tuple(nib.load(str(image)).shape[:3])
    if p_shape != i_shape:
        raise DemoError(f"label map {pred} has shape {p_shape}, its input {image} has {i_shape}")
    return p_shape


def _ssl_corpus(data_dir: Path, sample_image: Path, phantom_images: Sequence[Path], seed: int) -> tuple[Path, dict]:
    """Write the pre-training datalist ``<data_dir>/ssl_datalist.json`` with ``tools.data.ssl_datalist``.

    Two data sets, images only: the phantoms' image folder and a folder holding a copy of the
    sample CT (its own folder also holds the label map, which is not CT). Paths are relative to
    ``data_dir`` (the bundle's ``dataset_dir``). Returns the path and the datalist.
    """
    from tools.data.ssl_datalist import write_datalist

    folders = {Path(p).parent for p in phantom_images}
    if len(folders) != 1:
        raise DemoError(f"phantom images are not in one folder: {sorted(map(str, folders))}")
    ct_dir = data_dir / "ssl_corpus" / "totalseg_sample"
    shutil.rmtree(ct_dir, ignore_errors=True)
    ct_dir.mkdir(parents=True)
    shutil.copy2(sample_image, ct_dir / sample_image.name)
    # data-set names that are not folder names under data_dir (load_decathlon_datalist would turn them into paths)
    datasets = {"synthetic_phantoms": folders.pop(), "totalseg_sample": ct_dir}
    path = data_dir / "ssl_datalist.json"
    datalist = write_datalist(datasets, path, val_fraction=SSL_VAL_FRACTION, seed=seed, relative_to=data_dir)
    return path, datalist


def _count_encoder_tensors(path: Path) -> int:
    import torch

    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else {}
    return sum(1 for v in state.values() if hasattr(v, "shape"))


def ssl_val_interval(steps: int) -> int:
    """Validate 4 times (at least every step for tiny runs), the last time at the last step."""
    interval = max(1, steps // 4)
    while steps % interval:
        interval -= 1
    return interval


@dataclass
class DemoRun:
    """The settings of one demo run (defaults resolved), its output folders, step clock and results."""

    out: Path
    quick: bool
    epochs: int
    overlap: float
    num_phantoms: int
    seed: int
    spacing: list[float]
    sw_batch_size: int
    learning_rate: float
    ssl_steps: int
    ssl_learning_rate: float
    ssl_spacing: list[float]
    ssl_roi_size: list[int]
    pretrained_path: str | None
    steps: _Steps = field(default_factory=lambda: _Steps(NUM_STEPS))
    results: dict = field(default_factory=dict)

    @property
    def pretrain(self) -> bool:
        """Whether this run pre-trains (steps 3-5) rather than fine-tuning from a given encoder or scratch."""
        return self.ssl_steps > 0 and not self.pretrained_path

    @property
    def val_interval(self) -> int:
        """Fine-tuning validates twice (half way and at the end) when the epochs split evenly, else once."""
        return self.epochs // 2 if self.epochs >= 2 and self.epochs % 2 == 0 else self.epochs

    @property
    def ssl_val_interval(self) -> int:
        """Pre-training validation interval in steps (0 without pre-training)."""
        return ssl_val_interval(self.ssl_steps) if self.pretrain else 0

    @property
    def ssl_settings(self) -> dict:
        """The pre-training settings as reported in the metrics table."""
        return {
            "steps": self.ssl_steps,
            "feature_size": 12,
            "roi_size": self.ssl_roi_size,
            "spacing_mm": self.ssl_spacing,
            "batch": "2 volumes x 1 crop x 2 views",
            "learning_rate": self.ssl_learning_rate,
            "warmup_steps": min(10, max(1, self.ssl_steps // 10)),
            "val_interval": self.ssl_val_interval,
        }

    def dir(self, name: str) -> Path:
        """An output folder: data, ssl, figures, models, eval, inference, overlays, logs, train_logs."""
        return self.out / name

    def failed(self, what: str) -> DemoError:
        """A DemoError naming the current step."""
        return DemoError(f"{self.steps.current} failed: {what}")

    def run_bundle(
        self,
        bundle_dir: Path,
        run_id: str | None,
        configs: Sequence[str],
        overrides: dict,
        log_name: str,
        quiet: Sequence[str] = (),
    ) -> Path:
        """Run a bundle command as a user would, streamed and logged to ``logs/<log_name>``; return the log path."""
        log = self.dir("logs") / log_name
        run_streamed(
            bundle_command(run_id, configs, overrides),
            bundle_dir,
            log,
            self.steps.current,
            quiet=quiet,
            error=DemoError,
        )
        return log


def _sizes(value, kind: type = float) -> list:
    """A 3D setting from a number or a sequence."""
    return [kind(s) for s in (value if isinstance(value, (list, tuple)) else [value] * 3)]


def plan_run(
    output_dir,
    epochs,
    quick,
    spacing,
    overlap,
    sw_batch_size,
    learning_rate,
    num_phantoms,
    seed,
    ssl_steps,
    ssl_learning_rate,
    ssl_spacing,
    ssl_roi_size,
    pretrained_path,
) -> DemoRun:
    """The demo's settings with the defaults resolved and checked (see ``demo`` for their meaning)."""
    run = DemoRun(
        out=Path(output_dir).resolve() if output_dir else DEFAULT_OUTPUT_DIR,
        quick=bool(quick),
        epochs=int(epochs) if epochs is not None else (1 if quick else 4),
        overlap=float(overlap) if overlap is not None else (0.0 if quick else 0.25),
        num_phantoms=int(num_phantoms) if num_phantoms is not None else (2 if quick else 4),
        seed=seed,
        spacing=_sizes(spacing),
        sw_batch_size=sw_batch_size,
        learning_rate=learning_rate,
        ssl_steps=int(ssl_steps) if ssl_steps is not None else (SSL_STEPS_QUICK if quick else SSL_STEPS),
        ssl_learning_rate=ssl_learning_rate,
        ssl_spacing=_sizes(ssl_spacing),
        ssl_roi_size=[int(s) for s in ssl_roi_size],
        pretrained_path=None,
    )
    if run.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {run.epochs}")
    if run.num_phantoms < 2:
        raise ValueError(f"num_phantoms must be >= 2 (training and validation), got {run.num_phantoms}")
    if run.ssl_steps < 0:
        raise ValueError(f"ssl_steps must be >= 0, got {run.ssl_steps}")
    if pretrained_path:
        run.pretrained_path = str(Path(pretrained_path).resolve())
        if not Path(run.pretrained_path).is_file():
            raise ValueError(f"pretrained_path {run.pretrained_path} is not a file")
    return run


def clear_outputs(run: DemoRun) -> None:
    """Remove an earlier run's results (stale results must not pass for this run's), keeping a given encoder."""
    for name in ("ssl", "figures", "models", "eval", "inference", "overlays", "logs", "train_logs"):
        d = run.dir(name)
        if run.pretrained_path and Path(run.pretrained_path).is_relative_to(d.resolve()):
            continue  # the given encoder lives there (e.g. an earlier demo's export): keep it
        shutil.rmtree(d, ignore_errors=True)
    (run.out / "metrics.md").unlink(missing_ok=True)
    run.out.mkdir(parents=True, exist_ok=True)


def announce(run: DemoRun) -> None:
    """Print what the demo is about to do."""
    _say(
        f"Swin UNETR demo{' (quick)' if run.quick else ''}: self-supervised pre-training, then BTCV fine-tuning; "
        f"output in {run.out}"
    )
    _say(f"bundles: {SSL_BUNDLE_DIR}\n         {BUNDLE_DIR}")
    if run.pretrain:
        _say(
            f"pre-training: feature_size 12, roi {run.ssl_roi_size}, spacing {run.ssl_spacing} mm, {run.ssl_steps} "
            f"steps of 2 volumes x 1 crop x 2 views, lr {run.ssl_learning_rate} (warm-up "
            f"{run.ssl_settings['warmup_steps']} steps, cosine decay), validation every {run.ssl_val_interval} steps"
        )
    else:
        _say(
            "pre-training: skipped ("
            + (
                f"fine-tuning from {run.pretrained_path}"
                if run.pretrained_path
                else "--ssl_steps 0: fine-tuning from scratch"
            )
            + ")"
        )
    _say(
        f"fine-tuning: feature_size 12, roi 64^3, spacing {run.spacing} mm, {run.epochs} epoch(s), validation every "
        f"{run.val_interval}, lr {run.learning_rate}, sliding-window overlap {run.overlap}, "
        f"sw_batch_size {run.sw_batch_size}"
    )


# ----------------------------------------------------------------------------------------- the nine steps


def get_data(run: DemoRun) -> tuple[dict[str, Path], list[tuple[Path, Path]]]:
    """Step 1: the real sample CT and seeded synthetic phantoms under ``data/``; return (sample, phantoms)."""
    from tools.data.fetch_sample_ct import fetch_sample_ct
    from tools.data.make_phantoms import write_phantom_dataset

    data_dir = run.dir("data")
    sample = {k: Path(v) for k, v in fetch_sample_ct(data_dir / "sample_ct").items()}
    _say(f"sample CT: {sample['image']}\n  labels (TotalSegmentator predictions, BTCV ids): {sample['label']}")
    phantoms = [
        tuple(map(Path, p))
        for p in write_phantom_dataset(data_dir / "phantoms", num_cases=run.num_phantoms, seed=run.seed)
    ]
    _say(f"{len(phantoms)} synthetic phantoms (seed {run.seed}) under {data_dir / 'phantoms'}")
    return sample, phantoms


def write_datalists(run: DemoRun, sample: dict[str, Path], phantoms: list[tuple[Path, Path]]) -> dict:
    """Step 2: the pre-training corpus (images only) and the fine-tuning datalist.

    Returns {"ssl_datalist": path, "datalist": path, "validation_phantoms": [(image, label), ...]}.
    """
    data_dir = run.dir("data")
    ssl_datalist_path, ssl_datalist = _ssl_corpus(data_dir, sample["image"], [p[0] for p in phantoms], run.seed)
    for key in ("training", "validation"):
        _say(f"pre-training {key:>10}: " + ", ".join(Path(d["image"]).name for d in ssl_datalist[key]))
    _say(f"pre-training datalist (tools.data.ssl_datalist, val_fraction {SSL_VAL_FRACTION}): {ssl_datalist_path}")
    n_val = 2 if run.num_phantoms >= 4 else 1
    train_ph, val_ph = phantoms[:-n_val], phantoms[-n_val:]

    def item(image: Path, label: Path | None = None) -> dict:
        d = {"image": _rel(image, data_dir)}
        if label is not None:
            d["label"] = _rel(label, data_dir)
        return d

    datalist = {
        "training": [item(image, label) for image, label in train_ph] + [item(sample["image"], sample["label"])],
        "validation": [item(image, label) for image, label in val_ph] + [item(sample["image"], sample["label"])],
        "testing": [item(sample["image"]), item(val_ph[0][0])],
    }
    datalist_path = data_dir / "datalist.json"
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
    for key in ("training", "validation", "testing"):
        _say(f"fine-tuning  {key:>10}: " + ", ".join(Path(d["image"]).name for d in datalist[key]))
    _say(f"fine-tuning datalist: {datalist_path}")
    _say(f"NOTE: {AGREEMENT_NOTE}")
    return {"ssl_datalist": ssl_datalist_path, "datalist": datalist_path, "validation_phantoms": val_ph}


def pretrain(run: DemoRun, ssl_datalist: Path) -> Path:
    """Step 3: pre-train with the SSL bundle's ``training`` command; return the best checkpoint."""
    _say("(the bundle counts optimiser steps as ignite 'epochs' of 1 iteration: 'Epoch: k/N' is step k)")
    overrides = {
        "meta_file": "configs/metadata.json",
        "logging_file": "configs/logging.conf",
        "dataset_dir": run.dir("data"),
        "datalist": ssl_datalist,
        "bundle_root": run.dir("ssl"),
        "feature_size": 12,
        "roi_size": run.ssl_roi_size,
        "spacing": run.ssl_spacing,
        # 2 volumes x 1 crop per step: the contrastive loss takes the other volume's crop as its
        # negative (2 crops of one volume barely separate in a few hundred steps); drop_last keeps
        # every batch at 2 volumes whatever the corpus size
        "batch_size": 2,
        "num_samples": 1,
        "train#dataloader#drop_last": True,
        "num_workers": 0,
        "cache_rate": 1.0,
        "use_checkpoint": False,
        # small crops: keeping freed memory (off by default in training) halves the step time here
        # (page faults) for about 0.6 GB more; at the default size it costs too much memory
        "reuse_cpu_memory": True,
        "learning_rate": run.ssl_learning_rate,
        "warmup_steps": run.ssl_settings["warmup_steps"],
        "num_steps": run.ssl_steps,
        "val_interval": run.ssl_val_interval,
    }
    run.run_bundle(
        SSL_BUNDLE_DIR, "training", ["configs/train.json"], overrides, "3_pretrain.log", quiet=("Complete. Time taken",)
    )
    ssl_ckpt = run.dir("ssl") / "models" / "model.pt"
    if not ssl_ckpt.is_file():
        raise run.failed(f"training finished but wrote no {ssl_ckpt} (did it validate?)")
    _say(f"best pre-training checkpoint (lowest val_loss): {ssl_ckpt}")
    return ssl_ckpt


def export_encoder(run: DemoRun, ssl_ckpt: Path) -> tuple[Path, int]:
    """Step 4: export the encoder with the SSL bundle's ``configs/export.json``; return (path, tensor count)."""
    encoder_path = run.dir("ssl") / "models" / "model_swinvit.pt"
    run.run_bundle(
        SSL_BUNDLE_DIR,
        None,
        ["configs/export.json"],
        {"ckpt_path": ssl_ckpt, "encoder_path": encoder_path},
        "4_export.log",
    )
    if not encoder_path.is_file():
        raise run.failed(f"no {encoder_path}")
    n_tensors = _count_encoder_tensors(encoder_path)
    _say(f"encoder: {encoder_path} ({n_tensors} tensors, official model_swinvit.pt layout)")
    return encoder_path, n_tensors


def report_loss_drops(drops: dict, loss_png: Path) -> bool:
    """Print whether each pre-training loss fell (loudly if one did not); return True if all fell."""
    not_fallen = [tag for tag, d in drops.items() if not d["fell"]]
    w = next(iter(drops.values()))["window"] if drops else 0
    if not not_fallen:
        _say(f"each loss fell (mean of the first {w} steps -> last {w}): {format_loss_drops(drops)}")
    else:
        bar = "!" * 78
        _say(
            f"{bar}\nWARNING: not every pre-training loss fell by {100 * SSL_MIN_DROP:.0f}% or more "
            f"(mean of the first {w} steps -> last {w}): {', '.join(not_fallen)}\n"
            f"  {format_loss_drops(drops)}\n"
            f"  (more steps, --ssl_steps, or another --ssl_learning_rate may help; see {loss_png})\n{bar}"
        )
    return not not_fallen


def pretraining_figures(run: DemoRun, ssl_ckpt: Path, sample_image: Path, encoder_path: Path, n_tensors: int) -> dict:
    """Step 5: loss curves, an inpainting example and the loss drops; return the pre-training record."""
    from tools.demo.ssl_figures import loss_drops, plot_inpainting_example, plot_loss_curves

    out, figures_dir, run_dir = run.out, run.dir("figures"), run.dir("ssl") / "runs"
    loss_png = Path(plot_loss_curves(run_dir, figures_dir / "ssl_loss_curves.png"))
    _say(f"loss curves: {loss_png}")
    inpaint = plot_inpainting_example(
        ssl_ckpt,
        sample_image,
        figures_dir / "ssl_inpainting_example.png",
        roi_size=run.ssl_roi_size,
        spacing=run.ssl_spacing,
        seed=run.seed,
    )
    inpaint_png = Path(inpaint["png"])
    _say(
        f"inpainting example (sample CT, centre crop, view 1): {inpaint_png}\n"
        f"  L1 {inpaint['l1']:.3f} over the crop, {inpaint['l1_masked']:.3f} over the "
        f"{100 * inpaint['masked_fraction']:.0f}% masked voxels; rotation class {inpaint['rotation']}, "
        f"predicted {inpaint['predicted_rotation']}"
    )
    drops = loss_drops(run_dir, window=20, min_relative_drop=SSL_MIN_DROP)
    all_fell = report_loss_drops(drops, loss_png)
    scalars = read_scalars(run_dir)
    run.results["pretraining"] = {
        "checkpoint": str(ssl_ckpt),
        "encoder": str(encoder_path),
        "encoder_tensors": n_tensors,
        "loss_curves_png": str(loss_png),
        "inpainting_png": str(inpaint_png),
        "loss_drops": drops,
        "all_losses_fell": all_fell,
        "inpainting": inpaint,
    }
    return {
        "settings": run.ssl_settings,
        "drops": drops,
        "validation": {t: v for t, v in scalars.items() if t.startswith("val_")},
        "figures": {"loss curves": _rel(loss_png, out), "inpainting example": _rel(inpaint_png, out)},
        "encoder": _rel(encoder_path, out),
        "encoder_tensors": n_tensors,
        "inpainting": inpaint,
    }


def fine_tuning_settings(run: DemoRun, datalist: Path) -> dict:
    """The BTCV bundle settings that fine-tuning, evaluation and inference share."""
    return {
        "dataset_dir": run.dir("data"),
        "datalist": datalist,
        "feature_size": 12,
        "roi_size": [64, 64, 64],
        "spacing": run.spacing,
        "num_workers": 0,
        "sw_batch_size": run.sw_batch_size,
        "overlap": run.overlap,
    }


def fine_tune(run: DemoRun, common: dict, encoder_path: Path | None) -> Path:
    """Step 6: fine-tune the BTCV bundle (from ``encoder_path`` if given); return the best checkpoint."""
    if encoder_path:
        _say(f"encoder: {encoder_path}")
    models_dir = run.dir("models")
    overrides = {
        **common,
        "bundle_root": run.out,
        "ckpt_dir": models_dir,
        "output_dir": run.dir("train_logs"),
        "use_checkpoint": False,
        "reuse_cpu_memory": True,  # as in pre-training: small crops, faster with freed memory kept
        "num_samples": 2,
        "max_epochs": run.epochs,
        "val_interval": run.val_interval,
        "warmup_epochs": 0,  # warm-up counts epochs; its first epoch has lr 0
        "learning_rate": run.learning_rate,
        "sw_batch_size": 1,
    }
    if encoder_path:
        overrides["pretrained_path"] = encoder_path
    train_log = run.run_bundle(BUNDLE_DIR, "training", ["configs/train.json"], overrides, "6_train.log")
    if encoder_path:
        loaded = [line.strip() for line in train_log.read_text().splitlines() if "encoder tensors from" in line]
        if not loaded:
            raise run.failed(f"the log {train_log} does not report loading {encoder_path}")
        _say(f"encoder loaded: {loaded[-1].split(' - ')[-1]}")
    ckpt = models_dir / "model.pt"
    if not ckpt.is_file():
        raise run.failed(f"training finished but wrote no {ckpt} (did it validate?)")
    _say(f"best checkpoint: {ckpt}")
    run.results["checkpoint"] = str(ckpt)
    return ckpt


def evaluate(run: DemoRun, common: dict, ckpt: Path) -> Path:
    """Step 7: evaluate on the validation list with ``configs/evaluate.json``; return the evaluation folder."""
    _say(f"NOTE: {AGREEMENT_NOTE}")
    eval_dir = run.dir("eval")
    overrides = {
        **common,
        "ckpt_path": ckpt,
        "ckpt_dir": run.dir("models"),
        "output_dir": eval_dir,
        "use_checkpoint": False,
    }
    run.run_bundle(BUNDLE_DIR, None, ["configs/train.json", "configs/evaluate.json"], overrides, "7_evaluate.log")
    if not (eval_dir / "metrics_summary.json").is_file():
        raise run.failed(f"no {eval_dir / 'metrics_summary.json'}")
    return eval_dir


def infer(run: DemoRun, common: dict, ckpt: Path, sample_image: Path, phantom_image: Path) -> tuple[Path, Path]:
    """Step 8: inference on the sample CT and one phantom; return their label maps (checked: input geometry)."""
    infer_dir = run.dir("inference")
    run.run_bundle(
        BUNDLE_DIR,
        None,
        ["configs/inference.json"],
        {**common, "ckpt_path": ckpt, "output_dir": infer_dir},
        "8_inference.log",
    )
    sample_pred = infer_dir / "example_ct_seg.nii.gz"
    phantom_pred = infer_dir / (phantom_image.name[: -len(".nii.gz")] + "_seg.nii.gz")
    for pred, image in ((sample_pred, sample_image), (phantom_pred, phantom_image)):
        shape = _check_label_map(pred, image)
        _say(f"label map {pred} (shape {shape}, same as its input)")
    return sample_pred, phantom_pred


def overlays_and_metrics(
    run: DemoRun,
    sample: dict[str, Path],
    sample_pred: Path,
    phantom_image: Path,
    phantom_pred: Path,
    eval_dir: Path,
    ssl_record: dict,
) -> tuple[Path, Path]:
    """Step 9: PNG overlays and ``metrics.md``; return the two overlay PNGs."""
    from tools.demo.overlays import render_comparison, render_overlay

    names = organ_names()
    overlay_dir = run.dir("overlays")
    sample_png = overlay_dir / "example_ct_prediction_vs_totalsegmentator.png"
    rows = render_comparison(
        sample["image"],
        {"TotalSegmentator labels (reference)": sample["label"], "demo model prediction": sample_pred},
        sample_png,
        label_names=names,
        title="Sample CT: demo prediction vs TotalSegmentator (agreement, not accuracy)",
    )
    for row, entries in rows.items():
        _say(f"{row}: {len(entries)} organ(s): {', '.join(entries) or 'none'}")
    phantom_png = overlay_dir / f"{phantom_image.name[: -len('.nii.gz')]}_prediction.png"
    entries = render_overlay(
        phantom_image,
        phantom_pred,
        phantom_png,
        label_names=names,
        title=f"Phantom {phantom_image.name}: demo prediction",
    )
    _say(f"phantom prediction: {len(entries)} organ(s): {', '.join(entries) or 'none'}")
    table = metrics_markdown(eval_dir, pretraining=ssl_record)
    (run.out / "metrics.md").write_text(table)
    _say("")
    _say(table)
    return sample_png, phantom_png


# ----------------------------------------------------------------------------------------- the recipe


def _step(run: DemoRun, index: int, title: str, action, *args):
    """Run one numbered, timed step; return what ``action(run, *args)`` returns."""
    t0 = run.steps.start(index, title)
    result = action(run, *args)
    run.steps.done(t0)
    return result


def _skip(run: DemoRun, index: int, title: str, reason: str) -> None:
    """Announce a skipped step."""
    t0 = run.steps.start(index, title)
    _say(f"skipped: {reason}")
    run.steps.done(t0)


def run_pretraining(run: DemoRun, sample_image: Path, ssl_datalist: Path) -> tuple[Path | None, dict]:
    """Steps 3-5 (or their skip notices); return (encoder to fine-tune from or None, pre-training record)."""
    if not run.pretrain:
        reason = (
            f"--pretrained_path given: fine-tuning from {run.pretrained_path}"
            if run.pretrained_path
            else "--ssl_steps 0: fine-tuning from scratch"
        )
        _skip(run, 3, "self-supervised pre-training", reason)
        _skip(run, 4, "exporting the encoder", reason)
        _skip(run, 5, "pre-training figures", reason)
        return (Path(run.pretrained_path) if run.pretrained_path else None), {"skipped": reason}
    ssl_ckpt = _step(
        run,
        3,
        f"self-supervised pre-training for {run.ssl_steps} steps with the SSL bundle's configs/train.json",
        pretrain,
        ssl_datalist,
    )
    encoder_path, n_tensors = _step(
        run, 4, "exporting the encoder with the SSL bundle's configs/export.json", export_encoder, ssl_ckpt
    )
    ssl_record = _step(
        run,
        5,
        "pre-training figures: loss curves, an inpainting example, loss drops",
        pretraining_figures,
        ssl_ckpt,
        sample_image,
        encoder_path,
        n_tensors,
    )
    return encoder_path, ssl_record


def run_steps(run: DemoRun) -> dict:
    """The nine steps; return the paths the summary names."""
    sample, phantoms = _step(run, 1, "getting data: the real sample CT and synthetic phantoms", get_data)
    lists = _step(
        run, 2, "writing the datalists: pre-training corpus (images only) and BTCV", write_datalists, sample, phantoms
    )
    encoder_path, ssl_record = run_pretraining(run, sample["image"], lists["ssl_datalist"])
    common = fine_tuning_settings(run, lists["datalist"])
    source = (
        "from the exported encoder" if run.pretrain else "from the given encoder" if encoder_path else "from scratch"
    )
    ckpt = _step(
        run,
        6,
        f"fine-tuning a small Swin UNETR {source} for {run.epochs} epoch(s) with configs/train.json",
        fine_tune,
        common,
        encoder_path,
    )
    eval_dir = _step(run, 7, "evaluating on the validation list with configs/evaluate.json", evaluate, common, ckpt)
    phantom_image = lists["validation_phantoms"][0][0]
    sample_pred, phantom_pred = _step(
        run,
        8,
        "inference on the sample CT and one phantom with configs/inference.json",
        infer,
        common,
        ckpt,
        sample["image"],
        phantom_image,
    )
    sample_png, phantom_png = _step(
        run,
        9,
        "writing overlays and the metrics table",
        overlays_and_metrics,
        sample,
        sample_pred,
        phantom_image,
        phantom_pred,
        eval_dir,
        ssl_record,
    )
    return {
        "ckpt": ckpt,
        "eval_dir": eval_dir,
        "overlays": [sample_png, phantom_png],
        "label_maps": [sample_pred, phantom_pred],
    }


def summarise(run: DemoRun, outputs: dict, total: float) -> None:
    """Print the step times, the output files and the key outputs."""
    out, steps = run.out, run.steps
    _say(f"\n{'=' * 78}\nDemo finished in {_hms(total)} ({total:.1f} s)\n{'=' * 78}")
    for name, dt in steps.times:
        _say(f"  {name:<96} {_hms(dt):>7} ({dt:.1f} s)")
    _say(f"\nOutput files under {out}:")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        _say(f"  {_rel(path, out):<70} {path.stat().st_size / 1024:>10.1f} KiB")
    key = "\nKey outputs:\n"
    if run.pretrain:
        pre = run.results["pretraining"]
        verdict = "each loss fell" if pre["all_losses_fell"] else "WARNING: not every loss fell"
        key += (
            f"  pre-training   {verdict}: {format_loss_drops(pre['loss_drops'])}\n"
            f"  loss curves    {pre['loss_curves_png']}\n  inpainting     {pre['inpainting_png']}\n"
            f"  encoder        {pre['encoder']} ({pre['encoder_tensors']} tensors)\n"
        )
    elif run.pretrained_path:
        key += f"  encoder        {run.pretrained_path} (given, not pre-trained here)\n"
    (sample_png, phantom_png), (sample_pred, phantom_pred) = outputs["overlays"], outputs["label_maps"]
    key += (
        f"  metrics table  {out / 'metrics.md'}\n  overlays       {sample_png}\n"
        f"                 {phantom_png}\n  label maps     {sample_pred}\n                 {phantom_pred}\n"
        f"  checkpoint     {outputs['ckpt']}\n  evaluation     {outputs['eval_dir']}\n"
        f"  step logs      {run.dir('logs')}"
    )
    _say(key)
    _say(f"\nReminder: {AGREEMENT_NOTE}")
    if run.pretrain:
        _say(f"          {SSL_NOTE}")


def demo(
    output_dir: str | None = None,
    epochs: int | None = None,
    quick: bool = False,
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    overlap: float | None = None,
    sw_batch_size: int = 4,
    learning_rate: float = 1e-3,
    num_phantoms: int | None = None,
    seed: int = 0,
    ssl_steps: int | None = None,
    ssl_learning_rate: float = SSL_LEARNING_RATE,
    ssl_spacing: Sequence[float] = SSL_SPACING,
    ssl_roi_size: Sequence[int] = SSL_ROI_SIZE,
    pretrained_path: str | None = None,
) -> dict:
    """Run the demo: pre-train the Swin encoder (SSL bundle), export it, fine-tune on BTCV-style data, evaluate, infer.

    The nine steps: data, datalists, pre-training, encoder export, pre-training figures (PNG loss
    curves and an inpainting example under <output_dir>/figures), fine-tuning from the export,
    evaluation, inference, overlays and metrics table. Returns {step: seconds, ...} and the output
    paths. On failure, the command line prints which step failed (with the command and its log)
    and exits with code 1.

    Args:
        output_dir: where everything goes (default ``<repo>/demo_output``, git-ignored). Reused:
            the sample CT and phantoms are rewritten, earlier results are replaced.
        epochs: fine-tuning epochs (default 4; 1 with ``quick``). Validation runs half way and at
            the end for an even number of epochs, else at the end only: at least once, and always
            after the last epoch, so ``model.pt`` can come from the last epoch.
        quick: an even smaller run (2 phantoms, 30 pre-training steps, 1 epoch, no window overlap).
        spacing: resampling spacing in mm for fine-tuning, evaluation and inference, e.g. "[3,3,3]"
            (default; the recipe's is "[1.5,1.5,2.0]", several times the cost).
        overlap: sliding-window overlap (default 0.25; 0 with ``quick``).
        sw_batch_size: windows per forward pass in evaluation and inference.
        learning_rate: fine-tuning AdamW learning rate (the recipe's 1e-4 barely moves in a few epochs).
        num_phantoms: synthetic cases (default 4; 2 with ``quick``); the last 2 (1 if fewer than
            4) are held out for validation.
        seed: phantom and datalist seed.
        ssl_steps: pre-training optimiser steps (default 200; 30 with ``quick``); 0 skips
            pre-training and fine-tunes from scratch.
        ssl_learning_rate: pre-training AdamW peak learning rate (warm-up, then cosine decay).
        ssl_spacing: pre-training resampling spacing in mm (default "[2,2,2]": every phantom >= the ROI).
        ssl_roi_size: pre-training crop size (default "[64,32,32]"); square in the rotation plane
            (axes 1, 2), each side a multiple of 32, and at least 2 bottleneck tokens.
        pretrained_path: an existing encoder file (e.g. the official ``model_swinvit.pt`` or an
            earlier export) to fine-tune from: pre-training, export and its figures are skipped.
    """
    t_start = time.perf_counter()
    run = plan_run(
        output_dir,
        epochs,
        quick,
        spacing,
        overlap,
        sw_batch_size,
        learning_rate,
        num_phantoms,
        seed,
        ssl_steps,
        ssl_learning_rate,
        ssl_spacing,
        ssl_roi_size,
        pretrained_path,
    )
    clear_outputs(run)
    announce(run)
    run.results["output_dir"] = str(run.out)
    try:
        outputs = run_steps(run)
    except DemoError as e:
        raise e from None
    except Exception as e:
        raise run.failed(f"{type(e).__name__}: {e}") from e
    from tools.data.fetch_sample_ct import PROVENANCE_NAME

    total = time.perf_counter() - t_start
    summarise(run, outputs, total)
    run.results.update(
        step_seconds={name: dt for name, dt in run.steps.times},
        total_seconds=total,
        metrics_md=str(run.out / "metrics.md"),
        overlays=[str(p) for p in outputs["overlays"]],
        label_maps=[str(p) for p in outputs["label_maps"]],
        metrics_summary=str(outputs["eval_dir"] / "metrics_summary.json"),
        provenance=str(run.dir("data") / "sample_ct" / PROVENANCE_NAME),
    )
    return run.results


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(demo, errors=(DemoError,), failure="DEMO FAILED")
