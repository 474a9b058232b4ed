"""The BTCV and MSD bundles in the real MONAI Label 0.8.5 server (its ``monaibundle`` sample app), from its own venv.

The tests do what the model cards' "MONAI Label" sections tell a user to do: download the sample app,
put a copy of the bundle under ``<app>/model/`` (for MSD, the single-task copy that
``tools/msd_label_bundle.py`` writes), start the server offline on 127.0.0.1, and use its REST
API: ``/info/`` (labels from ``channel_def``), ``/infer`` (a label map on the input's grid), ``/train``
for one epoch, then ``/infer`` again, which must use the weights that training wrote to ``models/model.pt``.
Small knobs (``SMALL``) are written into the copy's configs, as a user would edit them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import PHANTOM_SHAPE, PHANTOM_SPACING, SMALL, run_workflow
from tools.common.bundles import BTCV_DIR, REPO_ROOT, bundle_parser, forget_scripts_modules

pytestmark = pytest.mark.clients

BUNDLE = "swin_unetr_btcv_seg"
# A large first step (no warm-up, lr 1e-2) so that one epoch changes the prediction visibly.
TRAIN_KNOBS = {**SMALL, "learning_rate": 0.01, "warmup_epochs": 0}
INFER_KNOBS = {k: SMALL[k] for k in ("feature_size", "roi_size", "num_workers", "sw_batch_size")}
STARTUP_S = 240
REQUEST_S = 600


def _write_knobs(config: Path, knobs: dict) -> None:
    """Set top-level knobs in a copied config file (4-space JSON, as the bundle writes it)."""
    content = json.loads(config.read_text())
    missing = sorted(set(knobs) - set(content))
    assert not missing, f"{config} has no top-level {missing}"
    content.update(knobs)
    config.write_text(json.dumps(content, indent=4) + "\n")


def _initial_model(bundle: Path, **overrides) -> None:
    """A fresh network's weights saved as the bundle saves model.pt: the state dict, its order recorded inside.

    MONAI Label reads it as it reads the zoo's model.pt: ``checkpoint.get("model", checkpoint)`` for inference,
    a ``CheckpointLoader`` with ``load_dict={"model": network}`` (a plain state dict is loaded as it is) when
    training starts from it."""
    torch.manual_seed(0)
    parser = bundle_parser(bundle, "train.json", overrides)
    try:
        network = parser.get_parsed_content("network_def")
    finally:
        forget_scripts_modules()
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")


def _datastore(studies: Path) -> list[str]:
    """Three phantom CTs in MONAI Label's layout (labels of the first two... all three in labels/final/)."""
    from tools.make_phantoms import write_phantom_dataset

    raw = studies.parent / "raw"
    pairs = write_phantom_dataset(raw, num_cases=4, seed=11, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    (studies / "labels" / "final").mkdir(parents=True)
    ids = []
    for k, (image, label) in enumerate(pairs):
        case = f"case{k}"
        shutil.copy(image, studies / f"{case}.nii.gz")
        if k < 3:  # three labelled cases: MONAI Label's val_split 0.2 gives 2 for training, 1 for validation
            shutil.copy(label, studies / "labels" / "final" / f"{case}.nii.gz")
        ids.append(case)
    return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``monailabel start_server``; every failure message carries its log."""

    def __init__(self, python: Path, app: Path, studies: Path, log: Path, model: str = BUNDLE):
        self.model = model
        self.port = _free_port()
        self.log = log
        cmd = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
        cmd += ["--conf", "models", model, "--conf", "zoo_source", "github", "--conf", "sam2", "false"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.command = cmd
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(cmd, cwd=app.parent, stdout=self._log_file, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-20000:]

    def fail(self, what: str) -> None:
        pytest.fail(f"{what}\n--- server log ({self.log}) ---\n{self.log_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_S) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            self.fail(f"{method} {path} -> HTTP {err.code}: {err.read()[:4000]!r}")
        except OSError as err:
            self.fail(f"{method} {path} -> {err!r}")
        raise AssertionError("unreachable")

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.fail(f"server exited with {self.process.returncode} during start-up")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/info/", timeout=10) as response:
                    return json.loads(response.read())
            except (OSError, urllib.error.URLError):
                time.sleep(2)
        self.fail(f"server not ready after {STARTUP_S} s")
        raise AssertionError("unreachable")

    def infer(self, image_id: str, out: Path) -> Path:
        boundary = "----swin-unetr-test"
        body = f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n--{boundary}--\r\n'
        data = self.request(
            "POST",
            f"/infer/{self.model}?image={image_id}&output=image",
            body.encode(),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        out.write_bytes(data)
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def _sample_app(python: Path, tmp_path: Path, source: Path | None, name: str) -> tuple[Path, Path]:
    """``monaibundle`` downloaded from the MONAI Label wheel, with a copy of bundle ``source`` (if any) as ``name``."""
    done = subprocess.run(
        [str(python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle"]
        + ["--output", str(tmp_path / "apps")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    app = tmp_path / "apps" / "monaibundle"
    bundle = app / "model" / name
    if source is not None:
        shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions", "__pycache__"))
    return app, bundle


@pytest.fixture()
def monailabel_app(tmp_path, monailabel_python) -> dict:
    """The sample app with a small copy of the BTCV bundle and its initial model.pt, and a datastore."""
    app, bundle = _sample_app(monailabel_python, tmp_path, BTCV_DIR, BUNDLE)
    _write_knobs(bundle / "configs" / "train.json", TRAIN_KNOBS)
    _write_knobs(bundle / "configs" / "inference.json", INFER_KNOBS)
    _initial_model(bundle)
    studies = tmp_path / "studies"
    ids = _datastore(studies)
    return {"python": monailabel_python, "app": app, "bundle": bundle, "studies": studies, "ids": ids}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bundle_prediction(bundle: Path, weights: Path, out: Path, **overrides) -> np.ndarray:
    """The bundle's own inference (project venv) with ``weights`` of its one input image: the label map as saved."""
    run_workflow(
        ["inference.json"],
        "infer",
        bundle_dir=bundle,
        bundle_root=str(bundle),
        ckpt_path=str(weights),
        output_dir=str(out / "output"),
        **overrides,
    )
    (saved,) = (out / "output").glob("*.nii.gz")
    return np.asarray(nib.load(saved).dataobj)


def _local_prediction(bundle: Path, image: Path, weights: Path, out: Path) -> np.ndarray:
    """The bundle's own inference (project venv) of ``image`` with ``weights``: the label map as saved."""
    inputs = out / "input"
    inputs.mkdir(parents=True)
    shutil.copy(image, inputs / image.name)
    return _bundle_prediction(bundle, weights, out, dataset_dir=str(inputs))


def _checked_answer(server, source, image_id: str, path: Path, labels: set) -> np.ndarray:
    """``/infer`` of ``image_id``: a label map with the input's shape and affine and only ``labels`` in it."""
    answer = nib.load(server.infer(image_id, path))
    assert answer.shape == source.shape, (path.name, answer.shape, source.shape)
    np.testing.assert_allclose(answer.affine, source.affine, atol=1e-4)
    answer_labels = np.asarray(answer.dataobj)
    assert set(np.unique(answer_labels).astype(int)) <= labels, path.name
    return answer_labels


def _infer_train_infer(server, studies: Path, image_id: str, model: str, model_pt: Path, labels: set, out: Path):
    """``/infer``, ``/train`` for one epoch (which must change ``model_pt``), ``/infer`` again: both label maps."""
    source = nib.load(studies / f"{image_id}.nii.gz")
    before = _checked_answer(server, source, image_id, out / "infer_before.nii.gz", labels)
    sha_before = _sha(model_pt)
    train = json.dumps({"max_epochs": 1, "device": "cpu"}).encode()
    server.request("POST", f"/train/{model}?run_sync=true", train, {"Content-Type": "application/json"})
    if not model_pt.is_file() or _sha(model_pt) == sha_before:
        server.fail("training left models/model.pt unchanged")
    after = _checked_answer(server, source, image_id, out / "infer_after.nii.gz", labels)
    return before, after


def _assert_second_answer_from_trained_weights(before, after, old, new) -> None:
    """The server's answers equal the bundle's own predictions with the first and the trained weights."""
    agree = {
        "server before ~ local old": float(np.mean(before == old)),
        "server after ~ local new": float(np.mean(after == new)),
        "local old ~ local new": float(np.mean(old == new)),
    }
    print(f"voxel agreement: {agree}")
    assert agree["server before ~ local old"] > 0.99, agree
    assert agree["server after ~ local new"] > 0.99, agree
    # the trained weights predict differently, so the server's second answer came from them
    assert agree["local old ~ local new"] < 0.98, agree


def test_monailabel_server_infers_trains_and_infers_with_the_trained_model(monailabel_app, tmp_path):
    app, bundle, ids = monailabel_app["app"], monailabel_app["bundle"], monailabel_app["ids"]
    model_pt = bundle / "models" / "model.pt"
    first_weights = tmp_path / "model_before.pt"
    shutil.copy(model_pt, first_weights)
    server = Server(monailabel_app["python"], app, monailabel_app["studies"], tmp_path / "server.log")
    try:
        info = server.wait_ready()
        channel_def = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]
        channel_def = channel_def["outputs"]["pred"]["channel_def"]
        organs = {name.lower(): int(k) for k, name in channel_def.items() if name.lower() != "background"}
        assert len(organs) == 13
        if BUNDLE not in info.get("models", {}):
            server.fail(f"/info/ lists no model {BUNDLE}: {json.dumps(info)[:2000]}")
        assert info["models"][BUNDLE]["labels"] == organs, info["models"][BUNDLE]
        assert BUNDLE in info.get("trainers", {}), info.get("trainers")

        image_id = ids[3]
        before_labels, after_labels = _infer_train_infer(
            server, monailabel_app["studies"], image_id, BUNDLE, model_pt, set(range(14)), tmp_path
        )
    finally:
        server.stop()

    image = monailabel_app["studies"] / f"{image_id}.nii.gz"
    old = _local_prediction(bundle, image, first_weights, tmp_path / "local_before")
    new = _local_prediction(bundle, image, model_pt, tmp_path / "local_after")
    _assert_second_answer_from_trained_weights(before_labels, after_labels, old, new)


MSD_BUNDLE = "swin_unetr_msd_spleen"
MSD_TASK = "Task09_Spleen"


def _msd_datastore(task_dir: Path, studies: Path) -> list[str]:
    """The task's 3 training cases, labelled, and its test case (``spleen3``, unlabelled) in MONAI Label's layout."""
    (studies / "labels" / "final").mkdir(parents=True)
    ids = []
    training = sorted((task_dir / "imagesTr").glob("*.nii.gz"))
    for k, image in enumerate(training):
        shutil.copy(image, studies / f"spleen{k}.nii.gz")
        shutil.copy(task_dir / "labelsTr" / image.name, studies / "labels" / "final" / f"spleen{k}.nii.gz")
        ids.append(f"spleen{k}")
    (test,) = sorted((task_dir / "imagesTs").glob("*.nii.gz"))
    shutil.copy(test, studies / f"spleen{len(training)}.nii.gz")
    return [*ids, f"spleen{len(training)}"]


def _msd_label_bundle(task_dir: Path, output: Path) -> None:
    """``python -m tools.msd_label_bundle`` (project venv), as the MSD card tells a user to run it."""
    cmd = [sys.executable, "-m", "tools.msd_label_bundle", "--task", MSD_TASK, "--dataset_dir", str(task_dir)]
    done = subprocess.run([*cmd, "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture()
def msd_label_app(tmp_path, monailabel_python) -> dict:
    """The sample app with the tool's Task09 copy of the MSD bundle (small knobs, initial model.pt) and a datastore."""
    from tools.make_msd_tasks import write_msd_task

    task_dir = write_msd_task(tmp_path / "msd", MSD_TASK, num_training=3, num_test=1, seed=3, shape=(64, 64, 40))
    app, _ = _sample_app(monailabel_python, tmp_path, None, MSD_BUNDLE)
    bundle = app / "model" / MSD_BUNDLE
    _msd_label_bundle(task_dir, bundle)
    _write_knobs(bundle / "configs" / "train.json", TRAIN_KNOBS)
    _write_knobs(bundle / "configs" / "inference.json", INFER_KNOBS)
    _initial_model(bundle)
    ids = _msd_datastore(task_dir, tmp_path / "studies")
    return {"python": monailabel_python, "app": app, "bundle": bundle, "studies": tmp_path / "studies", "ids": ids}


def test_monailabel_server_lists_msd_labels_infers_trains_and_infers_with_the_trained_model(msd_label_app, tmp_path):
    """The MSD bundle's Task09 copy from tools/msd_label_bundle.py: /info/ labels from its channel_def,
    /infer, /train for one epoch (model.pt changes), and the next /infer uses the trained weights."""
    app, bundle, ids = msd_label_app["app"], msd_label_app["bundle"], msd_label_app["ids"]
    model_pt = bundle / "models" / "model.pt"
    first_weights = tmp_path / "model_before.pt"
    shutil.copy(model_pt, first_weights)
    server = Server(msd_label_app["python"], app, msd_label_app["studies"], tmp_path / "server.log", model=MSD_BUNDLE)
    image_id = ids[-1]
    try:
        info = server.wait_ready()
        if MSD_BUNDLE not in info.get("models", {}):
            server.fail(f"/info/ lists no model {MSD_BUNDLE}: {json.dumps(info)[:2000]}")
        assert info["models"][MSD_BUNDLE]["labels"] == {"spleen": 1}, info["models"][MSD_BUNDLE]
        assert MSD_BUNDLE in info.get("trainers", {}), info.get("trainers")

        before_labels, after_labels = _infer_train_infer(
            server, msd_label_app["studies"], image_id, MSD_BUNDLE, model_pt, {0, 1}, tmp_path
        )
    finally:
        server.stop()

    # the copy's own inference reads the task's test list (dataset.json), whose one image is the one inferred above
    old = _bundle_prediction(bundle, first_weights, tmp_path / "local_before")
    new = _bundle_prediction(bundle, model_pt, tmp_path / "local_after")
    _assert_second_answer_from_trained_weights(before_labels, after_labels, old, new)
