"""The research code's pre-training step, as ``benchmark_ssl``'s ``research`` mode runs it.

Project-MONAI research-contributions ``SwinUNETR/Pretrain/main.py``: two rotated, cut-out views per
crop made per sample with numpy on the CPU (``research_views``), moved to the device, the network once
per view batch (or once on both), loss and update as main.py. The assumptions about the research
code's augmentation (utils/ops.py) are in ``benchmark_ssl``'s docstring.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tools.common.bundles import trains_fused
from tools.common.timing import sync

RESEARCH_FORWARDS = ("separate", "concat")

# The research augmentation (own implementation of what utils/ops.py does; see the module docstring).
NUM_ROTATIONS = 4
ROTATION_AXES = (2, 3)  # array axes of a channel-first crop (C, D, H, W): spatial axes 1 and 2
MAX_CUTOUT_FRACTION = 0.3
MAX_BOX_SIZE = 0.25
MIN_BOX_SIZE = 0.05
MAX_BOXES = 1000


def rotate_view(sample: np.ndarray, k: int) -> np.ndarray:
    """Rotate a channel-first crop (C, D, H, W) by ``k`` x 90 degrees in the plane of spatial axes 1, 2.

    Same direction as ``torch.rot90(crop, k, dims=(2, 3))`` (the bundle's ``rotate90``), so
    ``rotate_view(rotate_view(x, k), -k)`` is ``x`` and the label ``k`` means the same in both modes.
    """
    return np.ascontiguousarray(np.rot90(sample, int(k), axes=ROTATION_AXES))


def draw_cutout_mask(
    spatial_shape: Sequence[int],
    rng: np.random.Generator,
    max_fraction: float = MAX_CUTOUT_FRACTION,
    max_box_size: float = MAX_BOX_SIZE,
    min_box_size: float = MIN_BOX_SIZE,
    max_boxes: int = MAX_BOXES,
) -> np.ndarray:
    """Boolean mask of random boxes covering a share drawn uniformly in [0, ``max_fraction``) of the voxels.

    Box sides are drawn between ``min_box_size`` and ``max_box_size`` of each side; boxes are added
    until the union reaches the drawn share, a box that would take the union past
    ``max_fraction`` being halved along its longest side until it fits.
    """
    shape = np.asarray(spatial_shape, dtype=int)
    total = int(shape.prod())
    target = rng.uniform(0.0, max_fraction) * total
    budget = int(np.floor(max_fraction * total))
    min_sides = np.maximum(1, np.floor(min_box_size * shape)).astype(int)
    max_sides = np.maximum(min_sides, np.floor(max_box_size * shape)).astype(int)
    mask = np.zeros(tuple(shape), dtype=bool)
    masked = 0
    for _ in range(int(max_boxes)):
        if masked >= target:
            break
        sides = rng.integers(min_sides, max_sides + 1)
        starts = rng.integers(0, shape - sides + 1)

        def box_of(s: np.ndarray, starts: np.ndarray = starts) -> tuple[slice, ...]:
            return tuple(slice(int(a), int(a + b)) for a, b in zip(starts, s))

        new = int(np.count_nonzero(~mask[box_of(sides)]))
        while masked + new > budget and sides.max() > 1:
            i = int(np.argmax(sides))
            sides[i] = max(1, sides[i] // 2)
            new = int(np.count_nonzero(~mask[box_of(sides)]))
        if masked + new > budget:
            break
        mask[box_of(sides)] = True
        masked += new
    return mask


def noise_cutout(sample: np.ndarray, rng: np.random.Generator, **mask_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the crop (C, D, H, W) with random boxes replaced by noise in [0, 1]; returns (copy, mask)."""
    mask = draw_cutout_mask(sample.shape[1:], rng, **mask_kwargs)
    out = sample.copy()
    count = int(np.count_nonzero(mask))
    if count:
        noise = rng.standard_normal((sample.shape[0], count), dtype=np.float32)
        lo, hi = float(noise.min()), float(noise.max())
        noise = (noise - lo) / (hi - lo) if hi > lo else np.zeros_like(noise)
        out[:, mask] = noise.astype(sample.dtype, copy=False)
    return out, mask


def research_views(images: torch.Tensor, rng: np.random.Generator) -> dict[str, Any]:
    """The research code's two views of a CPU batch (N, C, D, H, W), made per sample with numpy on the CPU.

    Returns CPU tensors ``x1``, ``x2`` (rotated, un-masked: reconstruction targets), ``x1_augment``,
    ``x2_augment`` (rotated and cut out: the network inputs), ``rot1``, ``rot2`` (labels, long),
    ``masks`` (2N, D, H, W; view 1 of every sample, then view 2) and ``masked_fraction`` (mean share).
    """
    array = images.detach().cpu().numpy()
    if array.ndim != 5 or array.shape[1 + ROTATION_AXES[0]] != array.shape[1 + ROTATION_AXES[1]]:
        raise ValueError(
            f"crops of shape {tuple(array.shape[2:])} are not square in the rotation plane (spatial axes 1, 2)"
        )
    out: dict[str, Any] = {}
    masks = []
    for view in (1, 2):
        rotated, augmented, labels = [], [], []
        for sample in array:
            k = int(rng.integers(NUM_ROTATIONS))
            r = rotate_view(sample, k)
            a, m = noise_cutout(r, rng)
            rotated.append(r)
            augmented.append(a)
            labels.append(k)
            masks.append(m)
        out[f"x{view}"] = torch.from_numpy(np.stack(rotated))
        out[f"x{view}_augment"] = torch.from_numpy(np.stack(augmented))
        out[f"rot{view}"] = torch.tensor(labels, dtype=torch.long)
    out["masks"] = np.stack(masks)
    out["masked_fraction"] = float(out["masks"].mean())
    return out


def setup_research(
    device: torch.device, parser: Any, seed: int, crops: torch.Tensor, amp: bool, forward: str
) -> dict[str, Any]:
    """The research code's step: CPU augmentation per sample, views to the device, forward, loss, update."""
    from monai.losses import ContrastiveLoss

    if forward not in RESEARCH_FORWARDS:
        raise ValueError(f"research_forward must be one of {RESEARCH_FORWARDS}, got {forward!r}")
    torch.manual_seed(int(seed))  # the same initial weights as the bundle mode (set_determinism seeds torch alike)
    parser["fast_window_attention"] = False  # the research code runs MONAI's own window attention
    network = parser.get_parsed_content("network")  # the same SwinSSLNet with the bundle's other knobs
    if trains_fused(network):
        raise RuntimeError("the research mode's network must use MONAI's own window attention")
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=float(parser["learning_rate"]), weight_decay=float(parser["weight_decay"])
    )
    use_amp = bool(amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    contrast = ContrastiveLoss(temperature=float(parser["temperature"]))
    rotation_ce = torch.nn.CrossEntropyLoss()
    reconstruction_l1 = torch.nn.L1Loss()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as main.py
    rng = np.random.default_rng(int(seed))
    batch_cpu = crops.cpu()

    def step(index: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        views = research_views(batch_cpu, rng)
        t1 = time.perf_counter()
        x1, x2, x1_aug, x2_aug, rot1, rot2 = (
            views[k].to(device) for k in ("x1", "x2", "x1_augment", "x2_augment", "rot1", "rot2")
        )
        sync(device)
        t2 = time.perf_counter()
        network.train()
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            if forward == "separate":  # main.py: model(x1_augment), model(x2_augment)
                o1, o2 = network(x1_aug), network(x2_aug)
                rot_p = torch.cat([o1.rotation, o2.rotation])
                c1, c2 = o1.contrastive, o2.contrastive
                reconstruction = torch.cat([o1.reconstruction, o2.reconstruction])
            else:
                o = network(torch.cat([x1_aug, x2_aug]))
                half = x1_aug.shape[0]
                rot_p, c1, c2, reconstruction = o.rotation, o.contrastive[:half], o.contrastive[half:], o.reconstruction
            terms = {
                "rotation_loss": rotation_ce(rot_p, torch.cat([rot1, rot2])),
                "contrast_loss": contrast(c1, c2),
                "inpaint_loss": reconstruction_l1(reconstruction, torch.cat([x1, x2])),
            }
            loss = terms["rotation_loss"] + terms["contrast_loss"] + terms["inpaint_loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        loss_value = float(loss.detach())
        sync(device)
        t3 = time.perf_counter()
        return {
            "loss": loss_value,
            "loss_terms": {k: float(v.detach()) for k, v in terms.items()},
            "masked_fraction": views["masked_fraction"],
            "augment_s": t1 - t0,
            "transfer_s": t2 - t1,
            "compute_s": t3 - t2,
        }

    return {
        "network": network,
        "step": step,
        "settings": {
            "how": "research-contributions SwinUNETR/Pretrain main.py way: rot_rand + aug_rand per sample with numpy "
            "on the CPU (own implementation), views moved to the device, "
            + (
                "model(x1_augment), model(x2_augment)"
                if forward == "separate"
                else "model(torch.cat([x1_augment, x2_augment]))"
            )
            + ", rotation CE + contrastive + L1, scaler.step, zero_grad",
            "optimizer": "AdamW",
            "lr_scheduler": None,
            "reuse_cpu_memory": False,
            "allocator_applied": False,
            "amp": use_amp,
            "scaler_enabled": use_amp,
            "forward": forward,
            "augmentation": {
                "rotation_axes_spatial": [a - 1 for a in ROTATION_AXES],
                "max_cutout_fraction": MAX_CUTOUT_FRACTION,
                "box_size_range": [MIN_BOX_SIZE, MAX_BOX_SIZE],
                "fill": "normal noise min-max scaled to [0, 1]",
                "second_cutout_from_other_sample": False,
            },
        },
    }
