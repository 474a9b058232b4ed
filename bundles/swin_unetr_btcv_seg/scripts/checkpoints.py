# Generated from bundles/common/scripts/checkpoints.py: edit that, then run python -m tools sync_bundle_code
"""Checkpoints that survive a kill: atomic files, rotation that writes before it deletes, and resume from the latest."""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver, ValidationHandler

from .bundle_logger import logger
from .weights_format import checked_torch_file

__all__ = [
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "FinalValidationHandler",
    "atomic_torch_save",
    "latest_checkpoint",
    "resume_path",
    "checked_full_state",
    "LATEST",
    "RunRecord",
]

LATEST = "latest"
TMP_PREFIX = ".tmp_"
# Full-state checkpoints of a training run: the periodic checkpoint_epoch=N.pt / checkpoint_iteration=N.pt
# and checkpoint_last.pt (written on a clean end or a Python exception, never after a kill).
CHECKPOINT_GLOB = "checkpoint*.pt"
FULL_STATE_KEYS = ("model", "optimizer", "trainer")
RUN_RECORD_KEY = "run_record"  # the RunRecord of the run that saved a full-state checkpoint
_STARTED = time.time()  # temporaries older than this process are left over from a killed run


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file in the same folder, then rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _remove_quietly(path: str) -> None:
    """Delete ``path`` if it is still there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` writing atomically, optionally always to one fixed file name.

    Ignite's ``Checkpoint`` calls ``remove(old)`` *before* it saves the new file. Here ``remove``
    only notes the file; it is deleted once the new checkpoint is complete on disk, so at every
    moment after the first save at least one complete checkpoint exists. With a fixed name,
    ``remove`` does nothing: the next save replaces the file in one rename.
    """

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, create_dir=True)
        self.filename = filename
        self.replaced: list[str] = []  # file names to delete after the next complete save

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        name = self.filename or filename
        atomic_torch_save(checkpoint, os.path.join(self.dirname, name))
        self._remove_replaced(keep=name)

    def remove(self, filename: str) -> None:
        """Mark ``filename`` for deletion once its replacement is written (ignite asks before saving)."""
        if self.filename is None and filename not in self.replaced:
            self.replaced.append(filename)

    def _remove_replaced(self, keep: str) -> None:
        """Delete the files the save just written replaces (never ``keep`` itself)."""
        for name in self.replaced:
            if name != keep:
                _remove_quietly(os.path.join(self.dirname, name))
        self.replaced = []


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically (MONAI's are not).

    Periodic checkpoints rotate write-first (``AtomicDiskSaver``). At its first periodic save the
    saver also takes over the periodic files already in ``save_dir`` (from before a resume), so they
    rotate out under ``n_saved`` instead of piling up, and it deletes temporaries a killed run left.
    """

    def __init__(
        self,
        save_dir: str,
        *args: Any,
        final_filename: str | None = None,
        key_metric_filename: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir, *args, final_filename=final_filename, key_metric_filename=key_metric_filename, **kwargs
        )
        for attr, fixed_name in (
            ("_final_checkpoint", final_filename),
            ("_key_metric_checkpoint", key_metric_filename),
            ("_interval_checkpoint", None),
        ):
            checkpoint = getattr(self, attr, None)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, fixed_name)
        self._adopted = False

    def attach(self, engine: Any) -> None:
        """Attach as MONAI's saver does, with the final save first among the engine's exception handlers.

        MONAI's ``StatsHandler`` logs an exception and re-raises it, which ends the engine's
        exception handlers: a saver attached after it (as ``training`` attaches this one, after the
        trainer's handlers) would never write ``final_filename`` when training fails.
        """
        super().attach(engine)
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        ours = [h for h in handlers if getattr(h[0], "__self__", None) is self]
        handlers[:] = ours + [h for h in handlers if h not in ours]

    def save_key_metric_file(self) -> str:
        """Write the key-metric file (e.g. ``model.pt``) now, with the current weights and no score; return its path.

        For a run that has nothing to validate on; the file has the same content as a key-metric save.
        """
        checkpoint = getattr(self, "_key_metric_checkpoint", None)
        saver = getattr(checkpoint, "save_handler", None)
        if not isinstance(saver, AtomicDiskSaver) or saver.filename is None:
            raise ValueError("this saver writes no key-metric file with a fixed name (key_metric_filename)")
        state = checkpoint._setup_checkpoint()  # what ignite's Checkpoint saves: state dicts, DDP unwrapped
        if len(state) == 1:  # ignite saves a single object's state dict bare
            (state,) = state.values()
        saver(state, saver.filename)
        return os.path.join(str(saver.dirname), saver.filename)

    def interval_completed(self, engine: Any) -> None:
        """Save the periodic checkpoint; the first time, adopt the earlier files first."""
        if not self._adopted:
            self._adopted = True
            step = engine.state.epoch if self.epoch_level else engine.state.iteration
            self._adopt_earlier_files(step)
        super().interval_completed(engine)

    def _adopt_earlier_files(self, step: int) -> None:
        """Put the periodic files already on disk under this saver's rotation (see the class docstring)."""
        checkpoint = self._interval_checkpoint
        saver = checkpoint.save_handler
        for tmp in glob.glob(os.path.join(self.save_dir, TMP_PREFIX + "*.pt")):
            if os.path.getmtime(tmp) < _STARTED:
                _remove_quietly(tmp)
        if checkpoint.n_saved is None:
            return
        earlier = sorted(_periodic_files(self.save_dir, checkpoint))
        keep = [(s, name) for s, name in earlier if s < step][-checkpoint.n_saved :]
        saver.replaced.extend(name for s, name in earlier if (s, name) not in keep)
        checkpoint._saved.extend(Checkpoint.Item(s, name) for s, name in keep)
        checkpoint._saved.sort(key=lambda item: item.priority)
        if earlier:
            logger.info(
                "checkpoint rotation: keeping %d of the %d periodic checkpoints already in %s",
                len(keep),
                len(earlier),
                self.save_dir,
            )


class FinalValidationHandler(ValidationHandler):
    """MONAI ``ValidationHandler`` that validates once more when training completes.

    With the validator's key-metric saver, every run then writes ``model.pt`` (the best validated
    model of that run) even when it is shorter than ``interval`` epochs, as MONAI Label's runs are
    (50 epochs by default). The final epoch is not validated twice: when the periodic handler (every
    ``interval`` epochs) has just validated it, this one skips.

    A run without validation data (MONAI Label's ``val_split`` leaves none below 3 labelled images)
    still trains: with ``model_saver`` (the validator's key-metric saver) its last weights become
    ``model.pt``, unvalidated, and the log says so; without it the run writes no ``model.pt``.
    """

    def __init__(self, interval: int, validator: Any = None, model_saver: AtomicCheckpointSaver | None = None) -> None:
        super().__init__(interval=interval, validator=validator, epoch_level=True)
        self.model_saver = model_saver

    def attach(self, engine: Any) -> None:
        """Run at the trainer's COMPLETED event."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        """Validate the final model unless the periodic validation just did; without validation data, save it."""
        epoch = engine.state.epoch
        loader = getattr(self.validator, "data_loader", None)
        if loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
            self._save_unvalidated(engine)
            return
        if self.interval > 0 and epoch % self.interval == 0:
            return
        logger.info("final validation after epoch %d (the key-metric saver keeps the best as model.pt)", epoch)
        super().__call__(engine)

    def _save_unvalidated(self, engine: Any) -> None:
        """Write the run's last weights as the key-metric file (``model.pt``), saying that nothing validated them."""
        if self.model_saver is None:
            logger.warning("no validation data: this run writes no model.pt")
            return
        path = self.model_saver.save_key_metric_file()
        dataset = getattr(engine.state.dataloader, "dataset", None)
        trained_on = f"{len(dataset)} training image(s)" if dataset is not None else "training data"
        logger.warning(
            "no validation data (%s, none for validation): %s holds this run's last weights, unvalidated. "
            "To validate runs, give validation images (MONAI Label: at least 3 labelled images at val_split 0.2).",
            trained_on,
            path,
        )


def _periodic_files(save_dir: str, checkpoint: Checkpoint) -> list[tuple[int, str]]:
    """(step, file name) of the files in ``save_dir`` named as ``checkpoint`` names its periodic saves."""
    prefix = f"{checkpoint.filename_prefix}_" if checkpoint.filename_prefix else ""
    pattern = re.compile(re.escape(f"{prefix}checkpoint_{checkpoint.score_name}=") + r"(\d+)\.pt")
    found = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match.group(1)), name))
    return found


class RunRecord:
    """Which training run wrote a full-state checkpoint, and when: saved in each one under ``run_record``.

    A fresh run gets a new id; a run resumed from a checkpoint keeps that checkpoint's id (the same
    run, continued). Each save stamps its time, so ``latest_checkpoint`` picks the file saved last
    and names the run of every file it leaves aside.
    """

    def __init__(self, resume_from: str = "") -> None:
        earlier = _load_full_state(resume_from).get(RUN_RECORD_KEY) if resume_from else None
        self.id = str(earlier["id"]) if earlier else uuid.uuid4().hex[:12]
        self.started = float(earlier["started"]) if earlier else time.time()

    def state_dict(self) -> dict:
        """The record as saved: run id, start time and this save's time (seconds since the epoch)."""
        return {"id": self.id, "started": self.started, "saved": time.time()}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the run ``state`` records."""
        self.id, self.started = str(state["id"]), float(state["started"])


def _load_full_state(path: str) -> dict:
    """A full-state checkpoint (memory-mapped); raises if ``path`` is not one."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    missing = [k for k in FULL_STATE_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing or not isinstance(checkpoint["trainer"], Mapping) or "iteration" not in checkpoint["trainer"]:
        raise ValueError(f"not a full training checkpoint (missing {missing or ['trainer iteration']})")
    return checkpoint


@dataclass(frozen=True)
class _Candidate:
    """A full-state checkpoint in the folder ``latest`` looks in."""

    path: str
    iteration: int
    run: Mapping | None  # the RunRecord state; None for files saved before runs were recorded

    def rank(self) -> tuple:
        """Recorded files by save time, after every unrecorded one (they are older); those by iteration."""
        return (1, float(self.run["saved"]), self.iteration) if self.run else (0, 0.0, self.iteration)

    def describe(self) -> str:
        """``iteration 40, run 1a2b3c4d5e6f, saved 2026-12-07 10:01:02``."""
        if not self.run:
            return f"iteration {self.iteration}, saved before runs were recorded"
        return f"iteration {self.iteration}, run {self.run['id']}, saved {_when(self.run['saved'])}"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(seconds)))


def checked_full_state(path: str) -> str:
    """``path`` if it is a full-state training checkpoint; otherwise a ValueError naming it and saying what to do.

    ``models/model.pt`` and weights from elsewhere hold the network only: training cannot continue
    from them (no optimizer, scheduler or trainer state), but it can start from their weights.
    """
    try:
        _load_full_state(path)
    except ValueError as err:
        raise ValueError(
            f"{path}: cannot resume from this file: it holds no optimizer and trainer state ({err}); resume "
            f"needs a full-state checkpoint of a training run (checkpoint_last.pt or checkpoint_*.pt beside "
            f"model.pt), or 'latest'. To start a new training from the weights in this file, set pretrained_path "
            f"to it and leave resume_from unset."
        ) from err
    return path


def latest_checkpoint(ckpt_dir: str) -> str:
    """The full-state checkpoint in ``ckpt_dir`` (``checkpoint*.pt``) that was saved last.

    The save time is the one ``RunRecord`` stamps into each checkpoint, so a stale file of an
    abandoned run (its ``checkpoint_last.pt``, or periodic files with more iterations) never wins
    over the run saved since; the log names the file picked, its run, and every file left aside.
    Files saved before runs were recorded come after recorded ones; among them, the most trainer
    iterations wins. Temporary files of an interrupted save are never candidates; a file that does
    not load, or holds no trainer state, is skipped with a warning. Raises FileNotFoundError when
    none is left: resuming must never silently start afresh.
    """
    candidates = []
    for path in sorted(glob.glob(os.path.join(ckpt_dir, CHECKPOINT_GLOB))):
        try:
            checkpoint = _load_full_state(path)
            record = checkpoint.get(RUN_RECORD_KEY)
            candidates.append(_Candidate(path, int(checkpoint["trainer"]["iteration"]), record or None))
        except Exception as err:  # noqa: BLE001 (a file that does not load is not a checkpoint to resume from)
            logger.warning("resume: skipping %s: %s", path, err)
    if not candidates:
        raise FileNotFoundError(
            f"resume_from is set but {ckpt_dir} holds no training checkpoint (checkpoint_*.pt) "
            "that loads with model, optimizer and trainer state."
        )
    latest = max(candidates, key=_Candidate.rank)
    why = "the checkpoint saved last" if latest.run else "the most iterations (no checkpoint records its run)"
    logger.info("resume latest: %s (%s): %s in %s", latest.path, latest.describe(), why, ckpt_dir)
    aside = [c for c in candidates if c is not latest and (c.iteration > latest.iteration or _other_run(c, latest))]
    if aside:
        logger.warning(
            "resume latest: leaving aside %d checkpoint(s) of another run or saved earlier: %s; "
            "to continue one of them, resume from its path instead of latest",
            len(aside),
            "; ".join(f"{os.path.basename(c.path)} ({c.describe()})" for c in aside),
        )
    return latest.path


def _other_run(a: _Candidate, b: _Candidate) -> bool:
    return (a.run or {}).get("id") != (b.run or {}).get("id")


def resume_path(resume_from: Any, ckpt_dir: str, old_name_value: Any = None) -> str:
    """The checkpoint a run continues from (the configs' ``resume_path``, from the knob ``resume_from``).

    ``''`` for a fresh start, a path as given, or for ``latest`` (or ``True``) the complete full-state
    checkpoint in ``ckpt_dir`` saved last (``latest_checkpoint``). ``old_name_value``: the value given
    under the knob's former name (``resume`` in the pre-training bundle), refused with the new name, so
    an old command never starts afresh where it meant to resume.
    """
    if old_name_value is not None:
        raise ValueError(
            f"resume is now called resume_from, as in the fine-tuning bundles (same values: '{LATEST}', true, "
            f"false or a checkpoint path): pass --resume_from {old_name_value} instead of --resume."
        )
    text = str(resume_from).strip().lower() if isinstance(resume_from, (str, bool)) or resume_from is None else None
    if text in ("", "false", "none"):
        return ""
    if text in (LATEST, "true"):
        return latest_checkpoint(ckpt_dir)
    if isinstance(resume_from, str):
        return checked_full_state(checked_torch_file(resume_from, "resume_from checkpoint"))
    raise ValueError(f"resume_from must be '{LATEST}', true, false or a checkpoint path, not {resume_from!r}.")
