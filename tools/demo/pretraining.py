"""The demo's first five steps: data, datalists, self-supervised pre-training, the encoder export, its figures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from tools.common.bundles import SSL_DIR as SSL_BUNDLE_DIR
from tools.common.scalars import read_scalars
from tools.demo.metrics import AGREEMENT_NOTE
from tools.demo.plan import SSL_MIN_DROP, SSL_VAL_FRACTION, DemoError, DemoRun, rel_path, say
from tools.demo.ssl_figures import format_loss_drops


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


def get_data(run: DemoRun) -> tuple[dict[str, Path], list[tuple[Path, Path]]]:
    """Step 1: the real sample CT and seeded synthetic phantoms under ``data/``; return (sample, phantoms)."""
    from tools.data.fetch_sample_ct import fetch_sample_ct
    from tools.data.make_phantoms import write_phantom_dataset

    data_dir = run.dir("data")
    sample = {k: Path(v) for k, v in fetch_sample_ct(data_dir / "sample_ct").items()}
    say(f"sample CT: {sample['image']}\n  labels (TotalSegmentator predictions, BTCV ids): {sample['label']}")
    phantoms = [
        tuple(map(Path, p))
        for p in write_phantom_dataset(data_dir / "phantoms", num_cases=run.num_phantoms, seed=run.seed)
    ]
    say(f"{len(phantoms)} synthetic phantoms (seed {run.seed}) under {data_dir / 'phantoms'}")
    return sample, phantoms


def write_datalists(run: DemoRun, sample: dict[str, Path], phantoms: list[tuple[Path, Path]]) -> dict:
    """Step 2: the pre-training corpus (images only) and the fine-tuning datalist.

    Returns {"ssl_datalist": path, "datalist": path, "validation_phantoms": [(image, label), ...]}.
    """
    data_dir = run.dir("data")
    ssl_datalist_path, ssl_datalist = _ssl_corpus(data_dir, sample["image"], [p[0] for p in phantoms], run.seed)
    for key in ("training", "validation"):
        say(f"pre-training {key:>10}: " + ", ".join(Path(d["image"]).name for d in ssl_datalist[key]))
    say(f"pre-training datalist (tools.data.ssl_datalist, val_fraction {SSL_VAL_FRACTION}): {ssl_datalist_path}")
    n_val = 2 if run.num_phantoms >= 4 else 1
    train_ph, val_ph = phantoms[:-n_val], phantoms[-n_val:]

    def item(image: Path, label: Path | None = None) -> dict:
        d = {"image": rel_path(image, data_dir)}
        if label is not None:
            d["label"] = rel_path(label, data_dir)
        return d

    datalist = {
        "training": [item(image, label) for image, label in train_ph] + [item(sample["image"], sample["label"])],
        "validation": [item(image, label) for image, label in val_ph] + [item(sample["image"], sample["label"])],
        "testing": [item(sample["image"]), item(val_ph[0][0])],
    }
    datalist_path = data_dir / "datalist.json"
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
    for key in ("training", "validation", "testing"):
        say(f"fine-tuning  {key:>10}: " + ", ".join(Path(d["image"]).name for d in datalist[key]))
    say(f"fine-tuning datalist: {datalist_path}")
    say(f"NOTE: {AGREEMENT_NOTE}")
    return {"ssl_datalist": ssl_datalist_path, "datalist": datalist_path, "validation_phantoms": val_ph}


def pretrain(run: DemoRun, ssl_datalist: Path) -> Path:
    """Step 3: pre-train with the SSL bundle's ``training`` command; return the best checkpoint."""
    say("(the bundle counts optimiser steps as ignite 'epochs' of 1 iteration: 'Epoch: k/N' is step k)")
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
    say(f"best pre-training checkpoint (lowest val_loss): {ssl_ckpt}")
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
    say(f"encoder: {encoder_path} ({n_tensors} tensors, official model_swinvit.pt layout)")
    return encoder_path, n_tensors


def report_loss_drops(drops: dict, loss_png: Path) -> bool:
    """Print whether each pre-training loss fell (loudly if one did not); return True if all fell."""
    not_fallen = [tag for tag, d in drops.items() if not d["fell"]]
    w = next(iter(drops.values()))["window"] if drops else 0
    if not not_fallen:
        say(f"each loss fell (mean of the first {w} steps -> last {w}): {format_loss_drops(drops)}")
    else:
        bar = "!" * 78
        say(
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
    say(f"loss curves: {loss_png}")
    inpaint = plot_inpainting_example(
        ssl_ckpt,
        sample_image,
        figures_dir / "ssl_inpainting_example.png",
        roi_size=run.ssl_roi_size,
        spacing=run.ssl_spacing,
        seed=run.seed,
    )
    inpaint_png = Path(inpaint["png"])
    say(
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
        "figures": {"loss curves": rel_path(loss_png, out), "inpainting example": rel_path(inpaint_png, out)},
        "encoder": rel_path(encoder_path, out),
        "encoder_tensors": n_tensors,
        "inpainting": inpaint,
    }
