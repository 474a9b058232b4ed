"""Fine-tuning throughput of the swin_unetr_btcv_seg bundle against the model zoo's ``train.json`` settings.

Two modes train the same network size on the same phantom volumes (``tools.data.make_phantoms``), each in
a fresh Python process so that its peak memory is its own:

* ``bundle``    - the bundle's ``configs/train.json`` parsed with ``monai.bundle.ConfigParser``: its
  ``setup`` (allocator rule, ``set_determinism``), transforms, ``CacheDataset``, ``DataLoader``,
  network (``use_checkpoint``, flash attention), DiceCE loss, AdamW, trainer (amp, its training
  inferer) and the handlers that run during training iterations (lr schedule, StatsHandler,
  TensorBoardStatsHandler). Left out: validation and checkpoint saving (they run every
  ``val_interval`` epochs). The data list is the phantom cases.
* ``model_zoo`` - the model zoo's ``swin_unetr_btcv_segmentation`` 0.5.x ``configs/train.json``
  settings, built here from MONAI classes (``MODEL_ZOO_TRAIN``): LoadImaged, EnsureChannelFirstd,
  Orientationd RAS, Spacingd 1.5 x 1.5 x 2.0, ScaleIntensityRanged -175..250 -> 0..1, EnsureTyped,
  RandCropByPosNegLabeld (pos 1, neg 1), RandFlipd x 3 and RandRotate90d (p 0.1),
  RandShiftIntensityd (0.1, p 0.5); CacheDataset (cache_rate 1); DataLoader (shuffle);
  SwinUNETR with ``use_checkpoint`` (no flash attention); DiceCELoss(to_onehot_y, softmax,
  squared_pred, batch); Adam lr 2e-4; SupervisedTrainer(amp=True: autocast on CUDA only) with the
  postprocessing (softmax, argmax + one-hot 14) and ignite ``Accuracy`` computed every iteration,
  StatsHandler and TensorBoardStatsHandler; ``set_determinism(123)``; cudnn.benchmark on CUDA.
  Its ValidationHandler is left out, as the bundle's.
* optional bundle variants (``BUNDLE_VARIANTS``): ``bundle_float32`` (``amp`` false: no bf16 forward on
  a native-bf16 CPU, no float16 on CUDA) and ``bundle_reuse_cpu_memory`` (``reuse_cpu_memory`` true): what
  each of those settings costs or gains. (The bundle's own mode already trains in bf16 where the CPU
  has native bf16: ``amp_cpu_training`` defaults to true.)

This is the one tool that measures the BTCV bundle's training speed (``benchmark_btcv`` measures
inference); ``gpu_check`` runs its ``bundle`` mode for the GPU figure. Each run also counts the
FLOPs of one iteration (forward + backward of the network) and their fraction of the device's peak
in the precision the run trained in (``harness.training_precision``).

Both modes take the SAME number of crops per iteration (``crops``; the model zoo's own is
2 volumes x 2 crops = 4): the model zoo keeps 2 crops per volume and ``crops / 2`` volumes per batch,
the bundle keeps 1 volume per batch (its CUDA setting) and takes ``crops`` crops of it. Feature size
and crop size are the same for both (``feature_size``, ``roi_size``).

Measured per run, after ``warmup`` untimed iterations: the wall time of each timed iteration
(``ITERATION_COMPLETED`` to ``ITERATION_COMPLETED``: data loading, forward, loss, backward, optimiser,
postprocessing, metrics, handlers and epoch boundaries), the step alone (``ITERATION_STARTED`` to
``ITERATION_COMPLETED``), the losses, and the peak memory: CUDA ``max_memory_allocated`` on GPU; on
CPU the process peak RSS (``ru_maxrss``; it holds the cached volumes too). With ``repeats`` > 1 the
modes run interleaved (bundle, model_zoo, bundle, model_zoo, ...) and the report gives medians over
the repeats, so that a load change on a shared machine hits both modes alike.

Command lines (demo size, then full size; on a small CPU run full size once per mode)::

    python -m tools benchmark_finetune --feature_size 12 --roi_size 64 --crops 2 --warmup 2 --steps 6 \\
        --repeats 3 --output bench_output/finetune_demo.json
    python -m tools benchmark_finetune --feature_size 48 --roi_size 96 --crops 2 --warmup 1 --steps 3 \\
        --repeats 1 --output bench_output/finetune_full.json
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.finetune_model_zoo import MODEL_ZOO_TRAIN, model_zoo_trainer, split_crops
from tools.benchmarks.harness import (
    command,
    envelope,
    machine_line,
    peak_memory,
    run_modes,
    trainer_precision,
    write_result,
)
from tools.common.bundles import BTCV_DIR, REPO_ROOT, bundle_parser, cube, device_expr, trains_fused
from tools.common.engines import loss_of
from tools.common.machine import load_average
from tools.common.memory import memory_snapshot, status_mib
from tools.common.peak import device_peak, format_limit, limit, network_flops
from tools.common.stats import mean, num, ratio
from tools.common.timing import resolve_device, say, sync

__all__ = ["MODES", "make_cases", "measure_mode", "model_zoo_trainer", "run_benchmark", "split_crops", "time_run"]

# The bundle's variants beside its defaults: train.json knobs set, to show what each setting costs or gains.
BUNDLE_VARIANTS = {
    "bundle": {},
    "bundle_float32": {"amp": False},  # no reduced precision anywhere (CPU: no bf16; CUDA: no float16)
    "bundle_reuse_cpu_memory": {"reuse_cpu_memory": True},  # glibc kept from unmapping freed tensors
}
MODES = ("bundle", "model_zoo", "bundle_float32", "bundle_reuse_cpu_memory")
# What a run measures (the harness calls it, in a fresh process per run).
MEASURE = "tools.benchmarks.benchmark_finetune:measure_mode"
# The bundle's handlers that only act every val_interval epochs (validation, final validation).
BUNDLE_SKIPPED_HANDLERS = ("ValidationHandler", "scripts.checkpoints.FinalValidationHandler")
# Phantom cases: spacing as the bundles resample to, big enough for 1.5 x roi in-plane and 1 x roi in depth.
PHANTOM_SPACING = (1.5, 1.5, 2.0)


def phantom_shape(roi_size: Sequence[int]) -> list[int]:
    """A phantom volume shape that holds a crop of ``roi_size`` after resampling and foreground cropping."""
    return [int(math.ceil(1.5 * roi_size[0])), int(math.ceil(1.5 * roi_size[1])), int(roi_size[2]) + 8]


def make_cases(work_dir: Path, num_cases: int, roi_size: Sequence[int], seed: int) -> list[dict[str, str]]:
    """Write ``num_cases`` phantom cases (BTCV layout) under ``work_dir``; return the data list."""
    from tools.data.make_phantoms import write_phantom_dataset

    written = write_phantom_dataset(
        work_dir, num_cases=num_cases, seed=seed, shape=phantom_shape(roi_size), spacing=PHANTOM_SPACING
    )
    return [{"image": image, "label": label} for image, label in written]


# ------------------------------------------------------------------------------------------ the two modes


def bundle_trainer(
    dev: torch.device,
    data: list[dict],
    feature_size: int,
    roi: list[int],
    crops: int,
    num_workers: int | None,
    seed: int,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The bundle's SupervisedTrainer parsed from train.json on ``data``; (trainer, settings)."""
    parser = bundle_parser(
        BTCV_DIR,
        "train.json",
        {
            "device": device_expr(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "pretrained_path": "",
            "resume_from": "",
            "seed": int(seed),
            "output_dir": str(out_dir / "eval"),
            "ckpt_dir": str(out_dir / "models"),
            "batch_size": 1,
            "num_samples": int(crops),
            "train#datalist": data,
            "validate#datalist": data,  # checked with the training list; the benchmark never validates
            **({"num_workers": int(num_workers)} if num_workers is not None else {}),
            **(overrides or {}),
        },
    )
    handlers = [h for h in parser["train#handlers"] if h.get("_target_") not in BUNDLE_SKIPPED_HANDLERS]
    parser["train#handlers"] = handlers
    parser.get_parsed_content("setup")  # allocator rule and set_determinism, as the bundle's training runs them
    t0 = time.perf_counter()
    trainer = parser.get_parsed_content("train#trainer")
    inferer = trainer.inferer
    settings = {
        "config": "bundles/swin_unetr_btcv_seg/configs/train.json (ConfigParser)",
        "batch_size": 1,
        "num_samples": int(crops),
        "num_workers": int(parser["num_workers"]),
        "amp": bool(parser["amp"]),
        "trainer_amp": bool(trainer.amp),
        "training_inferer": type(inferer).__name__,
        "training_autocast": trainer_precision(trainer, dev),
        "optimizer": type(trainer.optimizer).__name__,
        "optim_set_to_none": bool(getattr(trainer, "optim_set_to_none", False)),
        "loss": repr(trainer.loss_function.__class__.__name__),
        "use_checkpoint": bool(parser["use_checkpoint"]),
        "use_flash_attention": bool(parser["use_flash_attention"]),
        "fast_window_attention": trains_fused(trainer.network),
        "handlers": [h["_target_"] for h in handlers],
        "handlers_left_out": list(BUNDLE_SKIPPED_HANDLERS) + ["checkpoint saver (every ckpt_interval epochs)"],
        "overrides": overrides or {},
        "setup_s": time.perf_counter() - t0,
    }
    return trainer, settings


# ------------------------------------------------------------------------------------------ one run


def time_run(trainer: Any, dev: torch.device, total: int) -> dict[str, list[float]]:
    """Run ``trainer`` for ``total`` iterations; per iteration: wall seconds, step seconds and loss.

    Wall = from the previous ``ITERATION_COMPLETED`` (the first: from ``STARTED``) to this one, after
    the trainer's own handlers; step = ``ITERATION_STARTED`` to ``ITERATION_COMPLETED``; CPU = this
    process's user + system time over the wall interval, all threads (data workers not included).
    """
    from ignite.engine import Events

    record: dict[str, list[float]] = {"wall_s": [], "step_s": [], "cpu_s": [], "loss": []}
    marks: dict[str, float] = {}

    def _started(engine: Any) -> None:
        marks["last"], marks["cpu"] = time.perf_counter(), time.process_time()

    def _iteration_started(engine: Any) -> None:
        sync(dev)
        marks["step"] = time.perf_counter()

    def _completed(engine: Any) -> None:
        sync(dev)
        now, cpu = time.perf_counter(), time.process_time()
        record["wall_s"].append(now - marks["last"])
        record["cpu_s"].append(cpu - marks["cpu"])
        record["step_s"].append(now - marks["step"])
        record["loss"].append(loss_of(engine.state.output))
        marks["last"], marks["cpu"] = now, cpu
        say(f"iteration {engine.state.iteration}/{total}: {record['wall_s'][-1]:.2f} s, loss {record['loss'][-1]:.4f}")
        if engine.state.iteration >= total:
            engine.terminate()

    trainer.add_event_handler(Events.STARTED, _started)
    trainer.add_event_handler(Events.ITERATION_STARTED, _iteration_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, _completed)
    trainer.run()
    return record


def measure_mode(
    mode: str,
    data: list[dict],
    device: str = "cpu",
    feature_size: int = 48,
    roi_size: Sequence[int] = (96, 96, 96),
    crops: int = 2,
    warmup: int = 1,
    steps: int = 3,
    num_workers: int | None = None,
    seed: int = 0,
    bundle_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one mode's trainer and run ``warmup + steps`` iterations in this process; return speed, losses, memory."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = resolve_device(device)
    roi = cube(roi_size)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"finetune_{mode}_") as tmp:
        if mode == "model_zoo":
            trainer, settings = model_zoo_trainer(dev, data, feature_size, roi, crops, num_workers, Path(tmp))
        else:
            overrides = {**(bundle_overrides or {}), **BUNDLE_VARIANTS[mode]}
            trainer, settings = bundle_trainer(
                dev, data, feature_size, roi, crops, num_workers, seed, Path(tmp), overrides
            )
        setup_s = time.perf_counter() - t0
        flops = network_flops(trainer.network, (int(crops), 1, *roi), backward=True)
        before = memory_snapshot()
        rss_before = status_mib("VmRSS")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        record = time_run(trainer, dev, int(warmup) + int(steps))
        after = memory_snapshot()
    timed = record["wall_s"][int(warmup) :]
    peak = peak_memory(dev, after["ru_maxrss_mib"], "iterations", "run")
    seconds = mean(timed)
    hwm = after["vm_hwm_mib"]
    return {
        "mode": mode,
        "device": str(dev),
        "settings": settings,
        "crops_per_iteration": int(crops),
        "setup_s": setup_s,
        "warmup_steps": int(warmup),
        "steps": len(timed),
        "iteration_times_s": timed,
        "step_times_s": record["step_s"][int(warmup) :],
        "warmup_times_s": record["wall_s"][: int(warmup)],
        "seconds_per_iteration": seconds,
        "iterations_per_second": (1.0 / seconds) if seconds else None,
        "crops_per_second": (int(crops) / seconds) if seconds else None,
        "step_seconds_mean": mean(record["step_s"][int(warmup) :]),
        "cpu_seconds_per_iteration": mean(record["cpu_s"][int(warmup) :]),
        "cpu_times_s": record["cpu_s"][int(warmup) :],
        "losses": record["loss"],
        **peak,
        "peak_rss_mib": after["ru_maxrss_mib"],
        "peak_rss_before_training_mib": before["ru_maxrss_mib"],
        "peak_rss_delta_training_mib": after["ru_maxrss_mib"] - before["ru_maxrss_mib"],
        "rss_before_training_mib": rss_before,
        "vm_hwm_mib": hwm,
        # a fresh process: its peak RSS is its own where ru_maxrss agrees with the address space's VmHWM
        "peak_rss_attributable": hwm is None or abs(after["ru_maxrss_mib"] - hwm) <= max(64.0, 0.05 * hwm),
        "flops_per_crop": flops // max(int(crops), 1),
        "flops_per_iteration": flops,
        "flops_counted": "forward + backward of the network (PyTorch flop counter), no optimiser step",
        "limit": limit(flops, seconds, device_peak(dev), settings["training_autocast"]),
    }


# ------------------------------------------------------------------------------------------ side by side


def median_of(runs: list[dict], key: str) -> float | None:
    """The median of ``key`` over the runs that have it (None if none)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


def summarise(runs: list[dict]) -> dict[str, Any]:
    """One mode's medians over its repeats (each repeat a fresh process)."""
    ok = [r for r in runs if "error" not in r]
    seconds = median_of(ok, "seconds_per_iteration")
    crops = ok[0]["crops_per_iteration"] if ok else None
    return {
        "repeats": len(runs),
        "failed": [r["error"] for r in runs if "error" in r],
        "seconds_per_iteration_median": seconds,
        "iterations_per_second_median": (1.0 / seconds) if seconds else None,
        "crops_per_second_median": (crops / seconds) if seconds and crops else None,
        "seconds_per_iteration_per_repeat": [r.get("seconds_per_iteration") for r in ok],
        "step_seconds_median": median_of(ok, "step_seconds_mean"),
        "cpu_seconds_per_iteration_median": median_of(ok, "cpu_seconds_per_iteration"),
        "peak_memory_mib_median": median_of(ok, "peak_memory_mib"),
        "peak_memory_mib_per_repeat": [r.get("peak_memory_mib") for r in ok],
        "training_autocast": ok[0]["settings"]["training_autocast"] if ok else None,
        "flops_per_iteration": ok[0]["flops_per_iteration"] if ok else None,
        "fraction_of_peak_median": median_of([r["limit"] for r in ok], "fraction_of_peak"),
        "limit": ok[0]["limit"] if len(ok) == 1 else None,
    }


def comparison(summary: dict[str, dict]) -> dict[str, Any]:
    """model_zoo / bundle ratios of the median time per iteration and of the median peak memory."""
    z = summary.get("model_zoo") or {}
    result: dict[str, Any] = {}
    for name in BUNDLE_VARIANTS:
        b = summary.get(name) or {}
        result[f"speedup_{name}_over_model_zoo"] = ratio(
            z.get("seconds_per_iteration_median"), b.get("seconds_per_iteration_median")
        )
        result[f"peak_memory_ratio_{name}_over_model_zoo"] = ratio(
            b.get("peak_memory_mib_median"), z.get("peak_memory_mib_median")
        )
    result["meaning"] = "speedup > 1: the bundle trains faster; memory ratio <= 1: the bundle needs no more memory"
    return result


def run_benchmark(
    device: str | None = None,
    feature_size: int = 48,
    roi_size: int | Sequence[int] = 96,
    crops: int = 4,
    warmup: int = 1,
    steps: int = 3,
    repeats: int = 1,
    modes: str | Sequence[str] = ("bundle", "model_zoo"),
    num_cases: int = 4,
    num_workers: int | None = None,
    seed: int = 0,
    output: str | None = None,
    work_dir: str | None = None,
    bundle_overrides: dict[str, Any] | None = None,
    isolate: bool = True,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Fine-tuning side by side, bundle vs model-zoo settings; write ``output`` (JSON), return the result.

    Args:
        device: "cpu", "cuda", "cuda:1"...; default cuda if available, else cpu.
        feature_size: SwinUNETR feature size for both (48 in both configs).
        roi_size: training crop size for both, an int (cube) or 3 ints (96 in both configs).
        crops: crops per iteration for both (the model zoo's own: 2 volumes x 2 crops = 4).
        warmup: untimed iterations first (cache, worker start-up and allocator warm-up).
        steps: timed iterations.
        repeats: runs per mode, interleaved across modes; the report gives medians.
        modes: among ``MODES``: "bundle", "model_zoo" and the bundle variants of ``BUNDLE_VARIANTS``.
        num_cases: phantom volumes in the training data list.
        num_workers: data workers for both (default: each config's own, 4 in both).
        seed: the bundle's seed and the phantoms' seed (the model zoo seeds with its own 123).
        output: JSON path (default bench_output/finetune_<device type>.json).
        work_dir: folder for the phantom cases (default: a temporary folder).
        bundle_overrides: extra train.json overrides for the bundle modes (e.g. ``{"amp": false}``).
        isolate: each run in a fresh subprocess (per-run peak memory); False runs them in this process.
        timeout_s: per-run subprocess time limit.
    """
    dev = resolve_device(device)
    roi = cube(roi_size)
    modes = [modes] if isinstance(modes, str) else list(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be among {MODES}, got {modes}")
    output = output or str(REPO_ROOT / "bench_output" / f"finetune_{dev.type}.json")
    with tempfile.TemporaryDirectory(prefix="finetune_cases_") as tmp:
        cases_dir = Path(work_dir or tmp)
        say(f"writing {num_cases} phantom case(s) of {phantom_shape(roi)} under {cases_dir}")
        data = make_cases(cases_dir, int(num_cases), roi, int(seed))
        args = {
            "data": data,
            "device": str(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "crops": int(crops),
            "warmup": int(warmup),
            "steps": int(steps),
            "num_workers": num_workers,
            "seed": int(seed),
            "bundle_overrides": bundle_overrides or {},
        }
        what = f"{warmup} warm-up + {steps} timed iteration(s)"
        runs = run_modes(MEASURE, modes, args, repeats=repeats, isolate=isolate, timeout_s=timeout_s, what=what)
    summary = {m: summarise(r) for m, r in runs.items()}
    result = envelope(
        dev,
        {k: v for k, v in args.items() if k != "data"}
        | {
            "modes": modes,
            "repeats": int(repeats),
            "num_cases": int(num_cases),
            "phantom_shape": phantom_shape(roi),
            "phantom_spacing": list(PHANTOM_SPACING),
            "model_zoo_constants": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_ZOO_TRAIN.items()},
            "timing": "wall time per iteration (data, step, postprocessing, metrics, handlers), medians over repeats",
            "memory_measure": (
                "torch.cuda.max_memory_allocated"
                if dev.type == "cuda"
                else "process peak RSS (getrusage ru_maxrss of a fresh process; includes the cached volumes)"
            ),
        },
        load_average_after=load_average(),
    )
    result |= {"summary": summary, "comparison": comparison(summary), "runs": runs}
    return write_result(result, output)


def format_report(result: dict[str, Any]) -> str:
    """A short text table of a benchmark result."""
    m, s, c = result["machine"], result["settings"], result["comparison"]
    lines = [
        f"{machine_line(m)}; load after {m['load_average_after']}",
        f"Fine-tuning on {s['device']}: feature_size {s['feature_size']}, roi {s['roi_size']}, {s['crops']} crops per "
        f"iteration, {s['warmup']} warm-up + {s['steps']} timed iterations, {s['repeats']} interleaved repeat(s)",
        "",
        f"{'mode':<15} {'precision':<24} {'s/it':>8} {'it/s':>8} {'crops/s':>8} {'peak MiB':>9} {'CPU s/it':>9}  "
        "s/it per repeat",
    ]
    for name, r in result["summary"].items():
        if r["failed"] and r["seconds_per_iteration_median"] is None:
            lines.append(f"{name:<15} FAILED: {r['failed'][0]}")
            continue
        lines.append(
            f"{name:<15} {str(r['training_autocast']):<24} {num(r['seconds_per_iteration_median'], '.3f'):>8} "
            f"{num(r['iterations_per_second_median'], '.4f'):>8} {num(r['crops_per_second_median'], '.3f'):>8} "
            f"{num(r['peak_memory_mib_median'], '.0f'):>9} {num(r['cpu_seconds_per_iteration_median'], '.2f'):>9}  "
            + ", ".join(num(x, ".3f") for x in r["seconds_per_iteration_per_repeat"])
        )

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    lines.append("")
    for name in BUNDLE_VARIANTS:
        if c[f"speedup_{name}_over_model_zoo"] is not None:
            lines.append(
                f"{name} against model_zoo: speed {fmt(c[f'speedup_{name}_over_model_zoo'])}, "
                f"peak memory {fmt(c[f'peak_memory_ratio_{name}_over_model_zoo'])}"
            )
    lines.append(f"peak memory: {s['memory_measure']}")
    peak = result.get("peak")
    lines.append(f"Limit (peak: {peak['assumption'] if peak else 'unknown device, no peak'})")
    for name, r in result["summary"].items():
        if r.get("flops_per_iteration"):
            fraction = r["fraction_of_peak_median"]
            lines.append(
                f"{name:<15} {r['flops_per_iteration'] / 1e9:.1f} GFLOP per iteration (forward + backward), "
                + (format_limit(r["limit"]) if r["limit"] else f"median {num(fraction, '.2%')} of the peak")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import logging

    command(run_benchmark, format_report, log_level=logging.WARNING)
