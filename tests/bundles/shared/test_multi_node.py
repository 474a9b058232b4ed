"""Multi-node DDP: two ``torchrun`` launchers (two "nodes" on this machine) join one c10d rendezvous and train.

Each launcher starts one process (``--nnodes 2 --nproc_per_node 1``, gloo on the CPU), as one launcher
per node does on a cluster. A third config file, written by the test, adds two steps: each rank
saves its weights before (``+setup``) and after (``+training``) training. The ranks see different
data (DistributedSampler; for pre-training also differently seeded proxy tasks), so equal weights
on both ranks after the step, different from the initial ones, mean the gradients were averaged
across the two launchers; rank 0 alone writes the bundle's checkpoints, which hold those weights.

The BTCV run is then resumed on two launchers with ``resume_from latest`` (the model card's command),
with a stale checkpoint of an abandoned run put beside its own: each rank saves what it resumed from,
its trainer iteration and its weights after training (a layered config, as above).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import BTCV_DIR, REPO, SMALL, SSL_DIR, SSL_SMALL
from tools.common.bundles import bundle_command

TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_weights_config(path: Path) -> str:
    """A config layered last: every rank saves its network's weights before and after training."""
    save = "$torch.save(@network.module.state_dict(), @bundle_root + '/{when}_rank' + str(dist.get_rank()) + '.pt')"
    path.write_text(
        json.dumps({"+setup": [save.format(when="initial")], "+training": [save.format(when="trained")]}, indent=4)
        + "\n"
    )
    return str(path)


def _rank_state_config(path: Path) -> str:
    """A config layered last: after training, each rank saves its resume path, trainer iteration and weights."""
    save = (
        "$torch.save({'resume_path': @resume_path, 'iteration': @train#trainer.state.iteration, "
        "'model': @network.module.state_dict()}, @bundle_root + '/resumed_rank' + str(dist.get_rank()) + '.pt')"
    )
    path.write_text(json.dumps({"+training": [save]}, indent=4) + "\n")
    return str(path)


def _two_nodes(bundle_dir: Path, overrides: dict, tmp_path: Path, rank_config=_rank_weights_config) -> list[str]:
    """Start two torchrun launchers of ``training`` on one c10d endpoint; wait; return their outputs."""
    configs = [str(bundle_dir / "configs" / c) for c in ("train.json", "multi_gpu_train.json")]
    configs.append(rank_config(tmp_path / "rank_config.json"))
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv_id",
        f"multi_node_{bundle_dir.name}",
        "--max_restarts",
        "0",
    ]
    command = launcher + bundle_command("training", configs, overrides)[1:]
    command += ["--meta_file", str(bundle_dir / "configs" / "metadata.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(bundle_dir)])}
    nodes = [
        subprocess.Popen(command, cwd=bundle_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT_S)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    return outputs


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a, b) -> bool:
    """Equal tensors, or equal extra state (the patch-merging record is a dict)."""
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _assert_synchronised(root: Path, checkpoint: Path) -> None:
    """Both ranks trained to the same weights, not the initial ones; rank 0's checkpoint holds them."""
    initial = [_load(root / f"initial_rank{r}.pt") for r in (0, 1)]
    trained = [_load(root / f"trained_rank{r}.pt") for r in (0, 1)]
    assert initial[0].keys() == trained[0].keys() == trained[1].keys()
    assert all(_same(initial[0][k], initial[1][k]) for k in initial[0])  # DDP broadcast rank 0's weights
    assert all(_same(trained[0][k], trained[1][k]) for k in trained[0])  # averaged gradients
    assert any(not _same(initial[0][k], trained[0][k]) for k in trained[0])  # and they did train
    saved = _load(checkpoint)["model"]
    assert saved.keys() == trained[0].keys()
    assert all(_same(saved[k], trained[0][k]) for k in saved)


def test_two_nodes_pretrain_together(ssl_corpus, tmp_path):
    # each rank validates at least one volume: MONAI's DistributedSampler refuses fewer volumes than ranks
    datalist = json.loads((ssl_corpus / "datalist.json").read_text())
    datalist["validation"] = datalist["validation"] + datalist["training"][:1]
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    overrides = {
        **SSL_SMALL,
        "batch_size": 1,
        "num_steps": 1,
        "val_interval": 1,
        "dataset_dir": str(ssl_corpus),
        "datalist": str(tmp_path / "datalist.json"),
        "bundle_root": str(tmp_path),
    }
    outputs = _two_nodes(SSL_DIR, overrides, tmp_path)
    assert all("2 processes" in output for output in outputs)  # the effective-rate line of each rank
    _assert_synchronised(tmp_path, tmp_path / "models" / "checkpoint_last.pt")
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.fixture(scope="module")
def btcv_two_nodes(phantom_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """One epoch of BTCV fine-tuning on two launchers (one iteration per rank); its bundle_root and outputs."""
    root = tmp_path_factory.mktemp("btcv_two_nodes")
    overrides = {
        **SMALL,
        "max_epochs": 1,
        "val_interval": 1,
        "dataset_dir": str(phantom_dir),
        "datalist": str(phantom_dir / "datalist.json"),
        "bundle_root": str(root),
    }
    return root, _two_nodes(BTCV_DIR, overrides, root)


def test_two_nodes_fine_tune_together(btcv_two_nodes):
    root, outputs = btcv_two_nodes
    assert all("2 processes" in output for output in outputs)
    _assert_synchronised(root, root / "models" / "checkpoint_last.pt")
    assert (root / "models" / "model.pt").is_file()


def test_resume_latest_under_ddp_continues_on_both_ranks_from_the_same_checkpoint(
    btcv_two_nodes, phantom_dir, tmp_path
):
    """Both ranks resume from the run's last checkpoint, not from a stale one of an abandoned run beside it.

    The stale file has more iterations (50 epochs) but was saved by another run, earlier: a rank that took
    it would stop on its epoch count, more than ``max_epochs``.
    """
    shutil.copytree(btcv_two_nodes[0] / "models", tmp_path / "models")
    last = tmp_path / "models" / "checkpoint_last.pt"
    first = _load(last)
    assert first["trainer"]["iteration"] == 1
    stale = dict(first, trainer={**first["trainer"], "iteration": 50, "epoch": 50})
    saved = first["run_record"]["saved"] - 3600
    stale["run_record"] = {"id": "abandoned0000", "started": saved - 3600, "saved": saved}
    torch.save(stale, tmp_path / "models" / "checkpoint_epoch=50.pt")
    overrides = {
        **SMALL,
        "max_epochs": 2,
        "val_interval": 100,  # the final validation only
        "resume_from": "latest",
        "dataset_dir": str(phantom_dir),
        "datalist": str(phantom_dir / "datalist.json"),
        "bundle_root": str(tmp_path),
    }
    outputs = _two_nodes(BTCV_DIR, overrides, tmp_path, _rank_state_config)
    ranks = [_load(tmp_path / f"resumed_rank{r}.pt") for r in (0, 1)]
    assert [r["resume_path"] for r in ranks] == [str(last), str(last)]  # the same file on both ranks
    assert [r["iteration"] for r in ranks] == [2, 2]  # resumed at iteration 1, trained the one left
    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])
    for output in outputs:  # each rank says which file it picked, of which run, and what it left aside
        assert f"resume latest: {last} (iteration 1, run {first['run_record']['id']}" in output
        assert "checkpoint_epoch=50.pt (iteration 50, run abandoned0000" in output
    resumed = _load(last)
    assert resumed["trainer"]["iteration"] == 2
    assert resumed["run_record"]["id"] == first["run_record"]["id"]  # the same run, continued
