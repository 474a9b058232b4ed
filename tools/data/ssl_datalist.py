"""Build MONAI datalists (JSON) of unlabelled CT volumes for self-supervised pre-training.

Used by the ``swin_unetr_ssl_pretrain`` bundle. Each data set is given as a name and a base
directory (plus an optional layout preset); its volumes are discovered under the base directory:

* volume files ``.nii``, ``.nii.gz``, ``.mhd``, ``.nrrd`` (any case): one file is one volume;
* DICOM series folders: a folder that *directly* holds DICOM files (``.dcm``/``.ima``, or any
  other file that carries the ``DICM`` magic at byte offset 128) is ONE series = one volume, and its
  entry is the folder path. Every file's header is read and checked by the bundles' own code,
  ``bundles/common/scripts/dicom_series.py`` (loaded by path): non-image objects beside the slices
  (RTSTRUCT, SEG, SR, ... by SOPClassUID) are left aside with a log line; the image files must be
  readable and complete (a truncated slice is an error), ONE series (an empty SeriesInstanceUID
  counts as the folder's series), evenly spaced (a missing slice is an error). Folders whose series'
  Modality is not in ``modalities`` (default ``CT``), or that hold only non-image objects, are
  skipped with a warning naming the folder (PT, DX, RTSTRUCT, SEG ... folders).

Every problem of every data set (both lists, all files) is collected and raised together in one
``CorpusError``, so one run shows everything to fix.

Hidden files and folders (names starting with ``.``) are ignored. Every other file the search
meets but does not use (``notes.txt``, ``preview.png``, a ``DICOMDIR``, a label excluded by a
preset) is named in a warning, one line per file or one line with a count when there are many;
the ``.raw`` voxel file of an ``.mhd`` header is read through the header.
Everything is sorted, so the same tree gives the same datalist.

Layout presets for the five public CT sets of the Swin UNETR pre-training (Tang et al., CVPR 2022:
LUNA16, TCIA Covid19, HNSCC, TCIA CT Colonography, LIDC-IDRI; ~5050 volumes). The paper's own
datalists (``SwinUNETR/Pretrain/jsons`` in Project-MONAI/research-contributions) point at private
NIfTI conversions (``images/img_N.nii.gz`` for both HNSCC and Colonography, hence paths must carry
the base directory), so the presets describe the layouts of the *public downloads* instead:

* ``luna16``: the LUNA16 challenge release, ``subset0`` .. ``subset9`` of ``<seriesuid>.mhd`` (+ .raw):
  files ``subset*/*.mhd``. ``seg-lungs-LUNA16/`` (lung masks) and the CSV files are not matched.
* ``tcia_covid19``: the NIfTI release of TCIA "CT Images in COVID-19" (as used by the paper's
  ``dataset_TCIAcovid19_0.json``): files ``**/volume-covid19-A-*.nii.gz`` at any depth, excluding
  ``*_seg.nii.gz`` (COVID-19-20 challenge labels; the challenge's ``*_ct.nii.gz`` images match).
  Assumption: the NIfTI release, not the DICOM one; for DICOM use no preset.
* ``hnscc``, ``tcia_colonography`` (collection "CT COLONOGRAPHY", ACRIN 6664), ``lidc_idri``: DICOM
  as written by the NBIA Data Retriever, ``[manifest-*/]<Collection>/<PatientID>/<Study>/<Series>/*.dcm``
  (study/series folder names are UIDs in the "classic" layout or ``date-description-uid`` in the
  "descriptive" one), so series folders are searched at any depth and only CT series are kept:
  HNSCC also holds PT/MR/RTSTRUCT/SEG/RTDOSE series, LIDC-IDRI DX/CR radiographs and XML reads.

With no preset both kinds are discovered anywhere under the base directory; NIfTI label files
(``*_seg.nii.gz`` ...) are not recognised as such, so point the base directory at images only.

Entries are ``{"image": os.path.join(base_dir, relative), "dataset": name}``: absolute when
``base_dir`` is absolute, relative to the working directory when it is relative, or, with
``relative_to=DIR``, relative to ``DIR`` (e.g. the folder of the JSON file, then pass that folder as
``base_dir`` to ``monai.data.load_decathlon_datalist``). Two entries that resolve to the same file or
folder are an error (e.g. nested base directories). Caveat: ``load_decathlon_datalist`` joins
every non-image value with its ``base_dir`` when that path exists, so a folder named like a
data set directly under that ``base_dir`` turns the ``dataset`` value into a path.

The split is seeded and stratified: each data set with >= 2 volumes gives
``round(n * val_fraction)`` volumes (at least 1, at most n - 1) to validation, drawn with
``np.random.default_rng([seed, crc32(name)])``, so adding a data set leaves the others' splits alone.

Command line (datasets are ``name=base_dir`` or ``name:preset=base_dir``)::

    python -m tools ssl_datalist luna16:luna16=/data/LUNA16 covid:tcia_covid19=/data/covid19 \\
        hnscc:hnscc=/data/NBIA/HNSCC --output /data/ssl_datalist.json --val_fraction 0.05 --seed 0 \\
        [--relative_to /data] [--modalities CT]
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.common.bundles import common_module

logger = logging.getLogger(__name__)


dicom_series = common_module("dicom_series")
skipped_files = common_module("skipped_files")

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".mhd", ".nrrd")
"""File name endings (case-insensitive) of single-file volumes."""
DEFAULT_MODALITIES = ("CT",)
"""DICOM Modality values kept by default."""


class CorpusError(ValueError):
    """A data set cannot be turned into a datalist; the message names the file or folder and the problem."""


@dataclass(frozen=True)
class Preset:
    """Where a public data set's volumes are under its base directory.

    ``kind`` is ``"files"`` (``patterns`` are file globs) or ``"dicom"`` (``patterns`` are globs of
    DICOM series folders, ``**`` = any depth including the base dir itself); ``exclude`` are
    ``fnmatch`` patterns on the file or folder name.
    """

    name: str
    kind: str
    patterns: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    description: str = ""


_NBIA = "NBIA Data Retriever layout <Collection>/<PatientID>/<Study>/<Series>/*.dcm, CT series only"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("luna16", "files", ("subset*/*.mhd",), description="LUNA16 release: subset0..9/<seriesuid>.mhd"),
        Preset(
            "tcia_covid19",
            "files",
            ("**/volume-covid19-A-*.nii.gz",),
            exclude=("*_seg.nii.gz",),
            description="TCIA CT Images in COVID-19, NIfTI release: volume-covid19-A-*.nii.gz",
        ),
        Preset("hnscc", "dicom", ("**",), description=f"TCIA HNSCC, {_NBIA}"),
        Preset("tcia_colonography", "dicom", ("**",), description=f"TCIA CT COLONOGRAPHY, {_NBIA}"),
        Preset("lidc_idri", "dicom", ("**",), description=f"TCIA LIDC-IDRI, {_NBIA}"),
    )
}
"""Layout presets by name (see the module docstring)."""


def get_preset(preset: str | Preset | None) -> Preset | None:
    """The ``Preset`` for a name (case-insensitive, ``-`` same as ``_``), a ``Preset``, or None."""
    if preset is None or isinstance(preset, Preset):
        return preset
    key = str(preset).strip().lower().replace("-", "_")
    if key not in PRESETS:
        raise CorpusError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or none (auto-discovery)")
    return PRESETS[key]


def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_EXTENSIONS)


def dicom_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the DICOM files directly inside ``folder`` (not in its subfolders)."""
    try:
        return dicom_series.dicom_files(os.fspath(folder))
    except OSError as exc:
        raise CorpusError(f"cannot list folder {os.fspath(folder)}: {exc}") from exc


def _keep_series(folder: str, keep: tuple[str, ...] | None, problems: list[str]) -> bool:
    """Whether a DICOM folder is a volume to keep; its problems go to ``problems``, skipped folders to the log."""
    report = dicom_series.inspect_series(folder)
    if report.ignored:
        logger.info("DICOM folder %s: leaving aside %s", folder, report.ignored_text())
    if report.non_image_only:
        logger.warning("skipping DICOM folder %s: it holds only %s", folder, report.ignored_text())
        return False
    if report.series and keep is not None and report.modality not in keep:
        logger.warning(
            "skipping DICOM series folder %s: Modality %r is not one of %s (%d files)",
            folder,
            report.modality or "(missing)",
            list(keep),
            report.num_slices,
        )
        return False
    problems.extend(report.problems)
    return not report.problems


def _glob_rel(base_dir: str, pattern: str, want_dirs: bool) -> set[str]:
    """Relative POSIX paths under ``base_dir`` matching ``pattern`` (``**`` recursive; hidden names skipped)."""
    full = os.path.join(glob.escape(base_dir), pattern + ("/" if want_dirs else ""))
    out = set()
    for hit in glob.glob(full, recursive=True):
        if want_dirs != os.path.isdir(hit):
            continue
        rel = os.path.relpath(hit, base_dir)
        out.add("" if rel == "." else Path(rel).as_posix())
    return out


def _normalize_modalities(modalities) -> tuple[str, ...] | None:
    if modalities is None:
        return None
    if isinstance(modalities, str):
        modalities = modalities.split(",")
    values = tuple(str(m).strip().upper() for m in modalities if str(m).strip())
    if not values or values in (("ANY",), ("*",)):
        return None
    return values


def _plain_files(folder: str) -> list[str]:
    """Paths of the files directly in ``folder`` (hidden ones aside)."""
    try:
        return [e.path for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    except OSError as exc:
        raise CorpusError(f"cannot list folder {folder}: {exc}") from exc


def _log_skipped(
    base: str, kinds: tuple[str, ...], looked_at: set[str], used: set[str], excluded: list[tuple[str, str]]
) -> None:
    """A warning naming each file under ``base`` that the search met but does not use (``skipped_files``)."""
    volume = f"a volume file ({', '.join(VOLUME_EXTENSIONS)})"
    what = {("files",): f"not {volume}", ("dicom",): "not a DICOM file"}.get(
        kinds, f"neither {volume} nor a DICOM file"
    )
    voxel_files = skipped_files.mhd_data_files(looked_at)  # read through their .mhd header
    not_read = looked_at - used - voxel_files - {rel for rel, _ in excluded}
    skipped = excluded + [(rel, what) for rel in sorted(not_read)]
    for line in skipped_files.skipped_lines(base, skipped):
        logger.warning(line)


def find_volumes(
    base_dir: str | os.PathLike,
    preset: str | Preset | None = None,
    modalities=DEFAULT_MODALITIES,
    problems: list[str] | None = None,
) -> list[str]:
    """Volumes of one data set: sorted ``os.path.join(base_dir, relative)`` paths (files and DICOM series folders).

    ``preset`` (name or ``Preset``) restricts the search to a public set's layout; None discovers
    volume files and DICOM series folders anywhere. DICOM series whose Modality is not in
    ``modalities`` (None or ``"any"``: keep all) are skipped with a warning. Raises CorpusError
    when ``base_dir`` is not a folder or no volume is found, and listing every problem of its DICOM
    folders (``dicom_series.inspect_series``); with a ``problems`` list, those are added to it instead.
    """
    base = os.fspath(base_dir)
    own_problems = problems is None
    problems = [] if problems is None else problems
    problems_before = len(problems)
    preset = get_preset(preset)
    keep = _normalize_modalities(modalities)
    if not os.path.isdir(base):
        raise CorpusError(f"data set base dir {base} does not exist or is not a folder")
    kinds = ("files", "dicom") if preset is None else (preset.kind,)
    file_patterns = preset.patterns if preset is not None else ("**/*",)
    dir_patterns = preset.patterns if preset is not None else ("**",)
    exclude = preset.exclude if preset is not None else ()
    found: set[str] = set()
    looked_at: set[str] = set()  # every file the search met; those neither found nor DICOM are logged
    dicom: set[str] = set()
    excluded: list[tuple[str, str]] = []
    if "files" in kinds:
        for pattern in file_patterns:
            for rel in _glob_rel(base, pattern, want_dirs=False):
                looked_at.add(rel)
                name = os.path.basename(rel)
                rule = next((x for x in exclude if fnmatch.fnmatch(name, x)), None)
                if rule:
                    excluded.append((rel, f"excluded by preset {preset.name}: {rule}"))
                elif _is_volume_file(name):
                    found.add(rel)
    if "dicom" in kinds:
        folders = set()
        for pattern in dir_patterns:
            folders |= _glob_rel(base, pattern, want_dirs=True)
        for rel in sorted(folders):
            if any(fnmatch.fnmatch(os.path.basename(rel), x) for x in exclude):
                continue
            folder = os.path.join(base, rel) if rel else base
            looked_at |= {os.path.relpath(f, base) for f in _plain_files(folder)}
            files = dicom_files(folder)
            dicom |= {os.path.relpath(f, base) for f in files}
            if files and _keep_series(folder, keep, problems):
                found.add(rel)
    _log_skipped(base, kinds, looked_at, found | dicom, excluded)
    if own_problems and problems:
        raise CorpusError(f"{len(problems)} problem(s) in data set base dir {base}:\n- " + "\n- ".join(problems))
    if not found and len(problems) > problems_before:
        return []  # the problems say why
    if not found:
        where = (
            f"preset {preset.name!r} ({preset.description}: {', '.join(preset.patterns)})"
            if preset
            else "volume files (" + ", ".join(VOLUME_EXTENSIONS) + ") or DICOM series folders"
        )
        raise CorpusError(f"no volumes found under data set base dir {base}: looked for {where}")
    return [os.path.normpath(os.path.join(base, rel)) if rel else os.path.normpath(base) for rel in sorted(found)]


def _dataset_spec(name: str, spec) -> tuple[str, str | None]:
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec), None
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        preset = spec[1]
        return os.fspath(spec[0]), (preset.name if isinstance(preset, Preset) else preset)
    raise CorpusError(f"data set {name!r}: expected base_dir or (base_dir, preset), got {spec!r}")


def parse_dataset_arg(arg: str) -> tuple[str, str, str | None]:
    """Parse a command-line data set ``name=base_dir`` or ``name:preset=base_dir`` into (name, base_dir, preset)."""
    arg = str(arg)
    left, sep, base_dir = arg.partition("=")
    name, _, preset = left.partition(":")
    name, preset = name.strip(), preset.strip() or None
    if not sep or not name or not base_dir:
        raise CorpusError(f"data set argument {arg!r}: expected name=base_dir or name:preset=base_dir")
    return name, base_dir, preset


def _val_counts(sizes: dict[str, int], val_fraction: float) -> dict[str, int]:
    counts = {}
    for name, n in sizes.items():
        k = int(math.floor(n * val_fraction + 0.5))
        if val_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        counts[name] = min(k, n)
    if val_fraction > 0 and sum(sizes.values()) >= 2 and sum(counts.values()) == 0:
        # only single-volume data sets: the largest (first by name) gives its volume to validation
        donor = sorted(sizes, key=lambda name: (-sizes[name], name))[0]
        counts[donor] = 1
    return counts


def build_datalist(
    datasets: dict,
    val_fraction: float = 0.05,
    seed: int = 0,
    relative_to: str | os.PathLike | None = None,
    modalities=DEFAULT_MODALITIES,
) -> dict:
    """Datalist ``{"training", "validation", "metadata"}`` for ``{name: base_dir or (base_dir, preset)}``.

    Each data set is searched with ``find_volumes``; its volumes are split into training and
    validation (stratified per data set, seeded); entries are ``{"image": path, "dataset": name}``
    sorted by data set name, then path. ``relative_to`` writes paths relative to that folder.
    Raises CorpusError for a data set without volumes or two entries resolving to the same path.
    """
    if not datasets:
        raise CorpusError("no data sets given: pass at least one name=base_dir")
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    specs = {str(name): _dataset_spec(str(name), spec) for name, spec in datasets.items()}
    volumes, problems = {}, []
    for name, (base, preset) in sorted(specs.items()):
        try:
            volumes[name] = find_volumes(base, preset, modalities, problems)
        except CorpusError as e:
            problems.append(f"data set {name!r}: {e}")
    if problems:
        raise CorpusError(f"{len(problems)} problem(s) in the data sets; nothing written:\n- " + "\n- ".join(problems))

    owner: dict[str, tuple[str, str]] = {}
    for name, paths in volumes.items():
        for path in paths:
            real = os.path.realpath(path)
            if real in owner:
                other_name, other_path = owner[real]
                raise CorpusError(
                    f"volume {real} is listed twice: as {other_path} (data set {other_name!r}) and as {path} "
                    f"(data set {name!r}); base dirs must not overlap"
                )
            owner[real] = (name, path)

    def entry_path(path: str) -> str:
        if relative_to is None:
            return path
        return os.path.relpath(os.path.abspath(path), os.path.abspath(os.fspath(relative_to)))

    counts = _val_counts({name: len(paths) for name, paths in volumes.items()}, val_fraction)
    training, validation, meta = [], [], {}
    for name, paths in volumes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        val_idx = set(rng.permutation(len(paths))[: counts[name]].tolist())
        for i, path in enumerate(paths):
            (validation if i in val_idx else training).append({"image": entry_path(path), "dataset": name})
        base, preset = specs[name]
        meta[name] = {
            "base_dir": base,
            "preset": preset,
            "num_volumes": len(paths),
            "num_training": len(paths) - len(val_idx),
            "num_validation": len(val_idx),
        }
        logger.info(
            "data set %s: %d volume(s) under %s (%d training, %d validation)",
            name,
            len(paths),
            base,
            len(paths) - len(val_idx),
            len(val_idx),
        )
    keep = _normalize_modalities(modalities)
    return {
        "training": training,
        "validation": validation,
        "metadata": {
            "datasets": meta,
            "seed": seed,
            "val_fraction": val_fraction,
            "relative_to": None if relative_to is None else os.fspath(relative_to),
            "dicom_modalities": None if keep is None else list(keep),
        },
    }


def write_datalist(
    datasets: dict,
    output: str | os.PathLike,
    val_fraction: float = 0.05,
    seed: int = 0,
    relative_to: str | os.PathLike | None = None,
    modalities=DEFAULT_MODALITIES,
) -> dict:
    """``build_datalist`` and write it to ``output`` as JSON (indent 2); return the datalist."""
    datalist = build_datalist(
        datasets, val_fraction=val_fraction, seed=seed, relative_to=relative_to, modalities=modalities
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(datalist, indent=2) + "\n")
    return datalist


def main(
    *datasets,
    output: str,
    val_fraction: float = 0.05,
    seed: int = 0,
    relative_to: str | None = None,
    modalities: str = "CT",
) -> None:
    """Command line: data sets as ``name=base_dir`` or ``name:preset=base_dir``; write the datalist, print a summary."""
    parsed: dict = {}
    for arg in datasets:
        name, base_dir, preset = parse_dataset_arg(arg)
        if name in parsed:
            raise CorpusError(f"data set name {name!r} given twice")
        parsed[name] = (base_dir, preset)
    if relative_to is not None:
        relative_to = str(relative_to)
    datalist = write_datalist(
        parsed, output, val_fraction=val_fraction, seed=seed, relative_to=relative_to, modalities=modalities
    )
    per_set = ", ".join(f"{name} {m['num_volumes']}" for name, m in datalist["metadata"]["datasets"].items())
    print(
        f"{output}: {len(datalist['training'])} training, {len(datalist['validation'])} validation "
        f"(val_fraction {float(val_fraction)}, seed {seed}); volumes per data set: {per_set}"
    )


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main)
