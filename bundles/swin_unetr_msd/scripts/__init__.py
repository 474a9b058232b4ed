"""Python parts of the swin_unetr_msd bundle that its configs cannot express."""

from . import (checkpoints, checks, datalists, encoder_weights, ensemble, inferers, metrics, msd_data, patch_merging,
               surface_dice, tasks, transforms)
