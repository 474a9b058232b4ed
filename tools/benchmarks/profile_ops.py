"""Per-operator profile of the BTCV bundle's network: where inference and training time goes.

For each requested precision, in a fresh process, the tool builds the network the way the bundle
does and profiles it with ``torch.profiler`` (self CPU time per ATen operator, or self CUDA time):

* ``inference`` - ``configs/inference.json``'s ``network_def`` converted as its inferer converts it
  (``scripts.inferers``: channels-last 3D with InstanceNorm as GroupNorm on CPU where
  ``channels_last`` is on; Swin attention masks reused where ``reuse_attention_masks`` is on), one
  call on ``sw_batch_size`` windows of ``roi_size`` under ``no_grad`` (as MONAI's evaluators run),
  autocast to the precision asked (``auto`` = what the bundle would use on this device);
* ``training`` - ``configs/train.json``'s ``network_def`` (its ``use_checkpoint``), ``loss`` and an
  AdamW step on random crops with random labels, forward under the same autocast rule.

``float32`` and ``bfloat16`` can be profiled side by side (``--precisions "[float32,bfloat16]"``;
bf16 on a CPU without native bf16 kernels is refused: oneDNN would run a reference kernel about
100x slower). Written: a JSON with the top operators per run (self time, share, calls, one
example input shape) and the wall time of the timed calls, plus a markdown table.

Command line::

    python -m tools profile_ops --mode inference --feature_size 48 --roi_size 96 \\
        --precisions "[float32,bfloat16]" --output_json prof.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.harness import envelope, machine_line, run_one, training_precision, write_result
from tools.common.bundles import BTCV_DIR, bundle_parser, cube, device_expr, use_bundle_scripts
from tools.common.timing import resolve_device, say, sync

MODES = ("inference", "training")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEASURE = "tools.benchmarks.profile_ops:profile_run"  # one (mode, precision) profile (the harness runs it)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> the one precision rule (``harness.training_precision``); a reduced one the device lacks -> error."""
    if precision == "auto":
        return training_precision(device)
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose auto, {', '.join(DTYPES)}")
    if DTYPES[precision] is not None and training_precision(device) != precision:
        raise ValueError(f"{precision} has no native kernels on this {device.type} (the bundle would not use it)")
    return precision


def build_network(mode: str, device: torch.device, feature_size: int, roi: list[int]) -> tuple[Any, Any, dict]:
    """(network, bundle config parser, settings) built from the bundle's config for ``mode``."""
    common = {"device": device_expr(device), "feature_size": int(feature_size), "roi_size": roi}
    if mode == "inference":
        parser = bundle_parser(BTCV_DIR, "inference.json", {**common, "ckpt_path": ""})
        network = parser.get_parsed_content("network_def").to(device).eval()
        inferers = use_bundle_scripts(BTCV_DIR).inferers
        reuse = bool(parser.get("reuse_attention_masks", False))
        channels_last = bool(parser.get("channels_last", False)) and device.type == "cpu"
        if reuse:
            inferers.reuse_attention_masks(network)
        if channels_last:
            inferers.to_channels_last(network)
        settings = {"channels_last": channels_last, "reuse_attention_masks": reuse}
        return network, parser, {**settings, "windows_per_call": int(parser["sw_batch_size"])}
    parser = bundle_parser(BTCV_DIR, "train.json", {**common, "pretrained_path": ""})
    network = parser.get_parsed_content("network_def").to(device).train()
    return network, parser, {"use_checkpoint": bool(parser["use_checkpoint"]), "crops_per_step": 1}


def profile_run(**a: Any) -> dict[str, Any]:
    """Profile one (mode, precision) run in this process (the harness runs it in a fresh one)."""
    from torch.profiler import ProfilerActivity, profile

    dev = resolve_device(a["device"])
    roi = list(a["roi_size"])
    torch.manual_seed(0)
    network, parser, settings = build_network(a["mode"], dev, a["feature_size"], roi)
    dtype = DTYPES[a["precision"]]
    batch = settings.get("windows_per_call", settings.get("crops_per_step"))
    x = torch.rand(batch, 1, *roi, device=dev)
    if settings.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if a["mode"] == "inference":
        step = _inference_step(network, x, dev, dtype)
    else:
        step = _training_step(network, parser, x, dev, dtype)
    for _ in range(int(a["warmup"])):
        step()
    sync(dev)
    start = time.perf_counter()
    for _ in range(int(a["calls"])):
        step()
    sync(dev)
    wall = (time.perf_counter() - start) / int(a["calls"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        sync(dev)
    result = {"mode": a["mode"], "precision": a["precision"], "seconds_per_call": wall, **settings}
    result["ops"] = top_ops(prof, int(a["top"]), cuda=dev.type == "cuda")
    return result


def _inference_step(network: Any, x: torch.Tensor, dev: torch.device, dtype: torch.dtype | None):
    def step() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            network(x)

    return step


def _training_step(network: Any, parser: Any, x: torch.Tensor, dev: torch.device, dtype: torch.dtype | None):
    loss_fn = parser.get_parsed_content("loss")
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(parser["learning_rate"]))
    out_channels = int(parser.get_parsed_content("network_def#out_channels"))
    label = torch.randint(0, out_channels, (x.shape[0], 1, *x.shape[2:]), device=dev)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = network(x)
        loss = loss_fn(logits.float(), label)
        loss.backward()
        optimizer.step()

    return step


def top_ops(prof: Any, top: int, cuda: bool = False) -> list[dict[str, Any]]:
    """The ``top`` ATen operators by self time (CUDA on a GPU, else CPU), with share, calls and an input shape."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    shapes: dict[str, list] = {}
    for event in prof.events():
        if event.name not in shapes and event.input_shapes:
            shapes[event.name] = event.input_shapes[:2]
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        {
            "op": e.key,
            "self_ms": getattr(e, key) / 1e3,
            "share": getattr(e, key) / total,
            "calls": e.count,
            "example_input_shapes": shapes.get(e.key),
        }
        for e in rows
    ]


def markdown(result: dict[str, Any]) -> str:
    """Per-run tables: operator, self time, share of all operators' self time, calls."""
    m, s = result["machine"], result["settings"]
    lines = [machine_line(m), f"feature_size {s['feature_size']}, roi {s['roi_size']}, device {s['device']}"]
    for run in result["runs"]:
        settings = {k: v for k, v in run.items() if k not in ("ops", "mode", "precision", "seconds_per_call")}
        lines += [
            "",
            f"{run['mode']}, {run['precision']}: {run['seconds_per_call']:.3f} s per call ({settings})",
            "",
            "| operator | self ms | share | calls |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [f"| {o['op']} | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |" for o in run["ops"]]
    return "\n".join(lines) + "\n"


def run_profile(
    mode: str = "inference",
    feature_size: int = 48,
    roi_size: int = 96,
    precisions: str | list[str] = "auto",
    device: str | None = None,
    warmup: int = 1,
    calls: int = 2,
    top: int = 15,
    output_json: str = "profile_ops.json",
) -> dict[str, Any]:
    """Profile the bundle's network per operator for ``mode`` and each precision; write JSON + markdown.

    Args:
        mode: ``inference`` or ``training``.
        feature_size: SwinUNETR feature size (48 in the bundle).
        roi_size: window / crop size (96 in the bundle).
        precisions: ``auto`` (the bundle's rule), ``float32``, ``bfloat16``, ``float16``, or a list.
        device: "cpu", "cuda"...; default cuda if available else cpu.
        warmup: untimed calls before the timed ones.
        calls: timed calls (their mean is ``seconds_per_call``); one more call is profiled.
        top: operators listed per run.
        output_json: where to write; the markdown goes next to it (``.md``).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    dev = resolve_device(device)
    roi = cube(roi_size)
    names = [precisions] if isinstance(precisions, str) else list(precisions)
    resolved = [resolve_precision(str(p), dev) for p in names]
    result = envelope(dev, {"mode": mode, "feature_size": int(feature_size), "roi_size": roi, "device": str(dev)})
    result["runs"] = []
    for precision in resolved:
        say(f"{mode} {precision}: profiling in a fresh process")
        args = {
            "mode": mode,
            "device": str(dev),
            "feature_size": int(feature_size),
            "roi_size": roi,
            "precision": precision,
            "warmup": int(warmup),
            "calls": int(calls),
            "top": int(top),
        }
        child = run_one(MEASURE, args, f"{mode}_{precision}")
        if "error" in child:
            raise RuntimeError(f"profile {mode} {precision}: {child['error']}")
        result["runs"].append(child)
    out = Path(output_json)
    write_result(result, out)
    out.with_suffix(".md").write_text(markdown(result))
    say(f"wrote {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(run_profile, report=markdown)
