"""Every training run validates once more at its end (``FinalValidationHandler``), so ``model.pt`` is written
even by runs shorter than ``val_interval`` (MONAI Label's), and a final epoch is never validated twice.
A run with no validation data (MONAI Label with fewer than 3 labelled images) saves its last weights as
``model.pt``, unvalidated, and says so."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.transforms import AsDiscreted
from torch import nn

from tests.helpers import BTCV_DIR, bundle_on_path


@pytest.fixture()
def checkpoints():
    with bundle_on_path(BTCV_DIR):
        import scripts.checkpoints

        yield scripts.checkpoints


def _evaluator(checkpoints, save_dir, cases: int, network: nn.Module | None = None):
    """A 2-class evaluator on ``cases`` tiny volumes and its key-metric saver of ``model.pt`` (as train.json's)."""
    network = network or nn.Conv3d(1, 2, 1)
    data = [{"image": torch.rand(1, 1, 4, 4, 4), "label": torch.randint(0, 2, (1, 1, 4, 4, 4))} for _ in range(cases)]
    saver = checkpoints.AtomicCheckpointSaver(
        str(save_dir),
        {"model": network, "network_record": nn.Linear(1, 1)},
        save_key_metric=True,
        key_metric_filename="model.pt",
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=network,
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric={"dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[saver],
    )
    return evaluator, saver


@pytest.mark.parametrize(
    "max_epochs, interval, validated_at",
    [(3, 100, [3]), (2, 1, [1, 2]), (3, 2, [2, 3]), (4, 2, [2, 4])],
    ids=["shorter-than-interval", "every-epoch", "ends-between", "ends-on-one"],
)
def test_runs_validate_at_their_end_once(checkpoints, tmp_path, max_epochs, interval, validated_at):
    evaluator, _ = _evaluator(checkpoints, tmp_path, cases=1)
    seen = []
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.epoch))
    trainer = Engine(lambda engine, batch: None)
    ValidationHandler(interval=interval, validator=evaluator).attach(trainer)
    checkpoints.FinalValidationHandler(interval=interval, validator=evaluator).attach(trainer)
    trainer.run([0, 1], max_epochs=max_epochs)
    assert seen == validated_at
    assert (tmp_path / "model.pt").is_file()


def _training_run(checkpoints, save_dir, cases: int, with_saver: bool = True) -> nn.Module:
    """One epoch of a trainer that changes the network's weights, with ``FinalValidationHandler`` attached."""
    network = nn.Conv3d(1, 2, 1)
    evaluator, saver = _evaluator(checkpoints, save_dir, cases=cases, network=network)

    def step(engine, batch):
        with torch.no_grad():
            network.weight.add_(1.0)

    trainer = Engine(step)
    handler = checkpoints.FinalValidationHandler(
        interval=100, validator=evaluator, model_saver=saver if with_saver else None
    )
    handler.attach(trainer)
    trainer.run([0], max_epochs=1)
    return network


def test_a_run_without_validation_data_saves_its_last_weights_and_says_so(checkpoints, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        network = _training_run(checkpoints, tmp_path / "unvalidated", cases=0)
    saved = torch.load(tmp_path / "unvalidated" / "model.pt", weights_only=True)
    torch.testing.assert_close(saved["model"], network.state_dict(), rtol=0, atol=0)
    assert "no validation data" in caplog.text and "unvalidated" in caplog.text, caplog.text
    # the same file layout as a validated run's key-metric save
    _training_run(checkpoints, tmp_path / "validated", cases=1)
    validated = torch.load(tmp_path / "validated" / "model.pt", weights_only=True)
    assert saved.keys() == validated.keys() == {"model", "network_record"}
    assert not list((tmp_path / "unvalidated").glob(".tmp_*"))


def test_without_a_model_saver_a_run_without_validation_data_writes_no_model(checkpoints, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _training_run(checkpoints, tmp_path, cases=0, with_saver=False)
    assert not (tmp_path / "model.pt").exists()
    assert "no validation data" in caplog.text
