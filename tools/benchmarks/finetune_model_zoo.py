"""The model zoo's ``swin_unetr_btcv_segmentation`` 0.5.x training, as ``benchmark_finetune``'s ``model_zoo`` mode
builds it from MONAI classes (its ``configs/train.json`` settings, stated once in ``MODEL_ZOO_TRAIN``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.harness import trainer_precision

NUM_CLASSES = 14
# The model zoo's swin_unetr_btcv_segmentation 0.5.x configs/train.json, its constants stated once.
MODEL_ZOO_TRAIN = {
    "name": "swin_unetr_btcv_segmentation",
    "version": "0.5.x",
    "config": "configs/train.json",
    "feature_size": 48,
    "roi_size": 96,
    "use_checkpoint": True,
    "axcodes": "RAS",
    "spacing": (1.5, 1.5, 2.0),
    "hu_window": (-175.0, 250.0),
    "num_samples": 2,
    "batch_size": 2,
    "flip_prob": 0.1,
    "rot90_prob": 0.1,
    "shift_offsets": 0.1,
    "shift_prob": 0.5,
    "cache_rate": 1.0,
    "num_workers": 4,
    "loss": {"to_onehot_y": True, "softmax": True, "squared_pred": True, "batch": True},
    "optimizer": "Adam",
    "learning_rate": 2e-4,
    "amp": True,  # SupervisedTrainer autocasts with torch.autocast("cuda"): float32 on CPU
    "seed": 123,
    "cudnn_benchmark": True,
}


def split_crops(crops: int, num_samples: int) -> tuple[int, int]:
    """(volumes per batch, crops per volume) for ``crops``: ``num_samples`` per volume where it divides."""
    crops = int(crops)
    if crops < 1:
        raise ValueError(f"crops must be at least 1, got {crops}")
    if num_samples >= 1 and crops % int(num_samples) == 0:
        return crops // int(num_samples), int(num_samples)
    return 1, crops


def model_zoo_transforms(roi: list[int], num_samples: int) -> Any:
    """The model zoo's training transforms (deterministic part cached by CacheDataset)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandShiftIntensityd,
        ScaleIntensityRanged,
        Spacingd,
    )

    z, keys = MODEL_ZOO_TRAIN, ["image", "label"]
    a_min, a_max = z["hu_window"]
    return Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes=z["axcodes"]),
            Spacingd(keys=keys, pixdim=z["spacing"], mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped(keys=keys),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=roi,
                pos=1,
                neg=1,
                num_samples=int(num_samples),
                image_key="image",
                image_threshold=0,
            ),
            *[RandFlipd(keys=keys, spatial_axis=[axis], prob=z["flip_prob"]) for axis in range(3)],
            RandRotate90d(keys=keys, max_k=3, prob=z["rot90_prob"]),
            RandShiftIntensityd(keys="image", offsets=z["shift_offsets"], prob=z["shift_prob"]),
        ]
    )


def model_zoo_trainer(
    dev: torch.device,
    data: list[dict],
    feature_size: int,
    roi: list[int],
    crops: int,
    num_workers: int | None,
    out_dir: Path,
) -> tuple[Any, dict[str, Any]]:
    """The model zoo's SupervisedTrainer settings built from MONAI classes on ``data``; (trainer, settings)."""
    import ignite.metrics
    from monai.data import CacheDataset, DataLoader
    from monai.engines import SupervisedTrainer
    from monai.handlers import StatsHandler, TensorBoardStatsHandler, from_engine
    from monai.inferers import SimpleInferer
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR
    from monai.transforms import Activationsd, AsDiscreted, Compose
    from monai.utils import set_determinism

    z = MODEL_ZOO_TRAIN
    workers = z["num_workers"] if num_workers is None else int(num_workers)
    batch_size, num_samples = split_crops(crops, z["num_samples"])
    set_determinism(seed=z["seed"])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = z["cudnn_benchmark"]
    t0 = time.perf_counter()
    network = SwinUNETR(
        in_channels=1, out_channels=NUM_CLASSES, feature_size=int(feature_size), use_checkpoint=z["use_checkpoint"]
    ).to(dev)
    dataset = CacheDataset(
        data=data, transform=model_zoo_transforms(roi, num_samples), cache_rate=z["cache_rate"], num_workers=workers
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    postprocessing = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=NUM_CLASSES),
        ]
    )
    loss_out = from_engine(["loss"], first=True)
    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=10**6,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=z["learning_rate"]),
        loss_function=DiceCELoss(**z["loss"]),
        inferer=SimpleInferer(),
        postprocessing=postprocessing,
        key_train_metric={"train_accuracy": ignite.metrics.Accuracy(output_transform=from_engine(["pred", "label"]))},
        train_handlers=[
            StatsHandler(tag_name="train_loss", output_transform=loss_out),
            TensorBoardStatsHandler(log_dir=str(out_dir / "eval"), tag_name="train_loss", output_transform=loss_out),
        ],
        amp=z["amp"],
    )
    settings = {
        "config": f"model zoo {z['name']} {z['version']} {z['config']} (rebuilt from MONAI classes)",
        "batch_size": batch_size,
        "num_samples": num_samples,
        "num_workers": workers,
        "amp": z["amp"],
        "training_autocast": trainer_precision(trainer, dev),
        "optimizer": "Adam",
        "loss": f"DiceCELoss({z['loss']})",
        "use_checkpoint": z["use_checkpoint"],
        "use_flash_attention": False,
        "per_iteration_extras": "postprocessing (softmax, argmax, one-hot) + ignite Accuracy",
        "setup_s": time.perf_counter() - t0,
    }
    return trainer, settings
