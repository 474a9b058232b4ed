"""Benchmark the swin_unetr_btcv_seg bundle against the model-zoo ``swin_unetr_btcv_segmentation`` 0.5.x settings.

What is measured, for one volume on one device (default: cuda if available, else cpu):

1. End-to-end inference per volume, each variant in a fresh process, stage by stage (input check, load,
   preprocess, sliding window, postprocess = softmax + invert + argmax, save) for four variants (``btcv_pipelines``):

   * ``bundle``      - the bundle's ``configs/inference.json`` as configured (amp on, flash attention on,
     channels-last on CPU);
   * ``bundle_float32`` - the same with ``amp`` False, everything else as configured (channels-last,
     attention masks reused): the bundle's float32 path, which decides per machine whether reduced
     precision pays; run only where the bundle would autocast;
   * ``bundle_float32_ncdhw`` - the same with ``amp`` and ``channels_last`` False: float32 in the plain
     NCDHW layout, the reference for the agreement numbers;
   * ``model_zoo``   - the same weights run with the model-zoo 0.5.x pipeline, built here from MONAI
     transforms (ITKReader, no foreground crop, plain ``SlidingWindowInferer``, no flash attention,
     evaluator amp = autocast on CUDA only).

   The bundle variants are parsed from the bundle's own configs with ``monai.bundle.ConfigParser``
   (``preprocessing``, ``inferer``, ``postprocessing``, ``network``, ``handlers``, ``dataset#data``),
   so this measures the bundle's real pipeline. Reported: the speed ratio model_zoo / bundle and
   the fraction of equal voxels between the saved label maps, over all voxels and over the voxels
   that either map labels as an organ.
2. Network forward time per call of ``sw_batch_size`` windows of ``roi_size`` (after a warm-up),
   for the bundle and model-zoo network settings, in float32 and, where the bundle would autocast
   on this device, in its reduced precision.
3. The limit: the FLOPs of one window (PyTorch's flop counter, forward), the achieved FLOP/s of the
   sliding window and the timed forward, and their fraction of the device's peak in the precision
   the variant ran in (``tools.common.peak``; the assumption is in ``peak``).

Training speed is measured by ``benchmark_finetune`` (the bundle's trainer side by side with the model
zoo's), not here. The machine, peak, process isolation and report header come from ``harness``.

Command line::

    python -m tools benchmark_btcv --image /tmp/sample/example_ct.nii.gz --feature_size 48 \\
        --roi_size 96 --device cpu --output_json bench.json

A full-size run (feature size 48, roi 96) of a real CT is slow on a CPU (measured times: the model
card); use ``--feature_size 12 --roi_size 64`` and a small image to try the tool out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.benchmarks.btcv_pipelines import (
    IN_CHANNELS,
    MODEL_ZOO,
    NUM_CLASSES,
    VARIANTS,
    build_variant,
    count_windows,
    flash_attention_of,
    run_end_to_end,
    write_random_checkpoint,
)
from tools.benchmarks.harness import command, envelope, machine_line, run_one, training_precision, write_result
from tools.common.bundles import cube
from tools.common.machine import load_average, native_bf16
from tools.common.peak import device_peak, format_limit, limit, network_flops
from tools.common.stats import finite_or_none
from tools.common.timing import resolve_device, say, sync

__all__ = ["NUM_CLASSES", "count_windows", "cube", "measure_variant", "run_benchmark", "format_report"]

# What one variant's run measures (the harness calls it in a fresh process per variant).
MEASURE = "tools.benchmarks.benchmark_btcv:measure_variant"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def label_agreement(path_a: str | None, path_b: str | None, foreground: bool = False) -> float | None:
    """Fraction of voxels with the same label in two saved label maps (None if either is missing or shapes differ).

    With ``foreground``, only voxels that either map labels as an organ count (None if there are none),
    so a mostly-background volume cannot hide disagreement on the organs.
    """
    import nibabel as nib

    if not path_a or not path_b:
        return None
    a = np.rint(np.asarray(nib.load(path_a).dataobj))
    b = np.rint(np.asarray(nib.load(path_b).dataobj))
    if a.shape != b.shape:
        return None
    if foreground:
        organs = (a > 0) | (b > 0)
        return float(np.mean(a[organs] == b[organs])) if organs.any() else None
    return float(np.mean(a == b))


def image_info(image_path: str) -> dict[str, Any]:
    """Shape and spacing of the input image (nibabel header)."""
    import nibabel as nib

    img = nib.load(image_path)
    return {
        "path": str(image_path),
        "shape": [int(s) for s in img.shape],
        "spacing_mm": [round(float(s), 4) for s in img.header.get_zooms()[:3]],
    }


# ------------------------------------------------------------------------------------------ forward


def time_forward(
    network: torch.nn.Module,
    shape: Sequence[int],
    device: torch.device,
    autocast: torch.dtype | None,
    repeats: int,
    seed: int = 0,
) -> list[float]:
    """Seconds of ``repeats`` forward calls on a random (seeded) input, after one warm-up call."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(shape), generator=generator).to(device)
    context = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else nullcontext
    times = []
    network.eval()
    with torch.no_grad():
        for i in range(int(repeats) + 1):
            t0 = time.perf_counter()
            with context():
                network(x)
            sync(device)
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - t0)
    return times


def benchmark_forward(
    networks: dict[str, torch.nn.Module], roi_size: Sequence[int], windows: int, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Per-call and per-window forward seconds for each network in float32 and in the bundle's autocast dtype.

    One call is a batch of ``windows`` windows of ``roi_size`` (the inferer's sw_batch_size by default).
    """
    reduced = DTYPES.get(training_precision(device))
    shape = (int(windows), IN_CHANNELS, *roi_size)
    rows = []
    for name, network in networks.items():
        flash = flash_attention_of(network)
        for autocast in (None, reduced or "skipped"):
            row = {
                "network": name,
                "use_flash_attention": flash,
                "input_shape": list(shape),
                "precision": "float32" if autocast in (None, "skipped") else str(autocast).removeprefix("torch."),
            }
            if autocast == "skipped":
                row.update(
                    precision="reduced",
                    skipped=(
                        f"no autocast on {device.type} here: the bundle's inferer stays in float32 "
                        f"(native bf16: {native_bf16()})"
                    ),
                )
                rows.append(row)
                continue
            say(f"forward: {name} {row['precision']} {list(shape)} x {repeats} (+1 warm-up)")
            times = time_forward(network, shape, device, autocast, repeats)
            mean = float(np.mean(times))
            row.update(
                repeats=len(times),
                times_s=times,
                windows_per_call=shape[0],
                seconds_per_call=mean,
                seconds_per_window=mean / shape[0],
                std_s=float(np.std(times)),
            )
            rows.append(row)
    return rows


def measure_variant(**a: Any) -> dict[str, Any]:
    """Build one variant, run the volume end to end, optionally time its forward: ``end_to_end``, ``model_forward``.

    Each variant runs in a fresh process so that process-wide settings one pipeline makes (the
    bundle's allocator setting, thread pools, the allocator's state) cannot speed up or slow down
    another.
    """
    dev = resolve_device(a["device"])
    t0 = time.perf_counter()
    pipeline = build_variant(a["name"], dev, a["feature_size"], a["roi_size"], a["ckpt_path"], a["output_dir"])
    setup_s = time.perf_counter() - t0
    say(f"{a['name']}: running one volume ({pipeline['precision']}, warm-up forward first)")
    result = run_end_to_end(pipeline, a["image"], dev, Path(a["output_dir"]), warmup=a["warmup"])
    result["setup_s"] = setup_s
    flops = network_flops(pipeline["network"], (1, IN_CHANNELS, *a["roi_size"]))
    peak = device_peak(dev)
    result["flops_per_window"] = flops
    result["limit"] = limit(
        flops * result["windows"], result["stages_s"]["sliding_window"], peak, pipeline["precision"]
    )
    forward = []
    if a["time_forward"]:
        batch = int(a["forward_batch"] or pipeline["sw_batch_size"])
        forward = benchmark_forward({a["name"]: pipeline["network"]}, a["roi_size"], batch, dev, a["repeats"])
        for row in forward:
            if "skipped" not in row:
                row["flops_per_window"] = flops
                row["limit"] = limit(flops * row["windows_per_call"], row["seconds_per_call"], peak, row["precision"])
    return {"end_to_end": result, "model_forward": forward}


# ------------------------------------------------------------------------------------------ report


def comparison(e2e: dict[str, dict]) -> dict[str, Any]:
    """Speed ratios model_zoo / bundle and voxel agreements of the bundle's label map."""
    bundle, float32, fp32, zoo = (e2e.get(v) for v in VARIANTS)

    def ratio(key_fn: Callable[[dict], float]) -> float | None:
        if not bundle or not zoo:
            return None
        return finite_or_none(key_fn(zoo) / key_fn(bundle)) if key_fn(bundle) > 0 else None

    return {
        "speed_ratio_model_zoo_over_bundle": ratio(lambda r: r["total_s"]),
        "sliding_window_ratio_model_zoo_over_bundle": ratio(lambda r: r["stages_s"]["sliding_window"]),
        "speed_ratio_bundle_float32_ncdhw_over_bundle": (
            finite_or_none(fp32["total_s"] / bundle["total_s"]) if bundle and fp32 else None
        ),
        "speed_ratio_bundle_float32_over_bundle": (
            finite_or_none(float32["total_s"] / bundle["total_s"]) if bundle and float32 else None
        ),
        "agreement_bundle_vs_bundle_float32": label_agreement(
            bundle and bundle["label_path"], float32 and float32["label_path"]
        ),
        "agreement_bundle_vs_bundle_float32_ncdhw": label_agreement(
            bundle and bundle["label_path"], fp32 and fp32["label_path"]
        ),
        "agreement_bundle_vs_model_zoo": label_agreement(bundle and bundle["label_path"], zoo and zoo["label_path"]),
        "organ_agreement_bundle_vs_bundle_float32_ncdhw": label_agreement(
            bundle and bundle["label_path"], fp32 and fp32["label_path"], foreground=True
        ),
        "organ_agreement_bundle_vs_model_zoo": label_agreement(
            bundle and bundle["label_path"], zoo and zoo["label_path"], foreground=True
        ),
    }


def limit_lines(result: dict[str, Any]) -> list[str]:
    """The report's lines on the limit: FLOPs of one window, achieved FLOP/s and fraction of the peak."""
    peak = result.get("peak")
    lines = ["", f"Limit (peak: {peak['assumption'] if peak else 'unknown device, no peak'})"]
    for name, r in result["end_to_end"].items():
        if r.get("limit"):
            lines.append(
                f"{name:<12} {r['flops_per_window'] / 1e9:.2f} GFLOP per window (forward); sliding window "
                f"{format_limit(r['limit'])}"
            )
    for r in result["model_forward"]:
        if r.get("limit"):
            lines.append(f"{r['network']:<12} forward {r['precision']:<9} {format_limit(r['limit'])}")
    return lines


def format_report(result: dict[str, Any]) -> str:
    """A readable text table of a benchmark result."""
    m, s = result["machine"], result["settings"]
    lines = [
        machine_line(m),
        f"Image {s['image']['path']} {s['image']['shape']} @ {s['image']['spacing_mm']} mm; device {s['device']}; "
        f"feature_size {s['feature_size']}, roi {s['roi_size']}; weights: {s['weights']}",
    ]
    loads = [m.get("load_average_1_5_15"), m.get("load_average_after_inference")]
    busy = [la[0] for la in loads if la and la[0] > 1.5 * (m["cpus_usable"] or 1)]
    if busy:
        lines.append(
            f"WARNING: 1-minute load average up to {max(busy):.1f} on {m['cpus_usable']} cores: other "
            f"processes shared the CPU, so the timings are inflated and noisy"
        )
    lines += [
        "",
        "End to end, seconds per volume",
        f"{'variant':<12} {'prec':<9} {'check':>7} {'load':>7} {'prep':>7} {'sliding':>9} {'post':>7} "
        f"{'save':>7} {'total':>8} {'windows':>8} {'s/window':>9}",
    ]
    for name, r in result["end_to_end"].items():
        st = r["stages_s"]
        lines.append(
            f"{name:<12} {r['precision']:<9} {st.get('input_check', 0.0):>7.2f} {st.get('load', 0.0):>7.2f} "
            f"{st.get('preprocess', 0.0):>7.2f} {st['sliding_window']:>9.2f} {st.get('postprocess', 0.0):>7.2f} "
            f"{st.get('save', 0.0):>7.2f} {r['total_s']:>8.2f} {r['windows']:>8d} "
            f"{r['sliding_window_s_per_window']:>9.3f}"
        )
    c = result["comparison"]

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines += [
        f"speed ratio bundle_float32 / bundle: {num(c.get('speed_ratio_bundle_float32_over_bundle'), '{:.2f}x')}; "
        f"voxel agreement bundle vs bundle_float32: {num(c.get('agreement_bundle_vs_bundle_float32'), '{:.4%}')}",
        f"speed ratio model_zoo / bundle: {num(c['speed_ratio_model_zoo_over_bundle'], '{:.2f}x')} "
        f"(sliding window alone {num(c['sliding_window_ratio_model_zoo_over_bundle'], '{:.2f}x')})",
        "voxel agreement bundle vs bundle_float32_ncdhw: "
        f"{num(c['agreement_bundle_vs_bundle_float32_ncdhw'], '{:.4%}')}; "
        f"bundle vs model_zoo: {num(c['agreement_bundle_vs_model_zoo'], '{:.4%}')}",
        f"organ-voxel agreement (voxels either map labels as an organ) bundle vs bundle_float32_ncdhw: "
        f"{num(c.get('organ_agreement_bundle_vs_bundle_float32_ncdhw'), '{:.4%}')}; "
        f"bundle vs model_zoo: {num(c.get('organ_agreement_bundle_vs_model_zoo'), '{:.4%}')}",
        *([f"({c['note']})"] if c.get("note") else []),
        *limit_lines(result),
        "",
        "Network forward, one call = a batch of windows (the inferer's sw_batch_size unless --forward_batch)",
        f"{'network':<10} {'flash':<6} {'precision':<10} {'windows':>8} {'s/call':>8} {'s/window':>9} {'std':>7}",
    ]
    for r in result["model_forward"]:
        if "skipped" in r:
            lines.append(
                f"{r['network']:<10} {str(r['use_flash_attention']):<6} {r['precision']:<10} skipped: {r['skipped']}"
            )
        else:
            lines.append(
                f"{r['network']:<10} {str(r['use_flash_attention']):<6} {r['precision']:<10} "
                f"{r['windows_per_call']:>8d} {r['seconds_per_call']:>8.3f} {r['seconds_per_window']:>9.3f} "
                f"{r['std_s']:>7.3f}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def run_variants(
    dev: torch.device,
    feature_size: int,
    roi: list[int],
    ckpt: str,
    out: Path,
    image: str,
    warmup: bool,
    forward_batch: int | None,
    repeats: int,
    skip_model_zoo: bool,
    skip_identical_fp32: bool,
) -> tuple[dict[str, dict], list[dict], bool]:
    """Run each variant on the volume in a fresh process; return (end to end by variant, forward rows, fp32 skipped).

    The fp32 run is skipped (third value True) where ``skip_identical_fp32`` and the bundle ran float32
    in the plain layout: its run is the fp32 run.
    """
    e2e: dict[str, dict] = {}
    forward_rows: list[dict] = []
    fp32_is_bundle = False
    for name in VARIANTS:
        if name == "model_zoo" and skip_model_zoo:
            say("model_zoo: skipped")
            continue
        if name == "bundle_float32" and e2e.get("bundle", {}).get("precision") == "float32":
            say("bundle_float32: skipped, the bundle runs float32 here, so its run is the float32 run")
            continue
        if name == "bundle_float32_ncdhw" and fp32_is_bundle:
            say(f"{name}: skipped, the bundle runs float32 in the plain layout here, so its run is this run")
            continue
        say(f"{name}: building the pipeline and running one volume in a fresh process")
        args = {
            "name": name,
            "device": str(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "ckpt_path": ckpt,
            "output_dir": str(out / name),
            "image": str(image),
            "warmup": bool(warmup),
            "time_forward": name in ("bundle", "model_zoo"),
            "forward_batch": forward_batch,
            "repeats": int(repeats),
        }
        child = run_one(MEASURE, args, name)
        if "error" in child:
            raise RuntimeError(f"benchmark variant {name}: {child['error']}")
        r = e2e[name] = child["end_to_end"]
        forward_rows += child["model_forward"]
        if name == "bundle":  # the fp32 run would repeat it: float32 and the plain layout here
            fp32_is_bundle = skip_identical_fp32 and r["precision"] == "float32" and not r["settings"]["channels_last"]
        say(
            f"{name}: total {r['total_s']:.2f} s, sliding window {r['stages_s']['sliding_window']:.2f} s over "
            f"{r['windows']} windows; label map {r['label_path']}"
        )
    return e2e, forward_rows, fp32_is_bundle


def run_benchmark(
    image: str,
    ckpt_path: str | None = None,
    feature_size: int = 48,
    roi_size: int = 96,
    device: str | None = None,
    output_json: str = "bench.json",
    skip_model_zoo: bool = False,
    repeats: int = 3,
    seed: int = 0,
    work_dir: str | None = None,
    warmup: bool = True,
    forward_batch: int | None = None,
    skip_identical_fp32: bool = True,
) -> dict[str, Any]:
    """Benchmark the bundle vs the model-zoo settings on one volume; write ``output_json``, return the result.

    The command line prints the result as a table.

    Args:
        image: input CT (NIfTI, HU).
        ckpt_path: bundle checkpoint (``{"model": ...}`` or a state dict); random init (seeded) if omitted.
        feature_size: SwinUNETR feature size (48 in the bundle).
        roi_size: sliding-window size (96 in the bundle and the model zoo).
        device: "cpu", "cuda", "cuda:1"...; default cuda if available else cpu.
        output_json: where to write the result.
        skip_model_zoo: leave the model-zoo variant out.
        repeats: timed forward calls per network setting (after one warm-up call).
        seed: seed of the random initialisation.
        work_dir: folder for label maps (default: ``<output_json stem>_outputs`` next to it).
        warmup: one untimed image load and forward before each end-to-end run.
        forward_batch: windows per timed forward call (default the inferer's sw_batch_size).
        skip_identical_fp32: leave out the ``bundle_float32_ncdhw`` run where the bundle uses no reduced precision
            and no channels-last on the device (it would repeat the same float32 computation).
    """
    dev = resolve_device(device)
    roi = cube(roi_size)
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image not found: {image}")
    out = (
        Path(work_dir)
        if work_dir
        else Path(output_json).resolve().with_suffix("").with_name(Path(output_json).stem + "_outputs")
    )
    out.mkdir(parents=True, exist_ok=True)
    say(f"device {dev}, feature_size {feature_size}, roi {roi}; outputs under {out}")
    if ckpt_path:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
        weights, ckpt = f"checkpoint {ckpt_path}", str(ckpt_path)
    else:
        ckpt = write_random_checkpoint(out / f"random_init_fs{feature_size}_seed{seed}.pt", feature_size, seed)
        weights = f"RANDOM INIT (torch seed {seed}; no --ckpt_path given): speeds are valid, labels are not"
    say(f"weights: {weights}")
    result = envelope(
        dev,
        {
            "image": image_info(image),
            "device": str(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "ckpt_path": str(ckpt_path) if ckpt_path else None,
            "weights": weights,
            "random_init": not ckpt_path,
            "seed": int(seed),
            "repeats": int(repeats),
            "forward_batch": forward_batch,
            "warmup_forward_before_end_to_end": bool(warmup),
            "model_zoo_constants": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_ZOO.items()},
            "bundle_autocast_dtype": training_precision(dev),
        },
    )
    Path(image).read_bytes()  # page cache warm for every variant alike

    e2e, forward_rows, fp32_is_bundle = run_variants(
        dev,
        feature_size,
        roi,
        ckpt,
        out,
        image,
        warmup=warmup,
        forward_batch=forward_batch,
        repeats=repeats,
        skip_model_zoo=skip_model_zoo,
        skip_identical_fp32=skip_identical_fp32,
    )
    result["machine"]["load_average_after_inference"] = load_average()
    result["end_to_end"] = e2e
    result["comparison"] = comparison(e2e)
    if fp32_is_bundle:
        result["comparison"]["agreement_bundle_vs_bundle_float32_ncdhw"] = 1.0
        result["comparison"]["organ_agreement_bundle_vs_bundle_float32_ncdhw"] = 1.0
        result["comparison"]["fp32_note"] = (
            "neither reduced precision nor channels-last is used on this device, "
            "so the bundle's label map is the fp32 label map"
        )
    if not ckpt_path:
        result["comparison"]["note"] = (
            "random weights: the agreements compare label maps of random logits "
            "(pipeline and numeric differences), not segmentation quality"
        )
    result["model_forward"] = forward_rows
    return write_result(result, output_json)


if __name__ == "__main__":
    command(run_benchmark, format_report)
