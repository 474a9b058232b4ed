"""The two BTCV inference pipelines ``benchmark_btcv`` times: the bundle's, parsed from its configs, and the
model zoo's ``swin_unetr_btcv_segmentation`` 0.5.x settings, built here from MONAI transforms.

Each is a dict (``preprocessing``, ``inferer``, ``postprocessing``, ``network``, ``precision``,
``settings``...) that ``run_end_to_end`` runs on one volume, stage by stage. Both load the same
weights (a checkpoint in the bundle's format).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.harness import training_precision
from tools.common.bundles import BTCV_DIR as BUNDLE_DIR
from tools.common.bundles import bundle_parser as parse_bundle_config
from tools.common.bundles import device_expr
from tools.common.timing import sync

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
# The variants: the bundle as configured; its float32 path as configured (channels-last on CPU, attention
# masks reused); float32 in the plain NCDHW layout (the reference of the agreement numbers); the model zoo's.
VARIANTS = ("bundle", "bundle_float32", "bundle_float32_ncdhw", "model_zoo")


def flash_attention_of(network: torch.nn.Module) -> bool:
    """True if the network's Swin attention blocks use PyTorch SDPA (``use_flash_attention``)."""
    return any(bool(getattr(m, "use_flash_attention", False)) for m in network.modules())


# ------------------------------------------------------------------------------------------ bundle


def bundle_parser(config: str, overrides: dict[str, Any]) -> Any:
    """A ConfigParser of the BTCV bundle's ``configs/<config>`` with its metadata and ``overrides``."""
    return parse_bundle_config(BUNDLE_DIR, config, overrides)


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

    ``name`` is the variant: ``bundle``, ``bundle_float32`` or ``bundle_float32_ncdhw`` (see ``VARIANTS``).
    """
    amp = name == "bundle"
    overrides = inference_overrides(
        device, feature_size, roi_size, ckpt_path, output_dir, amp, plain_layout=name == "bundle_float32_ncdhw"
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
        "precision": training_precision(device, amp),
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


def build_variant(
    name: str, device: torch.device, feature_size: int, roi_size: Sequence[int], ckpt_path: str, output_dir: str
) -> dict[str, Any]:
    """The pipeline of one benchmark variant (see ``VARIANTS``)."""
    if name == "model_zoo":
        return model_zoo_pipeline(device, feature_size, roi_size, ckpt_path, output_dir)
    return bundle_pipeline(device, feature_size, roi_size, ckpt_path, output_dir, name=name)


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
