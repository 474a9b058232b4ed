"""Python parts of the swin_unetr_ssl_pretrain bundle that its configs cannot express."""

from . import (checkpoints, corpus, encoder_weights, export, iteration, losses, model, patch_merging, proxy_tasks,
               resume)
