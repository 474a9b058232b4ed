"""Every training run validates once more at its end (``FinalValidationHandler``), so ``model.pt`` is written
even by runs shorter than ``val_interval`` (MONAI Label's), and a final epoch is never validated twice."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.transforms import AsDiscreted
from torch import nn

from tests.conftest import BTCV_DIR, bundle_on_path


@pytest.fixture()
def checkpoints():
    with bundle_on_path(BTCV_DIR):
        import scripts.checkpoints

        yield scripts.checkpoints


def _evaluator(checkpoints, save_dir, cases: int) -> SupervisedEvaluator:
    """A 2-class evaluator on ``cases`` tiny volumes whose key-metric saver writes ``model.pt`` (as train.json's)."""
    network = nn.Conv3d(1, 2, 1)
    data = [{"image": torch.rand(1, 1, 4, 4, 4), "label": torch.randint(0, 2, (1, 1, 4, 4, 4))} for _ in range(cases)]
    saver = checkpoints.AtomicCheckpointSaver(
        str(save_dir), {"model": network}, save_key_metric=True, key_metric_filename="model.pt"
    )
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=network,
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric={"dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[saver],
    )


@pytest.mark.parametrize(
    "max_epochs, interval, validated_at",
    [(3, 100, [3]), (2, 1, [1, 2]), (3, 2, [2, 3]), (4, 2, [2, 4])],
    ids=["shorter-than-interval", "every-epoch", "ends-between", "ends-on-one"],
)
def test_runs_validate_at_their_end_once(checkpoints, tmp_path, max_epochs, interval, validated_at):
    evaluator = _evaluator(checkpoints, tmp_path, cases=1)
    seen = []
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.epoch))
    trainer = Engine(lambda engine, batch: None)
    ValidationHandler(interval=interval, validator=evaluator).attach(trainer)
    checkpoints.FinalValidationHandler(interval=interval, validator=evaluator).attach(trainer)
    trainer.run([0, 1], max_epochs=max_epochs)
    assert seen == validated_at
    assert (tmp_path / "model.pt").is_file()


def test_a_run_without_validation_data_says_it_writes_no_model(checkpoints, tmp_path, caplog):
    evaluator = _evaluator(checkpoints, tmp_path, cases=0)
    trainer = Engine(lambda engine, batch: None)
    checkpoints.FinalValidationHandler(interval=100, validator=evaluator).attach(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=1)
    assert not (tmp_path / "model.pt").exists()
    assert "no validation data" in caplog.text
