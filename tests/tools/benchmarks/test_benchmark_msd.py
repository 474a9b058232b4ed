"""benchmark_msd at a tiny size: a CT and a 4-channel MRI task, each in its own process, every field sane.

No assertions on speed.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from tests.helpers import forget_scripts_modules
from tools.benchmarks import benchmark_msd as bm
from tools.common.machine import native_bf16

TASKS = ["Task09_Spleen", "Task01_BrainTumour"]
IN_CHANNELS = {"Task09_Spleen": 1, "Task01_BrainTumour": 4}
SPACING = {"Task09_Spleen": [1.5, 1.5, 2.0], "Task01_BrainTumour": [1.0, 1.0, 1.0]}
FEATURE_SIZE = 12
ROI = [64, 64, 64]  # the smallest crop that trains (32^3 reaches a 1x1x1 bottleneck)
NUM_SAMPLES = 1
ITERATIONS = 2
WARMUP = 1
SHAPE = [48, 48, 40]  # smaller than the ROI: the bundle's SpatialPadd pads it
CASES = 2  # one training case (fold 0 of 2 folds validates on the other): one iteration per epoch


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _numbers(value):
    """Every number (not bool) inside a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny run of both tasks, each in a fresh subprocess; (result, JSON on disk, report)."""
    output = tmp_path_factory.mktemp("bench_msd") / "msd_cpu.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))
        result = bm.run_benchmark(
            tasks=TASKS,
            device="cpu",
            feature_size=FEATURE_SIZE,
            roi_size=ROI,
            num_samples=NUM_SAMPLES,
            iterations=ITERATIONS,
            warmup=WARMUP,
            shape=SHAPE,
            cases=CASES,
            output=str(output),
            timeout_s=300,
        )
        report = bm.format_report(result)
    forget_scripts_modules()
    return result, output, report


def test_json_is_written_and_is_the_result(bench):
    result, output, _ = bench
    assert output.is_file()
    on_disk = json.loads(output.read_text())
    assert set(on_disk) == {"machine", "peak", "settings", "tasks", "load_average"}
    assert on_disk == json.loads(json.dumps({k: v for k, v in result.items() if k != "output"}))
    assert result["output"] == str(output)


def test_machine_settings_and_load_average(bench):
    _, output, _ = bench
    r = json.loads(output.read_text())
    m = r["machine"]
    for key in (
        "cpu_model",
        "cpu_count",
        "cpus_usable",
        "torch_threads",
        "cpu_capability",
        "gpu",
        "torch",
        "monai",
        "python",
        "device",
    ):
        assert key in m, key
    assert m["device"] == "cpu" and m["gpu"] is None
    s = r["settings"]
    assert s["tasks"] == TASKS and s["device"] == "cpu" and s["feature_size"] == FEATURE_SIZE
    assert s["roi_size"] == ROI and s["num_samples"] == NUM_SAMPLES and s["batch_size"] == 1
    assert s["iterations"] == ITERATIONS and s["warmup"] == WARMUP and s["shape"] == SHAPE
    assert s["num_workers"] == 0 and s["cache_rate"] == 1.0 and s["amp"] is False
    assert "fresh Python process" in s["isolation"] and "ru_maxrss" in s["memory_measure"]
    la = r["load_average"]
    for when in ("start", "end"):
        assert len(la[when]) == 3 and all(math.isfinite(x) and x >= 0 for x in la[when])


@pytest.mark.parametrize("task", TASKS)
def test_task(bench, task):
    _, output, _ = bench
    r = json.loads(output.read_text())["tasks"][task]
    assert "error" not in r, r
    assert r["task"] == task and r["device"] == "cpu" and r["pid"] != os.getpid()
    assert r["in_channels"] == IN_CHANNELS[task]
    assert r["roi_size"] == ROI and r["spacing"] == SPACING[task] and r["feature_size"] == FEATURE_SIZE
    assert r["crops_per_iteration"] == NUM_SAMPLES
    assert r["input_shape"] == [NUM_SAMPLES, IN_CHANNELS[task], *ROI]  # what the network was fed
    assert r["iterations"] == ITERATIONS and len(r["iteration_times_s"]) == ITERATIONS
    assert r["warmup_iterations"] == WARMUP and len(r["warmup_times_s"]) == WARMUP
    # the bundle's own knobs where not overridden; no CUDA AMP on a CPU, bf16 autocast only where native
    assert r["use_checkpoint"] is True and r["amp"] is False and r["fast_window_attention"] is True
    assert r["precision"] == ("bfloat16 autocast" if native_bf16() else "float32")
    # every number positive (or zero where a count or size may be zero) and finite
    for key in (
        "seconds_per_iteration",
        "min_seconds_per_iteration",
        "iterations_per_second",
        "crops_per_second",
        "data_seconds_per_iteration",
        "peak_memory_mib",
        "peak_rss_mib",
        "setup_s",
        "run_s",
        "parameters",
    ):
        assert _positive(r[key]), (key, r[key])
    assert all(_positive(t) for t in r["iteration_times_s"] + r["warmup_times_s"])
    assert all(math.isfinite(x) for x in _numbers(r))
    assert math.isclose(r["iterations_per_second"], 1.0 / r["seconds_per_iteration"], rel_tol=1e-6)
    assert math.isclose(r["crops_per_second"], r["iterations_per_second"] * NUM_SAMPLES, rel_tol=1e-6)
    assert r["min_seconds_per_iteration"] <= r["seconds_per_iteration"]
    assert r["final_loss_finite"] is True and len(r["losses"]) == ITERATIONS and r["final_loss"] == r["losses"][-1]
    # memory: the peak RSS of the task's own process, CUDA figures absent
    assert r["peak_memory_mib"] == r["peak_rss_mib"] >= r["peak_rss_before_training_mib"] > 0
    assert r["cuda_max_memory_allocated_mib"] is None
    assert len(r["load_average_start"]) == 3 and len(r["load_average_end"]) == 3
    # the limit: forward + backward of one iteration's input, timed by the mean iteration
    assert r["flops_per_iteration"] > 1e8 and r["limit"]["flops"] == r["flops_per_iteration"]
    assert math.isclose(r["limit"]["seconds"], r["seconds_per_iteration"], rel_tol=1e-9)
    assert 0.0 < r["limit"]["fraction_of_peak"] < 1.0


def test_tasks_ran_in_separate_processes(bench):
    result, _, _ = bench
    pids = {r["pid"] for r in result["tasks"].values()}
    assert len(pids) == len(TASKS)


def test_report_mentions_both_tasks(bench):
    _, _, report = bench
    for text in (*TASKS, "s/it", "it/s", "crops/s", "peak MiB", "Load average", "GFLOP per iteration"):
        assert text in report, text


def test_bad_arguments_are_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        bm.run_benchmark(tasks=["Task99_Nothing"], device="cpu", output=str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="iterations"):
        bm.run_benchmark(tasks=TASKS, device="cpu", iterations=0, output=str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()
