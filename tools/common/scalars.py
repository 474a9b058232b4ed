"""Scalars from TensorBoard event files, as the bundles' handlers write them."""

from __future__ import annotations

import os
from pathlib import Path


def event_files(run_dir: str | os.PathLike) -> list[Path]:
    """The event files under ``run_dir`` (or ``run_dir`` itself if it is one), oldest first."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return [run_dir]
    if not run_dir.is_dir():
        return []
    files = [p for p in run_dir.rglob("*") if p.is_file() and "tfevents" in p.name]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under ``run_dir``: ``{tag: [(step, value), ...]}`` by step.

    A bundle may write training and validation scalars from two writers (two event files in one
    folder); each file is read on its own and the series merged. If a step appears twice for a tag
    (a resumed run), the value from the more recent file wins. Raises FileNotFoundError when
    ``run_dir`` holds no event file.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = event_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files (*tfevents*) under {run_dir}")
    merged: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = merged.setdefault(tag, {})
            for event in acc.Scalars(tag):
                series[int(event.step)] = float(event.value)
    return {tag: sorted(series.items()) for tag, series in merged.items()}


def scalar_series(run_dir: str | os.PathLike, tag: str) -> list[tuple[int, float]]:
    """(step, value) of scalar ``tag`` under ``run_dir``, by step; empty if there are no events or no such tag."""
    try:
        return read_scalars(run_dir).get(tag, [])
    except FileNotFoundError:
        return []
