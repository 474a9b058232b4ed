"""Transforms that config alone cannot express."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Spacingd

__all__ = ["PathTolerantSpacingd"]


class PathTolerantSpacingd(Spacingd):
    """``Spacingd`` that leaves string entries such as MONAI Label's ``image_path`` alone.

    monai 1.6.1 ``Spacingd`` treats every ``<key>_*`` entry of a NIfTI sample as a metadata
    dictionary and calls ``.update()`` on it, so the ``image_path`` string that MONAI Label puts
    into the data dictionary raises ``AttributeError``. This subclass hides non-dictionary
    ``<key>_*`` entries during the call and puts them back unchanged afterwards.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], Mapping)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out
