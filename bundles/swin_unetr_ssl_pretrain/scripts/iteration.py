"""The pre-training iteration for MONAI's SupervisedTrainer / SupervisedEvaluator, and its run controls."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Average

from .bf16_conv_guard import bf16_guard_note, guard_bf16_conv_gradients
from .bundle_logger import logger
from .losses import LOSS_TERMS
from .precision import autocast_dtype
from .proxy_tasks import ProxyTaskViews
from .training_guards import check_finite_step
from .window_attention import trains_fused

__all__ = [
    "CKPT_METRIC_PRESETS",
    "VALIDATION_METRICS",
    "SSLTrainIteration",
    "SSLValIteration",
    "forward_views",
    "loss_terms",
    "lower_is_better",
    "validation_metrics",
]

LOGGED = ("loss", *LOSS_TERMS)
VALIDATION_METRICS = tuple(f"val_{name}" for name in LOGGED)
# named choices of ckpt_metric: "research" is the research code's (validation reconstruction L1 alone)
CKPT_METRIC_PRESETS = {"research": "val_inpaint_loss", "bundle": "val_loss"}


def _images(batchdata: Any, engine: Engine) -> torch.Tensor:
    images = batchdata["image"] if isinstance(batchdata, dict) else batchdata
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    return images.to(engine.state.device, non_blocking=getattr(engine, "non_blocking", False))


def _autocast(device: torch.device, enabled: bool, cpu_enabled: bool = False):
    """fp16 autocast on CUDA when ``enabled``; bf16 on CPUs with native bf16 when ``cpu_enabled``; else a no-op."""
    cpu_dtype = autocast_dtype("cpu") if device.type == "cpu" and cpu_enabled else None
    if cpu_dtype is not None:
        return torch.autocast("cpu", dtype=cpu_dtype)
    return torch.autocast("cuda", dtype=torch.float16, enabled=bool(enabled) and device.type == "cuda")


def _float32(outputs: Any) -> Any:
    """The network's outputs (a tuple of tensors), reduced-precision fields in float32: losses at full precision."""
    return type(outputs)(*(o.float() if o.dtype in (torch.bfloat16, torch.float16) else o for o in outputs))


def forward_views(network: torch.nn.Module, inputs: torch.Tensor, chunk_size: int = 0) -> Any:
    """The network's outputs for all views: one call (``chunk_size`` 0), or ``chunk_size`` views per call.

    Chunked, the outputs of the calls are concatenated field by field (``SSLOutputs`` or a tuple), so
    the loss sees the same 2B views in the same order. SwinSSLNet has no layer that mixes the views
    of a batch (its norms are per view), so loss and gradients are those of one call, up to the
    order of floating-point sums; autograd keeps every chunk's activations for the one backward,
    while each operation works on fewer views at a time.
    """
    chunk_size = int(chunk_size)
    if chunk_size < 0:
        raise ValueError(f"view_chunk_size must be >= 0 (0: all views in one forward), got {chunk_size}.")
    if chunk_size == 0 or chunk_size >= inputs.shape[0]:
        return network(inputs)
    parts = [network(chunk) for chunk in inputs.split(chunk_size)]
    return type(parts[0])(*(torch.cat(field) for field in zip(*parts)))


def _scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(losses[name].detach()) for name in LOGGED}


class SSLTrainIteration:
    """One pre-training iteration: proxy tasks on the batch's device, forward, weighted loss, backward.

    Use as ``SupervisedTrainer(iteration_update=...)``. With ``accumulation_steps`` = A, gradients of
    A iterations are summed (each loss divided by A) before one optimiser step; the learning-rate
    scheduler and the AMP ``scaler`` step with the optimiser, so schedules count optimiser steps.
    ``view_chunk_size`` > 0 sends the views through the network that many at a time
    (``forward_views``); the proxy tasks still run once on the whole batch, on its device.
    ``cpu_autocast`` runs the forward in bfloat16 on CPUs with native bf16 (AVX-512 bf16/AMX; no
    scaler needed, bf16 has float32's range) and the losses in float32; elsewhere it does nothing.
    In bf16, convolutions on inputs shallower than their kernel run in float32 (``bf16_conv_guard``).
    A non-finite loss (or, without the CUDA gradient scaler, gradient) stops training before the
    optimiser step (``training_guards.check_finite_step``).
    Returns the total and each loss term as floats (for StatsHandler/TensorBoard), plus ``step``.
    """

    def __init__(
        self,
        proxy_tasks: ProxyTaskViews,
        loss: torch.nn.Module,
        accumulation_steps: int = 1,
        lr_scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        amp: bool = False,
        max_grad_norm: float = 0.0,
        view_chunk_size: int = 0,
        cpu_autocast: bool = False,
    ) -> None:
        if int(view_chunk_size) < 0:
            raise ValueError(f"view_chunk_size must be >= 0 (0: all views in one forward), got {view_chunk_size}.")
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
        self.proxy_tasks = proxy_tasks
        self.loss = loss
        self.accumulation_steps = int(accumulation_steps)
        self.lr_scheduler = lr_scheduler
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
        self.amp = amp
        self.max_grad_norm = float(max_grad_norm)
        self.view_chunk_size = int(view_chunk_size)
        self.cpu_autocast = bool(cpu_autocast)
        self.description: str | None = None

    def _describe(self, device: torch.device, network: torch.nn.Module) -> str:
        """How the forward runs (precision, window attention, views per call); guards bf16 convolutions."""
        dtype = autocast_dtype("cpu") if device.type == "cpu" and self.cpu_autocast else None
        guard = ""
        if dtype is not None:
            guard_bf16_conv_gradients(network)
            guard = "; " + bf16_guard_note()
        if device.type == "cpu":
            precision = f"{dtype} autocast, losses in float32" if dtype is not None else "float32"
            attention = "fused window attention" if trains_fused(network) else "MONAI's window attention"
        else:
            precision = "float16 AMP" if self.amp else "float32"
            attention = "MONAI's window attention"
        chunks = f"{self.view_chunk_size} views per call" if self.view_chunk_size else "all views in one call"
        return f"on {device.type} in {precision}; {attention}; {chunks}{guard}"

    def __call__(self, engine: Engine, batchdata: Any) -> dict[str, float]:
        images = _images(batchdata, engine)
        if self.description is None:
            self.description = self._describe(images.device, engine.network)
            logger.info(f"pre-training forward {self.description}")
        views = self.proxy_tasks(images)
        local = (engine.state.iteration - 1) % self.accumulation_steps
        engine.network.train()
        if local == 0:
            engine.optimizer.zero_grad(set_to_none=True)
        with _autocast(images.device, self.amp, self.cpu_autocast):
            outputs = forward_views(engine.network, views["inputs"], self.view_chunk_size)
        if images.device.type == "cpu":
            outputs = _float32(outputs)
        losses = self.loss(outputs, views["targets"], views["rotations"])
        self.scaler.scale(losses["loss"] / self.accumulation_steps).backward()
        check_finite_step(
            losses["loss"],
            engine.network,
            engine.state.iteration,
            getattr(engine.state, "epoch", None),
            self.description,
            check_gradients=not self.scaler.is_enabled(),
        )
        if local == self.accumulation_steps - 1:
            if self.max_grad_norm > 0:
                self.scaler.unscale_(engine.optimizer)
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
            self.scaler.step(engine.optimizer)
            self.scaler.update()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        out = _scalars(losses)
        out["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        out["masked_fraction"] = float(views["masked_fraction"])
        return out


class SSLValIteration:
    """Validation: the same proxy tasks and losses without gradients, re-seeded at every validation run.

    Re-seeding makes each validation score the same rotations and boxes, so its losses are
    comparable from one validation to the next. Use as ``SupervisedEvaluator(iteration_update=...)``.
    """

    def __init__(
        self,
        proxy_tasks: ProxyTaskViews,
        loss: torch.nn.Module,
        seed: int = 0,
        amp: bool = False,
        view_chunk_size: int = 0,
        cpu_autocast: bool = False,
    ) -> None:
        if int(view_chunk_size) < 0:
            raise ValueError(f"view_chunk_size must be >= 0 (0: all views in one forward), got {view_chunk_size}.")
        self.cpu_autocast = bool(cpu_autocast)
        self.proxy_tasks = proxy_tasks
        self.loss = loss
        self.seed = int(seed)
        self.amp = amp
        self.view_chunk_size = int(view_chunk_size)

    def __call__(self, engine: Engine, batchdata: Any) -> dict[str, float]:
        if engine.state.iteration == 1:
            self.proxy_tasks.set_random_state(self.seed)
        images = _images(batchdata, engine)
        views = self.proxy_tasks(images)
        engine.network.eval()
        with torch.no_grad():
            with _autocast(images.device, self.amp, self.cpu_autocast):
                outputs = forward_views(engine.network, views["inputs"], self.view_chunk_size)
            if images.device.type == "cpu":
                outputs = _float32(outputs)
            losses = self.loss(outputs, views["targets"], views["rotations"])
        return _scalars(losses)


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """The total loss, each term and the learning rate from a training iteration's output (for logging)."""
    return {name: output[name] for name in (*LOGGED, "lr")}


def validation_metrics(key_metric: str) -> tuple[dict[str, Average], dict[str, Average]]:
    """Mean validation losses as ignite metrics: ``({key_metric: ...}, {every other: ...})``.

    ``key_metric`` (the checkpoint-selection knob) is one of ``VALIDATION_METRICS``: ``val_loss`` (the
    weighted total), ``val_inpaint_loss``, ``val_contrast_loss`` or ``val_rotation_loss``; lower is better.
    Or a preset of ``CKPT_METRIC_PRESETS``: ``research`` (= ``val_inpaint_loss``), ``bundle`` (= ``val_loss``).
    """
    key_metric = CKPT_METRIC_PRESETS.get(key_metric, key_metric)
    if key_metric not in VALIDATION_METRICS:
        choices = (*VALIDATION_METRICS, *CKPT_METRIC_PRESETS)
        raise ValueError(f"ckpt_metric must be one of {choices}, got {key_metric!r}.")
    metrics = {f"val_{name}": Average(output_transform=lambda out, name=name: out[name]) for name in LOGGED}
    key = {key_metric: metrics.pop(key_metric)}
    return key, metrics


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for loss-valued key metrics (MONAI starts ``best_metric`` at -1)."""
    return best < 0 or current < best
