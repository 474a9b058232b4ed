# Generated from bundles/common/scripts/allocator.py: edit that, then run python -m tools sync_bundle_code
"""Keep freed CPU memory for reuse instead of handing it back to the kernel (glibc malloc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from .bundle_logger import logger

__all__ = ["reuse_cpu_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied: bool | None = None


def reuse_cpu_memory(enabled: bool = True) -> bool:
    """Make glibc serve large allocations from its heap and keep freed memory for reuse; True if applied.

    By default glibc maps every allocation above 32 MiB (most activation tensors of a 3D network)
    with ``mmap`` and unmaps it when freed, so every forward pass page-faults its working set in
    again, a large share of a Swin UNETR forward pass spent in the kernel on a CPU. With
    ``mmap`` off for allocations and trimming off, freed blocks are reused. The process then keeps its
    peak resident memory until it exits. Process-wide and idempotent; a no-op (False) where the C
    library is not glibc.
    """
    global _applied
    if not enabled or _applied is not None:
        return bool(enabled and _applied)
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        logger.info("CPU memory: not glibc, allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    gnu_get_libc_version.restype = ctypes.c_char_p
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        logger.warning("CPU memory: glibc mallopt refused the settings; allocator left as it is")
        return False
    _applied = True
    logger.info(
        f"CPU memory: glibc {gnu_get_libc_version().decode()} keeps freed memory for reuse "
        "(no mmap per tensor, no trimming); resident memory stays at its peak"
    )
    return True
