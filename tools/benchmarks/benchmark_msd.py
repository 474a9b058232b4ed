"""Benchmark training of the swin_unetr_msd bundle: iterations per second and peak memory per MSD task.

For each task (default: Task09_Spleen, a 1-channel CT task, and Task01_BrainTumour, a 4-channel
MRI task), in a fresh Python process of its own:

1. a synthetic Decathlon task folder is written (``tools.data.make_msd_tasks.write_msd_task``; volumes of
   ``shape``, 128 x 128 x 96 by default, so a 96^3 crop is mostly image, not padding);
2. the bundle's real ``configs/train.json`` is parsed with ``monai.bundle.ConfigParser`` with these
   overrides: ``task``, ``dataset_dir``, ``bundle_root`` (a temporary folder), ``device``,
   ``feature_size``, ``roi_size`` (only if given: else the task's own from ``configs/tasks/<task>.json``),
   ``num_samples``, ``batch_size``, ``use_checkpoint`` (only if given), ``amp`` (pinned to the device:
   on only on CUDA; on a CPU ``--amp`` sets the training inferer's bf16 autocast, used where bf16 is
   native), ``num_workers`` 0, ``cache_rate`` 1.0, ``max_epochs`` and a ``val_interval``
   larger than it (no validation runs), ``num_folds`` (at most the number of cases written),
   ``pretrained_path`` and ``resume_from`` empty;
3. the bundle's ``setup`` runs (``set_determinism``), then the real ``train#trainer`` (a MONAI
   ``SupervisedTrainer``, an ignite engine, with the bundle's handlers: lr schedule, validation
   handler, stats, TensorBoard) for ``warmup + iterations`` iterations (the engine is terminated there).

Each iteration is timed with ignite events, ``ITERATION_STARTED`` to ``ITERATION_COMPLETED``
(synchronised on CUDA): forward, loss, backward and optimiser step of one batch, i.e. ``batch_size``
volumes x ``num_samples`` crops of ``roi_size`` (``RandCropByPosNegLabeld``). The batch fetch
(random crops and augmentation on the cached volumes, ``GET_BATCH_STARTED`` to ``GET_BATCH_COMPLETED``)
is timed apart and reported as ``data_seconds_per_iteration``. The first ``warmup`` iterations are
discarded.

Reported per task: in_channels, roi_size, spacing, feature_size, crops per iteration, iterations
timed, mean and min seconds per iteration, iterations/s (= 1 / mean), crops/s, the peak memory
(on CPU the child's peak RSS, ``ru_maxrss``: interpreter, libraries, cached volumes, model, optimiser
state and activations; on CUDA ``torch.cuda.max_memory_allocated`` over the iterations) and the final
loss, and the limit: the FLOPs of one iteration's network forward and backward (PyTorch's flop
counter, ``tools.common.peak``), the achieved FLOP/s and its fraction of the device's peak. Also:
the machine (``tools.common.machine.machine_info``), torch/monai versions, the settings,
and the system load average (``os.getloadavg``) at start and end, so a reader can tell whether the
cores were shared with other work.

Command line::

    python -m tools benchmark_msd --tasks "['Task09_Spleen','Task01_BrainTumour']" --device cpu \\
        --feature_size 48 --num_samples 4 --iterations 3 --warmup 1 --output bench_output/msd_cpu.json

    python -m tools benchmark_msd --device cuda --amp True --output bench_output/msd_cuda.json

A full-size step (feature size 48, four 96^3 crops) is slow on a small CPU (measured times: the
model card); ``--feature_size 12 --roi_size "[64,64,64]" --num_samples 1 --shape "[48,48,40]"``
tries the tool out quickly.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.harness import (
    command,
    envelope,
    machine_line,
    peak_memory,
    precision_label,
    run_modes,
    trainer_precision,
    write_result,
)
from tools.common.bundles import MSD_DIR as BUNDLE_DIR
from tools.common.bundles import REPO_ROOT, cube, device_expr, trains_fused
from tools.common.bundles import bundle_parser as parse_bundle_config
from tools.common.engines import loss_of, time_iterations
from tools.common.machine import load_average
from tools.common.memory import memory_snapshot, reset_peak_rss
from tools.common.peak import device_peak, format_limit, limit, network_flops
from tools.common.stats import mean, num
from tools.common.timing import resolve_device, say

CONFIG_DIR = BUNDLE_DIR / "configs"
DEFAULT_TASKS = ("Task09_Spleen", "Task01_BrainTumour")
DEFAULT_SHAPE = (128, 128, 96)
MEASURE = "tools.benchmarks.benchmark_msd:measure_task"  # one task's iterations (the harness runs it)


# ------------------------------------------------------------------------------------------ helpers


def _input_shape(batch: Any) -> list[int]:
    """Shape of the network input of an iteration: the batch dict, or its decollated list of per-crop dicts."""
    if isinstance(batch, dict):
        return [int(n) for n in batch["image"].shape]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
        return [len(batch), *(int(n) for n in batch[0]["image"].shape)]
    return []


def train_overrides(
    task: str,
    dataset_dir: str,
    bundle_root: str,
    device: torch.device,
    feature_size: int,
    roi_size: Sequence[int] | None,
    num_samples: int,
    batch_size: int,
    use_checkpoint: bool | None,
    amp: bool,
    max_epochs: int,
    num_folds: int,
    seed: int,
) -> dict[str, Any]:
    """The knobs of train.json this benchmark sets; ``roi_size`` / ``use_checkpoint`` None keep the bundle's."""
    overrides = {
        "task": task,
        "dataset_dir": str(dataset_dir),
        "bundle_root": str(bundle_root),
        "device": device_expr(device),
        "feature_size": int(feature_size),
        "num_samples": int(num_samples),
        "batch_size": int(batch_size),
        # the bundle's trainer rule is `@amp and torch.cuda.is_available()`; pinned to the device benchmarked
        "amp": bool(amp) and device.type == "cuda",
        # on a CPU the training forward's bf16 autocast (where native), as train.json's amp and amp_cpu_training
        "train#inferer#autocast": bool(amp) and device.type == "cpu",
        "num_workers": 0,
        "cache_rate": 1.0,
        "max_epochs": int(max_epochs),
        "val_interval": int(max_epochs) + 1,  # never reached: no validation in the timed run
        "num_folds": int(num_folds),
        "fold": 0,
        "seed": int(seed),
        "pretrained_path": "",
        "resume_from": "",
    }
    if roi_size is not None:
        overrides["roi_size"] = cube(roi_size)
    if use_checkpoint is not None:
        overrides["use_checkpoint"] = bool(use_checkpoint)
    return overrides


def bundle_parser(overrides: dict[str, Any]) -> Any:
    """A ConfigParser of the MSD bundle's ``configs/train.json`` with ``overrides`` applied (scripts importable)."""
    return parse_bundle_config(BUNDLE_DIR, "train.json", overrides)


# ------------------------------------------------------------------------------------------ one task


def log_iterations(trainer: Any, dev: torch.device, task: str, total: int, warmup: int) -> dict[str, list]:
    """Time each iteration of ``trainer`` (and its batch fetch apart) with ignite events; stop after ``total``.

    Returns the lists the events fill while the trainer runs: ``times``, ``data_times``, ``losses``,
    ``input_shapes``.
    """
    from ignite.engine import Events

    data_times: list[float] = []
    losses: list[float] = []
    input_shapes: list[list[int]] = []
    marks: dict[str, float] = {}

    @trainer.on(Events.GET_BATCH_STARTED)
    def _batch_start(engine: Any) -> None:
        marks["batch"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _batch_stop(engine: Any) -> None:
        data_times.append(time.perf_counter() - marks["batch"])

    def _log(engine: Any, times: list[float]) -> None:
        losses.append(loss_of(engine.state.output))
        input_shapes.append(_input_shape(engine.state.batch))
        n = len(times)
        say(
            f"{task} iteration {n}/{total} ({'warm-up' if n <= int(warmup) else 'timed'}): {times[-1]:.2f} s "
            f"(+{data_times[-1]:.2f} s batch), input {input_shapes[-1]}, loss {losses[-1]:.4f}"
        )
        if n >= total:
            engine.terminate()

    times = time_iterations(trainer, dev, _log)
    return {"times": times, "data_times": data_times, "losses": losses, "input_shapes": input_shapes}


# The bundle's resolved settings each task's record repeats.
RECORDED_SETTINGS = (
    "in_channels",
    "num_classes",
    "spacing",
    "roi_size",
    "intensity",
    "use_checkpoint",
    "use_flash_attention",
)


def measure_task(
    task: str,
    device: str = "cpu",
    feature_size: int = 48,
    roi_size: Sequence[int] | None = None,
    num_samples: int = 4,
    batch_size: int = 1,
    use_checkpoint: bool | None = None,
    amp: bool = True,
    iterations: int = 3,
    warmup: int = 1,
    shape: Sequence[int] = DEFAULT_SHAPE,
    cases: int = 3,
    seed: int = 0,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Write a synthetic task, run the bundle's trainer for warm-up + timed iterations; return speed and memory.

    Meant to run in a fresh process (``harness.run_modes``) so that the peak RSS belongs to this task.
    """
    from tools.data.make_msd_tasks import write_msd_task

    if int(iterations) < 1 or int(warmup) < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
    if int(cases) < 2:
        raise ValueError(f"need at least 2 cases (one training, one validation fold), got {cases}")
    dev = resolve_device(device)
    load_start = load_average()
    total = int(warmup) + int(iterations)
    with tempfile.TemporaryDirectory(prefix=f"benchmark_msd_{task}_", dir=work_dir) as tmp:
        t0 = time.perf_counter()
        data_root = Path(tmp) / "data"
        folder = write_msd_task(
            data_root, task, num_training=int(cases), num_test=0, seed=int(seed), shape=tuple(int(s) for s in shape)
        )
        data_s = time.perf_counter() - t0
        say(f"{task}: wrote {cases} synthetic case(s) of {list(shape)} in {data_s:.1f} s")

        t0 = time.perf_counter()
        # at least one iteration per epoch: `total` epochs always reach `total` iterations (terminated there)
        parser = bundle_parser(
            train_overrides(
                task,
                str(folder),
                str(Path(tmp) / "bundle_root"),
                dev,
                feature_size,
                roi_size,
                num_samples,
                batch_size,
                use_checkpoint,
                amp,
                max_epochs=total,
                num_folds=min(5, int(cases)),
                seed=seed,
            )
        )
        parser.get_parsed_content("setup")
        trainer = parser.get_parsed_content("train#trainer")
        settings = {k: parser.get_parsed_content(k, reset=False) for k in RECORDED_SETTINGS}
        setup_s = time.perf_counter() - t0
        network = trainer.network
        cases_training = len(trainer.data_loader.dataset)

        log = log_iterations(trainer, dev, task, total, int(warmup))
        before = memory_snapshot()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        peak_reset = reset_peak_rss()
        t0 = time.perf_counter()
        trainer.run()
        run_s = time.perf_counter() - t0
        after = memory_snapshot()
        peak = peak_memory(dev, after["ru_maxrss_mib"], "iterations", "task")

    input_shapes = log["input_shapes"]
    crops = input_shapes[-1][0] if input_shapes and input_shapes[-1] else int(batch_size) * int(num_samples)
    shape_in = input_shapes[-1] if input_shapes and input_shapes[-1] else None
    flops = network_flops(network, shape_in, backward=True) if shape_in else None
    precision = trainer_precision(trainer, dev)
    memory = {"before": before, "after": after, "peak": peak, "peak_reset": peak_reset, "load_start": load_start}
    return {
        "task": task,
        "pid": os.getpid(),
        "device": str(dev),
        "in_channels": int(settings["in_channels"]),
        "num_classes": int(settings["num_classes"]),
        "roi_size": [int(s) for s in settings["roi_size"]],
        "roi_size_source": "command line" if roi_size is not None else f"configs/tasks/{task}.json",
        "spacing": [float(s) for s in settings["spacing"]],
        "intensity": settings["intensity"],
        "feature_size": int(feature_size),
        "batch_size": int(batch_size),
        "num_samples": int(num_samples),
        "crops_per_iteration": int(crops),
        "input_shape": input_shapes[-1] if input_shapes else None,
        "use_checkpoint": bool(settings["use_checkpoint"]),
        "use_flash_attention": bool(settings["use_flash_attention"]),
        "amp": bool(trainer.amp),
        "precision": precision_label(precision),
        "fast_window_attention": trains_fused(network),
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "synthetic_shape": [int(s) for s in shape],
        "cases_written": int(cases),
        "cases_training": int(cases_training),
        "data_write_s": data_s,
        "setup_s": setup_s,
        "run_s": run_s,
        **_speed_and_memory(log, int(warmup), crops, memory),
        "flops_per_iteration": flops,
        "flops_counted": "forward + backward of the network (PyTorch flop counter), no optimiser step",
        "limit": limit(flops, mean(log["times"][int(warmup) :]), device_peak(dev), precision),
    }


def _speed_and_memory(log: dict, warmup: int, crops: int, memory: dict) -> dict[str, Any]:
    """The timing, loss and memory fields of a task's record, from ``log_iterations``' log and the snapshots."""
    times, data_times, losses = log["times"], log["data_times"], log["losses"]
    timed, timed_data = times[warmup:], data_times[warmup : len(times)]
    mean_s = mean(timed)
    ips = len(timed) / sum(timed) if timed and sum(timed) > 0 else None
    before, after, peak_reset, load_start = (
        memory["before"],
        memory["after"],
        memory["peak_reset"],
        memory["load_start"],
    )
    hwm = after["vm_hwm_mib"]
    return {
        "warmup_iterations": len(times[:warmup]),
        "iterations": len(timed),
        "iteration_times_s": timed,
        "warmup_times_s": times[:warmup],
        "seconds_per_iteration": mean_s,
        "min_seconds_per_iteration": float(min(timed)) if timed else None,
        "iterations_per_second": ips,
        "crops_per_second": ips * crops if ips is not None else None,
        "data_seconds_per_iteration": mean(timed_data),
        "losses": losses[warmup:],
        "warmup_losses": losses[:warmup],
        "final_loss": losses[-1] if losses else None,
        "final_loss_finite": bool(losses) and math.isfinite(losses[-1]),
        **memory["peak"],
        "peak_rss_mib": after["ru_maxrss_mib"],
        "peak_rss_before_training_mib": before["ru_maxrss_mib"],
        "vm_hwm_mib": hwm,
        "peak_rss_reset_before_training": peak_reset,
        "peak_rss_training_mib": hwm if peak_reset else None,
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


# ------------------------------------------------------------------------------------------ report


def _knob(setting: Any, tasks: dict[str, dict], key: str) -> str:
    """A knob as set on the command line, else as the bundle set it in the task runs ("bundle default: ...")."""
    if setting is not None:
        return str(setting)
    seen = sorted({str(r[key]) for r in tasks.values() if key in r})
    return f"{'/'.join(seen) or 'n/a'} (bundle default)"


def format_report(result: dict[str, Any]) -> str:
    """A readable text table of a benchmark result."""
    m, s = result["machine"], result["settings"]
    la = result["load_average"]
    lines = [
        machine_line(m),
        f"swin_unetr_msd training (configs/train.json, train#trainer) on {s['device']}: feature_size "
        f"{s['feature_size']}, {s['batch_size']} volume(s) x {s['num_samples']} crop(s) per iteration, "
        f"use_checkpoint {_knob(s['use_checkpoint'], result['tasks'], 'use_checkpoint')}, "
        f"flash attention {_knob(None, result['tasks'], 'use_flash_attention')}, "
        f"amp {s['amp']}; {s['warmup']} warm-up + {s['iterations']} timed iteration(s); synthetic volumes "
        f"{s['shape']}",
        f"Load average (1, 5, 15 min) at start {la['start']}, at end {la['end']} (the benchmark's own "
        f"{m['torch_threads']} torch threads alone make about {m['torch_threads']})",
    ]
    busiest = max((x[0] for x in (la["start"], la["end"]) if x), default=0.0)
    if busiest > 1.5 * (m["cpus_usable"] or 1):
        lines.append(
            f"WARNING: 1-minute load average up to {busiest:.1f} on {m['cpus_usable']} cores: other "
            "processes shared the CPU, so the timings are inflated"
        )
    lines += [
        "",
        f"{'task':<19} {'ch':>2} {'roi':<13} {'spacing':<16} {'crops':>5} {'iters':>5} {'s/it':>8} "
        f"{'min s/it':>8} {'it/s':>8} {'crops/s':>8} {'batch s':>7} {'peak MiB':>9} {'loss':>8}",
    ]
    for name, r in result["tasks"].items():
        if "error" in r:
            lines.append(f"{name:<19} {r['error']}")
            continue
        loss = num(r["final_loss"], ".4f") if r["final_loss_finite"] else f"{r['final_loss']} (NOT FINITE)"
        lines.append(
            f"{name:<19} {r['in_channels']:>2} {'x'.join(map(str, r['roi_size'])):<13} "
            f"{'x'.join(f'{v:g}' for v in r['spacing']):<16} {r['crops_per_iteration']:>5} {r['iterations']:>5} "
            f"{num(r['seconds_per_iteration'], '.3f'):>8} {num(r['min_seconds_per_iteration'], '.3f'):>8} "
            f"{num(r['iterations_per_second'], '.4f'):>8} {num(r['crops_per_second'], '.4f'):>8} "
            f"{num(r['data_seconds_per_iteration'], '.2f'):>7} {r['peak_memory_mib']:>9.0f} {loss:>8}"
        )
    lines += [
        f"{name} limit: {r['flops_per_iteration'] / 1e9:.1f} GFLOP per iteration (forward + backward), "
        f"{format_limit(r['limit'])}"
        for name, r in result["tasks"].items()
        if r.get("flops_per_iteration")
    ]
    lines.append(
        "Load average per task (start -> end of its process): "
        + "; ".join(
            f"{name} {r.get('load_average_start')} -> {r.get('load_average_end')}"
            for name, r in result["tasks"].items()
            if "error" not in r
        )
    )
    lines += [
        "",
        f"s/it: forward + loss + backward + optimiser step (ITERATION_STARTED..COMPLETED); batch s: the "
        f"batch fetch (random crops, augmentation) before it, not included; peak: {s['memory_measure']}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def run_benchmark(
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    device: str | None = None,
    feature_size: int = 48,
    roi_size: int | Sequence[int] | None = None,
    num_samples: int = 4,
    batch_size: int = 1,
    use_checkpoint: bool | None = None,
    amp: bool = True,
    iterations: int = 3,
    warmup: int = 1,
    shape: Sequence[int] = DEFAULT_SHAPE,
    cases: int = 3,
    seed: int = 0,
    output: str | None = None,
    isolate: bool = True,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Benchmark the MSD bundle's training per task; write ``output`` (JSON), return the result.

    The command line prints the result as a table.

    Args:
        tasks: task names, e.g. "['Task09_Spleen','Task01_BrainTumour']" (the default: one CT, one 4-channel MRI).
        device: "cpu", "cuda", "cuda:1"...; default cuda if available, else cpu.
        feature_size: SwinUNETR feature size (48 in the bundle).
        roi_size: crop size, an int (cube) or 3 ints; default each task's own (configs/tasks/<task>.json).
        num_samples: crops per volume (RandCropByPosNegLabeld).
        batch_size: volumes per iteration.
        use_checkpoint: gradient checkpointing; default the bundle's (true).
        amp: fp16 autocast on CUDA (no effect on CPU).
        iterations: timed iterations.
        warmup: untimed iterations first.
        shape: shape of the synthetic volumes (128 x 128 x 96 by default).
        cases: synthetic training cases written per task (fold 0 of min(5, cases) folds trains on the rest).
        seed: seed of the data, the weights and the augmentation.
        output: JSON path (default bench_output/msd_<device type>.json).
        isolate: run each task in a fresh subprocess (per-task peak RSS).
        timeout_s: per-task subprocess time limit.
    """
    dev = resolve_device(device)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    known = sorted(p.stem for p in (CONFIG_DIR / "tasks").glob("Task*.json"))
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose among {known}")
    if int(iterations) < 1 or int(warmup) < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
    roi = cube(roi_size) if roi_size is not None else None
    shape = [int(s) for s in shape]
    output = output or str(REPO_ROOT / "bench_output" / f"msd_{dev.type}.json")
    load_start = load_average()
    settings = {
        "bundle": "swin_unetr_msd",
        "config": "configs/train.json (train#trainer, after setup)",
        "tasks": tasks,
        "device": str(dev),
        "feature_size": int(feature_size),
        "roi_size": roi if roi is not None else "task default (configs/tasks/<task>.json)",
        "num_samples": int(num_samples),
        "batch_size": int(batch_size),
        "crops_per_iteration": int(batch_size) * int(num_samples),
        "use_checkpoint": None if use_checkpoint is None else bool(use_checkpoint),
        "amp": bool(amp) and dev.type == "cuda",
        "amp_requested": bool(amp),
        "num_workers": 0,
        "cache_rate": 1.0,
        "iterations": int(iterations),
        "warmup": int(warmup),
        "shape": shape,
        "cases": int(cases),
        "seed": int(seed),
        "data": "synthetic Decathlon task folders (tools.data.make_msd_tasks.write_msd_task)",
        "timing": "ignite Events.ITERATION_STARTED..ITERATION_COMPLETED per iteration"
        + (", torch.cuda.synchronize at both ends" if dev.type == "cuda" else "")
        + "; the first `warmup` iterations discarded; batch fetch timed apart",
        "isolation": (
            "each task in a fresh Python process (forked through /bin/sh)"
            if isolate
            else "all tasks in this process: peak RSS is not per task"
        ),
        "memory_measure": (
            "torch.cuda.max_memory_allocated over the iterations"
            if dev.type == "cuda"
            else "peak RSS of the task's process (getrusage ru_maxrss)"
        ),
    }
    result = envelope(dev, settings)
    args = {
        "device": str(dev),
        "feature_size": int(feature_size),
        "roi_size": roi,
        "num_samples": int(num_samples),
        "batch_size": int(batch_size),
        "use_checkpoint": use_checkpoint,
        "amp": bool(amp),
        "iterations": int(iterations),
        "warmup": int(warmup),
        "shape": shape,
        "cases": int(cases),
        "seed": int(seed),
    }
    what = f"{warmup} warm-up + {iterations} timed iteration(s); load average {load_average()}"
    runs = run_modes(MEASURE, tasks, args, key="task", isolate=isolate, timeout_s=timeout_s, what=what)
    results = {task: run for task, (run,) in runs.items()}
    result["tasks"] = results
    result["load_average"] = {
        "start": load_start,
        "end": load_average(),
        "meaning": "os.getloadavg() 1, 5, 15 min, before the first and after the last task",
    }
    return write_result(result, output)


if __name__ == "__main__":
    import logging

    command(run_benchmark, format_report, log_level=logging.WARNING)
