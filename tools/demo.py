"""End-to-end demo of the BTCV bundle on a small embedded data set, on CPU, in minutes.

Six steps, each announced with a progress line and timed:

1. data: the real sample CT (``tools.fetch_sample_ct``: TotalSegmentator's example abdomen CT with
   BTCV-id labels *predicted by TotalSegmentator*) and a few seeded synthetic phantoms
   (``tools.make_phantoms``, 4 by default) under ``<out>/data``;
2. a datalist: training = phantoms + the sample CT, validation = 2 held-out phantoms (1 with
   ``--quick``) + the sample CT, testing = the sample CT + one held-out phantom;
3. fine-tuning: ``python -m monai.bundle run training --config_file configs/train.json ...`` run in
   the bundle folder exactly as a user would, with a small configuration (feature size 12,
   64^3 crops, a few epochs, validating at least once), its output streamed to the console;
4. evaluation with ``configs/evaluate.json`` on the validation list (Dice, HD95 in mm per organ);
5. inference with ``configs/inference.json`` on the sample CT and one phantom (label maps in the
   input geometry);
6. PNG overlays (``tools.overlays``) and a Markdown metrics table ``<out>/metrics.md``.

A Dice against the sample CT's labels measures agreement with TotalSegmentator, not accuracy;
phantom Dice measures how well the tiny model learned synthetic shapes. A few epochs of a
feature-size-12 network from scratch are far from the published numbers: the demo shows the
pipeline working end to end, not a trained model.

Speed: sized for a 2-core CPU without reduced-precision kernels (AVX2 only), where one forward
pass of the small network on a 64^3 window takes 3-6 s and one training step on two 64^3 crops
15-35 s. The recipe's 1.5 x 1.5 x 2 mm spacing makes the sample CT 210 windows at overlap 0.5
(80 at 0.25), and it is run three times (validation, evaluation, inference); the demo therefore
resamples to 3 mm isotropic, the sample CT's own voxel size: 12 windows at overlap 0.25, 8 at 0.
Measured on such a machine (AMD EPYC, 2 cores): the defaults (4 phantoms, 4 epochs of 3 training
cases, validation at epochs 2 and 4) take about 3 minutes on an idle machine and 9 minutes with the
cores shared with other jobs; ``--quick`` 1 to 3.5 minutes; ``--epochs 10`` about 5 minutes idle.
``--spacing "[1.5,1.5,2.0]"`` gives the recipe's geometry at several times the cost.

Command line (from the repository root)::

    python -m tools.demo [--output_dir demo_output] [--epochs 4] [--quick]
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE_DIR = REPO_ROOT / "bundles" / "swin_unetr_btcv_seg"
META_FILE = BUNDLE_DIR / "configs" / "metadata.json"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "demo_output"
NUM_STEPS = 6
AGREEMENT_NOTE = (
    "Dice/HD95 on the sample CT (example_ct) measure agreement with TotalSegmentator's predicted labels, "
    "not accuracy against manual ground truth; the sample CT is also in the training list. "
    "Phantom scores are against the phantoms' exact synthetic labels."
)
# Console noise from the bundle subprocesses that carries no information for a demo user
# (kept in the step's log file).
_QUIET_PATTERNS = (
    "nvImageCodec is not available",
    "NvImgCodecPydicomReader",
    "Orientationd.__init__:labels",
)

logger = logging.getLogger("tools.demo")


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


def _fmt_arg(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt_arg(v) for v in value) + "]"
    if isinstance(value, Path):
        return str(value)
    return str(value)


def bundle_command(run_id: str | None, config_files: Sequence[str], overrides: dict) -> list[str]:
    """``python -m monai.bundle run [id] --config_file ... --key value ...`` as an argument list."""
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id:
        cmd.append(run_id)
    config = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    cmd += ["--config_file", config]
    for key, value in overrides.items():
        cmd += [f"--{key}", _fmt_arg(value)]
    return cmd


def _shell_quote(cmd: Sequence[str]) -> str:
    """The command as one could paste it into bash (double quotes where an argument holds single quotes)."""
    import shlex

    def quote(arg: str) -> str:
        if "'" in arg and not any(c in arg for c in '"$`\\!'):
            return f'"{arg}"'
        return shlex.quote(arg)

    return " ".join(quote(c) for c in cmd)


def run_streamed(cmd: Sequence[str], cwd: Path, log_path: Path, step: str) -> None:
    """Run ``cmd`` in ``cwd``, echo its output live (minus known noise) and tee all of it to ``log_path``.

    Raises DemoError naming ``step``, the exit code, the last lines of output and the log file if
    the command fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _say(f"$ cd {cwd} && {_shell_quote(cmd)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail: list[str] = []
    with open(log_path, "w") as log:
        log.write(f"$ cd {cwd} && {_shell_quote(cmd)}\n")
        try:
            proc = subprocess.Popen(
                list(cmd), cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", bufsize=1,
            )
        except OSError as e:
            raise DemoError(f"{step} failed: could not start {cmd[0]}: {e}") from e
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip())
                del tail[:-40]
                if not any(p in line for p in _QUIET_PATTERNS):
                    sys.stdout.write("    " + line)
                    sys.stdout.flush()
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        last = "\n".join("    " + t for t in tail[-25:])
        raise DemoError(
            f"{step} failed: the bundle command exited with code {rc}.\n"
            f"  command: cd {cwd} && {_shell_quote(cmd)}\n  full log: {log_path}\n  last lines:\n{last}"
        )


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


def metrics_markdown(eval_dir: Path, meta_file: Path = META_FILE) -> str:
    """Markdown tables of per-organ Dice and HD95 (mm) from the evaluation outputs.

    Columns: organ id and name (from the bundle metadata), one column per validation case
    (from ``val_*_per_case.csv``) and the mean over cases (from ``metrics_summary.json``).
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
        "> A few epochs of a feature-size-12 Swin UNETR from scratch: these numbers show the pipeline "
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
    return "\n".join(lines) + "\n"


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
) -> dict:
    """Run the six demo steps into ``output_dir``; return {step: seconds, ...} and the output paths.

    Args:
        output_dir: where everything goes (default ``<repo>/demo_output``, git-ignored). Reused:
            the sample CT and phantoms are rewritten, earlier results are replaced.
        epochs: training epochs (default 4; 1 with ``quick``). Validation runs half way and at
            the end for an even number of epochs, else at the end only: at least once, and always
            after the last epoch, so ``model.pt`` can come from the last epoch.
        quick: an even smaller run (2 phantoms, 1 epoch, no window overlap) for tests.
        spacing: resampling spacing in mm for training, evaluation and inference (the recipe's is
            1.5 x 1.5 x 2; 3 mm isotropic keeps the demo in minutes on a 2-core CPU).
        overlap: sliding-window overlap (default 0.25; 0 with ``quick``).
        sw_batch_size: windows per forward pass in evaluation and inference.
        learning_rate: AdamW learning rate (the recipe's 1e-4 barely moves in a few epochs).
        num_phantoms: synthetic cases (default 4; 2 with ``quick``); the last 2 (1 if fewer than
            4) are held out for validation.
        seed: phantom seed.
    """
    t_start = time.perf_counter()
    out = Path(output_dir).resolve() if output_dir else DEFAULT_OUTPUT_DIR
    epochs = int(epochs) if epochs is not None else (1 if quick else 4)
    overlap = float(overlap) if overlap is not None else (0.0 if quick else 0.25)
    num_phantoms = int(num_phantoms) if num_phantoms is not None else (2 if quick else 4)
    spacing = [float(s) for s in (spacing if isinstance(spacing, (list, tuple)) else [spacing] * 3)]
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if num_phantoms < 2:
        raise ValueError(f"num_phantoms must be >= 2 (training and validation), got {num_phantoms}")
    # validate twice (half way and at the end) when the epochs split evenly, else once at the end
    val_interval = epochs // 2 if epochs >= 2 and epochs % 2 == 0 else epochs

    data_dir = out / "data"
    models_dir, eval_dir, infer_dir = out / "models", out / "eval", out / "inference"
    overlay_dir, log_dir = out / "overlays", out / "logs"
    for d in (models_dir, eval_dir, infer_dir, overlay_dir, log_dir, out / "train_logs"):
        shutil.rmtree(d, ignore_errors=True)  # stale results must not pass for this run's
    (out / "metrics.md").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    _say(f"Swin UNETR BTCV bundle demo{' (quick)' if quick else ''}: output in {out}")
    _say(f"bundle: {BUNDLE_DIR}")
    _say(
        f"configuration: feature_size 12, roi 64^3, spacing {spacing} mm, {epochs} epoch(s), validation every "
        f"{val_interval}, lr {learning_rate}, sliding-window overlap {overlap}, sw_batch_size {sw_batch_size}"
    )
    steps = _Steps(NUM_STEPS)
    results: dict = {"output_dir": str(out)}

    def step_failed(e: Exception) -> DemoError:
        return e if isinstance(e, DemoError) else DemoError(f"{steps.current} failed: {type(e).__name__}: {e}")

    try:
        # 1. data ---------------------------------------------------------------------------------
        t0 = steps.start(1, "getting data: the real sample CT and synthetic phantoms")
        from tools.fetch_sample_ct import PROVENANCE_NAME, fetch_sample_ct
        from tools.make_phantoms import write_phantom_dataset

        sample = fetch_sample_ct(data_dir / "sample_ct")
        sample = {k: Path(v) for k, v in sample.items()}
        _say(f"sample CT: {sample['image']}\n  labels (TotalSegmentator predictions, BTCV ids): {sample['label']}")
        phantoms = [tuple(map(Path, p)) for p in write_phantom_dataset(data_dir / "phantoms", num_cases=num_phantoms, seed=seed)]
        _say(f"{len(phantoms)} synthetic phantoms (seed {seed}) under {data_dir / 'phantoms'}")
        steps.done(t0)

        # 2. datalist -----------------------------------------------------------------------------
        t0 = steps.start(2, "writing the datalist")
        n_val = 2 if num_phantoms >= 4 else 1
        train_ph, val_ph = phantoms[:-n_val], phantoms[-n_val:]

        def item(image: Path, label: Path | None = None) -> dict:
            d = {"image": _rel(image, data_dir)}
            if label is not None:
                d["label"] = _rel(label, data_dir)
            return d

        datalist = {
            "training": [item(i, l) for i, l in train_ph] + [item(sample["image"], sample["label"])],
            "validation": [item(i, l) for i, l in val_ph] + [item(sample["image"], sample["label"])],
            "testing": [item(sample["image"]), item(val_ph[0][0])],
        }
        datalist_path = data_dir / "datalist.json"
        datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
        for key in ("training", "validation", "testing"):
            _say(f"{key:>10}: " + ", ".join(Path(d["image"]).name for d in datalist[key]))
        _say(f"datalist: {datalist_path}")
        _say(f"NOTE: {AGREEMENT_NOTE}")
        steps.done(t0)

        common = {
            "dataset_dir": data_dir,
            "datalist": datalist_path,
            "feature_size": 12,
            "roi_size": [64, 64, 64],
            "spacing": spacing,
            "num_workers": 0,
            "sw_batch_size": sw_batch_size,
            "overlap": overlap,
        }

        # 3. fine-tuning --------------------------------------------------------------------------
        t0 = steps.start(3, f"fine-tuning a small Swin UNETR for {epochs} epoch(s) with configs/train.json")
        train_overrides = {
            **common,
            "bundle_root": out,
            "ckpt_dir": models_dir,
            "output_dir": out / "train_logs",
            "use_checkpoint": False,
            "num_samples": 2,
            "max_epochs": epochs,
            "val_interval": val_interval,
            "warmup_epochs": 0,  # warm-up counts epochs; its first epoch has lr 0
            "learning_rate": learning_rate,
            "sw_batch_size": 1,
        }
        run_streamed(bundle_command("training", ["configs/train.json"], train_overrides), BUNDLE_DIR,
                     log_dir / "3_train.log", steps.current)
        ckpt = models_dir / "model.pt"
        if not ckpt.is_file():
            raise DemoError(f"{steps.current} failed: training finished but wrote no {ckpt} (did it validate?)")
        _say(f"best checkpoint: {ckpt}")
        results["checkpoint"] = str(ckpt)
        steps.done(t0)

        # 4. evaluation ---------------------------------------------------------------------------
        t0 = steps.start(4, "evaluating on the validation list with configs/evaluate.json")
        _say(f"NOTE: {AGREEMENT_NOTE}")
        eval_overrides = {**common, "ckpt_path": ckpt, "ckpt_dir": models_dir, "output_dir": eval_dir,
                          "use_checkpoint": False}
        run_streamed(bundle_command(None, ["configs/train.json", "configs/evaluate.json"], eval_overrides),
                     BUNDLE_DIR, log_dir / "4_evaluate.log", steps.current)
        if not (eval_dir / "metrics_summary.json").is_file():
            raise DemoError(f"{steps.current} failed: no {eval_dir / 'metrics_summary.json'}")
        steps.done(t0)

        # 5. inference ----------------------------------------------------------------------------
        t0 = steps.start(5, "inference on the sample CT and one phantom with configs/inference.json")
        infer_overrides = {**common, "ckpt_path": ckpt, "output_dir": infer_dir}
        run_streamed(bundle_command(None, ["configs/inference.json"], infer_overrides), BUNDLE_DIR,
                     log_dir / "5_inference.log", steps.current)
        sample_pred = infer_dir / "example_ct_seg.nii.gz"
        phantom_img = val_ph[0][0]
        phantom_pred = infer_dir / (phantom_img.name[: -len(".nii.gz")] + "_seg.nii.gz")
        for pred, image in ((sample_pred, sample["image"]), (phantom_pred, phantom_img)):
            shape = _check_label_map(pred, image)
            _say(f"label map {pred} (shape {shape}, same as its input)")
        steps.done(t0)

        # 6. overlays and metrics -----------------------------------------------------------------
        t0 = steps.start(6, "writing overlays and the metrics table")
        from tools.overlays import render_comparison, render_overlay

        names = organ_names()
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
        phantom_png = overlay_dir / f"{phantom_img.name[: -len('.nii.gz')]}_prediction.png"
        entries = render_overlay(phantom_img, phantom_pred, phantom_png, label_names=names,
                                 title=f"Phantom {phantom_img.name}: demo prediction")
        _say(f"phantom prediction: {len(entries)} organ(s): {', '.join(entries) or 'none'}")
        table = metrics_markdown(eval_dir)
        (out / "metrics.md").write_text(table)
        _say("")
        _say(table)
        steps.done(t0)
    except DemoError as e:
        raise step_failed(e) from None
    except Exception as e:
        raise step_failed(e) from e

    total = time.perf_counter() - t_start
    _say(f"\n{'=' * 78}\nDemo finished in {_hms(total)} ({total:.1f} s)\n{'=' * 78}")
    for name, dt in steps.times:
        _say(f"  {name:<78} {_hms(dt):>7} ({dt:.1f} s)")
    _say(f"\nOutput files under {out}:")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        _say(f"  {_rel(path, out):<70} {path.stat().st_size / 1024:>10.1f} KiB")
    _say(f"\nKey outputs:\n  metrics table  {out / 'metrics.md'}\n  overlays       {sample_png}\n"
         f"                 {phantom_png}\n  label maps     {sample_pred}\n                 {phantom_pred}\n"
         f"  checkpoint     {ckpt}\n  evaluation     {eval_dir}\n  step logs      {log_dir}")
    _say(f"\nReminder: {AGREEMENT_NOTE}")
    results.update(
        step_seconds={name: dt for name, dt in steps.times},
        total_seconds=total,
        metrics_md=str(out / "metrics.md"),
        overlays=[str(sample_png), str(phantom_png)],
        label_maps=[str(sample_pred), str(phantom_pred)],
        metrics_summary=str(eval_dir / "metrics_summary.json"),
        provenance=str(data_dir / "sample_ct" / PROVENANCE_NAME),
    )
    return results


def main(
    output_dir: str | None = None,
    epochs: int | None = None,
    quick: bool = False,
    spacing=(3.0, 3.0, 3.0),
    overlap: float | None = None,
    sw_batch_size: int = 4,
    learning_rate: float = 1e-3,
    num_phantoms: int | None = None,
    seed: int = 0,
) -> None:
    """Run the BTCV bundle demo (data, datalist, fine-tuning, evaluation, inference, overlays).

    On failure, prints which step failed (with the command and its log) and exits with code 1.

    Args:
        output_dir: where everything goes (default <repo>/demo_output, git-ignored).
        epochs: training epochs (default 4; 1 with --quick).
        quick: an even smaller run (2 phantoms, 1 epoch, no window overlap), about 1-4 minutes.
        spacing: resampling spacing in mm, e.g. "[3,3,3]" (default; the recipe's is "[1.5,1.5,2.0]").
        overlap: sliding-window overlap (default 0.25; 0 with --quick).
        sw_batch_size: windows per forward pass in evaluation and inference.
        learning_rate: AdamW learning rate (default 1e-3).
        num_phantoms: synthetic cases (default 4; 2 with --quick); the last 2 (1 if fewer than 4)
            are validation cases.
        seed: phantom seed.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        demo(output_dir=output_dir, epochs=epochs, quick=quick, spacing=spacing, overlap=overlap,
             sw_batch_size=sw_batch_size, learning_rate=learning_rate, num_phantoms=num_phantoms, seed=seed)
    except DemoError as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
