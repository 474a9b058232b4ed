"""Python parts of the swin_unetr_btcv_seg bundle that its configs cannot express."""

from . import checkpoints, checks, datalists, encoder_weights, inferers, metrics, patch_merging, transforms
