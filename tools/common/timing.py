"""Devices, synchronised timing and progress lines of the measuring tools."""

from __future__ import annotations

import time

import torch


def say(message: str) -> None:
    """Print one progress line with the wall-clock time (stages take minutes on a CPU)."""
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that a timer reads the real end of a stage."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch.device; None or "" means cuda if available, else cpu."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
