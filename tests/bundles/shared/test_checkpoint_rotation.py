"""Checkpoint rotation that never leaves a moment without a complete checkpoint, and ``resume_from: latest``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR
from torch import nn

from tests.helpers import BTCV_DIR, MSD_DIR, SSL_DIR, bundle_on_path, error_text
from tools.data.make_msd_tasks import write_msd_task

MSD_TASK = "Task09_Spleen"


@pytest.fixture()
def checkpoints():
    with bundle_on_path(BTCV_DIR):
        import scripts.checkpoints

        yield scripts.checkpoints


def _full_state(iteration: int, model: nn.Module | None = None, **extra) -> dict:
    model = model or nn.Linear(2, 2)
    return {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "trainer": {"iteration": iteration, "epoch_length": 1, "max_epochs": 10},
        **extra,
    }


def _periodic_run(checkpoints, folder: Path, start: int, end: int, seen: list | None = None) -> None:
    """Run an ignite engine from iteration ``start`` to ``end``, saving a periodic checkpoint every iteration."""
    engine = Engine(lambda e, b: None)
    saver = checkpoints.AtomicCheckpointSaver(
        str(folder), {"model": nn.Linear(2, 2), "trainer": engine}, save_interval=1, epoch_level=False, n_saved=1
    )
    saver.attach(engine)
    if start:
        engine.load_state_dict({"iteration": start, "epoch_length": end, "max_epochs": 1})
    engine.run(range(end), max_epochs=1, epoch_length=end)


def test_the_new_periodic_file_is_complete_before_the_old_one_is_removed(checkpoints, tmp_path, monkeypatch):
    before_each_save = []
    write = checkpoints.atomic_torch_save

    def recording_write(obj, path):
        before_each_save.append(sorted(os.listdir(tmp_path)))
        write(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_torch_save", recording_write)
    _periodic_run(checkpoints, tmp_path, 0, 3)
    assert before_each_save == [[], ["checkpoint_iteration=1.pt"], ["checkpoint_iteration=2.pt"]]
    assert os.listdir(tmp_path) == ["checkpoint_iteration=3.pt"]


def test_files_from_before_a_resume_rotate_out_and_killed_temporaries_are_removed(checkpoints, tmp_path):
    for step in (2, 4, 9):  # 2 and 4: a kill between write and delete; 9: an abandoned, longer run
        torch.save({}, tmp_path / f"checkpoint_iteration={step}.pt")
    (tmp_path / "model.pt").write_bytes(b"best")
    stale, fresh = tmp_path / ".tmp_killed.pt", tmp_path / ".tmp_in_progress.pt"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    fresh.write_bytes(b"half")
    _periodic_run(checkpoints, tmp_path, 4, 6)
    assert sorted(os.listdir(tmp_path)) == [".tmp_in_progress.pt", "checkpoint_iteration=6.pt", "model.pt"]


def test_latest_is_the_complete_full_state_checkpoint_with_most_iterations(checkpoints, tmp_path, caplog):
    torch.save(_full_state(6), tmp_path / "checkpoint_epoch=3.pt")
    torch.save(_full_state(4), tmp_path / "checkpoint_last.pt")
    torch.save(_full_state(100), tmp_path / ".tmp_abc.pt")  # an interrupted save is never a candidate
    (tmp_path / "checkpoint_epoch=9.pt").write_bytes(b"truncated")  # does not load
    torch.save({"model": {}}, tmp_path / "checkpoint_weights.pt")  # no trainer state
    latest = str(tmp_path / "checkpoint_epoch=3.pt")
    assert checkpoints.latest_checkpoint(str(tmp_path)) == latest
    for value in ("latest", "LATEST", True, "true"):
        assert checkpoints.resume_path(value, str(tmp_path)) == latest
    for value in ("", False, None, "false"):
        assert checkpoints.resume_path(value, str(tmp_path)) == ""
    assert checkpoints.resume_path(latest, str(tmp_path / "elsewhere")) == latest  # a path is used as given
    with pytest.raises(FileNotFoundError, match="resume_from checkpoint not found: /elsewhere/ckpt.pt"):
        checkpoints.resume_path("/elsewhere/ckpt.pt", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no training checkpoint"):
        checkpoints.resume_path("latest", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="resume_from must be"):
        checkpoints.resume_path(3, str(tmp_path))


def _training_run(checkpoints, folder: Path, iterations: int, final: bool) -> str:
    """A trainer saving as the bundles' train.json does: a full-state checkpoint with its run record every
    iteration, and ``checkpoint_last.pt`` when it ends (``final``; a killed run writes none). Returns the run id."""
    engine, model = Engine(lambda e, b: None), nn.Linear(2, 2)
    record = checkpoints.RunRecord()
    save = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), 0.1), "trainer": engine}
    saver = checkpoints.AtomicCheckpointSaver(
        str(folder),
        {**save, "run_record": record},
        save_interval=1,
        epoch_level=False,
        n_saved=1,
        save_final=final,
        final_filename="checkpoint_last.pt",
    )
    saver.attach(engine)
    engine.run(range(iterations), max_epochs=1)
    return record.id


def test_latest_leaves_the_checkpoints_of_an_abandoned_run_aside_and_says_so(checkpoints, tmp_path, caplog):
    abandoned = _training_run(checkpoints, tmp_path, 6, final=True)  # a longer run, stopped early on an error
    torch.save(_full_state(9), tmp_path / "checkpoint_epoch=9.pt")  # older still: saved before runs were recorded
    new = _training_run(checkpoints, tmp_path, 2, final=False)  # a fresh, shorter run in the same folder, killed
    assert new != abandoned
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=9.pt", "checkpoint_iteration=2.pt", "checkpoint_last.pt"]
    logger = logging.getLogger("swin_unetr_btcv_seg")
    logger.addHandler(caplog.handler)  # a bundle's logging.conf may have replaced the root handlers
    try:
        caplog.set_level(logging.INFO, logger="swin_unetr_btcv_seg")
        latest = checkpoints.resume_path("latest", str(tmp_path))
    finally:
        logger.removeHandler(caplog.handler)
    assert latest == str(tmp_path / "checkpoint_iteration=2.pt")  # not the abandoned run's iteration 6
    picked, aside = dict.fromkeys(r.getMessage() for r in caplog.records if "resume latest" in r.getMessage())
    assert picked.startswith(f"resume latest: {latest} (iteration 2, run {new}, saved ")
    assert picked.endswith(f"): the checkpoint saved last in {tmp_path}")
    assert "leaving aside 2 checkpoint(s)" in aside
    assert f"checkpoint_last.pt (iteration 6, run {abandoned}, saved " in aside
    assert "checkpoint_epoch=9.pt (iteration 9, saved before runs were recorded)" in aside
    assert checkpoints.RunRecord(latest).id == new  # resuming continues the run it resumes
    assert checkpoints.RunRecord().id not in (new, abandoned)  # a fresh start is a new run


def _legacy_checkpoint(folder: Path, bundle_dir: Path) -> Path:
    """A full-state checkpoint of a feature-size-12 network built with the legacy patch-merging order."""
    with bundle_on_path(bundle_dir):
        from scripts.encoder_weights import NetworkRecord
        from scripts.patch_merging import LegacyPatchMerging

        net = SwinUNETR(1, 14, feature_size=12, downsample=LegacyPatchMerging)
        state = _full_state(8, net, network_record=NetworkRecord(net).state_dict())
    folder.mkdir(parents=True)
    torch.save(state, folder / "checkpoint_epoch=4.pt")
    return folder / "checkpoint_epoch=4.pt"


@pytest.mark.parametrize("bundle", ["btcv", "msd"])
def test_resume_from_latest_finds_the_checkpoint_and_builds_the_network_from_it(bundle, tmp_path):
    bundle_dir = BTCV_DIR if bundle == "btcv" else MSD_DIR
    overrides = {"bundle_root": str(tmp_path), "resume_from": "latest", "feature_size": 12}
    folder = tmp_path / "models"
    if bundle == "msd":  # one checkpoint folder per task and fold
        write_msd_task(tmp_path / "data", MSD_TASK, num_training=3, num_test=1, seed=0, shape=(24, 24, 16))
        overrides.update(task=MSD_TASK, dataset_dir=str(tmp_path / "data" / MSD_TASK), fold=1)
        folder = folder / MSD_TASK / "fold1"
    expected = _legacy_checkpoint(folder, bundle_dir)
    with bundle_on_path(bundle_dir):
        from scripts.patch_merging import LegacyPatchMerging

        parser = ConfigParser()
        parser.read_config(str(bundle_dir / "configs" / "train.json"))
        parser.update(overrides)
        assert parser.get_parsed_content("resume_path") == str(expected)
        assert parser.get_parsed_content("network_def#downsample") is LegacyPatchMerging


def test_ssl_resume_latest_and_missing_checkpoint(tmp_path):
    expected = _legacy_checkpoint(tmp_path / "models", SSL_DIR)
    with bundle_on_path(SSL_DIR):
        for value in ("latest", True):
            parser = ConfigParser()
            parser.read_config(str(SSL_DIR / "configs" / "train.json"))
            parser.update({"bundle_root": str(tmp_path), "resume_from": value})
            assert parser.get_parsed_content("resume_path") == str(expected)
        parser.update({"bundle_root": str(tmp_path / "nothing")})
        with pytest.raises(Exception) as err:
            parser.get_parsed_content("resume_path")
        assert "holds no training checkpoint" in error_text(err.value)
        # the former name is refused with the new one, never ignored (an ignored resume would start afresh)
        parser = ConfigParser()
        parser.read_config(str(SSL_DIR / "configs" / "train.json"))
        parser.update({"bundle_root": str(tmp_path), "resume": "latest"})
        with pytest.raises(Exception) as err:
            parser.get_parsed_content("resume_path")
    assert "pass --resume_from latest instead of --resume" in error_text(err.value)
