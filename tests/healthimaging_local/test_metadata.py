"""The ImageSetMetadata document: shape (§2), merge on re-import, conflicts and the DICOMTags summary."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import botocore.session
import pydicom
import pytest

from healthimaging_local.dicom import ParsedInstance, parse_p10
from healthimaging_local.metadata import build_metadata, conflicts_with, dicom_tags_summary
from healthimaging_local.sample_data import synthetic_study_files

DATASTORE_ID = "0" * 32
IMAGE_SET_ID = "a" * 32
FRAME_KEYS = {
    "ID",
    "PixelDataChecksumFromBaseToFullResolution",
    "MinPixelValue",
    "MaxPixelValue",
    "FrameSizeInBytes",
}


def _series(instances: int = 3, seed: int = 0) -> list[ParsedInstance]:
    """The instances of the first series of a synthetic study."""
    parsed = [parse_p10(data) for _, data in synthetic_study_files(1, 1, 1, instances, seed=seed)]
    assert len({p.series_uid for p in parsed}) == 1
    return parsed


def _with(instance: ParsedInstance, level: str, **changes: object) -> ParsedInstance:
    changed: Any = {level: {**getattr(instance, level), **changes}}
    return dataclasses.replace(instance, **changed)


def test_document_has_the_service_shape() -> None:
    instances = _series()
    document = build_metadata(DATASTORE_ID, IMAGE_SET_ID, instances)
    json.dumps(document, allow_nan=False)
    assert set(document) == {"SchemaVersion", "DatastoreID", "ImageSetID", "Patient", "Study"}
    assert (document["SchemaVersion"], document["DatastoreID"], document["ImageSetID"]) == (
        "1.1",
        DATASTORE_ID,
        IMAGE_SET_ID,
    )
    assert set(document["Patient"]) == {"DICOM"}
    assert {"PatientName", "PatientID", "PatientBirthDate", "PatientSex"} <= set(document["Patient"]["DICOM"])
    assert set(document["Study"]) == {"DICOM", "Series"}
    assert document["Study"]["DICOM"]["StudyInstanceUID"] == instances[0].study_uid
    [(series_uid, series)] = document["Study"]["Series"].items()
    assert series_uid == instances[0].series_uid
    assert set(series) == {"DICOM", "Instances"}
    assert series["DICOM"]["SeriesInstanceUID"] == series_uid
    assert list(series["Instances"]) == [i.sop_uid for i in instances]
    for entry in series["Instances"].values():
        assert set(entry) == {"DICOM", "DICOMVRs", "ImageFrames"}
        [frame] = entry["ImageFrames"]
        assert set(frame) == FRAME_KEYS
        [level] = frame["PixelDataChecksumFromBaseToFullResolution"]
        assert set(level) == {"Width", "Height", "Checksum"}


def test_reimport_overwrites_the_same_sop_instance_and_adds_new_ones() -> None:
    first, second, third = _series(3)
    base = build_metadata(DATASTORE_ID, IMAGE_SET_ID, [first, second])
    base_before = copy.deepcopy(base)
    changed_second = _with(second, "instance", ContentTime="235959")
    merged = build_metadata(DATASTORE_ID, IMAGE_SET_ID, [changed_second, third], base=base)
    instances = merged["Study"]["Series"][first.series_uid]["Instances"]
    assert list(instances) == [first.sop_uid, second.sop_uid, third.sop_uid]
    assert instances[second.sop_uid]["DICOM"]["ContentTime"] == "235959"
    assert instances[first.sop_uid] == base["Study"]["Series"][first.series_uid]["Instances"][first.sop_uid]
    assert base == base_before, "the previous version must not change"


def test_reimport_takes_the_latest_non_null_level_values() -> None:
    [only] = _series(1)
    base = build_metadata(DATASTORE_ID, IMAGE_SET_ID, [only])
    updated = _with(only, "series", SeriesDescription="RENAMED", Manufacturer=None)
    merged = build_metadata(DATASTORE_ID, IMAGE_SET_ID, [updated], base=base)
    series_dicom = merged["Study"]["Series"][only.series_uid]["DICOM"]
    assert series_dicom["SeriesDescription"] == "RENAMED"
    assert series_dicom["Manufacturer"] == only.series["Manufacturer"]


def test_an_instance_of_another_study_is_refused() -> None:
    [one] = _series(1, seed=1)
    [other] = _series(1, seed=2)
    with pytest.raises(ValueError, match="one study"):
        build_metadata(DATASTORE_ID, IMAGE_SET_ID, [one, other])


@pytest.mark.parametrize(
    ("level", "keyword", "value", "expected"),
    [
        ("patient", "PatientName", "OTHER^NAME", True),
        ("patient", "PatientID", "X-1", True),
        ("patient", "PatientBirthDate", "19000101", True),
        ("patient", "PatientSex", "U", True),
        ("study", "StudyDescription", "ANOTHER", True),
        ("study", "AccessionNumber", "ACC-OTHER", True),
        ("study", "StudyDate", "19991231", True),
        ("study", "StudyTime", "000001", True),
        ("study", "StudyID", "999", True),
        ("series", "SeriesDescription", "SERIES LEVEL ONLY", False),
        ("instance", "ContentTime", "101010", False),
    ],
)
def test_conflicts_with(level: str, keyword: str, value: str, expected: bool) -> None:
    first, second = _series(2)
    document = build_metadata(DATASTORE_ID, IMAGE_SET_ID, [first])
    assert conflicts_with(document, second) is False
    assert conflicts_with(document, _with(second, level, **{keyword: value})) is expected


def test_absent_and_empty_values_do_not_conflict() -> None:
    first, second = _series(2)
    document = build_metadata(DATASTORE_ID, IMAGE_SET_ID, [_with(first, "study", StudyDescription=None)])
    assert conflicts_with(document, _with(second, "study", StudyDescription="")) is False


def _model_dicom_tags() -> dict[str, dict[str, Any]]:
    model = botocore.session.get_session().get_service_model("medical-imaging")
    return {name: dict(shape.metadata) for name, shape in model.shape_for("DICOMTags").members.items()}


def test_dicom_tags_summary_fields_and_types() -> None:
    instances = _series(3)
    summary = dicom_tags_summary(build_metadata(DATASTORE_ID, IMAGE_SET_ID, instances))
    assert set(summary) == set(_model_dicom_tags())
    first = instances[0]
    assert summary["DICOMPatientId"] == first.patient["PatientID"]
    assert summary["DICOMPatientName"] == first.patient["PatientName"]
    assert summary["DICOMStudyInstanceUID"] == first.study_uid
    assert summary["DICOMSeriesInstanceUID"] == first.series_uid
    assert summary["DICOMSeriesModality"] == first.series["Modality"]
    assert summary["DICOMSeriesBodyPart"] == first.series["BodyPartExamined"]
    assert summary["DICOMSeriesNumber"] == 1
    assert summary["DICOMNumberOfStudyRelatedSeries"] == 1
    assert summary["DICOMNumberOfStudyRelatedInstances"] == 3
    assert summary["DICOMStudyDate"] == first.study["StudyDate"]
    assert summary["DICOMStudyTime"] == first.study["StudyTime"]
    for name, metadata in _model_dicom_tags().items():
        value = summary[name]
        assert isinstance(value, int if name.startswith(("DICOMNumber", "DICOMSeriesNumber")) else str), name
        assert metadata["min"] <= (value if isinstance(value, int) else len(value)) <= metadata["max"], name


def test_dicom_tags_summary_nulls_where_absent() -> None:
    path = (
        Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "77654033" / "CR1" / "6154"
    )
    instance = parse_p10(path.read_bytes())
    summary = dicom_tags_summary(build_metadata(DATASTORE_ID, IMAGE_SET_ID, [instance]))
    absent = {name for name, value in summary.items() if value is None}
    assert absent  # this file lacks e.g. BodyPartExamined or SeriesNumber
    for name in absent:
        assert name not in ("DICOMStudyInstanceUID", "DICOMSeriesInstanceUID")


def test_dicom_tags_summary_truncates_and_clamps_to_the_model() -> None:
    [only] = _series(1)
    oversized = dataclasses.replace(
        only,
        patient={**only.patient, "PatientName": "N" * 600, "PatientSex": "S" * 40},
        series={**only.series, "SeriesNumber": "99999999999", "Modality": "M" * 100},
        study={**only.study, "StudyTime": "1" * 100},
    )
    summary = dicom_tags_summary(build_metadata(DATASTORE_ID, IMAGE_SET_ID, [oversized]))
    assert summary["DICOMPatientName"] == "N" * 512
    assert summary["DICOMPatientSex"] == "S" * 16
    assert summary["DICOMSeriesModality"] == "M" * 32
    assert summary["DICOMStudyTime"] == "1" * 56
    assert summary["DICOMSeriesNumber"] == 2**31 - 1
    garbage = dataclasses.replace(only, series={**only.series, "SeriesNumber": "not a number"})
    assert (
        dicom_tags_summary(build_metadata(DATASTORE_ID, IMAGE_SET_ID, [garbage]))["DICOMSeriesNumber"] is None
    )
