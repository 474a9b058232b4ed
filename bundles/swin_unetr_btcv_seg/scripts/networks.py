# Generated from bundles/common/scripts/networks.py: edit that, then run python -m tools sync_bundle_code
"""MONAI's ``SwinUNETR``, built with the arguments that the installed monai takes.

The configs' ``network_def`` targets :func:`swin_unetr` so that one config runs on every tested monai:

* monai 1.4 still requires ``img_size`` (it only checks divisibility by 32 there; monai 1.5 removed it);
* only monai >= 1.6 takes ``use_flash_attention`` (PyTorch's ``scaled_dot_product_attention`` in
  ``WindowAttention``). On older monai the setting is kept on each window-attention layer, where
  the bundle's own attention (``window_attention``, used for inference and CPU training) reads it;
  MONAI's own layers there always run the plain attention.

The network is MONAI's class, so its state dict, TorchScript tracing and every client see plain SwinUNETR.
"""

from __future__ import annotations

import warnings

from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention

from .compat import MONAI_VERSION

__all__ = ["swin_unetr"]


def swin_unetr(use_flash_attention: bool = False, **kwargs) -> SwinUNETR:
    """``SwinUNETR(use_flash_attention=..., **kwargs)`` on the installed monai (see the module doc)."""
    if MONAI_VERSION >= (1, 6, 0):
        return SwinUNETR(use_flash_attention=use_flash_attention, **kwargs)
    if MONAI_VERSION < (1, 5, 0):
        kwargs.setdefault("img_size", 32)  # any multiple of 32 passes monai 1.4's construction-time check
        with warnings.catch_warnings():  # its deprecation notice names an argument the configs never set
            warnings.filterwarnings("ignore", message=".*img_size.*")
            network = SwinUNETR(**kwargs)
    else:
        network = SwinUNETR(**kwargs)
    for module in network.modules():
        if isinstance(module, WindowAttention):
            module.use_flash_attention = use_flash_attention
    return network
