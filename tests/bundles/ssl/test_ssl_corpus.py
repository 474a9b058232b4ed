"""Pre-training corpus checks: every bad volume is reported with its file, before any training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import SSL_DIR, SSL_SMALL, btcv_workflow, bundle_on_path, error_text

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _nifti(path: Path, array: np.ndarray, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return str(path)


def _ct(shape=(48, 80, 80), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000.0)
    volume[8:-8, 10:-10, 10:-10] = rng.normal(40, 20, size=(shape[0] - 16, shape[1] - 20, shape[2] - 20))
    return volume


@pytest.fixture()
def corpus(tmp_path) -> dict:
    """One good CT volume and one of each kind of bad input."""
    files = {
        "good": _nifti(tmp_path / "good.nii.gz", _ct()),
        "mr": _nifti(tmp_path / "mr.nii.gz", np.abs(_ct()) * 2.0),  # no air at -1000: not CT in HU
        "small": _nifti(tmp_path / "small.nii.gz", _ct(shape=(20, 40, 40))),
        "broken": str(tmp_path / "broken.nii.gz"),
        "missing": str(tmp_path / "missing.nii.gz"),
    }
    Path(files["broken"]).write_bytes(b"this is not a NIfTI file")
    return files


@pytest.fixture(scope="module")
def corpus_checks():
    with bundle_on_path(SSL_DIR):
        import scripts.corpus

        yield scripts.corpus


def test_every_bad_volume_is_reported_with_its_file_and_reason(corpus, corpus_checks):
    items = [{"image": path} for path in corpus.values()]
    with pytest.raises(corpus_checks.CorpusError) as err:
        corpus_checks.check_corpus(items, roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0), on_bad="error")
    text = str(err.value)
    assert "4 of 5 volume(s)" in text
    lines = {
        name: next(line for line in text.splitlines() if path in line)
        for name, path in corpus.items()
        if name != "good"
    }
    assert "does not look like CT in Hounsfield units" in lines["mr"]
    assert "smaller than the ROI (32, 64, 64)" in lines["small"] and "(20, 40, 40)" in lines["small"]
    assert "cannot be read" in lines["broken"]
    assert "does not exist" in lines["missing"]
    assert corpus["good"] not in text


def test_skip_mode_warns_for_each_bad_volume_and_keeps_the_good_ones(corpus, corpus_checks, caplog):
    items = [{"image": path} for path in corpus.values()]
    logger = logging.getLogger("swin_unetr_ssl_pretrain")
    logger.addHandler(caplog.handler)  # a bundle's logging.conf may have replaced the root handlers
    try:
        caplog.set_level(logging.WARNING, logger="swin_unetr_ssl_pretrain")
        kept = corpus_checks.check_corpus(items, roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0), on_bad="skip")
    finally:
        logger.removeHandler(caplog.handler)
    assert kept == [{"image": corpus["good"]}]
    warnings = sorted({r.getMessage() for r in caplog.records if r.levelno == logging.WARNING})
    for name in ("mr", "small", "broken", "missing"):
        assert sum(corpus[name] in w for w in warnings) == 1, name
    assert any("skipped 4 of 5" in w for w in warnings)


def test_skip_mode_with_nothing_usable_is_still_an_error(corpus, corpus_checks):
    with pytest.raises(corpus_checks.CorpusError, match="1 of 1"):
        corpus_checks.check_corpus([{"image": corpus["mr"]}], roi_size=(32, 64, 64), on_bad="skip")
    with pytest.raises(ValueError, match="on_bad must be one of"):
        corpus_checks.check_corpus([{"image": corpus["good"]}], roi_size=(32, 64, 64), on_bad="ignore")


def test_the_bundle_refuses_a_bad_corpus_before_training(corpus, tmp_path):
    datalist = {
        "training": [{"image": corpus["good"]}, {"image": corpus["mr"]}],
        "validation": [{"image": corpus["good"]}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"], "train", SSL_DIR, dataset_dir=str(tmp_path), bundle_root=str(tmp_path / "run"), **SSL_SMALL
        )
        workflow.initialize()
        with pytest.raises(Exception) as err:
            workflow.run()
    assert corpus["mr"] in error_text(err.value) and "not look like CT" in error_text(err.value)
    assert not (tmp_path / "run" / "models").exists()  # nothing trained, nothing written


def test_a_dicom_series_folder_is_a_usable_volume_through_the_bundle_preprocessing(tmp_path, corpus_checks):
    from tools.data.make_dicom_series import write_dicom_series

    volume = _ct(shape=(40, 80, 80)).astype(np.int16)
    series = tmp_path / "series"
    write_dicom_series(volume, AFFINE, series)
    items = corpus_checks.check_corpus([{"image": str(series)}], roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0))
    assert items == [{"image": str(series)}]
    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"], "train", SSL_DIR, dataset_dir=str(tmp_path), bundle_root=str(tmp_path / "run"), **SSL_SMALL
        )
        workflow.initialize()
        preprocessing = workflow.parser.get_parsed_content("train#preprocessing")
    crops = preprocessing({"image": str(series)})
    assert len(crops) == SSL_SMALL["num_samples"]
    image = crops[0]["image"]
    assert tuple(image.shape) == (1, *SSL_SMALL["roi_size"])
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.3


def test_skip_mode_with_nothing_usable_does_not_advise_setting_skip(corpus, corpus_checks):
    with pytest.raises(corpus_checks.CorpusError) as err:
        corpus_checks.check_corpus([{"image": corpus["mr"]}], roi_size=(32, 64, 64), on_bad="skip")
    text = str(err.value)
    assert "set on_bad_volume 'skip'" not in text
    assert "on_bad_volume is already 'skip'" in text and "no usable volume" in text


def test_the_bundle_reports_training_and_validation_problems_in_one_error(corpus, tmp_path):
    datalist = {
        "training": [{"image": corpus["good"]}, {"image": corpus["mr"]}],
        "validation": [{"image": corpus["good"]}, {"image": corpus["small"]}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    for on_bad, advice in (
        ("error", "set on_bad_volume 'skip' to pre-train on the rest (1 training and 1 validation"),
        ("skip", None),
    ):
        with bundle_on_path(SSL_DIR):
            workflow = btcv_workflow(
                ["train.json"],
                "train",
                SSL_DIR,
                dataset_dir=str(tmp_path),
                bundle_root=str(tmp_path / "run"),
                on_bad_volume=on_bad,
                **SSL_SMALL,
            )
            if advice is None:  # skip mode: both lists keep a usable volume, so training may start
                checked = workflow.parser.get_parsed_content("checked_corpus")
                assert checked == {"training": [{"image": corpus["good"]}], "validation": [{"image": corpus["good"]}]}
                continue
            with pytest.raises(Exception) as err:
                workflow.parser.get_parsed_content("checked_corpus")
        text = error_text(err.value)
        assert corpus["mr"] in text and corpus["small"] in text  # both lists, one error
        assert "1 of 2 volume(s) of the training list" in text and "1 of 2 volume(s) of the validation list" in text
        assert advice in text


def test_skip_mode_names_each_list_left_with_nothing(corpus, corpus_checks):
    lists = {
        "training": [{"image": corpus["good"]}, {"image": corpus["broken"]}],
        "validation": [{"image": corpus["missing"]}],
    }
    with pytest.raises(corpus_checks.CorpusError) as err:
        corpus_checks.check_corpora(lists, roi_size=(32, 64, 64), on_bad="skip")
    text = str(err.value)
    assert corpus["broken"] in text and corpus["missing"] in text
    assert "the validation datalist would be left with no usable volume" in text
    assert "training datalist would" not in text


def test_error_mode_advises_skip_only_when_skipping_leaves_something_to_train_on(corpus, corpus_checks):
    lists = {
        "training": [{"image": corpus["good"]}, {"image": corpus["mr"]}],
        "validation": [{"image": corpus["small"]}],  # skip would leave validation empty
    }
    texts = {}
    for on_bad in ("error", "skip"):
        with pytest.raises(corpus_checks.CorpusError) as err:
            corpus_checks.check_corpora(lists, roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0), on_bad=on_bad)
        texts[on_bad] = str(err.value)
    assert "set on_bad_volume 'skip'" not in texts["error"]
    assert (
        "on_bad_volume 'skip' would not help: the validation datalist would be left with no usable volume"
        in (texts["error"])
    )
    assert "the validation datalist would be left with no usable volume" in texts["skip"]  # the advice held

    lists["validation"].append({"image": corpus["good"]})
    with pytest.raises(corpus_checks.CorpusError, match=r"pre-train on the rest \(1 training and 1 validation"):
        corpus_checks.check_corpora(lists, roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0), on_bad="error")
    kept = corpus_checks.check_corpora(lists, roi_size=(32, 64, 64), spacing=(1.5, 1.5, 2.0), on_bad="skip")
    assert {name: len(items) for name, items in kept.items()} == {"training": 1, "validation": 1}
