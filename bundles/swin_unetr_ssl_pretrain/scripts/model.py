"""The pre-training network: the Swin UNETR encoder with the three proxy-task heads (Tang et al. 2022)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .networks import swin_unetr

__all__ = ["SSLOutputs", "SwinSSLNet", "SwinSSLReconstruction"]


class SSLOutputs(NamedTuple):
    """What :class:`SwinSSLNet` returns for a batch of B crops."""

    rotation: torch.Tensor  # (B, 4) rotation-class logits, from bottleneck token 0
    contrastive: torch.Tensor  # (B, contrastive_dim) embedding, from bottleneck token 1
    reconstruction: torch.Tensor  # (B, in_channels, *spatial) inpainted crop


def _up_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=1, padding=1),
        nn.InstanceNorm3d(out_ch),
        nn.LeakyReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
    ]


class SwinSSLNet(nn.Module):
    """Swin encoder + rotation head, contrastive head and reconstruction decoder.

    The encoder is ``SwinUNETR(...).swinViT`` built with the same class and knobs as the
    fine-tuning bundles, so its state dict (``swinViT.*``) drops into their SwinUNETR. Sizes follow
    ``feature_size`` (F): the bottleneck has 16 F channels (768 for F = 48) at 1/32 of the crop;
    the rotation head is Linear(16 F, 4) on token 0, the contrastive head Linear(16 F,
    ``contrastive_dim``) on token 1, and the decoder 5 x [3^3 conv, InstanceNorm, LeakyReLU,
    x2 upsample] with channels 16F -> 8F -> 4F -> 2F -> F -> F, then a 1^3 conv to the input channels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
        downsample: str | type[nn.Module] = "merging",
        contrastive_dim: int = 512,
        num_rotations: int = 4,
    ) -> None:
        super().__init__()
        self.swinViT = swin_unetr(
            in_channels=in_channels,
            out_channels=1,
            feature_size=feature_size,
            use_checkpoint=use_checkpoint,
            use_flash_attention=use_flash_attention,
            downsample=downsample,
        ).swinViT
        dim = 16 * feature_size
        self.rotation_head = nn.Linear(dim, num_rotations)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        blocks = [layer for i in range(5) for layer in _up_block(widths[i], widths[i + 1])]
        self.reconstruction_head = nn.Sequential(*blocks, nn.Conv3d(widths[-1], in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> SSLOutputs:
        """Heads' outputs for crops ``x`` of shape (B, in_channels, D, H, W), each side a multiple of 32."""
        bottleneck = self.swinViT(x.contiguous())[4]  # (B, 16F, D/32, H/32, W/32)
        if bottleneck.shape[2:].numel() < 2:
            raise ValueError(
                f"crop {tuple(x.shape[2:])} gives a {tuple(bottleneck.shape[2:])} bottleneck: the rotation and "
                "contrastive heads need at least 2 tokens (use crops of 64 or more per side)."
            )
        tokens = bottleneck.flatten(start_dim=2).transpose(1, 2)  # (B, tokens, 16F)
        return SSLOutputs(
            rotation=self.rotation_head(tokens[:, 0]),
            contrastive=self.contrastive_head(tokens[:, 1]),
            reconstruction=self.reconstruction_head(bottleneck),
        )


class SwinSSLReconstruction(SwinSSLNet):
    """The pre-training network returning only its reconstruction (one tensor), for ``configs/inference.json``.

    Same parameters and state dict keys as :class:`SwinSSLNet`, so the bundle's ``model.pt`` loads
    into it. One tensor in, one out: what ``verify_net_in_out``, ``ckpt_export`` (tracing) and
    ``monai.bundle load`` expect of ``network_def``. The rotation and contrastive heads are kept
    (unused) so the checkpoint loads strictly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The inpainted crop (B, in_channels, D, H, W) for crops ``x`` of that shape, each side a multiple of 32."""
        return self.reconstruction_head(self.swinViT(x.contiguous())[4])
