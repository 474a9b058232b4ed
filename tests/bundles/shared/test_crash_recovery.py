"""Training killed with SIGKILL, during a checkpoint save and between saves, resumes with the model card's command.

Each bundle trains in a subprocess (``python -m monai.bundle run training ...`` from the bundle folder, as a
user runs it). A ``sitecustomize`` shim, put on the subprocess's ``PYTHONPATH`` by this test only, makes one
periodic checkpoint save hang just before its rename, so the kill lands inside the save. At each kill at
least one complete full-state checkpoint must be on disk; the resumed run must continue from the newest one,
lose at most one checkpoint interval, and leave no old periodic files or temporaries behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import BTCV_DIR, SMALL, SSL_DIR, SSL_SMALL

# Makes the periodic checkpoint save number CRASH_TEST_HANG_AT (1-based) hang after its temporary file is
# written and before it is renamed into place; the file CRASH_TEST_MARKER says the hang has begun.
SHIM = """
import os, time
if os.environ.get("CRASH_TEST_HANG_AT"):
    _replace, _saves = os.replace, []

    def _hanging_replace(src, dst, *args, **kwargs):
        name = os.path.basename(str(dst))
        if name.startswith("checkpoint_") and "=" in name:
            _saves.append(name)
            if len(_saves) == int(os.environ["CRASH_TEST_HANG_AT"]):
                with open(os.environ["CRASH_TEST_MARKER"], "w") as f:
                    f.write(name)
                time.sleep(600)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _hanging_replace
"""

PROGRESS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+)")
RUN_TIMEOUT_S = 150


def _cli(settings: dict) -> list[str]:
    """Command-line overrides as a user types them."""
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    return args


# One trainer iteration per epoch and a periodic checkpoint after each: the fewest steps that show every
# kill point (the BTCV run trains on one case of its datalist, the pre-training run steps once per epoch).
BUNDLES = {
    "btcv": {
        "dir": BTCV_DIR,
        "resume": "resume_from",
        "epochs_key": "max_epochs",
        "small": {**SMALL, "val_interval": 100},
    },
    "ssl": {
        "dir": SSL_DIR,
        "resume": "resume_from",
        "epochs_key": "num_steps",
        "small": {**SSL_SMALL, "val_interval": 100},
    },
}
EPOCHS = 3


def _one_case_datalist(phantom_dir: Path, folder: Path) -> Path:
    """A BTCV datalist of one training and one validation case (images under ``phantom_dir``)."""
    datalist = json.loads((phantom_dir / "datalist.json").read_text())
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": datalist["training"][:1], "validation": datalist["validation"][:1]}))
    return path


def _complete_checkpoints(models: Path) -> dict[str, int]:
    """Full-state checkpoints on disk that load (model, optimiser, trainer), by name: their trainer iteration."""
    found = {}
    for path in sorted(models.glob("checkpoint*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 (a file that does not load is not a checkpoint)
            continue
        if {"model", "optimizer", "trainer"} <= set(state):
            found[path.name] = int(state["trainer"]["iteration"])
    return found


def _run_id(path: Path) -> str:
    """The id of the run that saved a full-state checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True)["run_record"]["id"]


def _steps(log: Path) -> list[int]:
    """The trainer iterations (one per epoch here) the run's log reports as done."""
    return [int(epoch) for epoch, _, _ in PROGRESS.findall(log.read_text())]


def _progress(log: Path) -> int:
    """The last trainer iteration the run's log reports as done (0 if none)."""
    return max(_steps(log), default=0)


def _start(spec: dict, data: dict, root: Path, log: Path, env: dict, *extra: str) -> subprocess.Popen:
    """Start the bundle's training command in the bundle folder, output to ``log``."""
    settings = {**data, "bundle_root": root, spec["epochs_key"]: EPOCHS, "ckpt_interval": 1, **spec["small"]}
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        *_cli(settings),
        *extra,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=spec["dir"], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    """Poll ``condition`` until it holds; fail with the log if the run ends or takes too long."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended or timed out before the kill point:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _first_step(log: Path) -> int:
    """The first trainer iteration the run's log reports."""
    steps = _steps(log)
    assert steps, log.read_text()[-4000:]
    return min(steps)


def _resumed_from(log: Path) -> int:
    match = re.search(r"resume latest: \S+ \(iteration (\d+), run \w+", log.read_text())
    assert match, log.read_text()[-4000:]
    return int(match.group(1))


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_sigkill_during_and_between_saves_resumes_from_the_last_complete_checkpoint(bundle, request, tmp_path):
    spec = BUNDLES[bundle]
    if bundle == "btcv":
        phantoms = request.getfixturevalue("phantom_dir")
        data = {"dataset_dir": phantoms, "datalist": _one_case_datalist(phantoms, tmp_path)}
    else:
        data = {"dataset_dir": request.getfixturevalue("ssl_corpus")}
    root, models, shim = tmp_path / "run", tmp_path / "run" / "models", tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    env = {**os.environ, "PYTHONPATH": str(shim)}

    # 1. killed inside the second periodic save: the first one must still be there, complete
    marker = tmp_path / "hanging"
    log = tmp_path / "run1.log"
    proc = _start(spec, data, root, log, {**env, "CRASH_TEST_HANG_AT": "2", "CRASH_TEST_MARKER": str(marker)})
    _wait_for(marker.exists, proc, log)
    assert list(models.glob(".tmp_*.pt")), "the kill must land inside a save"
    assert _complete_checkpoints(models) == {"checkpoint_epoch=1.pt": 1}
    _kill(proc)
    assert _complete_checkpoints(models) == {"checkpoint_epoch=1.pt": 1}
    run = _run_id(models / "checkpoint_epoch=1.pt")

    # 2. resumed with the model card's command; killed between saves, in the step after the next save
    log = tmp_path / "run2.log"
    proc = _start(spec, data, root, log, env, f"--{spec['resume']}", "latest")
    _wait_for(
        lambda: (models / "checkpoint_epoch=2.pt").exists() and not (models / "checkpoint_epoch=1.pt").exists(),
        proc,
        log,
    )
    time.sleep(0.5)  # into step 3, which takes seconds
    on_disk = _complete_checkpoints(models)
    _kill(proc)
    assert _resumed_from(log) == 1  # the newest complete checkpoint of run 1
    assert _first_step(log) == 2  # continued at the next step, nothing repeated
    assert on_disk == _complete_checkpoints(models) == {"checkpoint_epoch=2.pt": 2}  # the pre-resume file rotated out
    assert not list(models.glob(".tmp_*"))  # and the temporary of the killed save is cleaned up
    assert _progress(log) - 2 <= 1  # at most one interval lost

    # 3. resumed again, to the end
    log = tmp_path / "run3.log"
    resume_value = "True" if bundle == "ssl" else "latest"  # the SSL card's older spelling still works
    proc = _start(spec, data, root, log, env, f"--{spec['resume']}", resume_value)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-4000:]
    assert _resumed_from(log) == 2 and _first_step(log) == 3
    assert _complete_checkpoints(models) == {"checkpoint_last.pt": EPOCHS, f"checkpoint_epoch={EPOCHS}.pt": EPOCHS}
    assert _run_id(models / "checkpoint_last.pt") == run  # resumed twice: still the same run
    assert not list(models.glob(".tmp_*"))
