"""Write a bundle as the zip that ``monai.bundle download`` and MONAI Label unpack.

The zip holds one folder, ``<name>/``, with ``configs/``, ``scripts/``, ``LICENSE`` and of ``docs/`` only
what the model card links inside the bundle (``docs/README.md``, ``docs/data_license.txt``): no run
outputs, caches, measurements or guides (those live in the repository's ``docs/``), and:

- ``models/model.pt`` when ``--weights`` is given without ``--weights_url`` (weights in the zip);
- ``large_files.yml`` when ``--weights_url`` is given: the weights stay where they are hosted, and
  the file names their url and md5 (computed here from ``--weights``, the copy that was uploaded),
  in the model zoo's format (``large_files: [{path, url, hash_val, hash_type}]``);
- neither without ``--weights``: a configs-only zip (the model zoo's CI then fails its
  "models/model.pt present" check, which is logged).

The zip is named ``<name>_v<version>.zip`` (version from ``configs/metadata.json``), as
``monai.bundle download --source github`` expects. It is written to a temporary file in the output
folder and renamed into place; an existing zip is kept unless ``--overwrite``.

    python -m tools package_bundle bundles/swin_unetr_btcv_seg --out_dir dist \\
        --weights /path/to/model.pt [--weights_url https://host/model.pt] [--overwrite]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from tools.common.bundles import LARGE_FILES, bundle_files

logger = logging.getLogger("package_bundle")

REQUIRED = ("configs/metadata.json", "LICENSE")
WEIGHTS_PATH = "models/model.pt"
# of docs/, a downloaded bundle carries the model card and the data licence it links; nothing else
SHIPPED_DOCS = ("docs/README.md", "docs/data_license.txt")


def shipped(arcname: str) -> bool:
    """Whether a bundle file (path inside the bundle) goes into the zip: configs, scripts, licence files, the card."""
    return arcname.split("/", 1)[0] in ("configs", "scripts") or arcname in ("LICENSE", LARGE_FILES, *SHIPPED_DOCS)


def name_and_version(bundle_dir: Path) -> tuple[str, str]:
    """The bundle's name (its folder name) and its version from ``configs/metadata.json``."""
    missing = [r for r in REQUIRED if not (bundle_dir / r).is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle_dir}: not a bundle folder, missing {missing}")
    meta_file = bundle_dir / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_file}: cannot read the bundle's metadata: {e}") from e
    version = meta.get("version") if isinstance(meta, dict) else None
    if not isinstance(version, str) or not version:
        raise ValueError(f"{meta_file}: no 'version' string")
    return bundle_dir.name, version


def md5_of(path: Path) -> str:
    """The md5 hex digest of a file (the hash type the model zoo's large_files.yml use)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def check_weights(path: Path) -> str:
    """Check that ``path`` is a plain state dict, as the bundles save ``models/model.pt`` and the model zoo reads it.

    The zoo's CI and ``monai.bundle ckpt_export``/``load`` read ``models/model.pt`` without ``key_in_ckpt``,
    so a wrapped checkpoint (``{"model": ...}``, written by earlier versions, or a full-state
    ``checkpoint_*.pt``) is refused with the command that converts it. Returns a short description;
    raises FileNotFoundError or ValueError naming the file.
    """
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict of tensors, found a {type(obj).__name__}")
    # a state dict maps names to tensors; extra states (e.g. a layer's recorded patch-merging order) may be other values
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    wrapped = [k for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)]
    if wrapped or not tensors:
        what = f"a checkpoint with the state dict under {wrapped[0]!r}" if wrapped else f"keys {list(obj)[:6]}"
        raise ValueError(
            f"{path}: expected a plain state dict (the zoo and ckpt_export read models/model.pt without "
            f"key_in_ckpt), found {what}; convert it with python -m tools convert_checkpoint --input {path} "
            f"--output <new file> (add --patch_merging legacy|current if it records no order)"
        )
    return f"state dict, {tensors} tensors"


def large_files_yaml(entries: list[dict[str, str]]) -> str:
    """``large_files.yml`` text in the model zoo's layout: one ``path``/``url``/``hash_val``/``hash_type`` per file."""
    lines = ["large_files:"]
    for entry in entries:
        lines.append(f'  - path: "{entry["path"]}"')
        lines += [f'    {key}: "{entry[key]}"' for key in ("url", "hash_val", "hash_type")]
    return "\n".join(lines) + "\n"


def _write_zip(target: Path, name: str, members: list[tuple[Path | None, str, str | None]]) -> None:
    """Write ``members`` (file or text, path inside the bundle) under ``<name>/`` to ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{target.stem}_", suffix=".zip", dir=target.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for source, arcname, text in members:
                if text is None:
                    zf.write(source, f"{name}/{arcname}")
                else:
                    zf.writestr(f"{name}/{arcname}", text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def package_bundle(
    bundle_dir: str, out_dir: str = "dist", weights: str = "", weights_url: str = "", overwrite: bool = False
) -> Path:
    """Write ``<out_dir>/<name>_v<version>.zip`` from the bundle folder ``bundle_dir``; return its path.

    Args:
        bundle_dir: the bundle folder (e.g. bundles/swin_unetr_btcv_seg).
        out_dir: where the zip goes (created if missing).
        weights: a checkpoint of this bundle; goes into the zip as models/model.pt, unless weights_url is given.
        weights_url: where ``weights`` is hosted; the zip then gets large_files.yml (url + md5 of ``weights``)
            instead of the file.
        overwrite: replace an existing zip of the same name and version.
    """
    bundle = Path(bundle_dir).resolve()
    name, version = name_and_version(bundle)
    target = Path(out_dir).resolve() / f"{name}_v{version}.zip"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if weights_url and not weights:
        raise ValueError("--weights_url needs --weights: the hosted file's md5 is computed from the local copy")
    files = bundle_files(bundle)
    left_out = [arc for _, arc in files if not shipped(arc)]
    if left_out:
        logger.info("%s: not shipped (repository-only docs): %s", name, left_out)
    members: list[tuple[Path | None, str, str | None]] = [(p, arc, None) for p, arc in files if shipped(arc)]
    if weights:
        logger.info("weights %s: %s", weights, check_weights(Path(weights)))
    if weights_url:
        if any(arc == LARGE_FILES for _, arc, _ in members):
            raise ValueError(f"{bundle / LARGE_FILES} exists: edit it instead of passing --weights_url")
        entry = {"path": WEIGHTS_PATH, "url": weights_url, "hash_val": md5_of(Path(weights)), "hash_type": "md5"}
        members.append((None, LARGE_FILES, large_files_yaml([entry])))
    elif weights:
        members.append((Path(weights), WEIGHTS_PATH, None))
    else:
        logger.warning(
            "%s: no weights given: the zip has neither %s nor %s (the model zoo's CI requires one)",
            name,
            WEIGHTS_PATH,
            LARGE_FILES,
        )
    _write_zip(target, name, members)
    logger.info("wrote %s (%d files)", target, len(members))
    return target


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(package_bundle, report=str, errors=(FileNotFoundError, FileExistsError, ValueError))
