"""tools.benchmarks.gpu_check: the dry run takes every part's code path on the CPU and writes the JSON and markdown.

No assertions on speed: the figures of a dry run are of tiny sizes on a shared CPU. The dry run of
all parts takes about 150 s of CPU time (15 fresh processes); it runs once per module and is part
of the default suite, so that CI takes every code path the GPU run will take.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, forget_scripts_modules
from tools.benchmarks import gpu_check as gc
from tools.common.machine import native_bf16


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _fraction(x):
    return isinstance(x, float) and 0.0 < x < 1.0


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of every part (one torch thread per process: the test machine's cores are shared)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setattr(sys, "path", list(sys.path))
        result = gc.run_check(output_dir=str(out), dry_run=True, budget_s=1200, cap_scale=5)
    forget_scripts_modules()
    return result, out


def test_every_part_ran_and_the_json_is_the_result(dry):
    result, out = dry
    on_disk = json.loads((out / "gpu_check.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert list(on_disk["parts"]) == list(gc.PARTS)
    for name, part in on_disk["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert 0 < part["seconds"] <= part["cap_s"] + 5 and part["cap_s"] == gc.CAPS_S[name] * 5
    assert on_disk["settings"]["dry_run"] is True and on_disk["machine"]["device"] == "cpu"
    assert on_disk["peak"]["kind"] == "cpu" and on_disk["peak"]["peak_flops"]["float32"] > 0
    # each benchmark's own full JSON next to the summary
    for name in ("btcv_training", "btcv_inference", "ssl", "msd"):
        summary = on_disk["parts"][name]["summary"]
        assert (out / summary["json"]).is_file(), name
    chunked = json.loads((out / "ssl_chunked.json").read_text())
    assert list(chunked["modes"]) == ["bundle"] and chunked["modes"]["bundle"]["settings"]["view_chunk_size"] == 2
    assert len(list(out.iterdir())) <= 8  # what a device run brings back from $OUT


def test_part_summaries(dry):
    parts = dry[0]["parts"]
    t = parts["btcv_training"]["summary"]
    # the one precision rule: bf16 on a CPU with native bf16, else float32 (no CUDA AMP on a CPU)
    assert t["precision"] == ("bfloat16" if native_bf16() else "float32")
    assert _positive(t["iterations_per_second"]) and t["crops_per_iteration"] == 1
    assert _positive(t["peak_memory_mib"]) and _fraction(t["fraction_of_peak"])
    assert all(math.isfinite(x) for x in t["losses"])
    i = parts["btcv_inference"]["summary"]
    assert {"bundle", "bundle_float32_ncdhw", "model_zoo"} <= set(i["seconds_per_volume"])
    assert set(i["seconds_per_volume"]) <= {"bundle", "bundle_float32", "bundle_float32_ncdhw", "model_zoo"}
    assert all(_positive(v) for v in i["seconds_per_volume"].values())
    assert all(_fraction(v) for v in i["fraction_of_peak"].values())
    assert i["windows"]["bundle"] == i["windows"]["model_zoo"] >= 1 and _positive(
        i["speed_ratio_model_zoo_over_bundle"]
    )
    s = parts["ssl"]["summary"]
    assert set(s["seconds_per_step"]) == {"bundle", "research", "bundle_view_chunk_2"} and s["views_per_step"] == 4
    assert _positive(s["time_ratio_research_over_bundle"]) and _positive(s["peak_memory_ratio_research_over_bundle"])
    m = parts["msd"]["summary"]
    assert m["task"] == "Task01_BrainTumour" and m["in_channels"] == 4 and _positive(m["iterations_per_second"])
    d = parts["ddp"]["summary"]
    assert "torch.distributed.run" in d["launcher"] and os.path.isfile(d["checkpoint"]) and _positive(d["seconds"])


def test_markdown_table(dry):
    result, out = dry
    text = (out / "gpu_check.md").read_text()
    assert text == gc.markdown(result) and "DRY RUN" in text and "cores x clock x FLOPs/cycle" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| measurement | value | peak memory | fraction of peak FLOP/s |")
    body = rows[1:]
    variants = len(result["parts"]["btcv_inference"]["summary"]["seconds_per_volume"])  # 4 where the bundle autocasts
    assert len(body) == 1 + variants + 3 + 1 + 1  # training, inference variants, 3 SSL runs, MSD, DDP
    assert all(line.count("|") == 6 for line in body)
    for text_in in ("it/s", "s/volume", "s/step", "Task01_BrainTumour", "torchrun", "MiB", " %"):
        assert any(text_in in line for line in body), text_in


def test_a_failing_or_timed_out_part_is_recorded_and_the_next_part_runs(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_ct.nii.gz"
    # the SSL part cannot finish in 2 s; the inference part finds no image
    result = gc.run_check(
        output_dir=str(out), dry_run=True, image=str(missing), parts=["ssl", "btcv_inference"], caps={"ssl": 2}
    )
    ssl, inference = result["parts"]["ssl"], result["parts"]["btcv_inference"]
    assert ssl["status"] == "timeout" and "timed out" in ssl["error"] and ssl["seconds"] < 30
    assert inference["status"] == "failed" and "FileNotFoundError" in inference["error"]
    assert str(missing) in inference["error"]
    text = (out / "gpu_check.md").read_text()
    assert "| ssl | TIMEOUT:" in text and "| btcv_inference | FAILED: FileNotFoundError" in text
    assert json.loads((out / "gpu_check.json").read_text())["parts"]["ssl"]["status"] == "timeout"


def test_unknown_part_and_no_gpu_are_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown part"):
        gc.run_check(output_dir=str(tmp_path), dry_run=True, parts=["btcv_training", "nope"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            gc.run_check(output_dir=str(tmp_path / "full"))
    assert not (tmp_path / "full").exists()


def test_the_shell_wrapper_passes_its_flags_through(tmp_path):
    """``tools/gpu_check.sh`` runs the tool with the flags it is given (an unknown part: refused at once)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry_run", "True", "--parts", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "unknown part(s) ['nope']" in done.stdout + done.stderr
