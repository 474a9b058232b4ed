"""Timing the iterations of an ignite engine (a bundle's trainer) as the benchmarks do."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tools.common.timing import sync


def loss_of(output: Any) -> float:
    """The loss of a SupervisedTrainer iteration output (a dict, or a decollated list of dicts)."""
    item = output[0] if isinstance(output, (list, tuple)) else output
    return float(item["loss"])


def time_iterations(
    engine: Any, device: torch.device, on_iteration: Callable[[Any, list[float]], None] | None = None
) -> list[float]:
    """Time each iteration of ``engine``, ``ITERATION_STARTED`` to ``ITERATION_COMPLETED`` (synchronised on CUDA).

    Returns the list the events fill while the engine runs; ``on_iteration(engine, times)`` is called
    after each iteration's time is appended.
    """
    from ignite.engine import Events

    times: list[float] = []
    started: dict[str, float] = {}

    @engine.on(Events.ITERATION_STARTED)
    def _start(engine: Any) -> None:
        sync(device)
        started["t"] = time.perf_counter()

    @engine.on(Events.ITERATION_COMPLETED)
    def _stop(engine: Any) -> None:
        sync(device)
        times.append(time.perf_counter() - started["t"])
        if on_iteration is not None:
            on_iteration(engine, times)

    return times
