# Generated from bundles/common/scripts/outputs.py: edit that, then run python -m tools sync_bundle_code
"""Where inference writes each label map: one distinct, recognisable file per input, nothing overwritten unasked.

Naming rule (``output_names``): an input's output name is its file name without the image suffix
(``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``), or a DICOM series folder's whole name, every
dot kept (``1.3.6.1.4.1.9328.50.1.10``). Inputs that would share a name (``p1/ct.nii.gz`` and
``p2/ct.nii.gz``) are each prefixed with as many of their parent folders' names as make them
distinct, joined by ``_`` (``p1_ct``, ``p2_ct``). The bundle's postfix and ``.nii.gz`` follow.

``OutputNames.plan`` (``plan_outputs``) runs before any compute: it fixes every output path, stops on
a name two inputs would still share, and on outputs that already exist unless ``overwrite`` is true.
The same ``OutputNames`` makes ``SaveImaged`` write to the planned paths (its ``output_name_formatter``), and
``RecordOutputd`` adds an ``{"input", "output"}`` entry per written label map to ``manifest.json``
in the output folder.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.transforms import MapTransform

from .bundle_logger import logger
from .checks import InputDataError
from .datalists import IMAGE_SUFFIXES

__all__ = ["MANIFEST_NAME", "OUTPUT_KEY", "output_stem", "output_names", "plan_outputs", "OutputNames", "RecordOutputd"]

MANIFEST_NAME = "manifest.json"
OUTPUT_KEY = "output"
OUTPUT_EXT = ".nii.gz"


def _source(path: Any) -> str:
    """An input path as ``LoadImage`` records it in ``filename_or_obj``, normalised for lookups."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def output_stem(path: str) -> str:
    """The file name without its image suffix; a folder's (DICOM series) whole name, dots and all."""
    name = os.path.basename(os.path.normpath(str(path)))
    if os.path.isdir(path):
        return name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _qualified(paths: list[str], stem: str) -> list[str]:
    """``stem`` prefixed by the fewest parent folder names that tell ``paths`` apart."""
    parents = [os.path.dirname(_source(p)).strip(os.sep).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parents) + 1):
        names = ["_".join(p[-depth:] + [stem]) for p in parents]
        if len(set(names)) == len(names):
            return names
    return [stem] * len(paths)  # same folder and name: the same input twice, reported by plan_outputs


def output_names(paths: Sequence[str]) -> list[str]:
    """The output name (no postfix, no extension) of each input path, distinct where the paths' names clash."""
    paths = [str(p) for p in paths]
    stems = [output_stem(p) for p in paths]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, stem in enumerate(stems):
        groups[stem].append(i)
    names = list(stems)
    for stem, members in groups.items():
        if len(members) > 1:
            for i, name in zip(members, _qualified([paths[i] for i in members], stem)):
                names[i] = name
    return names


def _clashes(items: list[dict], image_key: str) -> list[str]:
    """One line per output path that several inputs would write."""
    by_output: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_output[item[OUTPUT_KEY]].append(str(item[image_key]))
    return [
        f"{out}: would be written by {len(srcs)} inputs ({', '.join(srcs)})"
        for out, srcs in by_output.items()
        if len(srcs) > 1
    ]


def _read_manifest(path: str) -> list[dict]:
    """The entries of an existing manifest ([] when there is none); an unreadable one is an error, not dropped."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise InputDataError(f"{path}: existing output manifest cannot be read ({e}); move it away") from e
    if not isinstance(entries, list):
        raise InputDataError(f"{path}: existing output manifest is not a JSON list; move it away")
    return entries


def _write_manifest(path: str, entries: list[dict]) -> None:
    """Write the manifest atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def plan_outputs(
    items: Sequence[dict], output_dir: str, postfix: str = "", overwrite: bool = False, image_key: str = "image"
) -> list[dict]:
    """The items, each with its output label map path under ``OUTPUT_KEY``; checked before any compute.

    Raises ``InputDataError`` naming the inputs when two of them would write one file, naming the
    files when outputs exist already and ``overwrite`` is false, and naming an existing manifest that
    cannot be read (it is never dropped).
    """
    items = [dict(item) for item in items]
    names = output_names([item[image_key] for item in items])
    tail = (f"_{postfix}" if postfix else "") + OUTPUT_EXT
    for item, name in zip(items, names):
        item[OUTPUT_KEY] = os.path.normpath(os.path.join(output_dir, name + tail))
    problems = _clashes(items, image_key)
    if problems:
        raise InputDataError("inputs would overwrite each other's output:\n- " + "\n- ".join(problems))
    existing = [item[OUTPUT_KEY] for item in items if os.path.exists(item[OUTPUT_KEY])]
    if existing and not overwrite:
        raise InputDataError(
            f"{len(existing)} output file(s) exist already and overwrite is false: "
            + ", ".join(existing)
            + "; set overwrite to true to replace them, or choose another "
            "output_dir"
        )
    if existing:
        logger.warning(f"overwrite is true: replacing {len(existing)} existing output file(s): {', '.join(existing)}")
    _read_manifest(os.path.join(output_dir, MANIFEST_NAME))  # an unreadable one stops the run now, not midway
    renamed = sum(name != output_stem(item[image_key]) for item, name in zip(items, names))
    logger.info(
        f"{len(items)} output(s) planned in {output_dir}"
        + (f" ({renamed} folder-qualified: inputs with the same name)" if renamed else "")
    )
    return items


class OutputNames:
    """``output_name_formatter`` of ``SaveImaged`` that names each input's label map as ``plan`` planned it.

    ``plan`` runs ``plan_outputs`` and remembers the names. ``FolderLayout`` strips one extension
    (two for ``.gz``) from the subject it is given, so the name is passed with ``.nii.gz`` appended:
    a DICOM folder's last dotted part is kept. An input that was not planned (e.g. sent by MONAI
    Label, which builds the post-processing alone) is named by ``output_stem``.
    """

    def __init__(self):
        self.names: dict[str, str] = {}

    def plan(
        self,
        items: Sequence[dict],
        output_dir: str,
        postfix: str = "",
        overwrite: bool = False,
        image_key: str = "image",
    ) -> list[dict]:
        """``plan_outputs``, remembering each input's output name; returns the planned items."""
        planned = plan_outputs(items, output_dir, postfix, overwrite, image_key)
        sources = [item[image_key] for item in planned]
        self.names = {_source(src): name for src, name in zip(sources, output_names(sources))}
        return planned

    def __call__(self, metadict: dict, saver: Any) -> dict:
        source = (metadict or {}).get("filename_or_obj", "")
        name = self.names.get(_source(source)) if source else None
        return {"subject": (name if name is not None else output_stem(str(source))) + OUTPUT_EXT, "idx": None}


class RecordOutputd(MapTransform):
    """After ``SaveImaged(savepath_in_metadict=True)``: add ``{"input", "output"}`` to ``<output_dir>/manifest.json``.

    An earlier entry for the same output file (written again with ``overwrite``) is replaced; the
    manifest is rewritten atomically after each label map, so it lists what was written so far.
    With ``reference_key`` (evaluation), each entry also names the file of that item (the reference
    label map) under ``"reference"``, so a prediction can be scored again later.
    """

    def __init__(self, keys, output_dir: str, reference_key: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.manifest = os.path.join(output_dir, MANIFEST_NAME)
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {})
            if not meta.get("saved_to"):
                continue  # nothing was saved (e.g. MONAI Label dropped SaveImaged)
            output = str(meta["saved_to"])
            entries = [
                e
                for e in _read_manifest(self.manifest)
                if not (isinstance(e, Mapping) and _source(e.get(OUTPUT_KEY, "")) == _source(output))
            ]
            entry = {"input": str(meta.get("filename_or_obj", "")), OUTPUT_KEY: output}
            if self.reference_key is not None:
                entry["reference"] = str(getattr(d[self.reference_key], "meta", {}).get("filename_or_obj", ""))
            entries.append(entry)
            _write_manifest(self.manifest, entries)
        return d
