"""The demo's run: its settings with defaults resolved (``DemoRun``), the step clock, and the plan it announces."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.common.bundles import REPO_ROOT, bundle_command
from tools.common.bundles import SSL_DIR as SSL_BUNDLE_DIR
from tools.common.processes import run_streamed

DEFAULT_OUTPUT_DIR = REPO_ROOT / "demo_output"
NUM_STEPS = 9
# Pre-training defaults (see the module docstring for the reasons)
SSL_STEPS, SSL_STEPS_QUICK = 200, 30
SSL_ROI_SIZE = (64, 32, 32)
SSL_SPACING = (2.0, 2.0, 2.0)
SSL_LEARNING_RATE = 4e-4
SSL_VAL_FRACTION = 0.4
SSL_MIN_DROP = 0.05  # a loss "fell" when its last-20-step mean is at least 5 % below its first-20-step mean


class DemoError(RuntimeError):
    """A demo step failed; the message names the step."""


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def say(msg: str = "") -> None:
    print(msg, flush=True)


class Steps:
    """Announce numbered steps and record their wall times."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.times: list[tuple[str, float]] = []
        self.current = ""

    def start(self, index: int, title: str) -> float:
        self.current = f"[{index}/{self.total}] {title}"
        say(f"\n{'=' * 78}\n{self.current} ...\n{'=' * 78}")
        return time.perf_counter()

    def done(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.times.append((self.current, dt))
        say(f"--- {self.current}: done in {hms(dt)} ({dt:.1f} s)")


def rel_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base``, with forward slashes (as the datalists and the summary show it)."""
    return Path(os.path.relpath(path, base)).as_posix()


def ssl_val_interval(steps: int) -> int:
    """Validate 4 times (at least every step for tiny runs), the last time at the last step."""
    interval = max(1, steps // 4)
    while steps % interval:
        interval -= 1
    return interval


@dataclass
class DemoRun:
    """The settings of one demo run (defaults resolved), its output folders, step clock and results."""

    out: Path
    quick: bool
    epochs: int
    overlap: float
    num_phantoms: int
    seed: int
    spacing: list[float]
    sw_batch_size: int
    learning_rate: float
    ssl_steps: int
    ssl_learning_rate: float
    ssl_spacing: list[float]
    ssl_roi_size: list[int]
    pretrained_path: str | None
    steps: Steps = field(default_factory=lambda: Steps(NUM_STEPS))
    results: dict = field(default_factory=dict)

    @property
    def pretrain(self) -> bool:
        """Whether this run pre-trains (steps 3-5) rather than fine-tuning from a given encoder or scratch."""
        return self.ssl_steps > 0 and not self.pretrained_path

    @property
    def val_interval(self) -> int:
        """Fine-tuning validates twice (half way and at the end) when the epochs split evenly, else once."""
        return self.epochs // 2 if self.epochs >= 2 and self.epochs % 2 == 0 else self.epochs

    @property
    def ssl_val_interval(self) -> int:
        """Pre-training validation interval in steps (0 without pre-training)."""
        return ssl_val_interval(self.ssl_steps) if self.pretrain else 0

    @property
    def ssl_settings(self) -> dict:
        """The pre-training settings as reported in the metrics table."""
        return {
            "steps": self.ssl_steps,
            "feature_size": 12,
            "roi_size": self.ssl_roi_size,
            "spacing_mm": self.ssl_spacing,
            "batch": "2 volumes x 1 crop x 2 views",
            "learning_rate": self.ssl_learning_rate,
            "warmup_steps": min(10, max(1, self.ssl_steps // 10)),
            "val_interval": self.ssl_val_interval,
        }

    def dir(self, name: str) -> Path:
        """An output folder: data, ssl, figures, models, eval, inference, overlays, logs, train_logs."""
        return self.out / name

    def failed(self, what: str) -> DemoError:
        """A DemoError naming the current step."""
        return DemoError(f"{self.steps.current} failed: {what}")

    def run_bundle(
        self,
        bundle_dir: Path,
        run_id: str | None,
        configs: Sequence[str],
        overrides: dict,
        log_name: str,
        quiet: Sequence[str] = (),
    ) -> Path:
        """Run a bundle command as a user would, streamed and logged to ``logs/<log_name>``; return the log path."""
        log = self.dir("logs") / log_name
        run_streamed(
            bundle_command(run_id, configs, overrides),
            bundle_dir,
            log,
            self.steps.current,
            quiet=quiet,
            error=DemoError,
        )
        return log


def _sizes(value, kind: type = float) -> list:
    """A 3D setting from a number or a sequence."""
    return [kind(s) for s in (value if isinstance(value, (list, tuple)) else [value] * 3)]


def plan_run(
    output_dir,
    epochs,
    quick,
    spacing,
    overlap,
    sw_batch_size,
    learning_rate,
    num_phantoms,
    seed,
    ssl_steps,
    ssl_learning_rate,
    ssl_spacing,
    ssl_roi_size,
    pretrained_path,
) -> DemoRun:
    """The demo's settings with the defaults resolved and checked (see ``demo`` for their meaning)."""
    run = DemoRun(
        out=Path(output_dir).resolve() if output_dir else DEFAULT_OUTPUT_DIR,
        quick=bool(quick),
        epochs=int(epochs) if epochs is not None else (1 if quick else 4),
        overlap=float(overlap) if overlap is not None else (0.0 if quick else 0.25),
        num_phantoms=int(num_phantoms) if num_phantoms is not None else (2 if quick else 4),
        seed=seed,
        spacing=_sizes(spacing),
        sw_batch_size=sw_batch_size,
        learning_rate=learning_rate,
        ssl_steps=int(ssl_steps) if ssl_steps is not None else (SSL_STEPS_QUICK if quick else SSL_STEPS),
        ssl_learning_rate=ssl_learning_rate,
        ssl_spacing=_sizes(ssl_spacing),
        ssl_roi_size=[int(s) for s in ssl_roi_size],
        pretrained_path=None,
    )
    if run.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {run.epochs}")
    if run.num_phantoms < 2:
        raise ValueError(f"num_phantoms must be >= 2 (training and validation), got {run.num_phantoms}")
    if run.ssl_steps < 0:
        raise ValueError(f"ssl_steps must be >= 0, got {run.ssl_steps}")
    if pretrained_path:
        run.pretrained_path = str(Path(pretrained_path).resolve())
        if not Path(run.pretrained_path).is_file():
            raise ValueError(f"pretrained_path {run.pretrained_path} is not a file")
    return run


def clear_outputs(run: DemoRun) -> None:
    """Remove an earlier run's results (stale results must not pass for this run's), keeping a given encoder."""
    for name in ("ssl", "figures", "models", "eval", "inference", "overlays", "logs", "train_logs"):
        d = run.dir(name)
        if run.pretrained_path and Path(run.pretrained_path).is_relative_to(d.resolve()):
            continue  # the given encoder lives there (e.g. an earlier demo's export): keep it
        shutil.rmtree(d, ignore_errors=True)
    (run.out / "metrics.md").unlink(missing_ok=True)
    run.out.mkdir(parents=True, exist_ok=True)


def announce(run: DemoRun) -> None:
    """Print what the demo is about to do."""
    say(
        f"Swin UNETR demo{' (quick)' if run.quick else ''}: self-supervised pre-training, then BTCV fine-tuning; "
        f"output in {run.out}"
    )
    say(f"bundles: {SSL_BUNDLE_DIR}\n         {BUNDLE_DIR}")
    if run.pretrain:
        say(
            f"pre-training: feature_size 12, roi {run.ssl_roi_size}, spacing {run.ssl_spacing} mm, {run.ssl_steps} "
            f"steps of 2 volumes x 1 crop x 2 views, lr {run.ssl_learning_rate} (warm-up "
            f"{run.ssl_settings['warmup_steps']} steps, cosine decay), validation every {run.ssl_val_interval} steps"
        )
    else:
        say(
            "pre-training: skipped ("
            + (
                f"fine-tuning from {run.pretrained_path}"
                if run.pretrained_path
                else "--ssl_steps 0: fine-tuning from scratch"
            )
            + ")"
        )
    say(
        f"fine-tuning: feature_size 12, roi 64^3, spacing {run.spacing} mm, {run.epochs} epoch(s), validation every "
        f"{run.val_interval}, lr {run.learning_rate}, sliding-window overlap {run.overlap}, "
        f"sw_batch_size {run.sw_batch_size}"
    )
