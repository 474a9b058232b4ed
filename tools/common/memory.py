"""Peak and current resident memory of this process, from /proc and ``getrusage``."""

from __future__ import annotations

import resource
import sys

MIB = 1024.0 * 1024.0


def status_kib(field: str) -> float | None:
    """A ``Vm*`` field of /proc/self/status in KiB (None where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def status_mib(field: str) -> float | None:
    """A ``Vm*`` field of /proc/self/status in MiB (None where unavailable)."""
    kib = status_kib(field)
    return kib / 1024.0 if kib is not None else None


def ru_maxrss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0


def memory_snapshot() -> dict[str, float | None]:
    """``ru_maxrss`` and, on Linux, ``VmHWM`` (peak RSS of the current address space) in MiB."""
    return {"ru_maxrss_mib": ru_maxrss_mib(), "vm_hwm_mib": status_mib("VmHWM")}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmHWM") is not None
    except OSError:
        return False
