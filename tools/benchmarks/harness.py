"""The benchmarks' one harness: what every benchmark shares, so that each states only what it measures.

* ``training_precision`` / ``trainer_precision``: the one precision rule every benchmark asks (the
  bundles' own, ``bundles/common/scripts/precision.py``): float16 with AMP on CUDA, bfloat16 on a CPU
  with native bf16 kernels (AVX-512 bf16 / AMX) where the bundle autocasts, else float32. The
  fraction of peak is taken against the peak of that precision.
* ``run_one`` / ``run_modes``: a measurement (``"tools.benchmarks.<tool>:<function>"``, called with
  keyword arguments and returning a JSON-able dict) in a fresh Python process (its own peak RSS, its
  own process-wide settings) or in this one; modes x repeats interleaved (mode a, mode b, mode a, ...)
  so that a load change on a shared machine hits every mode alike. ``child`` is the one entry point
  of those processes.
* ``peak_memory``: a run's peak memory fields, read right after its timed steps (CUDA
  ``max_memory_allocated`` on a GPU, else the process peak RSS, ``ru_maxrss``).
* ``envelope`` and ``write_result``: the result's machine (CPU, cores, GPU, versions, load), the
  device's peak FLOP/s and the settings; the JSON file.
* ``machine_line`` and ``command``: the report's ``Machine: ...`` line, and a benchmark's command
  line (``fire``) printing its report.
* ``benchmark``: a benchmark's entry point (its ``run_benchmark``, what its command line runs) by
  name, for a tool that composes benchmarks (``gpu_check``).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tools.common.machine import machine_info, native_bf16
from tools.common.memory import MIB
from tools.common.peak import device_peak
from tools.common.processes import run_child
from tools.common.timing import say

__all__ = [
    "training_precision",
    "trainer_precision",
    "precision_label",
    "run_one",
    "run_modes",
    "child",
    "peak_memory",
    "envelope",
    "write_result",
    "machine_line",
    "command",
    "benchmark",
    "BENCHMARKS",
]

# The benchmarks by name: each module's ``run_benchmark`` is its entry point (its command line).
BENCHMARKS = ("benchmark_btcv", "benchmark_finetune", "benchmark_msd", "benchmark_ssl")


# ------------------------------------------------------------------------------------------ precision


def training_precision(device: torch.device | str, autocast: bool = True) -> str:
    """The precision a bundle computes its forward in on ``device`` with its reduced precision on (``autocast``).

    float16 on CUDA; bfloat16 on a CPU with native bf16 kernels (the bundles' ``amp_cpu_training``
    rule: elsewhere bf16 Conv3d is far slower than float32); float32 otherwise or with ``autocast`` off.
    """
    kind = torch.device(device).type
    if not autocast:
        return "float32"
    if kind == "cuda":
        return "float16"
    return "bfloat16" if kind == "cpu" and native_bf16() else "float32"


def precision_label(precision: str) -> str:
    """``bfloat16 autocast`` / ``float16 autocast`` for a reduced precision, ``float32`` as it is."""
    return precision if precision == "float32" else f"{precision} autocast"


def trainer_precision(trainer: Any, device: torch.device | str) -> str:
    """The precision of a bundle ``SupervisedTrainer``'s forward: its amp (CUDA) or its training inferer's autocast."""
    inferer_autocast = bool(getattr(getattr(trainer, "inferer", None), "autocast", False))
    if torch.device(device).type == "cuda":
        return training_precision(device, bool(getattr(trainer, "amp", False)) or inferer_autocast)
    return training_precision(device, inferer_autocast)


# ------------------------------------------------------------------------------------------ processes


def _function(measure: str) -> Callable[..., dict[str, Any]]:
    module, name = measure.split(":")
    return getattr(importlib.import_module(module), name)


def child(args_json: str, result_path: str) -> None:
    """Entry point of every measuring process: ``{"measure": "module:function", "kwargs": {...}}`` -> JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = json.loads(args_json)
    Path(result_path).write_text(json.dumps(_function(a["measure"])(**a["kwargs"]), indent=2))


def run_one(
    measure: str, kwargs: dict[str, Any], label: str, isolate: bool = True, timeout_s: float | None = None
) -> dict[str, Any]:
    """``measure(**kwargs)`` in a fresh process (``isolate``) or here; ``{"error": ...}`` if the process failed."""
    if not isolate:
        return _function(measure)(**kwargs)
    return run_child("tools.benchmarks.harness", "child", {"measure": measure, "kwargs": kwargs}, label, timeout_s)


def run_modes(
    measure: str,
    modes: Sequence[str],
    kwargs: dict[str, Any],
    key: str = "mode",
    repeats: int = 1,
    isolate: bool = True,
    timeout_s: float | None = None,
    what: str = "",
) -> dict[str, list[dict[str, Any]]]:
    """Each mode (passed as ``key``) ``repeats`` times, interleaved; every run's result by mode, in order."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for repeat in range(int(repeats)):
        for mode in modes:
            where = "fresh subprocess" if isolate else "in process"
            say(f"repeat {repeat + 1}/{repeats}, {mode}: {where}{', ' + what if what else ''}")
            run = run_one(measure, {**kwargs, key: mode}, mode, isolate, timeout_s)
            runs[mode].append({key: mode, **run} if "error" in run else run)
    return runs


# ------------------------------------------------------------------------------------------ result


def peak_memory(device: torch.device | str, peak_rss_mib: float, steps: str, process: str) -> dict[str, Any]:
    """The peak memory of a run: CUDA ``max_memory_allocated`` over its ``steps`` on a GPU, else ``peak_rss_mib``.

    Call it right after the timed steps, before anything else runs on the device (a FLOP count does).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    allocated = torch.cuda.max_memory_allocated(dev) / MIB if cuda else None
    return {
        "peak_memory_mib": allocated if cuda else peak_rss_mib,
        "peak_memory_kind": (
            f"torch.cuda.max_memory_allocated over the {steps}"
            if cuda
            else f"peak RSS of this {process}'s process (resource.getrusage ru_maxrss)"
        ),
        "cuda_max_memory_allocated_mib": allocated,
        "cuda_max_memory_reserved_mib": torch.cuda.max_memory_reserved(dev) / MIB if cuda else None,
    }


def envelope(device: torch.device | str, settings: dict[str, Any], **machine_extra: Any) -> dict[str, Any]:
    """A result's common part: the machine (with its load average), the device's peak FLOP/s, the settings."""
    return {"machine": {**machine_info(device), **machine_extra}, "peak": device_peak(device), "settings": settings}


def write_result(result: dict[str, Any], output: str | Path) -> dict[str, Any]:
    """Write ``result`` as JSON to ``output`` (folders made); return it with ``output`` added (not in the file)."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=4) + "\n")
    say(f"wrote {output}")
    result["output"] = str(output)
    return result


# ------------------------------------------------------------------------------------------ report


def machine_line(m: dict[str, Any]) -> str:
    """The report's ``Machine: ...`` line of a result's ``machine``."""
    return (
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable cores ({m['torch_threads']} torch threads), "
        f"CPU capability {m['cpu_capability']}, native bf16 {m['native_bf16']}, GPU {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, monai {m['monai']}"
    )


def command(run: Callable[..., dict[str, Any]], format_report: Callable[[dict[str, Any]], str], **options: Any) -> None:
    """``run`` as its command line: its flags, then a blank line and ``format_report`` of its result."""
    from tools.common.cli import fire_command

    fire_command(run, report=lambda result: "\n" + format_report(result), **options)


def benchmark(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run benchmark ``name`` (one of ``BENCHMARKS``) as its command line would, in this process; its result."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose among {BENCHMARKS}")
    return importlib.import_module(f"tools.benchmarks.{name}").run_benchmark(**kwargs)
