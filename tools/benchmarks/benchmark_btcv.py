"""Benchmark the swin_unetr_btcv_seg bundle against the model-zoo ``swin_unetr_btcv_segmentation`` 0.5.x settings.

What is measured, for one volume on one device (default: cuda if available, else cpu):

1. End-to-end inference per volume, each variant in a fresh process, stage by stage (input check, load,
   preprocess, sliding window, postprocess = softmax + invert + argmax, save) for three variants:

   * ``bundle``      - the bundle's ``configs/inference.json`` as configured (amp on, flash attention on,
     channels-last on CPU);
   * ``bundle_float32`` - the same with ``amp`` False, everything else as configured (channels-last,
     attention masks reused): the bundle's float32 path, which decides per machine whether reduced
     precision pays; run only where the bundle would autocast;
   * ``bundle_fp32`` - the same with ``amp`` and ``channels_last`` False: the float32 NCDHW reference
     for the agreement numbers;
   * ``model_zoo``   - the same weights run with the model-zoo 0.5.x pipeline, built here from MONAI
     transforms (ITKReader, no foreground crop, plain ``SlidingWindowInferer``, no flash attention,
     evaluator amp = autocast on CUDA only).

   The bundle variants are parsed from the bundle's own configs with ``monai.bundle.ConfigParser``
   (``preprocessing``, ``inferer``, ``postprocessing``, ``network``, ``handlers``, ``dataset#data``),
   so this measures the bundle's real pipeline. Reported: the speed ratio model_zoo / bundle and
   the fraction of equal voxels between the saved label maps, over all voxels and over the voxels
   that either map labels as an organ.
2. Network forward time per call of ``sw_batch_size`` windows of ``roi_size`` (after a warm-up),
   for the bundle and model-zoo network settings, in float32 and, where the bundle would autocast
   on this device, in its reduced precision.
3. Training iterations per second of the bundle's ``SupervisedTrainer`` step (train.json's network
   with its ``use_checkpoint``, DiceCE loss, AdamW, amp rule) on phantom crops, in a fresh
   subprocess so that its peak memory (CUDA ``max_memory_allocated``; on CPU the process peak RSS)
   belongs to training alone.
4. The machine: CPU model, cores, torch CPU capability, native bf16, GPU, library versions.
5. The limit: the FLOPs of one window (PyTorch's flop counter; forward for inference, forward and
   backward per crop for training), the achieved FLOP/s of the sliding window, the timed forward
   and the training step, and their fraction of the device's peak (``tools.common.peak``: the CPU's
   cores x clock x ISA, or the GPU's datasheet; the assumption is in ``peak``).

Command line::

    python -m tools benchmark_btcv --image /tmp/sample/example_ct.nii.gz --feature_size 48 \\
        --roi_size 96 --device cpu --train_steps 3 --output_json bench.json

A full-size run (feature size 48, roi 96) of a real CT is slow on a CPU (measured times: the model
card); use ``--feature_size 12 --roi_size 64`` and a small image to try the tool out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.common.bundles import bundle_parser as parse_bundle_config
from tools.common.bundles import cube, device_expr, use_bundle_scripts
from tools.common.engines import loss_of, time_iterations
from tools.common.machine import load_average, machine_info, native_bf16
from tools.common.memory import MIB, memory_snapshot
from tools.common.peak import device_peak, format_limit, limit, network_flops
from tools.common.processes import run_child
from tools.common.stats import finite_or_none
from tools.common.timing import resolve_device, say, sync

# The model-zoo bundle swin_unetr_btcv_segmentation 0.5.x, configs/inference.json: the constants
# of its pipeline, stated once. roi_size and feature_size follow the command line (same network,
# same windows for both pipelines); the model zoo itself uses 96 and 48.
MODEL_ZOO = {
    "name": "swin_unetr_btcv_segmentation",
    "version": "0.5.x",
    "reader": "ITKReader",
    "axcodes": "RAS",
    "spacing": (1.5, 1.5, 2.0),
    "spacing_mode": "bilinear",
    "hu_window": (-175.0, 250.0),
    "intensity_range": (0.0, 1.0),
    "roi_size": 96,
    "feature_size": 48,
    "sw_batch_size": 4,
    "overlap": 0.5,
    "use_flash_attention": False,
    "evaluator_amp": True,  # SupervisedEvaluator autocasts with torch.autocast("cuda"): a no-op on CPU
}
NUM_CLASSES = 14
IN_CHANNELS = 1
VARIANTS = ("bundle", "bundle_float32", "bundle_fp32", "model_zoo")


# ------------------------------------------------------------------------------------------ helpers


def dtype_name(dtype: torch.dtype | None) -> str:
    """'float32' for None (no autocast), else the dtype's short name."""
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def flash_attention_of(network: torch.nn.Module) -> bool:
    """True if the network's Swin attention blocks use PyTorch SDPA (``use_flash_attention``)."""
    return any(bool(getattr(m, "use_flash_attention", False)) for m in network.modules())


# ------------------------------------------------------------------------------------------ bundle


def bundle_parser(config: str, overrides: dict[str, Any]) -> Any:
    """A ConfigParser of the BTCV bundle's ``configs/<config>`` with its metadata and ``overrides``."""
    return parse_bundle_config(BUNDLE_DIR, config, overrides)


def bundle_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The precision the bundle's inferer autocasts to on ``device`` with amp on (None = float32)."""
    inferers = use_bundle_scripts(BUNDLE_DIR).inferers
    rule = getattr(inferers, "autocast_dtype", None)
    if rule is not None:
        return rule(device.type)
    return torch.float16 if device.type == "cuda" else torch.bfloat16  # older bundle: always autocast


def inference_overrides(
    device: torch.device,
    feature_size: int,
    roi_size: Sequence[int],
    ckpt_path: str,
    output_dir: str,
    amp: bool,
    plain_layout: bool = True,
) -> dict[str, Any]:
    """Overrides of inference.json for one benchmark variant.

    ``amp`` false with ``plain_layout`` gives the float32 reference: no autocast and the plain NCDHW
    layout (no channels-last); without ``plain_layout`` the bundle's float32 path as configured.
    """
    overrides = {
        "device": device_expr(device),
        "feature_size": int(feature_size),
        "roi_size": list(roi_size),
        "ckpt_path": str(ckpt_path),
        "output_dir": str(output_dir),
        "amp": bool(amp),
        "overwrite": True,  # each timed repeat writes the same label map again
    }
    if not amp and plain_layout:
        overrides["channels_last"] = False
    return overrides


def write_random_checkpoint(path: Path, feature_size: int, seed: int) -> str:
    """Write a bundle-format checkpoint of a randomly initialised network (seeded); return its path.

    Format as the bundle's training writes ``models/model.pt``: the state dict, its patch-merging
    order recorded in it, so every variant loads the same weights through its own checkpoint loader.
    """
    parser = bundle_parser(
        "inference.json", {"feature_size": int(feature_size), "ckpt_path": "", "device": "$torch.device('cpu')"}
    )
    torch.manual_seed(int(seed))
    network = parser.get_parsed_content("network_def")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), str(path))
    return str(path)


def load_checkpoint(loader: Any, network: torch.nn.Module) -> None:
    """Run an ignite ``CheckpointLoader`` handler outside an engine run (a bare Engine holds no state)."""
    from ignite.engine import Engine

    loader(Engine(lambda engine, batch: None))
    network.eval()


def bundle_pipeline(
    device: torch.device,
    feature_size: int,
    roi_size: Sequence[int],
    ckpt_path: str,
    output_dir: str,
    name: str = "bundle",
) -> dict[str, Any]:
    """The bundle's inference pipeline parsed from inference.json, weights loaded as its ``network`` loads them.

    ``name`` is the variant: ``bundle``, ``bundle_float32`` or ``bundle_fp32`` (see ``VARIANTS``).
    """
    amp = name == "bundle"
    overrides = inference_overrides(
        device, feature_size, roi_size, ckpt_path, output_dir, amp, plain_layout=name == "bundle_fp32"
    )
    parser = bundle_parser("inference.json", overrides)
    network = parser.get_parsed_content("network").eval()  # scripts.ensemble: strict, logged

    def input_check(image_path: str) -> None:
        parser["datalist_items"] = [{"image": image_path}]
        parser.parse()
        parser.get_parsed_content("dataset#data")

    return {
        "name": name,
        "preprocessing": parser.get_parsed_content("preprocessing"),
        "inferer": parser.get_parsed_content("inferer"),
        "postprocessing": parser.get_parsed_content("postprocessing"),
        "network": network,
        "input_check": input_check if parser["check_inputs"] else None,
        "forward_context": nullcontext,
        "precision": dtype_name(bundle_autocast_dtype(device) if amp else None),
        "settings": {
            "config": "configs/inference.json",
            "amp": bool(amp),
            "use_flash_attention": flash_attention_of(network),
            "sw_batch_size": int(parser["sw_batch_size"]),
            "overlap": float(parser["overlap"]),
            "channels_last": bool(parser.get("channels_last", False)) and device.type == "cpu",
            "reuse_cpu_memory": bool(parser.get("reuse_cpu_memory", False)) and device.type == "cpu",
            "reuse_attention_masks": bool(parser.get("reuse_attention_masks", False)),
            "spacing": list(parser["spacing"]),
            "hu_window": list(parser["hu_window"]),
            "patch_merging": type(network.swinViT.layers1[0].downsample).__name__,
        },
        "roi_size": list(parser["roi_size"]),
        "overlap": float(parser["overlap"]),
        "sw_batch_size": int(parser["sw_batch_size"]),
    }


def model_zoo_network(feature_size: int, downsample: Any) -> torch.nn.Module:
    """SwinUNETR as the model zoo builds it (no flash attention, no checkpointing in inference).

    ``downsample`` is the bundle's resolved patch-merging layer for the same weights, so both
    pipelines compute the same function of the same weights (monai 1.6.1 has no ``img_size``).
    """
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=IN_CHANNELS,
        out_channels=NUM_CLASSES,
        feature_size=int(feature_size),
        use_checkpoint=False,
        use_flash_attention=MODEL_ZOO["use_flash_attention"],
        downsample=downsample,
    )


def model_zoo_reader() -> str:
    """The model zoo's ITKReader; NibabelReader where itk is not installed (e.g. a GPU box without its wheels).

    The reader changes only the load stage's time: both give the same array and affine for NIfTI.
    """
    import importlib.util

    return MODEL_ZOO["reader"] if importlib.util.find_spec("itk") is not None else "NibabelReader"


def model_zoo_pipeline(
    device: torch.device, feature_size: int, roi_size: Sequence[int], ckpt_path: str, output_dir: str
) -> dict[str, Any]:
    """The model-zoo 0.5.x inference pipeline built from MONAI transforms, same weights as the bundle."""
    from monai.handlers import CheckpointLoader
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    downsample = bundle_parser("inference.json", {"ckpt_path": str(ckpt_path)}).get_parsed_content(
        "network_def#downsample"
    )
    network = model_zoo_network(feature_size, downsample).to(device)
    load_checkpoint(
        CheckpointLoader(load_path=str(ckpt_path), load_dict={"model": network}, map_location=device), network
    )
    a_min, a_max = MODEL_ZOO["hu_window"]
    b_min, b_max = MODEL_ZOO["intensity_range"]
    preprocessing = Compose(
        [
            LoadImaged(keys="image", reader=model_zoo_reader()),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes=MODEL_ZOO["axcodes"]),
            Spacingd(keys="image", pixdim=MODEL_ZOO["spacing"], mode=MODEL_ZOO["spacing_mode"]),
            ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True),
            EnsureTyped(keys="image"),
        ]
    )
    postprocessing = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(keys="pred", output_dir=str(output_dir)),
        ]
    )
    roi = list(roi_size)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=MODEL_ZOO["sw_batch_size"], overlap=MODEL_ZOO["overlap"])
    evaluator_autocast = MODEL_ZOO["evaluator_amp"] and device.type == "cuda"

    def forward_context() -> Any:
        # SupervisedEvaluator(amp=True) wraps the inferer in torch.autocast("cuda")
        return torch.autocast("cuda") if evaluator_autocast else nullcontext()

    return {
        "name": "model_zoo",
        "preprocessing": preprocessing,
        "inferer": inferer,
        "postprocessing": postprocessing,
        "network": network,
        "input_check": None,
        "forward_context": forward_context,
        "precision": "float16" if evaluator_autocast else "float32",
        "settings": {
            "config": f"model zoo {MODEL_ZOO['name']} {MODEL_ZOO['version']} (rebuilt from MONAI transforms)",
            "evaluator_amp": MODEL_ZOO["evaluator_amp"],
            "use_flash_attention": flash_attention_of(network),
            "reader": model_zoo_reader(),
            "sw_batch_size": MODEL_ZOO["sw_batch_size"],
            "overlap": MODEL_ZOO["overlap"],
            "spacing": list(MODEL_ZOO["spacing"]),
            "hu_window": list(MODEL_ZOO["hu_window"]),
            "foreground_crop": False,
            "patch_merging": type(network.swinViT.layers1[0].downsample).__name__,
            "patch_merging_note": "the bundle's choice for these weights, so both compute the same function "
            "(the model zoo on monai 1.6.1 would always build 'merging')",
        },
        "roi_size": roi,
        "overlap": float(MODEL_ZOO["overlap"]),
        "sw_batch_size": int(MODEL_ZOO["sw_batch_size"]),
    }


# ------------------------------------------------------------------------------------------ end to end


def count_windows(spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI's sliding_window_inference uses for an image of this shape."""
    total = 1
    for size, roi in zip(spatial_shape, roi_size):
        size = max(int(size), int(roi))  # smaller images are padded to the roi
        interval = max(int(roi * (1 - overlap)), 1) if roi < size else roi
        total *= 1 if roi >= size else math.ceil((size - roi) / interval) + 1
    return total


def _stage_of(transform: Any, phase: str) -> str:
    """Stage name of one transform: load / preprocess / postprocess / save."""
    name = type(transform).__name__
    if phase == "pre":
        return "load" if name in ("LoadImaged", "DicomLoadImaged") else "preprocess"
    return "save" if name == "SaveImaged" else "postprocess"


def apply_timed(
    transforms: Any, data: dict, phase: str, stages: dict[str, float], steps: list[dict], device: torch.device
) -> dict:
    """Apply a Compose's transforms one by one, adding each one's seconds to its stage."""
    from monai.transforms import apply_transform

    for transform in transforms.transforms:
        t0 = time.perf_counter()
        data = apply_transform(transform, data)
        sync(device)
        seconds = time.perf_counter() - t0
        stage = _stage_of(transform, phase)
        stages[stage] = stages.get(stage, 0.0) + seconds
        steps.append({"transform": type(transform).__name__, "stage": stage, "seconds": seconds})
    return data


def warm_up(pipeline: dict[str, Any], image_path: str, device: torch.device) -> float:
    """Untimed: one load of the image (reader imports, page cache) and one forward of sw_batch_size windows.

    Returns the seconds of the warm-up forward.
    """
    pipeline["preprocessing"].transforms[0]({"image": image_path})
    shape = (pipeline["sw_batch_size"], IN_CHANNELS, *pipeline["roi_size"])
    x = torch.rand(shape, device=device)
    t0 = time.perf_counter()
    with torch.no_grad(), pipeline["forward_context"]():
        pipeline["inferer"](x, pipeline["network"])
    sync(device)
    return time.perf_counter() - t0


def find_output(output_dir: Path, image_path: str, since: float) -> str | None:
    """The label map (``<name>_<postfix>.*``) SaveImaged wrote for ``image_path`` under ``output_dir``."""
    stem = Path(image_path).name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    found = [p for p in output_dir.rglob(f"{stem}_*") if p.is_file() and p.stat().st_mtime >= since - 1]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def run_end_to_end(
    pipeline: dict[str, Any], image_path: str, device: torch.device, output_dir: Path, warmup: bool = True
) -> dict[str, Any]:
    """Run one volume through a pipeline; return stage seconds, total, window count and the saved label map."""
    import nibabel as nib
    from monai.data import decollate_batch, list_data_collate

    warmup_s = warm_up(pipeline, image_path, device) if warmup else None
    stages: dict[str, float] = {}
    steps: list[dict] = []
    start_wall = time.time()
    t_start = time.perf_counter()
    if pipeline["input_check"] is not None:
        t0 = time.perf_counter()
        pipeline["input_check"](image_path)
        stages["input_check"] = time.perf_counter() - t0
    data = apply_timed(pipeline["preprocessing"], {"image": image_path}, "pre", stages, steps, device)
    preprocessed_shape = [int(s) for s in data["image"].shape[1:]]
    batch = list_data_collate([data])
    t0 = time.perf_counter()
    inputs = batch["image"].to(device)
    with torch.no_grad(), pipeline["forward_context"]():
        pred = pipeline["inferer"](inputs, pipeline["network"])
    sync(device)
    stages["sliding_window"] = time.perf_counter() - t0
    # as an engine does: decollate batch and output, merge, then postprocess item by item
    item = {**decollate_batch(batch)[0], **decollate_batch({"image": inputs, "pred": pred})[0]}
    apply_timed(pipeline["postprocessing"], item, "post", stages, steps, device)
    total = time.perf_counter() - t_start
    label_path = find_output(output_dir, image_path, start_wall)
    label_shape = list(nib.load(label_path).shape) if label_path else None
    windows = count_windows(preprocessed_shape, pipeline["roi_size"], pipeline["overlap"])
    return {
        "precision": pipeline["precision"],
        "settings": pipeline["settings"],
        "stages_s": {
            k: stages[k]
            for k in ("input_check", "load", "preprocess", "sliding_window", "postprocess", "save")
            if k in stages
        },
        "transforms_s": steps,
        "total_s": total,
        "warmup_forward_s": warmup_s,
        "preprocessed_shape": preprocessed_shape,
        "windows": windows,
        "sliding_window_s_per_window": stages["sliding_window"] / max(windows, 1),
        "label_path": label_path,
        "label_shape": label_shape,
    }


def label_agreement(path_a: str | None, path_b: str | None, foreground: bool = False) -> float | None:
    """Fraction of voxels with the same label in two saved label maps (None if either is missing or shapes differ).

    With ``foreground``, only voxels that either map labels as an organ count (None if there are none),
    so a mostly-background volume cannot hide disagreement on the organs.
    """
    import nibabel as nib

    if not path_a or not path_b:
        return None
    a = np.rint(np.asarray(nib.load(path_a).dataobj))
    b = np.rint(np.asarray(nib.load(path_b).dataobj))
    if a.shape != b.shape:
        return None
    if foreground:
        organs = (a > 0) | (b > 0)
        return float(np.mean(a[organs] == b[organs])) if organs.any() else None
    return float(np.mean(a == b))


def image_info(image_path: str) -> dict[str, Any]:
    """Shape and spacing of the input image (nibabel header)."""
    import nibabel as nib

    img = nib.load(image_path)
    return {
        "path": str(image_path),
        "shape": [int(s) for s in img.shape],
        "spacing_mm": [round(float(s), 4) for s in img.header.get_zooms()[:3]],
    }


# ------------------------------------------------------------------------------------------ forward


def time_forward(
    network: torch.nn.Module,
    shape: Sequence[int],
    device: torch.device,
    autocast: torch.dtype | None,
    repeats: int,
    seed: int = 0,
) -> list[float]:
    """Seconds of ``repeats`` forward calls on a random (seeded) input, after one warm-up call."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(shape), generator=generator).to(device)
    context = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else nullcontext
    times = []
    network.eval()
    with torch.no_grad():
        for i in range(int(repeats) + 1):
            t0 = time.perf_counter()
            with context():
                network(x)
            sync(device)
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - t0)
    return times


def benchmark_forward(
    networks: dict[str, torch.nn.Module], roi_size: Sequence[int], windows: int, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Per-call and per-window forward seconds for each network in float32 and in the bundle's autocast dtype.

    One call is a batch of ``windows`` windows of ``roi_size`` (the inferer's sw_batch_size by default).
    """
    reduced = bundle_autocast_dtype(device)
    shape = (int(windows), IN_CHANNELS, *roi_size)
    rows = []
    for name, network in networks.items():
        flash = flash_attention_of(network)
        for autocast in (None, reduced or "skipped"):
            row = {
                "network": name,
                "use_flash_attention": flash,
                "input_shape": list(shape),
                "precision": dtype_name(None if autocast in (None, "skipped") else autocast),
            }
            if autocast == "skipped":
                row.update(
                    precision="reduced",
                    skipped=(
                        f"no autocast on {device.type} here: the bundle's inferer stays in float32 "
                        f"(native bf16: {native_bf16()})"
                    ),
                )
                rows.append(row)
                continue
            say(f"forward: {name} {row['precision']} {list(shape)} x {repeats} (+1 warm-up)")
            times = time_forward(network, shape, device, autocast, repeats)
            mean = float(np.mean(times))
            row.update(
                repeats=len(times),
                times_s=times,
                windows_per_call=shape[0],
                seconds_per_call=mean,
                seconds_per_window=mean / shape[0],
                std_s=float(np.std(times)),
            )
            rows.append(row)
    return rows


def build_variant(
    name: str, device: torch.device, feature_size: int, roi_size: Sequence[int], ckpt_path: str, output_dir: str
) -> dict[str, Any]:
    """The pipeline of one benchmark variant (see ``VARIANTS``)."""
    if name == "model_zoo":
        return model_zoo_pipeline(device, feature_size, roi_size, ckpt_path, output_dir)
    return bundle_pipeline(device, feature_size, roi_size, ckpt_path, output_dir, name=name)


def variant_child(args_json: str, result_path: str) -> None:
    """Subprocess entry: build one variant, run the volume end to end, optionally time its forward; write JSON.

    Each variant runs in a fresh process so that process-wide settings one pipeline makes (the
    bundle's allocator setting, thread pools, the allocator's state) cannot speed up or slow down
    another.
    """
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = json.loads(args_json)
    dev = resolve_device(a["device"])
    t0 = time.perf_counter()
    pipeline = build_variant(a["name"], dev, a["feature_size"], a["roi_size"], a["ckpt_path"], a["output_dir"])
    setup_s = time.perf_counter() - t0
    say(f"{a['name']}: running one volume ({pipeline['precision']}, warm-up forward first)")
    result = run_end_to_end(pipeline, a["image"], dev, Path(a["output_dir"]), warmup=a["warmup"])
    result["setup_s"] = setup_s
    flops = network_flops(pipeline["network"], (1, IN_CHANNELS, *a["roi_size"]))
    peak = device_peak(dev)
    result["flops_per_window"] = flops
    result["limit"] = limit(
        flops * result["windows"], result["stages_s"]["sliding_window"], peak, pipeline["precision"]
    )
    forward = []
    if a["time_forward"]:
        batch = int(a["forward_batch"] or pipeline["sw_batch_size"])
        forward = benchmark_forward({a["name"]: pipeline["network"]}, a["roi_size"], batch, dev, a["repeats"])
        for row in forward:
            if "skipped" not in row:
                row["flops_per_window"] = flops
                row["limit"] = limit(flops * row["windows_per_call"], row["seconds_per_call"], peak, row["precision"])
    Path(result_path).write_text(json.dumps({"end_to_end": result, "model_forward": forward}))


# ------------------------------------------------------------------------------------------ training


def phantom_batch(n: int, roi_size: Sequence[int], hu_window: Sequence[float], seed: int) -> dict[str, torch.Tensor]:
    """``n`` phantom crops of ``roi_size`` (image windowed to 0..1, label ids 0-13), as one training batch."""
    from tools.data.make_phantoms import windowed_crops

    images, labels = windowed_crops(n, roi_size, hu_window, seed)
    return {"image": torch.from_numpy(images).float(), "label": torch.from_numpy(labels)}


def measure_training(
    device: str,
    feature_size: int,
    roi_size: Sequence[int],
    steps: int,
    seed: int = 0,
    warmup_steps: int = 1,
    crops: int | None = None,
) -> dict[str, Any]:
    """Run the bundle's SupervisedTrainer for warm-up + timed steps on phantom crops; return speed and memory.

    Parsed from train.json: the network (with its ``use_checkpoint`` and flash attention), DiceCE
    loss, AdamW, and the trainer with its amp rule. The data loader is replaced by in-memory
    phantom batches of ``crops`` crops (default ``batch_size * num_samples``, what
    RandCropByPosNegLabeld hands one iteration) and the handlers (validation, logging, lr
    schedule) are left out. Meant to run in a fresh process (see ``benchmark_training``).
    """
    from monai.utils import set_determinism

    dev = resolve_device(device)
    roi = cube(roi_size)
    parser = bundle_parser(
        "train.json",
        {
            "device": device_expr(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "pretrained_path": "",
            "resume_from": "",
            "seed": int(seed),
            "max_epochs": 1,
        },
    )
    set_determinism(seed=int(seed))
    configured_crops = int(parser["batch_size"]) * int(parser.get_parsed_content("num_samples"))
    crops = int(crops) if crops else configured_crops
    batch = phantom_batch(crops, roi, parser["hu_window"], seed)
    total_steps = int(warmup_steps) + int(steps)
    loader = torch.utils.data.DataLoader([batch] * total_steps, batch_size=None, shuffle=False)
    parser.update({"train#dataloader": loader, "train#handlers": []})
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []

    def _log(engine: Any, times: list[float]) -> None:
        losses.append(loss_of(engine.state.output))
        say(f"training step {len(times)}/{total_steps}: {times[-1]:.2f} s, loss {losses[-1]:.4f}")

    times = time_iterations(trainer, dev, _log)
    flops = network_flops(trainer.network, (crops, IN_CHANNELS, *roi), backward=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = memory_snapshot()
    trainer.run()
    after = memory_snapshot()
    timed = times[int(warmup_steps) :]
    precision = "float16" if trainer.amp and dev.type == "cuda" else "float32"
    peak, peak_before, hwm = after["ru_maxrss_mib"], before["ru_maxrss_mib"], after["vm_hwm_mib"]
    return {
        "config": "configs/train.json SupervisedTrainer (phantom crops in memory, no handlers)",
        "device": str(dev),
        "feature_size": int(feature_size),
        "roi_size": roi,
        "batch_crops": crops,
        "configured_batch_crops": configured_crops,
        "use_checkpoint": bool(parser["use_checkpoint"]),
        "use_flash_attention": flash_attention_of(trainer.network),
        "amp": bool(trainer.amp),
        "warmup_steps": int(warmup_steps),
        "steps": len(timed),
        "step_times_s": timed,
        "warmup_times_s": times[: int(warmup_steps)],
        "seconds_per_iteration": float(np.mean(timed)) if timed else None,
        "iterations_per_second": float(len(timed) / sum(timed)) if timed and sum(timed) > 0 else None,
        "losses": losses,
        "flops_per_crop": flops // max(crops, 1),
        "flops_per_iteration": flops,
        "flops_counted": "forward + backward of the network (PyTorch flop counter), no optimiser step",
        "limit": limit(flops, float(np.mean(timed)) if timed else None, device_peak(dev), precision),
        "peak_rss_mib": peak,
        "peak_rss_before_training_mib": peak_before,
        "peak_rss_delta_training_mib": peak - peak_before,
        "vm_hwm_mib": hwm,
        "peak_rss_attributable": hwm is None or abs(peak - hwm) <= max(64.0, 0.05 * hwm),
        "cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated(dev) / MIB if dev.type == "cuda" else None,
        "memory_measure": (
            ("torch.cuda.max_memory_allocated; " if dev.type == "cuda" else "")
            + "peak RSS (resource.getrusage ru_maxrss) of a fresh training process, started through a forking "
            "/bin/sh so it does not inherit the launcher's peak; vm_hwm_mib (/proc VmHWM) cross-checks it"
        ),
    }


def training_child(args_json: str, result_path: str) -> None:
    """Entry point of the training subprocess: measure and write the result JSON to ``result_path``."""
    result = measure_training(**json.loads(args_json))
    Path(result_path).write_text(json.dumps(result, indent=2))


def benchmark_training(
    device: torch.device,
    feature_size: int,
    roi_size: Sequence[int],
    steps: int,
    seed: int = 0,
    warmup_steps: int = 1,
    crops: int | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Measure training in a fresh Python process so that its peak memory belongs to training alone."""
    args = {
        "device": str(device),
        "feature_size": int(feature_size),
        "roi_size": list(roi_size),
        "steps": int(steps),
        "seed": int(seed),
        "warmup_steps": int(warmup_steps),
        "crops": crops,
    }
    result = run_child("tools.benchmarks.benchmark_btcv", "training_child", args, "training", timeout_s)
    return {**result, **args} if "error" in result else result


# ------------------------------------------------------------------------------------------ report


def comparison(e2e: dict[str, dict]) -> dict[str, Any]:
    """Speed ratios model_zoo / bundle and voxel agreements of the bundle's label map."""
    bundle, float32, fp32, zoo = (e2e.get(v) for v in VARIANTS)

    def ratio(key_fn: Callable[[dict], float]) -> float | None:
        if not bundle or not zoo:
            return None
        return finite_or_none(key_fn(zoo) / key_fn(bundle)) if key_fn(bundle) > 0 else None

    return {
        "speed_ratio_model_zoo_over_bundle": ratio(lambda r: r["total_s"]),
        "sliding_window_ratio_model_zoo_over_bundle": ratio(lambda r: r["stages_s"]["sliding_window"]),
        "speed_ratio_bundle_fp32_over_bundle": (
            finite_or_none(fp32["total_s"] / bundle["total_s"]) if bundle and fp32 else None
        ),
        "speed_ratio_bundle_float32_over_bundle": (
            finite_or_none(float32["total_s"] / bundle["total_s"]) if bundle and float32 else None
        ),
        "agreement_bundle_vs_bundle_float32": label_agreement(
            bundle and bundle["label_path"], float32 and float32["label_path"]
        ),
        "agreement_bundle_vs_bundle_fp32": label_agreement(
            bundle and bundle["label_path"], fp32 and fp32["label_path"]
        ),
        "agreement_bundle_vs_model_zoo": label_agreement(bundle and bundle["label_path"], zoo and zoo["label_path"]),
        "organ_agreement_bundle_vs_bundle_fp32": label_agreement(
            bundle and bundle["label_path"], fp32 and fp32["label_path"], foreground=True
        ),
        "organ_agreement_bundle_vs_model_zoo": label_agreement(
            bundle and bundle["label_path"], zoo and zoo["label_path"], foreground=True
        ),
    }


def limit_lines(result: dict[str, Any]) -> list[str]:
    """The report's lines on the limit: FLOPs of one window, achieved FLOP/s and fraction of the peak."""
    peak = result.get("peak")
    lines = ["", f"Limit (peak: {peak['assumption'] if peak else 'unknown device, no peak'})"]
    for name, r in result["end_to_end"].items():
        if r.get("limit"):
            lines.append(
                f"{name:<12} {r['flops_per_window'] / 1e9:.2f} GFLOP per window (forward); sliding window "
                f"{format_limit(r['limit'])}"
            )
    for r in result["model_forward"]:
        if r.get("limit"):
            lines.append(f"{r['network']:<12} forward {r['precision']:<9} {format_limit(r['limit'])}")
    return lines


def format_report(result: dict[str, Any]) -> str:
    """A readable text table of a benchmark result."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable cores ({m['torch_threads']} torch threads), "
        f"CPU capability {m['cpu_capability']}, native bf16 {m['native_bf16']}, GPU {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, monai {m['monai']}",
        f"Image {s['image']['path']} {s['image']['shape']} @ {s['image']['spacing_mm']} mm; device {s['device']}; "
        f"feature_size {s['feature_size']}, roi {s['roi_size']}; weights: {s['weights']}",
    ]
    loads = [m.get("load_average_1_5_15"), m.get("load_average_after_inference")]
    busy = [la[0] for la in loads if la and la[0] > 1.5 * (m["cpus_usable"] or 1)]
    if busy:
        lines.append(
            f"WARNING: 1-minute load average up to {max(busy):.1f} on {m['cpus_usable']} cores: other "
            f"processes shared the CPU, so the timings are inflated and noisy"
        )
    lines += [
        "",
        "End to end, seconds per volume",
        f"{'variant':<12} {'prec':<9} {'check':>7} {'load':>7} {'prep':>7} {'sliding':>9} {'post':>7} "
        f"{'save':>7} {'total':>8} {'windows':>8} {'s/window':>9}",
    ]
    for name, r in result["end_to_end"].items():
        st = r["stages_s"]
        lines.append(
            f"{name:<12} {r['precision']:<9} {st.get('input_check', 0.0):>7.2f} {st.get('load', 0.0):>7.2f} "
            f"{st.get('preprocess', 0.0):>7.2f} {st['sliding_window']:>9.2f} {st.get('postprocess', 0.0):>7.2f} "
            f"{st.get('save', 0.0):>7.2f} {r['total_s']:>8.2f} {r['windows']:>8d} "
            f"{r['sliding_window_s_per_window']:>9.3f}"
        )
    c = result["comparison"]

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines += [
        f"speed ratio bundle_float32 / bundle: {num(c.get('speed_ratio_bundle_float32_over_bundle'), '{:.2f}x')}; "
        f"voxel agreement bundle vs bundle_float32: {num(c.get('agreement_bundle_vs_bundle_float32'), '{:.4%}')}",
        f"speed ratio model_zoo / bundle: {num(c['speed_ratio_model_zoo_over_bundle'], '{:.2f}x')} "
        f"(sliding window alone {num(c['sliding_window_ratio_model_zoo_over_bundle'], '{:.2f}x')})",
        f"voxel agreement bundle vs bundle_fp32: {num(c['agreement_bundle_vs_bundle_fp32'], '{:.4%}')}; "
        f"bundle vs model_zoo: {num(c['agreement_bundle_vs_model_zoo'], '{:.4%}')}",
        f"organ-voxel agreement (voxels either map labels as an organ) bundle vs bundle_fp32: "
        f"{num(c.get('organ_agreement_bundle_vs_bundle_fp32'), '{:.4%}')}; "
        f"bundle vs model_zoo: {num(c.get('organ_agreement_bundle_vs_model_zoo'), '{:.4%}')}",
        *([f"({c['note']})"] if c.get("note") else []),
        *limit_lines(result),
        "",
        "Network forward, one call = a batch of windows (the inferer's sw_batch_size unless --forward_batch)",
        f"{'network':<10} {'flash':<6} {'precision':<10} {'windows':>8} {'s/call':>8} {'s/window':>9} {'std':>7}",
    ]
    for r in result["model_forward"]:
        if "skipped" in r:
            lines.append(
                f"{r['network']:<10} {str(r['use_flash_attention']):<6} {r['precision']:<10} skipped: {r['skipped']}"
            )
        else:
            lines.append(
                f"{r['network']:<10} {str(r['use_flash_attention']):<6} {r['precision']:<10} "
                f"{r['windows_per_call']:>8d} {r['seconds_per_call']:>8.3f} {r['seconds_per_window']:>9.3f} "
                f"{r['std_s']:>7.3f}"
            )
    t = result.get("training")
    lines.append("")
    if not t:
        lines.append("Training: skipped")
    elif "error" in t:
        lines.append(f"Training: {t['error']}")
    else:
        mem = (
            f"CUDA max allocated {t['cuda_max_memory_allocated_mib']:.0f} MiB"
            if t["cuda_max_memory_allocated_mib"] is not None
            else f"peak RSS {t['peak_rss_mib']:.0f} MiB (+{t['peak_rss_delta_training_mib']:.0f} MiB over the "
            f"{t['peak_rss_before_training_mib']:.0f} MiB peak before the first step)"
        )
        lines.append(
            f"Training: {num(t['iterations_per_second'], '{:.3f}')} it/s "
            f"({num(t['seconds_per_iteration'], '{:.2f}')} s/it over {t['steps']} steps, batch of "
            f"{t['batch_crops']} crops of {t['roi_size']}, use_checkpoint {t['use_checkpoint']}, amp {t['amp']}); "
            f"{mem}"
        )
        if t.get("limit"):
            lines.append(
                f"Training limit: {t['flops_per_iteration'] / 1e9:.1f} GFLOP per iteration (forward + backward), "
                f"{format_limit(t['limit'])}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def run_variants(
    dev: torch.device,
    feature_size: int,
    roi: list[int],
    ckpt: str,
    out: Path,
    image: str,
    warmup: bool,
    forward_batch: int | None,
    repeats: int,
    skip_model_zoo: bool,
    skip_identical_fp32: bool,
) -> tuple[dict[str, dict], list[dict], bool]:
    """Run each variant on the volume in a fresh process; return (end to end by variant, forward rows, fp32 skipped).

    The fp32 run is skipped (third value True) where ``skip_identical_fp32`` and the bundle ran float32
    in the plain layout: its run is the fp32 run.
    """
    e2e: dict[str, dict] = {}
    forward_rows: list[dict] = []
    fp32_is_bundle = False
    for name in VARIANTS:
        if name == "model_zoo" and skip_model_zoo:
            say("model_zoo: skipped")
            continue
        if name == "bundle_float32" and e2e.get("bundle", {}).get("precision") == "float32":
            say("bundle_float32: skipped, the bundle runs float32 here, so its run is the float32 run")
            continue
        if name == "bundle_fp32" and fp32_is_bundle:
            say("bundle_fp32: skipped, the bundle runs float32 in the plain layout here, so its run is the fp32 run")
            continue
        say(f"{name}: building the pipeline and running one volume in a fresh process")
        args = {
            "name": name,
            "device": str(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "ckpt_path": ckpt,
            "output_dir": str(out / name),
            "image": str(image),
            "warmup": bool(warmup),
            "time_forward": name in ("bundle", "model_zoo"),
            "forward_batch": forward_batch,
            "repeats": int(repeats),
        }
        child = run_child("tools.benchmarks.benchmark_btcv", "variant_child", args, name)
        if "error" in child:
            raise RuntimeError(f"benchmark variant {name}: {child['error']}")
        r = e2e[name] = child["end_to_end"]
        forward_rows += child["model_forward"]
        if name == "bundle":  # the fp32 run would repeat it: float32 and the plain layout here
            fp32_is_bundle = skip_identical_fp32 and r["precision"] == "float32" and not r["settings"]["channels_last"]
        say(
            f"{name}: total {r['total_s']:.2f} s, sliding window {r['stages_s']['sliding_window']:.2f} s over "
            f"{r['windows']} windows; label map {r['label_path']}"
        )
    return e2e, forward_rows, fp32_is_bundle


def run_benchmark(
    image: str,
    ckpt_path: str | None = None,
    feature_size: int = 48,
    roi_size: int = 96,
    device: str | None = None,
    train_steps: int = 3,
    output_json: str = "bench.json",
    skip_model_zoo: bool = False,
    skip_training: bool = False,
    repeats: int = 3,
    seed: int = 0,
    work_dir: str | None = None,
    warmup: bool = True,
    train_warmup_steps: int = 1,
    train_crops: int | None = None,
    forward_batch: int | None = None,
    skip_identical_fp32: bool = True,
) -> dict[str, Any]:
    """Benchmark the bundle vs the model-zoo settings on one volume; write ``output_json``, return the result.

    The command line prints the result as a table.

    Args:
        image: input CT (NIfTI, HU).
        ckpt_path: bundle checkpoint (``{"model": ...}`` or a state dict); random init (seeded) if omitted.
        feature_size: SwinUNETR feature size (48 in the bundle).
        roi_size: sliding-window / training crop size (96 in the bundle and the model zoo).
        device: "cpu", "cuda", "cuda:1"...; default cuda if available else cpu.
        train_steps: timed training steps (after the warm-up steps).
        output_json: where to write the result.
        skip_model_zoo: leave the model-zoo variant out.
        skip_training: leave the training measurement out.
        repeats: timed forward calls per network setting (after one warm-up call).
        seed: seed of the random initialisation and of the phantom training crops.
        work_dir: folder for label maps (default: ``<output_json stem>_outputs`` next to it).
        warmup: one untimed image load and forward before each end-to-end run.
        train_warmup_steps: untimed training steps before the timed ones.
        train_crops: crops per training batch (default train.json's batch_size * num_samples).
        forward_batch: windows per timed forward call (default the inferer's sw_batch_size).
        skip_identical_fp32: leave out the ``bundle_fp32`` run where the bundle uses no reduced precision
            and no channels-last on the device (it would repeat the same float32 computation).
    """
    dev = resolve_device(device)
    roi = cube(roi_size)
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image not found: {image}")
    out = (
        Path(work_dir)
        if work_dir
        else Path(output_json).resolve().with_suffix("").with_name(Path(output_json).stem + "_outputs")
    )
    out.mkdir(parents=True, exist_ok=True)
    say(f"device {dev}, feature_size {feature_size}, roi {roi}; outputs under {out}")
    if ckpt_path:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
        weights, ckpt = f"checkpoint {ckpt_path}", str(ckpt_path)
    else:
        ckpt = write_random_checkpoint(out / f"random_init_fs{feature_size}_seed{seed}.pt", feature_size, seed)
        weights = f"RANDOM INIT (torch seed {seed}; no --ckpt_path given): speeds are valid, labels are not"
    say(f"weights: {weights}")
    result: dict[str, Any] = {
        "machine": machine_info(dev),
        "settings": {
            "image": image_info(image),
            "device": str(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "ckpt_path": str(ckpt_path) if ckpt_path else None,
            "weights": weights,
            "random_init": not ckpt_path,
            "seed": int(seed),
            "repeats": int(repeats),
            "train_steps": int(train_steps),
            "train_warmup_steps": int(train_warmup_steps),
            "train_crops": train_crops,
            "forward_batch": forward_batch,
            "warmup_forward_before_end_to_end": bool(warmup),
            "model_zoo_constants": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_ZOO.items()},
            "bundle_autocast_dtype": dtype_name(bundle_autocast_dtype(dev)),
        },
        "peak": device_peak(dev),
    }
    Path(image).read_bytes()  # page cache warm for every variant alike

    e2e, forward_rows, fp32_is_bundle = run_variants(
        dev,
        feature_size,
        roi,
        ckpt,
        out,
        image,
        warmup=warmup,
        forward_batch=forward_batch,
        repeats=repeats,
        skip_model_zoo=skip_model_zoo,
        skip_identical_fp32=skip_identical_fp32,
    )
    result["machine"]["load_average_after_inference"] = load_average()
    result["end_to_end"] = e2e
    result["comparison"] = comparison(e2e)
    if fp32_is_bundle:
        result["comparison"]["agreement_bundle_vs_bundle_fp32"] = 1.0
        result["comparison"]["organ_agreement_bundle_vs_bundle_fp32"] = 1.0
        result["comparison"]["fp32_note"] = (
            "neither reduced precision nor channels-last is used on this device, "
            "so the bundle's label map is the fp32 label map"
        )
    if not ckpt_path:
        result["comparison"]["note"] = (
            "random weights: the agreements compare label maps of random logits "
            "(pipeline and numeric differences), not segmentation quality"
        )
    result["model_forward"] = forward_rows
    if skip_training:
        say("training: skipped")
        result["training"] = None
    else:
        say(f"training: {train_steps} step(s) after {train_warmup_steps} warm-up step(s), in a fresh subprocess")
        result["training"] = benchmark_training(
            dev, feature_size, roi, train_steps, seed=seed, warmup_steps=train_warmup_steps, crops=train_crops
        )
    Path(output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(output_json).write_text(json.dumps(result, indent=4) + "\n")
    say(f"wrote {output_json}")
    return result


def report(result: dict[str, Any]) -> str:
    """The command line's printout: a blank line and the text table."""
    return "\n" + format_report(result)


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(run_benchmark, report=report)
