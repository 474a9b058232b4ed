"""The proxy tasks as MONAI transforms: rotation with its class, random-box cutout, two views per crop.

Two cutout rules (``cutout_mode``): ``"research"`` follows the research code's recipe (a box budget
counted with overlaps, Gaussian-noise boxes, then boxes pasted from another crop of the batch, see
:class:`ResearchBoxCutout`); ``"bundle"`` is this bundle's earlier variant (:class:`RandBoxCutout`:
the masked union drawn in bounds, uniform noise, no paste pass).

Array transforms work on one channel-first crop (C, D, H, W) on whatever device the tensor lives
on, so the trainer applies them to a batch already on the GPU; random draws come from each
transform's ``self.R`` (MONAI's ``Randomizable``), so ``set_random_state(seed)`` makes them
reproducible. The trainer applies :class:`ProxyTaskViews` (train.json's ``proxy_tasks``) to each batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

__all__ = [
    "CUTOUT_MODES",
    "DEFAULT_CUTOUT_FRACTION",
    "NUM_ROTATIONS",
    "ProxyTaskViews",
    "RandBoxCutout",
    "RandRotate90Class",
    "ResearchBoxCutout",
    "draw_research_boxes",
    "rotate90",
]

NUM_ROTATIONS = 4  # 0, 90, 180, 270 degrees
CUTOUT_MODES = ("research", "bundle")
# the share bounds each mode uses when cutout_fraction is not given
DEFAULT_CUTOUT_FRACTION = {"research": (0.0, 0.3), "bundle": (0.1, 0.3)}


def rotate90(img: torch.Tensor, k: int, spatial_axes: Sequence[int] = (1, 2)) -> torch.Tensor:
    """Rotate a channel-first crop by ``k`` x 90 degrees in the plane of ``spatial_axes`` (0-based, no channel)."""
    return torch.rot90(img, int(k), dims=[a + 1 for a in spatial_axes])


class RandRotate90Class(Randomizable, Transform):
    """Rotate a crop by one of 0/90/180/270 degrees, drawn uniformly; return ``(rotated, class)``.

    The class ``k`` is the number of quarter turns, so ``rotate90(rotated, -k)`` restores the input.
    The default plane (spatial axes 1, 2) is the one the research code rotates in.
    """

    def __init__(self, spatial_axes: Sequence[int] = (1, 2)) -> None:
        self.spatial_axes = tuple(spatial_axes)
        self._k = 0

    def randomize(self, data: Any = None) -> None:
        self._k = int(self.R.randint(NUM_ROTATIONS))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> tuple[torch.Tensor, int]:
        if randomize:
            self.randomize()
        return rotate90(img, self._k, self.spatial_axes), self._k


class RandBoxCutout(Randomizable, Transform):
    """Mask random boxes of a crop for the inpainting task; ``fraction`` bounds the masked share of voxels.

    A target share is drawn uniformly from ``fraction = (low, high)``; boxes (each side up to
    ``max_box_size`` of the crop side) are added until the union reaches it, each box shrunk so
    that the union never exceeds ``high``. Masked voxels are filled with uniform noise in
    ``fill_range`` (the crop's normalised intensity range). ``__call__`` returns the masked crop;
    the boolean mask of the last call (D, H, W) is kept in ``self.mask``.
    """

    def __init__(
        self,
        fraction: Sequence[float] = (0.1, 0.3),
        max_box_size: float = 0.25,
        fill_range: Sequence[float] = (0.0, 1.0),
        max_boxes: int = 1000,
    ) -> None:
        low, high = _check_fraction(fraction)
        if not 0.0 < max_box_size <= 1.0:
            raise ValueError(f"max_box_size must be in (0, 1], got {max_box_size}.")
        self.fraction = (low, high)
        self.max_box_size = float(max_box_size)
        self.fill_range = (float(fill_range[0]), float(fill_range[1]))
        self.max_boxes = int(max_boxes)
        self._boxes: list[tuple[slice, ...]] = []
        self.mask: torch.Tensor | None = None

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw the boxes for a crop of ``spatial_shape``; they are kept for the next ``__call__``."""
        shape = np.asarray(spatial_shape, dtype=int)
        total = int(shape.prod())
        target = self.R.uniform(*self.fraction) * total
        budget = int(np.floor(self.fraction[1] * total))
        mask = np.zeros(shape, dtype=bool)
        masked = 0
        boxes = []
        max_sides = np.maximum(1, np.floor(self.max_box_size * shape)).astype(int)
        for _ in range(self.max_boxes):
            if masked >= target:
                break
            sides = np.array([self.R.randint(1, m + 1) for m in max_sides])
            room = budget - masked
            if room <= 0:
                break
            if sides.prod() > room:  # shrink so the union cannot pass the upper bound
                sides = np.maximum(1, np.floor(sides * (room / sides.prod()) ** (1.0 / len(sides)))).astype(int)
                while sides.prod() > room:
                    sides[int(np.argmax(sides))] -= 1
            starts = [self.R.randint(0, s - b + 1) for s, b in zip(shape, sides)]
            box = tuple(slice(int(a), int(a + b)) for a, b in zip(starts, sides))
            masked += int((~mask[box]).sum())
            mask[box] = True
            boxes.append(box)
        self._boxes = boxes

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        spatial = img.shape[1:]
        if randomize:
            self.randomize(spatial)
        mask = torch.zeros(spatial, dtype=torch.bool, device=img.device)
        for box in self._boxes:
            mask[box] = True
        # noise drawn where the crop lives (the GPU in training), seeded from self.R
        generator = torch.Generator(device=img.device).manual_seed(int(self.R.randint(2**31)))
        low, high = self.fill_range
        noise = torch.rand(img.shape, generator=generator, device=img.device, dtype=torch.float32)
        noise = (low + (high - low) * noise).to(img.dtype)
        self.mask = mask
        return torch.where(mask, noise, img)


def _check_fraction(fraction: Sequence[float]) -> tuple[float, float]:
    low, high = (float(f) for f in fraction)
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"cutout fraction must satisfy 0 <= low <= high < 1, got {tuple(fraction)}.")
    return low, high


def draw_research_boxes(
    spatial_shape: Sequence[int],
    rng: np.random.RandomState,
    fraction: Sequence[float] = (0.0, 0.3),
    max_box_size: float = 0.25,
    min_box_size: float = 0.05,
) -> list[tuple[slice, ...]]:
    """Boxes of one cutout pass by the research code's rule, drawn from ``rng``.

    A budget of ``U(fraction) x volume`` voxels is drawn; boxes are added until the sum of their
    volumes reaches it (overlapping voxels count once per box). Per axis of side ``n``: start in
    ``[0, n - t)``, side in ``[t, m)`` with ``t = int(min_box_size n)``, ``m = int(max_box_size n)``
    (4..23 voxels for 96), the end clipped to the crop. Sides are at least 1 voxel, so tiny crops terminate.
    """
    shape = [int(n) for n in spatial_shape]
    budget = rng.uniform(*fraction) * float(np.prod(shape))
    small = [max(1, int(min_box_size * n)) for n in shape]
    large = [max(int(max_box_size * n), t + 1) for n, t in zip(shape, small)]
    boxes, used = [], 0
    while used < budget:
        box = []
        for n, t, m in zip(shape, small, large):
            start = int(rng.randint(0, max(n - t, 1)))
            box.append(slice(start, min(start + int(rng.randint(t, m)), n)))
        boxes.append(tuple(box))
        used += int(np.prod([b.stop - b.start for b in box]))
    return boxes


def _scaled_noise(
    shape: Sequence[int], generator: torch.Generator, device: torch.device, fill_range: tuple[float, float]
) -> torch.Tensor:
    """Gaussian noise min-max scaled to ``fill_range`` (as the research code fills each box)."""
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    low, high = noise.aminmax()
    scaled = (noise - low) / (high - low).clamp_min(1e-12)
    return fill_range[0] + (fill_range[1] - fill_range[0]) * scaled


class ResearchBoxCutout(Randomizable):
    """The research code's cutout on a batch of crops (B, C, D, H, W), any device.

    Crop by crop, in batch order: a noise pass (:func:`draw_research_boxes`, each box filled with
    Gaussian noise min-max scaled to ``fill_range``), then, when a crop index drawn uniformly from
    the batch is another crop (probability (B-1)/B), a second pass whose boxes copy that crop's
    current voxels (already cut out if it comes earlier in the batch). After a call, ``self.mask``
    (B, D, H, W, bool, CPU) marks every voxel that no longer holds the crop's own value, ``self.foreign``
    those holding another crop's tissue (not noise), ``self.sources`` the crop pasted from, or -1.
    """

    def __init__(
        self,
        fraction: Sequence[float] = (0.0, 0.3),
        max_box_size: float = 0.25,
        min_box_size: float = 0.05,
        fill_range: Sequence[float] = (0.0, 1.0),
    ) -> None:
        self.fraction = _check_fraction(fraction)
        if not 0.0 <= min_box_size < max_box_size <= 1.0:
            raise ValueError(f"need 0 <= min_box_size < max_box_size <= 1, got {min_box_size}, {max_box_size}.")
        self.max_box_size, self.min_box_size = float(max_box_size), float(min_box_size)
        self.fill_range = (float(fill_range[0]), float(fill_range[1]))
        self.mask: np.ndarray | None = None
        self.foreign: np.ndarray | None = None
        self.sources: list[int] = []

    def randomize(self, data: Any = None) -> None:
        pass  # boxes are drawn crop by crop in __call__

    def _boxes(self, spatial: Sequence[int]) -> list[tuple[slice, ...]]:
        return draw_research_boxes(spatial, self.R, self.fraction, self.max_box_size, self.min_box_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        batch, channels, spatial = out.shape[0], out.shape[1], out.shape[2:]
        # which crop's tissue each voxel holds (-1: noise), tracked on the CPU alongside the device edits
        origin = np.broadcast_to(np.arange(batch, dtype=np.int16).reshape(-1, 1, 1, 1), (batch, *spatial)).copy()
        generator = torch.Generator(device=out.device).manual_seed(int(self.R.randint(2**31)))
        self.sources = []
        for i in range(batch):
            for box in self._boxes(spatial):
                sides = [b.stop - b.start for b in box]
                out[(i, slice(None), *box)] = _scaled_noise(
                    (channels, *sides), generator, out.device, self.fill_range
                ).to(out.dtype)
                origin[(i, *box)] = -1
            source = int(self.R.randint(batch))
            self.sources.append(source if source != i else -1)
            if source == i:
                continue
            for box in self._boxes(spatial):
                out[(i, slice(None), *box)] = out[(source, slice(None), *box)]
                origin[(i, *box)] = origin[(source, *box)]
        own = np.arange(batch).reshape(-1, 1, 1, 1)
        self.mask, self.foreign = origin != own, (origin >= 0) & (origin != own)
        return out


class ProxyTaskViews(Randomizable):
    """Two augmented views of every crop in a batch: each rotated (with its class) and cut out.

    ``views(images)`` with ``images`` (B, C, D, H, W) on any device returns a dict of batches of
    2B: ``"inputs"`` (rotated, masked: what the network sees), ``"targets"`` (rotated, un-masked:
    what the reconstruction must match), ``"rotations"`` (class of each, long) and
    ``"masked_fraction"`` (mean share of masked voxels); the first B rows are view 1 of each crop,
    the last B view 2, which is how ``ContrastiveLoss`` pairs them.

    ``cutout_mode``: ``"research"`` (:class:`ResearchBoxCutout` on each view's batch of B crops, as
    the research code's ``aug_rand``) or ``"bundle"`` (:class:`RandBoxCutout` per crop). With
    ``cutout_fraction`` None, the mode's bounds from ``DEFAULT_CUTOUT_FRACTION`` are used.
    """

    def __init__(
        self,
        cutout_fraction: Sequence[float] | None = None,
        max_box_size: float = 0.25,
        spatial_axes: Sequence[int] = (1, 2),
        fill_range: Sequence[float] = (0.0, 1.0),
        cutout_mode: str = "bundle",
    ) -> None:
        if cutout_mode not in CUTOUT_MODES:
            raise ValueError(f"cutout_mode must be one of {CUTOUT_MODES}, got {cutout_mode!r}.")
        fraction = DEFAULT_CUTOUT_FRACTION[cutout_mode] if cutout_fraction is None else cutout_fraction
        self.cutout_mode = cutout_mode
        self.rotate = RandRotate90Class(spatial_axes)
        if cutout_mode == "research":
            self.cutout = ResearchBoxCutout(fraction, max_box_size, fill_range=fill_range)
        else:
            self.cutout = RandBoxCutout(fraction, max_box_size, fill_range)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.rotate.set_random_state(state=self.R)
        self.cutout.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        pass  # the sub-transforms draw per crop

    def _check_square(self, images: torch.Tensor) -> None:
        plane = [images.shape[2 + a] for a in self.rotate.spatial_axes]
        if plane[0] != plane[1]:
            raise ValueError(
                f"crops of spatial shape {tuple(images.shape[2:])} are not square in the rotation plane (spatial axes "
                f"{self.rotate.spatial_axes}): a 90-degree turn would change their shape. Use a roi_size with equal "
                "sides there."
            )

    def _view(self, images: torch.Tensor) -> tuple[list, list, list, list]:
        """One view of every crop: (inputs, targets, rotation classes, masked shares)."""
        rotated, classes = zip(*(self.rotate(crop) for crop in images))
        if self.cutout_mode == "research":
            inputs = self.cutout(torch.stack(rotated))
            return list(inputs), list(rotated), list(classes), [float(m.mean()) for m in self.cutout.mask]
        inputs, shares = [], []
        for crop in rotated:
            inputs.append(self.cutout(crop))
            shares.append(float(self.cutout.mask.float().mean()))
        return inputs, list(rotated), list(classes), shares

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_square(images)
        inputs, targets, rotations, fractions = [], [], [], []
        for _view in range(2):
            for collected, new in zip((inputs, targets, rotations, fractions), self._view(images)):
                collected.extend(new)
        return {
            "inputs": torch.stack(inputs),
            "targets": torch.stack(targets),
            "rotations": torch.tensor(rotations, dtype=torch.long, device=images.device),
            "masked_fraction": torch.tensor(float(np.mean(fractions))),
        }
