"""The BTCV and MSD bundles in the real MONAI Label 0.8.5 server (its ``monaibundle`` sample app), from its own venv.

The tests do what the "MONAI Label" guide (docs/monai_label.md, linked from the model cards) tells a user
to do: download the sample app, put a copy of the bundle under ``<app>/model/`` (for MSD, the single-task copy that
``tools/release/msd_label_bundle.py`` writes), start the server offline on 127.0.0.1, and use its REST
API: ``/info/`` (labels from ``channel_def``), ``/infer`` (a label map on the input's grid), ``/train``
for one epoch, then ``/infer`` again, which must use the weights that training wrote to ``models/model.pt``.
Small knobs (``SMALL``) are written into the copy's configs, as a user would edit them.
``test_the_model_cards_monailabel_commands_run_as_written`` takes the BTCV "MONAI Label" block
from that guide itself and runs it by bash, with only its folders, weights file and port replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
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

from tests.helpers import PHANTOM_SHAPE, PHANTOM_SPACING, SMALL, card_block, run_workflow
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
    from tools.data.make_phantoms import write_phantom_dataset

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
        self._log_file = open(log, "wb")
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
    """``python -m tools msd_label_bundle`` (project venv), as the MSD card tells a user to run it."""
    cmd = [sys.executable, "-m", "tools", "msd_label_bundle", "--task", MSD_TASK, "--dataset_dir", str(task_dir)]
    done = subprocess.run([*cmd, "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture()
def msd_label_app(tmp_path, monailabel_python) -> dict:
    """The sample app with the tool's Task09 copy of the MSD bundle (small knobs, initial model.pt) and a datastore."""
    from tools.data.make_msd_tasks import write_msd_task

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
    """The MSD bundle's Task09 copy from tools/release/msd_label_bundle.py: /info/ labels from its channel_def,
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


BTCV_CARD = REPO_ROOT / "docs" / "monai_label.md"  # moved from the BTCV model card; the card links it
CARD_PORT = "8000"


def _zoo_stand_in(path: Path) -> Path:
    """A raw SwinUNETR state dict (feature size 12) as the model zoo publishes its file: no order records."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), path)
    return path


def _card_studies(studies: Path) -> Path:
    """The card's datastore with one labelled image (``case0``) and the unlabelled ``case3`` it infers."""
    from tools.data.make_phantoms import write_phantom_dataset

    (image0, label0), (image3, _) = write_phantom_dataset(
        studies.parent / "raw", num_cases=2, seed=11, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING
    )
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(image0, studies / "case0.nii.gz")
    shutil.copy(label0, studies / "labels" / "final" / "case0.nii.gz")
    shutil.copy(image3, studies / "case3.nii.gz")
    return studies


def _server_in_background(script: str, log: Path) -> str:
    """The card's ``start_server`` command (with its continuation lines) run in the background until the script
    ends, followed by a wait until ``/info/`` answers: the card starts it in one shell and curls from another."""
    lines = script.splitlines()
    (first,) = [k for k, line in enumerate(lines) if "monailabel.main start_server" in line]
    last = first
    while lines[last].rstrip().endswith("\\"):
        last += 1
    command = lines[first : last + 1]
    port = re.search(r"--port (\d+)", "\n".join(command)).group(1)
    command[-1] += f" > {shlex.quote(str(log))} 2>&1 &"
    wait = [
        "SERVER=$!",
        "trap 'rc=$?; kill $SERVER 2>/dev/null; wait $SERVER || true; exit $rc' EXIT",
        f"for _ in $(seq {STARTUP_S // 2}); do",
        f"    curl -s -o /dev/null http://127.0.0.1:{port}/info/ && break",
        "    kill -0 $SERVER 2>/dev/null || { echo 'server exited during start-up' >&2; exit 3; }",
        "    sleep 2",
        "done",
    ]
    return "\n".join(lines[:first] + command + wait + lines[last + 1 :])


def test_the_model_cards_monailabel_commands_run_as_written(tmp_path, monailabel_python):
    """The BTCV "MONAI Label" block (docs/monai_label.md) on a fresh app download: a published checkpoint converted
    into the copy, /info/, /infer of the unlabelled case3 (a label map on its grid), and /train with a single labelled
    image, which trains and saves its last weights as model.pt, unvalidated, saying so in the server log."""
    block = card_block(BTCV_CARD, "MONAI Label")
    source = tmp_path / "bundles" / BUNDLE  # the bundle with the test's small knobs, as a user would edit them
    shutil.copytree(
        BTCV_DIR, source, ignore=shutil.ignore_patterns("models", "eval", "predictions", "runs", "__pycache__")
    )
    _write_knobs(source / "configs" / "train.json", TRAIN_KNOBS)
    _write_knobs(source / "configs" / "inference.json", INFER_KNOBS)
    stand_in = _zoo_stand_in(tmp_path / "zoo_model_fs12.pt")
    studies = _card_studies(tmp_path / "studies")
    apps, answer, port = tmp_path / "apps", tmp_path / "case3_seg.nii.gz", str(_free_port())

    script = block
    for old, new in [
        ("APPS=~/monailabel/apps", f"APPS={shlex.quote(str(apps))}"),
        ("STUDIES=~/monailabel/studies", f"STUDIES={shlex.quote(str(studies))}"),
        (f"cp -r bundles/{BUNDLE} ", f"cp -r {shlex.quote(str(source))} "),
        ("/weights/model_swin_unetr_btcv_segmentation_v1.pt", shlex.quote(str(stand_in))),
        ("-o case3_seg.nii.gz", f"-o {shlex.quote(str(answer))}"),
        (f"127.0.0.1:{CARD_PORT}", f"127.0.0.1:{port}"),
        (f"--port {CARD_PORT}", f"--port {port}"),
    ]:
        assert old in script, f"the card's MONAI Label commands changed: no '{old}' in\n{block}"
        script = script.replace(old, new)
    for placeholder in ("~/", "/weights/", CARD_PORT):
        assert placeholder not in script, f"the card's commands changed: {placeholder} left in the test's script"
    log = tmp_path / "server.log"
    prelude = f'set -euo pipefail\npython() {{ {shlex.quote(sys.executable)} "$@"; }}\n'
    result = subprocess.run(
        ["bash", "-c", prelude + _server_in_background(script, log)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    server_log = log.read_text(errors="replace") if log.exists() else "(no server log)"
    report = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n--- server log ---\n{server_log[-12000:]}"
    assert result.returncode == 0, report

    # the bundle folder was used as it is, nothing downloaded
    assert f"Adding Bundle from Local: {BUNDLE}" in server_log, report
    bundle = apps / "monaibundle" / "model" / BUNDLE
    assert (bundle / "configs" / "inference.json").is_file(), sorted(p.name for p in bundle.parent.iterdir())

    # stdout's last line: /info/'s JSON, then /train's answer (curl adds no newline)
    answers = result.stdout.splitlines()[-1]
    info, end = json.JSONDecoder().raw_decode(answers)
    assert len(info["models"][BUNDLE]["labels"]) == 13, info["models"][BUNDLE]
    assert json.loads(answers[end:]) == {}, report

    image, label_map = nib.load(studies / "case3.nii.gz"), nib.load(answer)
    assert label_map.shape == image.shape, (label_map.shape, image.shape)
    np.testing.assert_allclose(label_map.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label_map.dataobj)).astype(int)) <= set(range(14))

    # one labelled image: trained, last weights saved unvalidated, and said so
    assert "no validation data (1 training image(s), none for validation)" in server_log, report
    assert "holds this run's last weights, unvalidated" in server_log, report
    trained = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert "swinViT.patch_embed.proj.weight" in trained, sorted(trained)[:5]  # a plain state dict, as model.pt is
    first = torch.load(stand_in, weights_only=True)
    changed = [k for k, v in first.items() if not torch.equal(v, trained[k])]
    assert changed, "training left the converted weights unchanged"
