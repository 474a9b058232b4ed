"""MONAI Deploy application: a DICOM CT series in, a DICOM SEG out, with the segments the bundle's metadata names.

    python apps/btcv_seg_deploy/app.py -i <DICOM folder> -o <output folder> -m <bundle folder | model.ts>

Written for the Swin UNETR BTCV bundle (13 organs); it runs any of this project's CT segmentation bundles whose
``configs/inference.json`` the Deploy operator can run, e.g. the MSD bundle's single-task copy of Task09_Spleen
(``tools/release/msd_label_bundle.py``). ``-m`` is either the bundle folder itself (with ``models/model.pt``; the Deploy
operator puts the folder on ``sys.path`` and runs ``configs/inference.json`` with the bundle's own inferer) or a
TorchScript ``model.ts`` exported with the BTCV bundle's ``inference_deploy.json`` overlay (MONAI's own classes only;
see README.md). The segments are the foreground labels of the bundle's ``channel_def`` (configs/metadata.json, or
extra/metadata.json in the archive), and the algorithm name is the bundle's ``name``.
Runs with the MONAI Deploy App SDK (tests/clients/requirements-deploy.txt); needs nothing from this repository.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.core.domain import Image
from monai.deploy.core.io_type import IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Configs a model.ts archive carries (ckpt_export stores each under extra/ by name): the overlay replaces the
# bundle's preprocessing, inferer and postprocessing with MONAI's own classes.
ARCHIVE_CONFIGS = ["inference", "inference_deploy"]
DIRECTORY_CONFIGS = ["inference"]

# SNOMED CT codes of the organs, by channel_def name (the BTCV organs; MSD's spleen, liver, pancreas). Left/right
# structures have codes of their own. Other names (e.g. MSD's tumours) are typed as "Anatomical structure".
ORGAN_CODES = {
    "spleen": codes.SCT.Spleen,
    "right kidney": Code("9846003", "SCT", "Right kidney"),
    "left kidney": Code("18639004", "SCT", "Left kidney"),
    "gallbladder": codes.SCT.Gallbladder,
    "esophagus": codes.SCT.Esophagus,
    "liver": codes.SCT.Liver,
    "stomach": codes.SCT.Stomach,
    "aorta": codes.SCT.Aorta,
    "inferior vena cava": codes.SCT.InferiorVenaCava,
    "portal and splenic veins": codes.SCT.PortalVein,
    "pancreas": codes.SCT.Pancreas,
    "right adrenal gland": Code("281625007", "SCT", "Right adrenal gland"),
    "left adrenal gland": Code("281624008", "SCT", "Left adrenal gland"),
}

# A series selector that takes the CT image series of a study (DICOM SEG, RTSTRUCT... are left aside).
CT_SERIES_RULES = json.dumps({"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]})


def bundle_metadata(model_path: Path) -> dict:
    """The bundle's metadata: configs/metadata.json of a bundle folder, extra/metadata.json of a model.ts."""
    if model_path.is_dir():
        meta_file = model_path / "configs" / "metadata.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{model_path} is not a bundle folder: {meta_file} not found")
        return json.loads(meta_file.read_text())
    if not zipfile.is_zipfile(model_path):
        raise ValueError(f"{model_path} is neither a bundle folder nor a TorchScript model.ts archive")
    with zipfile.ZipFile(model_path) as archive:
        names = [n for n in archive.namelist() if n.endswith("extra/metadata.json")]
        if not names:
            raise ValueError(f"{model_path} carries no extra/metadata.json: export it with monai.bundle ckpt_export")
        return json.loads(archive.read(names[0]))


def segment_descriptions(metadata: dict) -> list[SegmentDescription]:
    """One segment per foreground channel of the output's channel_def, in label order (segment i = label i)."""
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    labels = sorted(int(k) for k in channel_def if int(k) > 0)
    if labels != list(range(1, len(labels) + 1)):
        raise ValueError(f"channel_def labels must be 1..N after the background, got {labels}")
    version = str(metadata.get("version", ""))
    algorithm = str(metadata.get("name", "Swin UNETR"))
    descriptions = []
    for label in labels:
        name = channel_def[str(label)]
        organ = ORGAN_CODES.get(name.lower())
        descriptions.append(
            SegmentDescription(
                segment_label=name,
                segmented_property_category=codes.SCT.Organ if organ else codes.SCT.AnatomicalStructure,
                segmented_property_type=organ or codes.SCT.AnatomicalStructure,
                algorithm_name=algorithm,
                algorithm_family=codes.DCM.ArtificialIntelligence,
                algorithm_version=version,
            )
        )
    return descriptions


class BundleSegApp(Application):
    """DICOM CT series -> the bundle's inference -> DICOM SEG with one segment per foreground label of channel_def."""

    def compose(self):
        app_context: AppContext = Application.init_app_context(self.argv)
        model_path = Path(app_context.model_path).expanduser().resolve()
        if not model_path.exists():
            raise FileNotFoundError(f"model path {model_path} (-m) does not exist: a bundle folder or a model.ts")
        config_names = DIRECTORY_CONFIGS if model_path.is_dir() else ARCHIVE_CONFIGS
        if model_path.is_dir():
            # SDK 4.0.0's model factory wraps any other folder in a generic Model without a predictor, which
            # the bundle operator would then call as the network: the folder goes to the operator's bundle_path
            # alone, and the operator builds the network from the bundle's configs and models/model.pt.
            app_context.models = None
        logging.info(f"bundle {model_path} ({'directory' if model_path.is_dir() else 'model.ts'}): {config_names}")

        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(app_context.input_path), name="study_loader_op"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=CT_SERIES_RULES, name="series_selector_op")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_vol_op")
        inference = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=config_names),
            bundle_path=model_path,
            name="bundle_inference_op",
        )
        writer = DICOMSegmentationWriterOperator(
            self,
            segment_descriptions=segment_descriptions(bundle_metadata(model_path)),
            output_folder=Path(app_context.output_path),
            name="dicom_seg_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, writer, {("pred", "seg_image")})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    BundleSegApp().run()
