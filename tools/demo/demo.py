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

How long the demo takes is measured in the top-level README.md and ``docs/performance.md``;
on a CPU shared with other jobs, fewer ``--ssl_steps`` keep it short.

Command line (from the repository root)::

    python -m tools demo [--output_dir demo_output] [--ssl_steps 200] [--epochs 4] [--quick]
        [--pretrained_path model_swinvit.pt]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.demo.metrics import AGREEMENT_NOTE, SSL_NOTE, metrics_markdown, organ_names
from tools.demo.plan import (
    SSL_LEARNING_RATE,
    SSL_ROI_SIZE,
    SSL_SPACING,
    DemoError,
    DemoRun,
    announce,
    clear_outputs,
    hms,
    plan_run,
    rel_path,
    say,
)
from tools.demo.pretraining import export_encoder, get_data, pretrain, pretraining_figures, write_datalists
from tools.demo.ssl_figures import format_loss_drops

logger = logging.getLogger("tools.demo.demo")


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


# ------------------------------------------------------------------------------- steps 6 to 9 (1 to 5: pretraining)


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
        say(f"encoder: {encoder_path}")
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
        say(f"encoder loaded: {loaded[-1].split(' - ')[-1]}")
    ckpt = models_dir / "model.pt"
    if not ckpt.is_file():
        raise run.failed(f"training finished but wrote no {ckpt} (did it validate?)")
    say(f"best checkpoint: {ckpt}")
    run.results["checkpoint"] = str(ckpt)
    return ckpt


def evaluate(run: DemoRun, common: dict, ckpt: Path) -> Path:
    """Step 7: evaluate on the validation list with ``configs/evaluate.json``; return the evaluation folder."""
    say(f"NOTE: {AGREEMENT_NOTE}")
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
        say(f"label map {pred} (shape {shape}, same as its input)")
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
        say(f"{row}: {len(entries)} organ(s): {', '.join(entries) or 'none'}")
    phantom_png = overlay_dir / f"{phantom_image.name[: -len('.nii.gz')]}_prediction.png"
    entries = render_overlay(
        phantom_image,
        phantom_pred,
        phantom_png,
        label_names=names,
        title=f"Phantom {phantom_image.name}: demo prediction",
    )
    say(f"phantom prediction: {len(entries)} organ(s): {', '.join(entries) or 'none'}")
    table = metrics_markdown(eval_dir, pretraining=ssl_record)
    (run.out / "metrics.md").write_text(table)
    say("")
    say(table)
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
    say(f"skipped: {reason}")
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
    say(f"\n{'=' * 78}\nDemo finished in {hms(total)} ({total:.1f} s)\n{'=' * 78}")
    for name, dt in steps.times:
        say(f"  {name:<96} {hms(dt):>7} ({dt:.1f} s)")
    say(f"\nOutput files under {out}:")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        say(f"  {rel_path(path, out):<70} {path.stat().st_size / 1024:>10.1f} KiB")
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
    say(key)
    say(f"\nReminder: {AGREEMENT_NOTE}")
    if run.pretrain:
        say(f"          {SSL_NOTE}")


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
    settings = dict(locals())  # the arguments, as given: plan_run resolves their defaults
    t_start = time.perf_counter()
    run = plan_run(**settings)
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
        step_seconds=dict(run.steps.times),
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
