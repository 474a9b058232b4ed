"""Python parts of the swin_unetr_msd bundle that its configs cannot express.

Modules with a "Generated from bundles/common/scripts/..." header are copies: edit the source there,
then run ``python -m tools sync_bundle_code``; the others belong to this bundle.

``BUNDLE_ROOT`` is the folder that holds this package: the configs' default ``bundle_root``, so every
default path (models/, eval/, ...) is under the bundle whatever the working directory.

The first thing it does is ``compat.require_supported_versions()``: a monai or torch this bundle cannot
run on stops here, with the installed and the supported versions, before any other module needs them.
"""

import os

from . import compat

compat.require_supported_versions()

from . import (  # noqa: E402  (after the version check: an unsupported monai fails with its own message)
    bf16_conv_guard,
    checkpoints,
    checks,
    datalists,
    dicom_series,
    distributed,
    encoder_weights,
    ensemble,
    folds,
    inferers,
    known_checkpoints,
    metrics,
    msd_data,
    networks,
    outputs,
    patch_merging,
    precision,
    surface_dice,
    tasks,
    training_guards,
    transforms,
    weights_format,
    window_attention,
)

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
