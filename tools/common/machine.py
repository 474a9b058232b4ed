"""A description of the machine and software that measured numbers were taken on."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

import torch


def lscpu_text() -> str:
    """``lscpu``'s output in the C locale (empty where the command is missing or fails)."""
    if not shutil.which("lscpu"):
        return ""
    try:
        return subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_fields(text: str) -> dict[str, str]:
    """``key: value`` lines (``lscpu``, one processor of ``/proc/cpuinfo``) as a dict; the first of a key wins."""
    fields: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in text.splitlines()):
        if value.strip():
            fields.setdefault(key.strip(), value.strip())
    return fields


def _lscpu() -> dict[str, str]:
    """``lscpu``'s fields (empty where the command is missing or fails)."""
    return parse_fields(lscpu_text())


def _cpuinfo_field(prefix: str) -> str | None:
    """The first ``/proc/cpuinfo`` value whose key starts with ``prefix`` (None where unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU model name: /proc/cpuinfo, else ``lscpu``, else platform.processor()."""
    return _cpuinfo_field("model name") or _lscpu().get("Model name") or platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """CPU feature flags: /proc/cpuinfo, else ``lscpu`` (empty where unavailable)."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        flags = _lscpu().get("Flags", "")
    return set(flags.split())


def native_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 bf16 / AMX): the bundles' CPU autocast rule."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute system load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Describe the machine and software the numbers were taken on (``device``: default cuda if available)."""
    import monai

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")),
        "native_bf16": native_bf16(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average_1_5_15": load_average(),
    }
