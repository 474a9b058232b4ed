"""The prepared GPU run: every speed the model cards need, from one command on one GPU (8 minutes on an H100/H200).

Parts, each in a fresh process of its own with its own time cap (a part that fails or runs out of
time is recorded as such and the next one runs):

* ``btcv_training``  - full-size BTCV training iterations of the bundle's ``train.json`` trainer with its
  precision rule (``benchmark_finetune``, its ``bundle`` mode): iterations/s, CUDA peak memory, the limit;
* ``btcv_inference`` - end-to-end inference of the sample CT, the bundle against the model zoo's
  settings (``benchmark_btcv``): seconds per volume, label agreement;
* ``ssl``            - the pre-training step against the research code's way (``benchmark_ssl``);
* ``msd``            - one 4-channel MSD task, Task01_BrainTumour (``benchmark_msd``);
* ``ddp``            - a one-GPU ``torchrun`` run of the BTCV bundle's ``train.json`` +
  ``multi_gpu_train.json`` on phantoms (one epoch): it finishes and rank 0 writes its checkpoint.

Writes ``<output_dir>/gpu_check.json`` (machine, peak, settings, per part: status, seconds, cap,
a summary and the path of the part's own full JSON) and ``<output_dir>/gpu_check.md`` (a markdown
table for the model cards), plus each benchmark's own JSON next to them. The benchmarks run through
their entry points (``harness.benchmark``) and each part through the harness's fresh process.

``--dry_run`` runs the same code paths at a tiny size on the CPU (feature size 12, 64^3 windows, a
phantom instead of the sample CT, one step each): the test suite runs it.

Command line (the shell wrapper ``tools/gpu_check.sh`` sets up the packages first)::

    python -m tools gpu_check --output_dir gpu_check_out --image gpu_inputs/sample_ct/example_ct.nii.gz
    python -m tools gpu_check --dry_run True --output_dir /tmp/gpu_check_dry
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tools.benchmarks.harness import benchmark, envelope, machine_line, run_one
from tools.common.bundles import BTCV_DIR, REPO_ROOT, bundle_command, cube
from tools.common.processes import run_with_timeout
from tools.common.stats import num
from tools.common.timing import say

PARTS = ("btcv_training", "btcv_inference", "ssl", "msd", "ddp")
# seconds per part on one H100/H200: 440 s together, the rest of 8 minutes for starting the processes
CAPS_S = {"btcv_training": 80, "btcv_inference": 140, "ssl": 90, "msd": 70, "ddp": 60}
DEFAULT_IMAGE = REPO_ROOT / "gpu_inputs" / "sample_ct" / "example_ct.nii.gz"
MSD_TASK = "Task01_BrainTumour"
MEASURE = "tools.benchmarks.gpu_check:measure_part"  # one part (the harness runs it in a fresh process)

# Full size (the bundles' defaults) and the dry run's tiny size on the CPU.
SIZES = {
    "full": {
        "device": "cuda",
        "feature_size": 48,
        "roi_size": 96,
        "train_steps": 5,
        "train_warmup": 2,
        "train": {"crops": 4, "num_cases": 2, "num_workers": None},  # train.json's 4 crops per volume on CUDA
        "repeats": 3,
        "inference": {"warmup": True, "forward_batch": None},
        "isolate": True,
        "ssl": {"roi_size": [96, 96, 96], "batch_size": 2, "num_samples": 2, "warmup": 1, "steps": 3},
        "msd": {"roi_size": None, "num_samples": 4, "iterations": 3, "warmup": 1, "shape": [128, 128, 96], "cases": 3},
        "ddp": {"phantom_shape": [128, 128, 96], "overrides": {}},
    },
    "dry": {
        "device": "cpu",
        "feature_size": 12,
        "roi_size": [64, 64, 32],  # a 2 x 2 x 1 bottleneck: the smallest that trains
        "train_steps": 1,
        "train_warmup": 0,
        "train": {"crops": 1, "num_cases": 1, "num_workers": 0},
        "repeats": 1,
        # one window per timed call and no warm-up forward (the bundle's sw_batch_size is 4)
        "inference": {"warmup": False, "forward_batch": 1},
        "isolate": False,  # the SSL modes and the MSD task in the part's own process
        "ssl": {"roi_size": [64, 32, 32], "batch_size": 1, "num_samples": 2, "warmup": 0, "steps": 1},
        "msd": {
            "roi_size": [64, 64, 32],
            "num_samples": 1,
            "iterations": 1,
            "warmup": 0,
            "shape": [48, 48, 40],
            "cases": 2,
        },
        "ddp": {
            "phantom_shape": [48, 48, 32],
            "overrides": {"num_samples": 1, "sw_batch_size": 1, "use_checkpoint": False},
        },
    },
}


# ------------------------------------------------------------------------------------------ parts


def part_btcv_training(size: dict, out: Path, work: Path, image: str) -> dict[str, Any]:
    """BTCV training iterations of the bundle's trainer and precision rule; summary of speed, memory and the limit."""
    r = benchmark(
        "benchmark_finetune",
        device=size["device"],
        feature_size=size["feature_size"],
        roi_size=cube(size["roi_size"]),
        warmup=size["train_warmup"],
        steps=size["train_steps"],
        modes=["bundle"],
        output=str(out / "btcv_training.json"),
        work_dir=str(work / "btcv_training_cases"),
        isolate=size["isolate"],
        **size["train"],
    )
    (run,) = r["runs"]["bundle"]
    if "error" in run:
        raise RuntimeError(run["error"])
    return {
        "json": "btcv_training.json",
        "iterations_per_second": run["iterations_per_second"],
        "seconds_per_iteration": run["seconds_per_iteration"],
        "crops_per_iteration": run["crops_per_iteration"],
        "precision": run["settings"]["training_autocast"],
        "peak_memory_mib": run["peak_memory_mib"],
        "fraction_of_peak": run["limit"]["fraction_of_peak"],
        "losses": run["losses"],
    }


def part_btcv_inference(size: dict, out: Path, work: Path, image: str) -> dict[str, Any]:
    """The sample CT end to end, the bundle against the model zoo's settings (random weights: speed only)."""
    if not os.path.isfile(image):
        raise FileNotFoundError(
            f"image not found: {image} (the sample CT: python -m tools fetch_sample_ct --dest_dir gpu_inputs/sample_ct)"
        )
    r = benchmark(
        "benchmark_btcv",
        image=image,
        feature_size=size["feature_size"],
        roi_size=size["roi_size"],
        device=size["device"],
        output_json=str(out / "btcv_inference.json"),
        repeats=size["repeats"],
        **size["inference"],
        work_dir=str(work / "btcv_inference"),
    )
    e2e = r["end_to_end"]
    return {
        "json": "btcv_inference.json",
        "image": image,
        "seconds_per_volume": {k: v["total_s"] for k, v in e2e.items()},
        "sliding_window_s": {k: v["stages_s"]["sliding_window"] for k, v in e2e.items()},
        "windows": {k: v["windows"] for k, v in e2e.items()},
        "precision": {k: v["precision"] for k, v in e2e.items()},
        "fraction_of_peak": {k: v["limit"]["fraction_of_peak"] for k, v in e2e.items()},
        "speed_ratio_model_zoo_over_bundle": r["comparison"]["speed_ratio_model_zoo_over_bundle"],
        "agreement_bundle_vs_bundle_float32_ncdhw": r["comparison"]["agreement_bundle_vs_bundle_float32_ncdhw"],
    }


def part_ssl(size: dict, out: Path, work: Path, image: str) -> dict[str, Any]:
    """The pre-training step: the bundle (all views in one call, and one view batch per call) and the research way.

    The second bundle run sets ``view_chunk_size`` to one view batch (``batch_size`` x ``num_samples``
    views), the research code's network calls, with the proxy tasks on the device.
    """
    common = {"device": size["device"], "feature_size": size["feature_size"], "isolate": size["isolate"], **size["ssl"]}
    r = benchmark("benchmark_ssl", output=str(out / "ssl.json"), **common)
    chunk = int(size["ssl"]["batch_size"]) * int(size["ssl"]["num_samples"])
    chunked = benchmark(
        "benchmark_ssl", output=str(out / "ssl_chunked.json"), mode="bundle", view_chunk_size=chunk, **common
    )
    modes = {**r["modes"], f"bundle_view_chunk_{chunk}": chunked["modes"]["bundle"]}
    failed = {k: v["error"] for k, v in modes.items() if "error" in v}
    if failed:
        raise RuntimeError(f"SSL benchmark modes failed: {failed}")
    return {
        "json": "ssl.json",
        "json_chunked": "ssl_chunked.json",
        "view_chunk_size": chunk,
        "seconds_per_step": {k: v["seconds_per_iteration"] for k, v in modes.items()},
        "peak_memory_mib": {k: v["peak_memory_mib"] for k, v in modes.items()},
        "precision": {k: v["precision"] for k, v in modes.items()},
        "fraction_of_peak": {k: v["limit"]["fraction_of_peak"] for k, v in modes.items()},
        "views_per_step": r["settings"]["views"],
        "time_ratio_research_over_bundle": r["comparison"]["time_ratio_research_over_bundle"],
        "peak_memory_ratio_research_over_bundle": r["comparison"]["peak_memory_ratio_research_over_bundle"],
    }


def part_msd(size: dict, out: Path, work: Path, image: str) -> dict[str, Any]:
    """One 4-channel MSD task's training iterations (synthetic Task01_BrainTumour)."""
    r = benchmark(
        "benchmark_msd",
        tasks=[MSD_TASK],
        device=size["device"],
        feature_size=size["feature_size"],
        output=str(out / "msd.json"),
        isolate=size["isolate"],
        **size["msd"],
    )
    t = r["tasks"][MSD_TASK]
    if "error" in t:
        raise RuntimeError(t["error"])
    return {
        "json": "msd.json",
        "task": MSD_TASK,
        "in_channels": t["in_channels"],
        "roi_size": t["roi_size"],
        "crops_per_iteration": t["crops_per_iteration"],
        "iterations_per_second": t["iterations_per_second"],
        "seconds_per_iteration": t["seconds_per_iteration"],
        "precision": t["precision"],
        "peak_memory_mib": t["peak_memory_mib"],
        "fraction_of_peak": t["limit"]["fraction_of_peak"],
    }


def part_ddp(size: dict, out: Path, work: Path, image: str) -> dict[str, Any]:
    """``torchrun --standalone --nproc_per_node 1`` of BTCV train.json + multi_gpu_train.json, one epoch."""
    from tools.data.make_phantoms import write_phantom_dataset

    data = work / "ddp_data"
    pairs = write_phantom_dataset(data, num_cases=2, seed=3, shape=tuple(size["ddp"]["phantom_shape"]))
    items = [{"image": str(Path(i).relative_to(data)), "label": str(Path(lb).relative_to(data))} for i, lb in pairs]
    (data / "datalist.json").write_text(json.dumps({"training": items[:1], "validation": items[1:]}))
    root = work / "ddp_bundle_root"
    overrides = {
        "dataset_dir": str(data),
        "datalist": str(data / "datalist.json"),
        "bundle_root": str(root),
        "max_epochs": 1,
        "val_interval": 1,
        "num_workers": 0,
        "feature_size": size["feature_size"],
        "roi_size": cube(size["roi_size"]),
        **size["ddp"]["overrides"],
    }
    configs = [str(BTCV_DIR / "configs" / c) for c in ("train.json", "multi_gpu_train.json")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd = launcher + bundle_command(None, configs, overrides)[1:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(BTCV_DIR)]), "OMP_NUM_THREADS": "4"}
    t0 = time.perf_counter()
    rc = run_with_timeout(cmd, BTCV_DIR, env, None)
    seconds = time.perf_counter() - t0
    model = root / "models" / "model.pt"
    if rc != 0 or not model.is_file():
        raise RuntimeError(f"torchrun exited with {rc}; {model} {'exists' if model.is_file() else 'missing'}")
    return {"launcher": " ".join(launcher), "seconds": seconds, "checkpoint": str(model), "epochs": 1}


PART_FUNCTIONS = {
    "btcv_training": part_btcv_training,
    "btcv_inference": part_btcv_inference,
    "ssl": part_ssl,
    "msd": part_msd,
    "ddp": part_ddp,
}


def measure_part(part: str, size: str, output_dir: str, work_dir: str, image: str) -> dict[str, Any]:
    """One part, run in its own process by the harness: its summary, or ``{"error": why}`` if it failed."""
    import traceback

    out, work = Path(output_dir), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        return PART_FUNCTIONS[part](SIZES[size], out, work, image)
    except Exception as e:  # noqa: BLE001 (any failure is recorded in the report; the next part still runs)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------------ report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _rows(name: str, s: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, value, peak memory, fraction of peak) rows of one part's summary."""
    if name == "btcv_training":
        return [
            (
                f"BTCV training step ({s['crops_per_iteration']} crops, {s['precision']})",
                f"{num(s['iterations_per_second'], '.3f')} it/s ({num(s['seconds_per_iteration'], '.3f')} s/it)",
                f"{num(s['peak_memory_mib'], '.0f')} MiB",
                _pct(s["fraction_of_peak"]),
            )
        ]
    if name == "btcv_inference":
        return [
            (
                f"BTCV inference, sample CT end to end: {variant} ({s['precision'][variant]}, "
                f"{s['windows'][variant]} windows)",
                f"{seconds:.2f} s/volume (sliding window {s['sliding_window_s'][variant]:.2f} s)",
                "",
                _pct(s["fraction_of_peak"][variant]),
            )
            for variant, seconds in s["seconds_per_volume"].items()
        ]
    if name == "ssl":
        return [
            (
                f"SSL pre-training step, {mode} ({s['views_per_step']} views, {s['precision'][mode]})",
                f"{seconds:.3f} s/step",
                f"{num(s['peak_memory_mib'][mode], '.0f')} MiB",
                _pct(s["fraction_of_peak"][mode]),
            )
            for mode, seconds in s["seconds_per_step"].items()
        ]
    if name == "msd":
        return [
            (
                f"MSD {s['task']} training step ({s['in_channels']} channels, {s['crops_per_iteration']} crops of "
                f"{'x'.join(map(str, s['roi_size']))}, {s['precision']})",
                f"{num(s['iterations_per_second'], '.3f')} it/s ({num(s['seconds_per_iteration'], '.3f')} s/it)",
                f"{num(s['peak_memory_mib'], '.0f')} MiB",
                _pct(s["fraction_of_peak"]),
            )
        ]
    return [("torchrun DDP smoke run (1 process, BTCV, 1 epoch)", f"finished in {s['seconds']:.1f} s", "", "")]


def markdown(result: dict[str, Any]) -> str:
    """The markdown table of a gpu_check result, for the model cards."""
    m, peak = result["machine"], result["peak"]
    lines = [
        f"{machine_line(m)}; device {m['device']}, CUDA {m['cuda_version']}"
        + (" - DRY RUN: tiny sizes on the CPU, not figures for a model card" if result["settings"]["dry_run"] else ""),
        f"Peak: {peak['assumption'] if peak else 'unknown device'}",
        "",
        "| measurement | value | peak memory | fraction of peak FLOP/s | part (cap) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, part in result["parts"].items():
        where = f"{name} ({part['seconds']:.0f} of {part['cap_s']:.0f} s)"
        if part["status"] != "ok":
            lines.append(f"| {name} | {part['status'].upper()}: {part['error']} | | | {where} |")
            continue
        lines += [f"| {a} | {b} | {c} | {d} | {where} |" for a, b, c, d in _rows(name, part["summary"])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def run_part(name: str, size: str, out: Path, work: Path, image: str, cap_s: float) -> dict[str, Any]:
    """One part in a fresh process under its time cap; its status, seconds and summary (or error)."""
    say(f"{name}: cap {cap_s:.0f} s")
    args = {"part": name, "size": size, "output_dir": str(out), "work_dir": str(work / name), "image": image}
    t0 = time.perf_counter()
    r = run_one(MEASURE, args, name, timeout_s=cap_s)
    seconds = time.perf_counter() - t0
    if "error" in r:
        status = "timeout" if r.get("timed_out") else "failed"
        say(f"{name}: {status} after {seconds:.0f} s: {r['error']}")
        return {"status": status, "seconds": seconds, "cap_s": cap_s, "error": r["error"]}
    say(f"{name}: ok in {seconds:.0f} s")
    return {"status": "ok", "seconds": seconds, "cap_s": cap_s, "summary": r}


def run_check(
    output_dir: str = "gpu_check_out",
    dry_run: bool = False,
    image: str | None = None,
    parts: str | list[str] | tuple[str, ...] = PARTS,
    work_dir: str | None = None,
    budget_s: float = 450.0,
    cap_scale: float = 1.0,
    caps: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run the parts, each under its cap, within ``budget_s``; write gpu_check.json and gpu_check.md.

    Args:
        output_dir: where gpu_check.json, gpu_check.md and each benchmark's JSON are written.
        dry_run: tiny sizes on the CPU (same code paths), with a phantom instead of the sample CT.
        image: the CT for the inference part (default gpu_inputs/sample_ct/example_ct.nii.gz).
        parts: which parts to run (default all: btcv_training, btcv_inference, ssl, msd, ddp).
        work_dir: scratch folder for label maps, phantoms and checkpoints (default <output_dir>/../gpu_check_work).
        budget_s: the whole run's time; a part's cap is cut to what is left of it.
        cap_scale: multiply every part's cap (e.g. on a slower GPU).
        caps: seconds per part instead of the default caps (and their scale), e.g. "{'ssl': 120}".
    """
    parts = [parts] if isinstance(parts, str) else list(parts)
    unknown = [p for p in [*parts, *(caps or {})] if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
    if not dry_run and not _cuda():
        raise ValueError("no CUDA device here: the full check is for a GPU; --dry_run True runs it small on the CPU")
    size = "dry" if dry_run else "full"
    out = Path(output_dir).resolve()
    work = Path(work_dir).resolve() if work_dir else out.parent / f"{out.name}_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if dry_run and image is None:
        from tools.data.make_phantoms import write_phantom_dataset

        image = str(write_phantom_dataset(work / "phantom", num_cases=1, seed=5, shape=(48, 48, 32))[0][0])
    image = str(image or DEFAULT_IMAGE)
    device = SIZES[size]["device"]
    settings = {"dry_run": bool(dry_run), "size": SIZES[size], "image": image, "budget_s": float(budget_s)}
    result = envelope(device, settings) | {"parts": {}}
    start = time.perf_counter()
    for name in parts:
        left = budget_s - (time.perf_counter() - start)
        if left < 5:
            result["parts"][name] = {"status": "skipped", "seconds": 0.0, "cap_s": 0.0, "error": "budget spent"}
            continue
        cap = min(float((caps or {}).get(name, CAPS_S[name] * float(cap_scale))), left)
        result["parts"][name] = run_part(name, size, out, work, image, cap)
    result["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(result, indent=4) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(run_check, report=markdown)
