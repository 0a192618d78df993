"""The ImageSetMetadata JSON document: build it from parsed instances, merge re-imports, summarise it for search."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import botocore.session

if TYPE_CHECKING:
    from collections.abc import Iterable

    from healthimaging_local.dicom import ParsedInstance

SCHEMA_VERSION = "1.1"
PATIENT_CONFLICT_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY_CONFLICT_KEYWORDS = (
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
)
# DICOMTags member -> (document level, DICOM keyword); the two counts are computed from the document.
SUMMARY_SOURCES: dict[str, tuple[str, str]] = {
    "DICOMPatientId": ("Patient", "PatientID"),
    "DICOMPatientName": ("Patient", "PatientName"),
    "DICOMPatientBirthDate": ("Patient", "PatientBirthDate"),
    "DICOMPatientSex": ("Patient", "PatientSex"),
    "DICOMStudyInstanceUID": ("Study", "StudyInstanceUID"),
    "DICOMStudyId": ("Study", "StudyID"),
    "DICOMStudyDescription": ("Study", "StudyDescription"),
    "DICOMAccessionNumber": ("Study", "AccessionNumber"),
    "DICOMSeriesInstanceUID": ("Series", "SeriesInstanceUID"),
    "DICOMSeriesModality": ("Series", "Modality"),
    "DICOMSeriesBodyPart": ("Series", "BodyPartExamined"),
    "DICOMSeriesNumber": ("Series", "SeriesNumber"),
    "DICOMStudyDate": ("Study", "StudyDate"),
    "DICOMStudyTime": ("Study", "StudyTime"),
}
SUMMARY_ORDER = (
    "DICOMPatientId",
    "DICOMPatientName",
    "DICOMPatientBirthDate",
    "DICOMPatientSex",
    "DICOMStudyInstanceUID",
    "DICOMStudyId",
    "DICOMStudyDescription",
    "DICOMNumberOfStudyRelatedSeries",
    "DICOMNumberOfStudyRelatedInstances",
    "DICOMAccessionNumber",
    "DICOMSeriesInstanceUID",
    "DICOMSeriesModality",
    "DICOMSeriesBodyPart",
    "DICOMSeriesNumber",
    "DICOMStudyDate",
    "DICOMStudyTime",
)


def build_metadata(
    datastore_id: str,
    image_set_id: str,
    instances: Iterable[ParsedInstance],
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the ImageSetMetadata document holding ``instances`` (merged into ``base`` when given).

    A re-imported SOP instance replaces its previous entry; new instances and series are added. Patient,
    Study and Series attributes take the non-null values of the latest instance. ``base`` is not modified:
    only the containers on the changed paths are copied, untouched instance entries are shared with it.

    :param datastore_id: the datastore
    :param image_set_id: the image set
    :param instances: parsed instances, in import order
    :param base: the previous version's document, if any
    :raises ValueError: an instance belongs to another study than the document
    """
    document: dict[str, Any] = {
        "SchemaVersion": SCHEMA_VERSION,
        "DatastoreID": datastore_id,
        "ImageSetID": image_set_id,
        "Patient": {"DICOM": dict(base["Patient"]["DICOM"]) if base else {}},
        "Study": {
            "DICOM": dict(base["Study"]["DICOM"]) if base else {},
            "Series": dict(base["Study"]["Series"]) if base else {},
        },
    }
    patient = document["Patient"]["DICOM"]
    study = document["Study"]["DICOM"]
    all_series = document["Study"]["Series"]
    copied_series: set[str] = set()
    for instance in instances:
        known_study = study.get("StudyInstanceUID")
        if known_study is not None and known_study != instance.study_uid:
            raise ValueError("an image set holds instances of one study only")
        _merge_level(patient, instance.patient)
        _merge_level(study, instance.study)
        if instance.series_uid not in copied_series:
            previous = all_series.get(instance.series_uid)
            all_series[instance.series_uid] = {
                "DICOM": dict(previous["DICOM"]) if previous else {},
                "Instances": dict(previous["Instances"]) if previous else {},
            }
            copied_series.add(instance.series_uid)
        series = all_series[instance.series_uid]
        _merge_level(series["DICOM"], instance.series)
        series["Instances"][instance.sop_uid] = {
            "DICOM": dict(instance.instance),
            "DICOMVRs": dict(instance.vrs),
            "ImageFrames": [dict(frame) for frame in instance.frames],
        }
    return document


def _merge_level(target: dict[str, Any], update: dict[str, Any]) -> None:
    """Take every non-null value of ``update``; keys it only has as null are added as null."""
    for key, value in update.items():
        if value is not None or key not in target:
            target[key] = value


def _same(left: Any, right: Any) -> bool:
    """DICOM equality where an absent, null and empty value are the same."""
    return (left if left not in ("", []) else None) == (right if right not in ("", []) else None)


def conflicts_with(document: dict[str, Any], instance: ParsedInstance) -> bool:
    """True when ``instance`` disagrees with the primary image set ``document`` on Patient or Study level.

    Compared: PatientID, PatientName, PatientBirthDate, PatientSex, StudyInstanceUID, StudyID, StudyDate,
    StudyTime, AccessionNumber and StudyDescription.

    :param document: the existing primary image set's metadata document
    :param instance: the instance being imported
    """
    patient = document.get("Patient", {}).get("DICOM", {})
    study = document.get("Study", {}).get("DICOM", {})
    return any(
        not _same(patient.get(key), instance.patient.get(key)) for key in PATIENT_CONFLICT_KEYWORDS
    ) or any(not _same(study.get(key), instance.study.get(key)) for key in STUDY_CONFLICT_KEYWORDS)


@lru_cache(maxsize=1)
def _summary_limits() -> dict[str, tuple[int | None, int | None]]:
    """(min, max) of every DICOMTags member, from botocore's medical-imaging service model."""
    model = botocore.session.get_session().get_service_model("medical-imaging")
    return {
        name: (shape.metadata.get("min"), shape.metadata.get("max"))
        for name, shape in model.shape_for("DICOMTags").members.items()
    }


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return "\\".join("" if item is None else str(item) for item in value) or None
    return str(value)


def _as_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        try:
            return int(float(str(value)))
        except (ValueError, OverflowError):
            return None


def dicom_tags_summary(document: dict[str, Any]) -> dict[str, Any]:
    """The 16 ``DICOMTags`` of a SearchImageSets summary (None where absent), within the model's limits.

    Strings longer than the model's max are truncated, integers are clamped. Series fields come from the
    document's first series (an image set holds one series). The two counts are the document's series and
    SOP instances.

    :param document: an ImageSetMetadata document
    """
    limits = _summary_limits()
    all_series = document.get("Study", {}).get("Series", {})
    first_series: dict[str, Any] = next(iter(all_series.values()), {})
    levels = {
        "Patient": document.get("Patient", {}).get("DICOM", {}),
        "Study": document.get("Study", {}).get("DICOM", {}),
        "Series": first_series.get("DICOM", {}),
    }
    raw: dict[str, Any] = {
        name: levels[level].get(keyword) for name, (level, keyword) in SUMMARY_SOURCES.items()
    }
    raw["DICOMNumberOfStudyRelatedSeries"] = len(all_series)
    raw["DICOMNumberOfStudyRelatedInstances"] = sum(len(s.get("Instances", {})) for s in all_series.values())
    summary: dict[str, Any] = {}
    for name in SUMMARY_ORDER:
        low, high = limits.get(name, (None, None))
        value = raw[name]
        if name in (
            "DICOMSeriesNumber",
            "DICOMNumberOfStudyRelatedSeries",
            "DICOMNumberOfStudyRelatedInstances",
        ):
            number = _as_int(value)
            if number is not None:
                number = max(number, low) if low is not None else number
                number = min(number, high) if high is not None else number
            summary[name] = number
        else:
            text = _as_text(value)
            summary[name] = text[:high] if text is not None and high is not None else text
    return summary
