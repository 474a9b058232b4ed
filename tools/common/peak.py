"""The limit: FLOPs of a network call (PyTorch's flop counter) and the device's peak FLOP/s.

* ``network_flops``: the FLOPs ``torch.utils.flop_counter.FlopCounterMode`` counts for one call of a
  network (optionally with its backward) on an input shape, run on a ``meta`` copy of the network:
  no arithmetic is done, so a full-size count takes seconds on any machine. The counter counts
  convolutions, matrix products and attention (2 FLOPs per multiply-add); norms, activations and
  other elementwise work are not counted.
* ``cpu_peak``: the CPU's peak from ``lscpu`` / ``/proc/cpuinfo`` text: cores x clock x FLOPs per
  cycle of its widest vector ISA, stating the assumptions (FMA units per core, which clock).
* ``gpu_peak``: a datasheet table keyed by the device name (dense figures, no sparsity).
* ``device_peak`` / ``peak_flops`` / ``limit``: the peak of the device a benchmark ran on, the
  figure for one precision, and achieved FLOP/s with its fraction of that peak.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from tools.common.machine import lscpu_text, parse_fields

TERA = 1e12

# FLOPs per cycle per core (2 per FMA) of each ISA, with the assumption stated in the output.
CPU_ISA = (
    # (name, required flags, fp32 FLOPs/cycle, assumption)
    ("AVX-512", ("avx512f",), 64, "2 FMA units x 16 fp32 lanes x 2 FLOPs (AVX-512; 1-FMA SKUs have half)"),
    ("AVX2+FMA", ("avx2", "fma"), 32, "2 FMA units x 8 fp32 lanes x 2 FLOPs (AVX2)"),
    ("AVX", ("avx",), 16, "1 add + 1 multiply unit x 8 fp32 lanes (AVX, no FMA)"),
    ("SSE2", (), 8, "1 add + 1 multiply unit x 4 fp32 lanes (SSE2)"),
)
ZEN4_AVX512 = (32, "AMD AVX-512 on 256-bit units: 2 FMA x 8 fp32 lanes x 2 FLOPs (Zen 4 double-pumps 512-bit)")
AMX_BF16 = (1024, "AMX: 1 TMUL unit x 1024 bf16 FLOPs per cycle (Intel's figure: 512 bf16 multiply-adds/cycle/core)")
AVX512_BF16 = (128, "AVX-512 bf16 (VDPBF16PS): 2 FMA units x 32 bf16 pairs x 2 FLOPs")

GPU_SOURCES = {
    "H100": "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), dense",
    "H200": "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), dense",
    "A100": "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), dense",
}
# (substring of torch.cuda.get_device_name, model, source key, TFLOP/s dense: fp32, tf32, bf16, fp16);
# the first match wins, so the specific names come first. The datasheets give the tensor-core figures
# "with sparsity"; dense is half of those.
GPU_PEAKS = (
    ("H200 NVL", "H200 NVL", "H200", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    ("H200", "H200 SXM", "H200", {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.5, "float16": 989.5}),
    ("H100 NVL", "H100 NVL", "H100", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    ("H100 PCIe", "H100 PCIe", "H100", {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0}),
    ("H100", "H100 SXM", "H100", {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.5, "float16": 989.5}),
    ("A100", "A100 (SXM4 and PCIe)", "A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
)


# ------------------------------------------------------------------------------------------ FLOPs


def _outputs_sum(output: Any) -> torch.Tensor:
    """The sum of every floating tensor in a network's output (a tensor, or a tuple / list / dict of them)."""
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    items = output.values() if isinstance(output, dict) else output
    return sum(_outputs_sum(o) for o in items if isinstance(o, (torch.Tensor, tuple, list, dict)))


def network_flops(network: torch.nn.Module, input_shape: Sequence[int], backward: bool = False) -> int:
    """FLOPs PyTorch's flop counter counts for ``network(x)`` with ``x`` of ``input_shape`` (and its backward).

    Counted on a ``meta`` copy in the network's own mode (train / eval): no arithmetic runs and the
    network itself is untouched. A ``DistributedDataParallel`` wrapper is looked through.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module = getattr(network, "module", network)
    meta = copy.deepcopy(module).to("meta")
    x = torch.zeros(tuple(int(s) for s in input_shape), device="meta")
    with FlopCounterMode(display=False) as counter:
        if backward:
            _outputs_sum(meta(x)).backward()
        else:
            with torch.no_grad():
                meta(x)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ CPU peak


def _cpu_clock_ghz(lscpu: dict[str, str], cpuinfo: dict[str, str]) -> tuple[float | None, str]:
    """The clock the peak assumes, and where it came from: max, else nominal, else current, else BogoMIPS / 2."""
    if lscpu.get("CPU max MHz"):
        return float(lscpu["CPU max MHz"]) / 1000.0, "lscpu 'CPU max MHz' (maximum boost clock; all-core is lower)"
    model = lscpu.get("Model name") or cpuinfo.get("model name") or ""
    nominal = re.search(r"@\s*([\d.]+)\s*GHz", model)
    if nominal:
        return float(nominal.group(1)), "nominal clock in the model name"
    if cpuinfo.get("cpu MHz"):
        return float(cpuinfo["cpu MHz"]) / 1000.0, "/proc/cpuinfo 'cpu MHz' (current clock)"
    bogomips = lscpu.get("BogoMIPS") or cpuinfo.get("bogomips")
    if bogomips:
        return float(bogomips) / 2000.0, "BogoMIPS / 2 (x86 BogoMIPS is twice the clock)"
    return None, "unknown"


def _cpu_cores(lscpu: dict[str, str], usable: int | None) -> tuple[int, str]:
    """Physical cores the process can use: sockets x cores per socket, capped by the usable logical CPUs."""
    try:
        physical = int(lscpu["Socket(s)"]) * int(lscpu["Core(s) per socket"])
    except (KeyError, ValueError):
        physical = int(lscpu.get("CPU(s)") or os.cpu_count() or 1)
    threads = int(lscpu.get("Thread(s) per core") or 1)
    cores = physical if usable is None else max(1, min(physical, int(usable) // max(threads, 1) or 1))
    return cores, f"{physical} physical cores (lscpu sockets x cores per socket), {usable} usable logical CPUs"


def cpu_peak(lscpu: str | None = None, cpuinfo: str | None = None, usable_cpus: int | None = None) -> dict[str, Any]:
    """The CPU's peak FLOP/s in float32 and bfloat16 from ``lscpu`` and ``/proc/cpuinfo`` text.

    ``lscpu`` / ``cpuinfo`` default to this machine's (``lscpu`` run in the C locale); ``usable_cpus``
    defaults to this process's CPU affinity. Peak = cores x clock x FLOPs per cycle, with the ISA's
    FLOPs per cycle and the clock's source stated under ``assumption``.
    """
    own = lscpu is None
    if own:
        lscpu = lscpu_text()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read().split("\n\n")[0]
        except OSError:
            cpuinfo = ""
    if usable_cpus is None and own:
        usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fields, info = parse_fields(lscpu), parse_fields(cpuinfo)
    flags = set((fields.get("Flags") or info.get("flags") or "").split())
    amd = "AMD" in (fields.get("Vendor ID") or info.get("vendor_id") or "")
    isa, fp32_cycle, isa_note = next((n, f, a) for n, req, f, a in CPU_ISA if all(r in flags for r in req))
    if isa == "AVX-512" and amd:
        fp32_cycle, isa_note = ZEN4_AVX512
    bf16_cycle, bf16_note = fp32_cycle, "no native bf16: bf16 runs at the fp32 rate or slower"
    if "amx_bf16" in flags:
        bf16_cycle, bf16_note = AMX_BF16
    elif "avx512_bf16" in flags:
        bf16_cycle, bf16_note = AVX512_BF16
    clock, clock_note = _cpu_clock_ghz(fields, info)
    cores, cores_note = _cpu_cores(fields, usable_cpus)
    per_core = (clock or 0.0) * 1e9
    return {
        "kind": "cpu",
        "model": fields.get("Model name") or info.get("model name") or "unknown",
        "cores": cores,
        "clock_ghz": clock,
        "isa": isa,
        "fp32_flops_per_cycle_per_core": fp32_cycle,
        "bf16_flops_per_cycle_per_core": bf16_cycle,
        "peak_flops": {
            "float32": cores * per_core * fp32_cycle if clock else None,
            "bfloat16": cores * per_core * bf16_cycle if clock else None,
        },
        "assumption": f"cores x clock x FLOPs/cycle; cores: {cores_note}; clock: {clock_note}; "
        f"fp32: {isa_note}; bf16: {bf16_note}",
    }


# ------------------------------------------------------------------------------------------ GPU peak


def gpu_peak(name: str) -> dict[str, Any] | None:
    """The datasheet peak of a GPU named ``name`` (``torch.cuda.get_device_name``), None if not in the table."""
    for key, model, source, tflops in GPU_PEAKS:
        if key.lower() in name.lower():
            return {
                "kind": "gpu",
                "model": model,
                "device_name": name,
                "peak_flops": {p: v * TERA for p, v in tflops.items()},
                "assumption": f"datasheet dense figures, boost clock: {GPU_SOURCES[source]}",
            }
    return None


def device_peak(device: torch.device | str) -> dict[str, Any] | None:
    """The peak of ``device``: ``cpu_peak()`` on a CPU, the datasheet table on CUDA (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return cpu_peak() if device.type == "cpu" else None


def peak_precision(device_type: str, precision: str) -> str:
    """The peak figure a computation in ``precision`` runs against: float32 convolutions on CUDA use TF32.

    cuDNN convolutions (most of SwinUNETR's FLOPs) use TF32 tensor cores by default
    (``torch.backends.cudnn.allow_tf32``); on a CPU float16 has no peak figure of its own here.
    """
    if device_type == "cuda" and precision == "float32" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    if device_type == "cpu" and precision == "float16":
        return "float32"
    return precision


def limit(flops: float | None, seconds: float | None, peak: dict[str, Any] | None, precision: str) -> dict[str, Any]:
    """Achieved FLOP/s of ``flops`` done in ``seconds``, and its fraction of ``peak`` in ``precision``."""
    achieved = flops / seconds if flops and seconds and seconds > 0 else None
    kind = peak_precision(peak["kind"] if peak else "cpu", precision)
    peak_value = (peak or {}).get("peak_flops", {}).get(kind)
    return {
        "flops": flops,
        "seconds": seconds,
        "achieved_flops_per_s": achieved,
        "peak_precision": kind,
        "peak_flops_per_s": peak_value,
        "fraction_of_peak": achieved / peak_value if achieved and peak_value else None,
    }


def format_limit(row: dict[str, Any] | None) -> str:
    """``12.3 GFLOP/s = 4.5 % of the bfloat16 peak (0.27 TFLOP/s)`` for a ``limit`` row."""
    if not row or row.get("achieved_flops_per_s") is None:
        return "n/a"
    text = f"{row['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"
    if row.get("fraction_of_peak") is not None:
        text += (
            f" = {100 * row['fraction_of_peak']:.1f} % of the {row['peak_precision']} peak "
            f"({row['peak_flops_per_s'] / TERA:.2f} TFLOP/s)"
        )
    return text
