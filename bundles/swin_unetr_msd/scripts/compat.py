# Generated from bundles/common/scripts/compat.py: edit that, then run python -m tools sync_bundle_code
"""The MONAI and torch versions this bundle runs on, and the start-up check that refuses the others.

Tested: monai 1.4.0, 1.5.2 and 1.6.1 with torch 2.13.0, and monai 1.6.1 with torch 2.14.1 (the project
repository's docs/versions.md says what differs between them). ``require_supported_versions``
runs first when a config imports ``scripts``, and refuses, naming the installed and the supported versions:

* monai < 1.4: it does not merge the ``+imports`` and ``+setup`` keys of ``configs/multi_gpu_train.json``
  into ``train.json`` (monai 1.4 added ``+`` keys), so multi-GPU training would start without its
  process-group import and rank set-up; nothing older than 1.4.0 is tested;
* torch < 2.1: the bundles load checkpoints with ``torch.load(mmap=True)`` and attend with
  ``scaled_dot_product_attention(scale=...)``, both new in torch 2.1.

A monai newer than the tested ones only gets a warning: nothing known breaks it. This module imports
nothing of MONAI but its version, so the check runs before any import that an old monai would fail.
"""

from __future__ import annotations

import re

import monai
import torch

from .bundle_logger import logger

__all__ = [
    "MONAI_MIN",
    "MONAI_TESTED",
    "TORCH_MIN",
    "TORCH_TESTED",
    "MONAI_VERSION",
    "version_tuple",
    "unsupported_versions",
    "require_supported_versions",
]

MONAI_MIN = (1, 4, 0)
MONAI_TESTED = ("1.4.0", "1.5.2", "1.6.1")
TORCH_MIN = (2, 1, 0)
TORCH_TESTED = ("2.13.0", "2.14.1")
_MONAI_TOO_OLD = (
    "monai < 1.4 does not merge the '+imports' and '+setup' keys of configs/multi_gpu_train.json, "
    "and nothing older than monai 1.4.0 is tested"
)
_TORCH_TOO_OLD = "torch < 2.1 lacks torch.load(mmap=True) and scaled_dot_product_attention(scale=...)"
_WHAT_TO_DO = (
    "install a tested pair, e.g. `pip install monai==1.6.1 torch==2.13.0` (the versions in "
    "configs/metadata.json), or monai 1.4.0 or 1.5.2 with torch 2.13.0"
)


def version_tuple(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a version string such as ``"1.5.2"``, ``"2.13.0+cpu"`` or ``"1.6.0rc1"``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


MONAI_VERSION = version_tuple(monai.__version__)


def unsupported_versions(monai_version: str | None = None, torch_version: str | None = None) -> list[str]:
    """One line per package below the bundle's minimum (empty if both are supported); default: the installed ones."""
    monai_version = monai.__version__ if monai_version is None else monai_version
    torch_version = torch.__version__ if torch_version is None else torch_version
    problems = []
    if version_tuple(monai_version) < MONAI_MIN:
        problems.append(f"monai {monai_version} is installed; this bundle needs monai >= 1.4.0 ({_MONAI_TOO_OLD})")
    if version_tuple(torch_version) < TORCH_MIN:
        problems.append(f"torch {torch_version} is installed; this bundle needs torch >= 2.1.0 ({_TORCH_TOO_OLD})")
    return problems


def require_supported_versions() -> None:
    """Raise RuntimeError naming the installed and the supported versions if monai or torch is too old.

    A monai newer than the tested ones is logged as a warning, not refused.
    """
    problems = unsupported_versions()
    if problems:
        tested = f"monai {', '.join(MONAI_TESTED)} with torch {', '.join(TORCH_TESTED)}"
        message = f"unsupported versions: {'; '.join(problems)}. Tested: {tested}. To run it, {_WHAT_TO_DO}."
        # logged too: monai's config parser turns a failed `import scripts` into a later, vaguer error
        logger.error(message)
        raise RuntimeError(message)
    if version_tuple(monai.__version__)[:2] > version_tuple(MONAI_TESTED[-1])[:2]:
        logger.warning(
            "monai %s is newer than the versions this bundle was tested with (%s); if it fails, %s.",
            monai.__version__,
            ", ".join(MONAI_TESTED),
            _WHAT_TO_DO,
        )
