"""Benchmark a pre-training step of the swin_unetr_ssl_pretrain bundle against the research code's way.

One step = a batch of ``batch_size`` volumes x ``num_samples`` crops of ``roi_size`` (4 crops of 96^3
by default), turned into two views per crop (8 views), forward through ``SwinSSLNet``, loss
(rotation CE + contrastive + L1 reconstruction), backward and an AdamW step. Two modes, same
network (the bundle's ``network`` with its knobs: ``use_checkpoint``, flash attention, feature
size; same seed so same weights), same phantom crops, same optimiser, float32 on CPU and fp16
autocast + GradScaler on CUDA (``--amp``):

* ``bundle``   - the bundle's own objects, parsed from ``configs/train.json`` with
  ``monai.bundle.ConfigParser`` (``network``, ``optimizer``, ``loss``, ``proxy_tasks``,
  ``train#iteration`` with its lr scheduler and scaler; train.json's ``setup`` runs first as in
  the bundle's ``training``: the CPU allocator setting ``reuse_cpu_memory``, ``set_determinism``
  and proxy-task seeding). ``SSLTrainIteration(engine, batch)`` is called on a batch already on
  the device: the proxy tasks (rotation, box cutout) run there. ``--reuse_cpu_memory False``
  measures the bundle without its allocator setting (the research mode never applies it).
* ``research`` - the research code's way (Project-MONAI research-contributions
  ``SwinUNETR/Pretrain/main.py``), its network with MONAI's own window attention (train.json's
  ``fast_window_attention`` off: the research code has no fused attention): two rotated views with
  their labels, each cut out, made per sample with numpy **on the CPU** (as a data pipeline would),
  then the views (augmented inputs and un-masked targets) moved to the device; the network runs once
  per view batch as main.py does (``--research_forward concat`` runs it once on
  ``torch.cat([x1_augment, x2_augment])``); loss and
  update as main.py (autocast around forward and loss, ``scaler.step``, ``zero_grad`` after the
  step; ``torch.backends.cudnn.benchmark = True`` as main.py sets it). The augmentation here is
  this file's own implementation, with these assumptions about the research code (utils/ops.py):
  rotation by k x 90 degrees, k uniform in 0..3, in the plane of spatial axes 1, 2 (the bundle's
  plane, so labels mean the same); noise cutout of random boxes (sides 5 % to 25 % of the crop)
  until a share drawn uniformly in [0, 0.3) of the voxels is covered, filled with normal noise
  min-max scaled to [0, 1]. Unlike the research code, the union never exceeds 30 % (the last box is
  shrunk), and its second cutout that pastes boxes from another sample of the batch is left out;
  its ``torch.autograd.set_detect_anomaly(True)`` (a debugging switch that would dominate the time)
  and its optional lr decay / gradient clipping (off by default there) are left out too.

Measured per mode: warm-up steps (untimed), then timed steps (each synchronised on CUDA), their
mean, iterations/s, the losses (all finite), the research mode's split into CPU augmentation /
transfer / device compute and the bundle mode's proxy-task time, and the peak memory. The ratio
research_time / bundle_time (> 1: the bundle is faster) and the peak-memory ratio are reported.
The limit: the FLOPs of one step's network forward and backward over all views (PyTorch's flop
counter, ``tools.common.peak``), the achieved FLOP/s and its fraction of the device's peak.

Peak memory: each mode runs in a fresh Python process (``harness.run_modes``, started through a forking
``/bin/sh`` so the child's ``ru_maxrss`` is not inherited from the launcher), so its numbers belong to
that mode alone. On CUDA the headline is ``torch.cuda.max_memory_allocated``
over the steps (reset after setup). On CPU it is the process peak RSS (``resource.getrusage``
``ru_maxrss``: interpreter, libraries, model, optimiser state and activations); ``vm_hwm_mib``
(/proc/self/status VmHWM) cross-checks it, and where Linux allows resetting the peak
(``/proc/self/clear_refs`` = 5) right before the first step, ``peak_rss_steps_mib`` is the peak of
the steps alone. psutil is not needed (it reports no peak RSS on Linux).

Command line::

    python -m tools benchmark_ssl --device cpu --feature_size 48 --roi_size "[96,96,96]" \\
        --batch_size 2 --num_samples 2 --warmup 1 --steps 2 --output bench_output/ssl_cpu.json

Feature size 48 at 96^3 is slow on a small CPU (measured times: the model card); ``--feature_size 12
--roi_size "[64,32,32]" --batch_size 1`` tries the tool out quickly (the rotation plane, spatial
axes 1 and 2, must be square; each side a multiple of 32 with at least 2 bottleneck tokens).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from tools.benchmarks.harness import (
    command,
    envelope,
    machine_line,
    peak_memory,
    precision_label,
    run_modes,
    training_precision,
    write_result,
)
from tools.benchmarks.ssl_research import RESEARCH_FORWARDS, setup_research
from tools.common.bundles import REPO_ROOT, cube, device_expr, trains_fused
from tools.common.bundles import SSL_DIR as BUNDLE_DIR
from tools.common.bundles import bundle_parser as parse_bundle_config
from tools.common.memory import memory_snapshot, reset_peak_rss, status_mib
from tools.common.peak import device_peak, format_limit, limit, network_flops
from tools.common.stats import mean, num, ratio
from tools.common.timing import resolve_device, say, sync

MODES = ("bundle", "research")
MEASURE = "tools.benchmarks.benchmark_ssl:measure_mode"  # one mode's step (the harness runs it)


# ------------------------------------------------------------------------------------------ helpers


def bundle_parser(overrides: dict[str, Any]) -> Any:
    """A ConfigParser of the bundle's ``configs/train.json`` with its metadata and ``overrides`` applied."""
    return parse_bundle_config(BUNDLE_DIR, "train.json", overrides)


def train_overrides(
    device: torch.device,
    feature_size: int,
    roi_size: Sequence[int],
    batch_size: int,
    num_samples: int,
    seed: int,
    amp: bool,
    view_chunk_size: int = 0,
    reuse_cpu_memory: bool | None = None,
) -> dict[str, Any]:
    """The train.json knobs set here (no pretrained weights, no resume; allocator None: train.json's value)."""
    overrides = {
        "device": device_expr(device),
        "feature_size": int(feature_size),
        "roi_size": [int(s) for s in roi_size],
        "batch_size": int(batch_size),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "pretrained_path": "",
        "resume_from": "",
        "num_workers": 0,
        # the bundle's rule is `amp and torch.cuda.is_available()`; pinned to the device benchmarked
        "use_amp": bool(amp) and device.type == "cuda",
        # and bf16 autocast of the forward on CPUs with native bf16 (train.json's amp_cpu_training)
        "amp_cpu_training": bool(amp),
        "view_chunk_size": int(view_chunk_size),
    }
    if reuse_cpu_memory is not None:
        overrides["reuse_cpu_memory"] = bool(reuse_cpu_memory)
    return overrides


def phantom_crops(n: int, roi_size: Sequence[int], hu_window: Sequence[float], seed: int) -> torch.Tensor:
    """``n`` phantom CT crops (n, 1, *roi_size), windowed to 0..1 as the bundle's preprocessing does."""
    from tools.data.make_phantoms import windowed_crops

    return torch.from_numpy(windowed_crops(n, roi_size, hu_window, seed)[0])


def _attributable(ru_maxrss: float, hwm_before: float | None, hwm_after: float | None) -> bool:
    """True if ``ru_maxrss`` equals this address space's peak (VmHWM before / after the reset), within 5 %."""
    hwms = [h for h in (hwm_before, hwm_after) if h is not None]
    if not hwms:
        return True
    return abs(ru_maxrss - max(hwms)) <= max(64.0, 0.05 * max(hwms))


# ------------------------------------------------------------------------------------------ the two steps


class TimedProxyTasks:
    """Wraps the bundle's ProxyTaskViews: same call, and the seconds of the last call (synchronised)."""

    def __init__(self, proxy_tasks: Any, device: torch.device) -> None:
        self.proxy_tasks = proxy_tasks
        self.device = device
        self.seconds = 0.0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        sync(self.device)
        t0 = time.perf_counter()
        views = self.proxy_tasks(images)
        sync(self.device)
        self.seconds = time.perf_counter() - t0
        return views


def setup_bundle(device: torch.device, parser: Any, seed: int, crops: torch.Tensor) -> dict[str, Any]:
    """The bundle's workflow objects from train.json after its ``setup``; the batch on the device."""
    # train.json "setup", first as in its "training": allocator setting, set_determinism(seed), proxy-task seed
    setup_results = parser.get_parsed_content("setup")
    allocator_applied = setup_results[0]
    if not isinstance(allocator_applied, bool) or int(parser["seed"]) != int(seed):
        raise RuntimeError("train.json setup: the allocator line is not first, or the seed is not the benchmark's")
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer")
    loss = parser.get_parsed_content("loss")
    proxy_tasks = parser.get_parsed_content("proxy_tasks")  # the instance setup seeded
    iteration = parser.get_parsed_content("train#iteration")
    if iteration.proxy_tasks is not proxy_tasks or iteration.loss is not loss:
        raise RuntimeError("train#iteration does not use the parsed proxy_tasks / loss")
    timed = TimedProxyTasks(proxy_tasks, device)
    iteration.proxy_tasks = timed
    engine = SimpleNamespace(
        state=SimpleNamespace(iteration=0, device=device), network=network, optimizer=optimizer, non_blocking=False
    )
    batch = {"image": crops.to(device)}
    sync(device)

    def step(index: int) -> dict[str, Any]:
        engine.state.iteration = index + 1
        out = iteration(engine, batch)
        return {
            "loss": out["loss"],
            "loss_terms": {k: out[k] for k in ("inpaint_loss", "contrast_loss", "rotation_loss")},
            "masked_fraction": out["masked_fraction"],
            "proxy_tasks_s": timed.seconds,
        }

    return {
        "network": network,
        "step": step,
        "settings": {
            "how": "configs/train.json parsed with ConfigParser (network, optimizer, loss, proxy_tasks, "
            "train#iteration); SSLTrainIteration on a batch already on the device, proxy tasks on the device",
            "optimizer": type(optimizer).__name__,
            "lr_scheduler": type(iteration.lr_scheduler).__name__,
            "amp": bool(iteration.amp),
            "cpu_bf16": device.type == "cpu"
            and training_precision(device, bool(getattr(iteration, "cpu_autocast", False))) == "bfloat16",
            "scaler_enabled": bool(iteration.scaler.is_enabled()),
            "accumulation_steps": iteration.accumulation_steps,
            "max_grad_norm": iteration.max_grad_norm,
            "view_chunk_size": iteration.view_chunk_size,
            "fast_window_attention": trains_fused(network),
            "reuse_cpu_memory": bool(parser["reuse_cpu_memory"]),
            "allocator_applied": allocator_applied,
        },
    }


def measure_mode(
    mode: str,
    device: str = "cpu",
    feature_size: int = 48,
    roi_size: Sequence[int] = (96, 96, 96),
    batch_size: int = 2,
    num_samples: int = 2,
    warmup: int = 1,
    steps: int = 2,
    seed: int = 0,
    amp: bool = True,
    research_forward: str = "separate",
    view_chunk_size: int = 0,
    reuse_cpu_memory: bool | None = None,
) -> dict[str, Any]:
    """Set one mode up and time its steps in this process; return its speed, losses and memory."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = resolve_device(device)
    roi = cube(roi_size)
    t_setup = time.perf_counter()
    parser = bundle_parser(
        train_overrides(dev, feature_size, roi, batch_size, num_samples, seed, amp, view_chunk_size, reuse_cpu_memory)
    )
    crops = phantom_crops(int(batch_size) * int(num_samples), roi, parser["hu_window"], seed)
    if mode == "bundle":
        setup = setup_bundle(dev, parser, seed, crops)
    else:
        setup = setup_research(dev, parser, seed, crops, amp, research_forward)
    network = setup["network"]
    setup_s = time.perf_counter() - t_setup
    before = memory_snapshot()
    rss_before = status_mib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    peak_reset = reset_peak_rss()
    records: list[dict[str, Any]] = []
    total = int(warmup) + int(steps)
    for index in range(total):
        sync(dev)
        t0 = time.perf_counter()
        record = setup["step"](index)
        sync(dev)
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
        say(
            f"{mode} step {index + 1}/{total} ({'warm-up' if index < int(warmup) else 'timed'}): "
            f"{record['seconds']:.2f} s, loss {record['loss']:.4f}"
        )
    after = memory_snapshot()
    timed, warm = records[int(warmup) :], records[: int(warmup)]
    times = [r["seconds"] for r in timed]
    peak = peak_memory(dev, after["ru_maxrss_mib"], "steps", "mode")
    hwm = after["vm_hwm_mib"]
    breakdown_keys = ("augment_s", "transfer_s", "compute_s") if mode == "research" else ("proxy_tasks_s",)
    flops = network_flops(network, (2 * crops.shape[0], *crops.shape[1:]), backward=True)
    precision = training_precision(dev, bool(setup["settings"]["amp"]) or bool(setup["settings"].get("cpu_bf16")))
    result = {
        "mode": mode,
        "pid": os.getpid(),
        "device": str(dev),
        "precision": precision_label(precision),
        "settings": setup["settings"],
        "flops_per_step": flops,
        "flops_per_view": flops // (2 * crops.shape[0]),
        "flops_counted": "forward + backward of the network over all views (PyTorch flop counter)",
        "limit": limit(flops, mean(times), device_peak(dev), precision),
        "use_checkpoint": bool(parser["use_checkpoint"]),
        "use_flash_attention": any(bool(getattr(m, "use_flash_attention", False)) for m in network.modules()),
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "cudnn": {
            "benchmark": bool(torch.backends.cudnn.benchmark),
            "deterministic": bool(torch.backends.cudnn.deterministic),
        },
        "setup_s": setup_s,
        "warmup_steps": len(warm),
        "steps": len(timed),
        "step_times_s": times,
        "warmup_times_s": [r["seconds"] for r in warm],
        "seconds_per_iteration": mean(times),
        "iterations_per_second": (len(times) / sum(times)) if times and sum(times) > 0 else None,
        "losses": [float(r["loss"]) for r in timed],
        "warmup_losses": [float(r["loss"]) for r in warm],
        "loss_terms": [r["loss_terms"] for r in timed],
        "masked_fraction": [float(r["masked_fraction"]) for r in timed],
        "breakdown_s": {k: [float(r[k]) for r in timed] for k in breakdown_keys},
        "breakdown_mean_s": {k: mean([float(r[k]) for r in timed]) for k in breakdown_keys},
        **peak,
        "peak_rss_mib": after["ru_maxrss_mib"],
        "peak_rss_before_steps_mib": before["ru_maxrss_mib"],
        "rss_before_steps_mib": rss_before,
        "vm_hwm_mib": hwm,
        "peak_rss_reset_before_steps": peak_reset,
        "peak_rss_steps_mib": hwm if peak_reset else None,
        # ru_maxrss is this address space's own peak (not inherited from a launcher) if it matches VmHWM
        "peak_rss_attributable": _attributable(after["ru_maxrss_mib"], before["vm_hwm_mib"], hwm),
    }
    return result


# ------------------------------------------------------------------------------------------ isolation, report


def comparison(modes: dict[str, dict]) -> dict[str, Any]:
    """research / bundle ratios of time per step, iterations/s and peak memory."""
    b, r = modes.get("bundle") or {}, modes.get("research") or {}
    return {
        "time_ratio_research_over_bundle": ratio(r.get("seconds_per_iteration"), b.get("seconds_per_iteration")),
        "speedup_bundle_iterations_per_second_over_research": ratio(
            b.get("iterations_per_second"), r.get("iterations_per_second")
        ),
        "peak_memory_ratio_research_over_bundle": ratio(r.get("peak_memory_mib"), b.get("peak_memory_mib")),
        "meaning": "time ratio > 1: the bundle's step is faster than the research code's way",
    }


def format_report(result: dict[str, Any]) -> str:
    """A short text table of a benchmark result."""
    m, s = result["machine"], result["settings"]
    lines = [
        machine_line(m),
        f"SSL pre-training step on {s['device']}: feature_size {s['feature_size']}, roi {s['roi_size']}, "
        f"{s['batch_size']} volumes x {s['num_samples']} crops = {s['crops']} crops -> {s['views']} views; "
        f"{s['warmup']} warm-up + {s['steps']} timed steps",
    ]
    la = m.get("load_average_1_5_15")
    if la and la[0] > 1.5 * (m["cpus_usable"] or 1):
        lines.append(f"WARNING: 1-minute load average {la[0]:.1f} on {m['cpus_usable']} cores: timings are inflated")
    lines += ["", f"{'mode':<9} {'precision':<17} {'s/step':>8} {'it/s':>8} {'peak MiB':>9}  {'steps (s)':<20} losses"]
    for name, r in result["modes"].items():
        if "error" in r:
            lines.append(f"{name:<9} {r['error']}")
            continue
        lines.append(
            f"{name:<9} {r['precision']:<17} {num(r['seconds_per_iteration'], '.3f'):>8} "
            f"{num(r['iterations_per_second'], '.4f'):>8} {r['peak_memory_mib']:>9.0f}  "
            f"{', '.join(f'{t:.2f}' for t in r['step_times_s']):<20} "
            f"{', '.join(f'{x:.4f}' for x in r['losses'])}"
        )
        extra = ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_mean_s"].items() if v is not None)
        steps_peak = (
            f"; peak RSS of the steps alone {r['peak_rss_steps_mib']:.0f} MiB"
            if r.get("peak_rss_steps_mib") is not None and r["cuda_max_memory_allocated_mib"] is None
            else ""
        )
        reuse = "on" if r["settings"].get("allocator_applied") else "off"
        lines.append(f"{'':<9} mean split: {extra}{steps_peak}; glibc reuse of freed memory {reuse}")
        if r.get("limit"):
            lines.append(
                f"{'':<9} limit: {r['flops_per_step'] / 1e9:.1f} GFLOP per step ({r['flops_per_view'] / 1e9:.2f} per "
                f"view, forward + backward), {format_limit(r['limit'])}"
            )
    c = result["comparison"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}x"

    lines += [
        "",
        f"time per step research / bundle: {fmt(c['time_ratio_research_over_bundle'])}; "
        f"peak memory research / bundle: {fmt(c['peak_memory_ratio_research_over_bundle'])}",
        f"peak memory: {s['memory_measure']}",
    ]
    return "\n".join(lines)


def run_benchmark(
    device: str | None = None,
    feature_size: int = 48,
    roi_size: int | Sequence[int] = (96, 96, 96),
    batch_size: int = 2,
    num_samples: int = 2,
    warmup: int = 1,
    steps: int = 2,
    output: str | None = None,
    seed: int = 0,
    amp: bool = True,
    research_forward: str = "separate",
    view_chunk_size: int = 0,
    reuse_cpu_memory: bool | None = None,
    mode: str | Sequence[str] = "both",
    isolate: bool = True,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Benchmark a pre-training step, bundle vs research way; write ``output`` (JSON), return the result.

    The command line prints the result as a table.

    Args:
        device: "cpu", "cuda", "cuda:1"...; default cuda if available, else cpu.
        feature_size: SwinSSLNet feature size (48 in the bundle).
        roi_size: crop size, an int (cube) or 3 ints; spatial axes 1 and 2 must be equal (96^3 in the bundle).
        batch_size: volumes per batch (crops = batch_size * num_samples, views = twice that).
        num_samples: crops per volume.
        warmup: untimed steps first.
        steps: timed steps.
        output: JSON path (default bench_output/ssl_<device type>.json).
        seed: seed of the weights, the phantom crops and the augmentation.
        amp: fp16 autocast + GradScaler on CUDA; on a CPU with native bf16 the bundle mode's forward in
            bf16 (train.json's ``amp_cpu_training``); the research mode stays float32 on CPU, as the
            research code's amp is CUDA only.
        research_forward: "separate" (main.py: one forward per view batch) or "concat" (one forward on both).
        view_chunk_size: the bundle's knob: views per network call (0: all views in one call).
        reuse_cpu_memory: the bundle's allocator knob (None: train.json's value; the research mode never sets it).
        mode: "both", "bundle" or "research" (or a list of modes).
        isolate: run each mode in a fresh subprocess (per-mode peak RSS).
        timeout_s: per-mode subprocess time limit.
    """
    dev = resolve_device(device)
    roi = cube(roi_size)
    modes = list(MODES) if mode == "both" else [mode] if isinstance(mode, str) else list(mode)
    if any(m not in MODES for m in modes):
        raise ValueError(f"modes must be among {MODES}, got {modes}")
    if research_forward not in RESEARCH_FORWARDS:
        raise ValueError(f"research_forward must be one of {RESEARCH_FORWARDS}, got {research_forward!r}")
    if roi[1] != roi[2]:
        raise ValueError(f"roi_size {roi} is not square in the rotation plane (spatial axes 1, 2)")
    output = output or str(REPO_ROOT / "bench_output" / f"ssl_{dev.type}.json")
    crops = int(batch_size) * int(num_samples)
    settings = {
        "bundle": "swin_unetr_ssl_pretrain",
        "config": "configs/train.json",
        "device": str(dev),
        "feature_size": int(feature_size),
        "roi_size": roi,
        "batch_size": int(batch_size),
        "num_samples": int(num_samples),
        "crops": crops,
        "views": 2 * crops,
        "warmup": int(warmup),
        "steps": int(steps),
        "seed": int(seed),
        "amp": bool(amp),
        "precision": precision_label(training_precision(dev, bool(amp) and dev.type == "cuda")),
        "research_forward": research_forward,
        "view_chunk_size": int(view_chunk_size),
        "reuse_cpu_memory": "train.json's value" if reuse_cpu_memory is None else bool(reuse_cpu_memory),
        "data": "phantom CT crops (tools.data.make_phantoms), windowed to 0..1",
        "isolation": (
            "each mode in a fresh Python process (forked through /bin/sh)"
            if isolate
            else "all modes in this process: peak RSS is not per mode"
        ),
        "memory_measure": (
            "torch.cuda.max_memory_allocated over the steps (reset after setup)"
            if dev.type == "cuda"
            else "process peak RSS (getrusage ru_maxrss; VmHWM cross-check; steps-only peak after "
            "/proc/self/clear_refs reset)"
        ),
    }
    result = envelope(dev, settings, psutil=_has_psutil())
    args = {
        "device": str(dev),
        "feature_size": int(feature_size),
        "roi_size": roi,
        "batch_size": int(batch_size),
        "num_samples": int(num_samples),
        "warmup": int(warmup),
        "steps": int(steps),
        "seed": int(seed),
        "amp": bool(amp),
        "research_forward": research_forward,
        "view_chunk_size": int(view_chunk_size),
        "reuse_cpu_memory": None if reuse_cpu_memory is None else bool(reuse_cpu_memory),
    }
    what = f"{warmup} warm-up + {steps} timed step(s)"
    runs = run_modes(MEASURE, modes, args, isolate=isolate, timeout_s=timeout_s, what=what)
    results = {name: run for name, (run,) in runs.items()}
    result["modes"] = results
    result["comparison"] = comparison(results)
    return write_result(result, output)


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    import logging

    command(run_benchmark, format_report, log_level=logging.WARNING)
