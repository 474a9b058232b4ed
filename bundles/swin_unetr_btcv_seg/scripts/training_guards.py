# Generated from bundles/common/scripts/training_guards.py: edit that, then run python -m tools sync_bundle_code
"""Training stops at the first non-finite loss or gradient, before the optimiser step, and says where and how."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from .bundle_logger import logger

__all__ = ["NonFiniteTrainingError", "StopOnNonFinite", "check_finite_step", "nonfinite_gradients"]

_LISTED = 4


class NonFiniteTrainingError(RuntimeError):
    """A training iteration produced a non-finite loss or gradient; the weights were not updated with it."""


def nonfinite_gradients(network: nn.Module) -> list[str]:
    """Names of ``network``'s parameters whose gradient holds a NaN or an infinity."""
    named = [(name, p.grad) for name, p in network.named_parameters() if p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(grad).all() for _, grad in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_finite_step(
    loss: torch.Tensor | float,
    network: nn.Module,
    iteration: int,
    epoch: int | None,
    forward: str,
    check_gradients: bool = True,
) -> None:
    """Raise ``NonFiniteTrainingError`` if ``loss`` (or, with ``check_gradients``, a gradient) is not finite.

    Call it after the backward pass and before the optimiser step, so that the weights stay those of
    the last finite iteration. ``forward`` says how the forward ran (precision, attention path).
    """
    value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    if value == value and abs(value) != float("inf"):
        bad = nonfinite_gradients(network) if check_gradients else []
        if not bad:
            return
        listed = ", ".join(bad[:_LISTED]) + (", ..." if len(bad) > _LISTED else "")
        what = f"{len(bad)} gradient tensor(s) hold NaN or inf ({listed})"
    else:
        what = f"the loss is {value}"
    message = (
        f"training stopped at iteration {iteration}{'' if epoch is None else f' (epoch {epoch})'}: {what}; "
        f"training forward {forward}. "
        f"The optimiser step was not taken, so the weights are those after iteration {iteration - 1}: the "
        "checkpoint_last.pt this run writes as it stops, in ckpt_dir, holds them. To go on, resume from it "
        "(resume_from latest) with a lower learning_rate, or train in float32 (amp_cpu_training false on a CPU, "
        "amp false on a GPU)."
    )
    logger.error(message)
    raise NonFiniteTrainingError(message)


class StopOnNonFinite:
    """Ignite handler for MONAI's ``SupervisedTrainer``: ``check_finite_step`` after each backward pass.

    Attached to ``IterationEvents.BACKWARD_COMPLETED``, which the trainer fires before its optimiser
    step. With CUDA AMP the gradient scaler skips steps with inf/NaN gradients by design, so there
    only the loss is checked. The forward's description comes from the trainer's inferer when it has
    one (``AutocastSimpleInferer.description``).
    """

    def attach(self, engine: Engine) -> None:
        """Check every iteration of ``engine`` after its backward pass."""
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Raise ``NonFiniteTrainingError`` when this iteration's loss or a gradient is not finite."""
        output: Any = engine.state.output
        forward = getattr(getattr(engine, "inferer", None), "description", None) or "as configured"
        check_finite_step(
            output[CommonKeys.LOSS],
            engine.network,
            engine.state.iteration,
            engine.state.epoch,
            forward,
            check_gradients=not (getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None),
        )
