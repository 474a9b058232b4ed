"""The pre-training loss: weighted L1 inpainting + contrastive + rotation cross-entropy."""

from __future__ import annotations

import torch
from monai.losses import ContrastiveLoss
from torch import nn

__all__ = ["LOSS_TERMS", "SSLLoss"]

LOSS_TERMS = ("inpaint_loss", "contrast_loss", "rotation_loss")


class SSLLoss(nn.Module):
    """``loss = inpaint_weight * L1 + contrast_weight * contrastive + rotation_weight * CE``.

    ``forward(outputs, targets, rotations)`` takes the network's :class:`SSLOutputs` for a batch
    of 2B views (view 1 of each crop, then view 2), the un-masked rotated crops and the rotation
    classes, and returns a dict with ``"loss"`` and each un-weighted term (``LOSS_TERMS``). The
    contrastive term is MONAI's ``ContrastiveLoss`` between the first and second B embeddings.
    """

    def __init__(
        self,
        inpaint_weight: float = 1.0,
        contrast_weight: float = 1.0,
        rotation_weight: float = 1.0,
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        self.weights = {
            "inpaint_loss": float(inpaint_weight),
            "contrast_loss": float(contrast_weight),
            "rotation_loss": float(rotation_weight),
        }
        self.inpaint = nn.L1Loss()
        self.contrast = ContrastiveLoss(temperature=temperature)
        self.rotation = nn.CrossEntropyLoss()

    def forward(self, outputs, targets: torch.Tensor, rotations: torch.Tensor) -> dict[str, torch.Tensor]:
        """Total and per-term losses; every value is a scalar tensor (the total carries the gradient)."""
        embeddings = outputs.contrastive.float()
        half = embeddings.shape[0] // 2
        terms = {
            "inpaint_loss": self.inpaint(outputs.reconstruction.float(), targets.float()),
            "contrast_loss": self.contrast(embeddings[:half], embeddings[half:]),
            "rotation_loss": self.rotation(outputs.rotation.float(), rotations),
        }
        total = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": total, **terms}
