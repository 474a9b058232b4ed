"""Python parts of the swin_unetr_btcv_seg bundle that its configs cannot express.

Every module except ``bundle_logger`` and ``lcc`` is generated from ``bundles/common/scripts`` (see the header of
each file): edit it there, then run ``python -m tools sync_bundle_code``.

``BUNDLE_ROOT`` is the folder that holds this package: the configs' default ``bundle_root``, so every
default path (models/, eval/, ...) is under the bundle whatever the working directory.

First it installs ``error_report``'s exception hook (a failed run's last lines name the cause), then
``compat.require_supported_versions()``: a monai or torch this bundle cannot
run on stops here, with the installed and the supported versions, before any other module needs them.
"""

import os

from . import error_report

error_report.install("swin_unetr_btcv_seg")  # an uncaught error ends the output with its cause

from . import compat  # noqa: E402

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
    lcc,
    metrics,
    networks,
    outputs,
    patch_merging,
    precision,
    training_guards,
    transforms,
    weights_format,
    window_attention,
)

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
