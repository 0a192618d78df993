"""
What of an image-set summary may leave the task, and how search criteria stay out of what Airflow shows.

Summaries (``ImageSetsMetadataSummary``) go to XCom. Unless the user opts in (``include_phi``), their ``DICOMTags``
are de-identified with DICOM PS3.15 Annex E's **Basic Application Level Confidentiality Profile**: each tag gets the
action of the profile's column "Basic Prof." in Table E.1-1 for the attribute it carries (:data:`DICOM_TAG_ACTIONS`).
Tags the table does not list are standard attributes the profile keeps. A tag this package does not know (one the
service adds later) is removed. ``phi_allow_tags`` keeps named tags unchanged, as the profile's options do for
theirs (keeping the two UID tags is the Retain UIDs Option, E.3.9). See ``docs/phi.md``.

Search criteria may name a patient. Airflow stores a templated field's rendered value and shows it in the UI and the
REST API; :class:`RenderedSearchCriteria` makes that stored value the criteria with every value replaced, and
:func:`mask_search_criteria` registers the values with Airflow's secrets masker so that logs show ``***``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

REDACTED = "***"


class Action(StrEnum):
    """Action codes of PS3.15 Table E.1-1 used here (E.1.1)."""

    #: replace with a zero-length value
    Z = "Z"
    #: remove
    X = "X"
    #: replace with a non-zero-length UID, internally consistent within a set of instances
    U = "U"
    #: keep (the attribute is not listed in Table E.1-1, or an option keeps it)
    K = "K"


@dataclass(frozen=True)
class TagRule:
    """
    The Annex E action for one ``DICOMTags`` member.

    :param tag: the DICOM attribute's (group,element)
    :param name: the attribute's name in PS3.6
    :param action: the action of Table E.1-1's Basic Profile column (K: not listed, so kept)
    :param level: where ``GetImageSetMetadata`` holds it: ``Patient``, ``Study`` or ``Series``
    :param keyword: its PS3.6 keyword there; None for the counts, which the document's structure gives
    """

    tag: str
    name: str
    action: Action
    level: str
    keyword: str | None


#: ``DICOMTags`` member -> Annex E Basic Profile action (PS3.15 Table E.1-1). A test checks that every member of the
#: botocore model's ``DICOMTags`` shape has a row here.
DICOM_TAG_ACTIONS: dict[str, TagRule] = {
    "DICOMPatientName": TagRule("(0010,0010)", "Patient's Name", Action.Z, "Patient", "PatientName"),
    "DICOMPatientId": TagRule("(0010,0020)", "Patient ID", Action.Z, "Patient", "PatientID"),
    "DICOMPatientBirthDate": TagRule(
        "(0010,0030)", "Patient's Birth Date", Action.Z, "Patient", "PatientBirthDate"
    ),
    "DICOMPatientSex": TagRule("(0010,0040)", "Patient's Sex", Action.Z, "Patient", "PatientSex"),
    "DICOMAccessionNumber": TagRule("(0008,0050)", "Accession Number", Action.Z, "Study", "AccessionNumber"),
    "DICOMStudyId": TagRule("(0020,0010)", "Study ID", Action.Z, "Study", "StudyID"),
    "DICOMStudyDate": TagRule("(0008,0020)", "Study Date", Action.Z, "Study", "StudyDate"),
    "DICOMStudyTime": TagRule("(0008,0030)", "Study Time", Action.Z, "Study", "StudyTime"),
    "DICOMStudyDescription": TagRule(
        "(0008,1030)", "Study Description", Action.X, "Study", "StudyDescription"
    ),
    "DICOMStudyInstanceUID": TagRule(
        "(0020,000D)", "Study Instance UID", Action.U, "Study", "StudyInstanceUID"
    ),
    "DICOMSeriesInstanceUID": TagRule(
        "(0020,000E)", "Series Instance UID", Action.U, "Series", "SeriesInstanceUID"
    ),
    "DICOMSeriesModality": TagRule("(0008,0060)", "Modality", Action.K, "Series", "Modality"),
    "DICOMSeriesBodyPart": TagRule(
        "(0018,0015)", "Body Part Examined", Action.K, "Series", "BodyPartExamined"
    ),
    "DICOMSeriesNumber": TagRule("(0020,0011)", "Series Number", Action.K, "Series", "SeriesNumber"),
    "DICOMNumberOfStudyRelatedSeries": TagRule(
        "(0020,1206)", "Number of Study Related Series", Action.K, "Study", None
    ),
    "DICOMNumberOfStudyRelatedInstances": TagRule(
        "(0020,1208)", "Number of Study Related Instances", Action.K, "Study", None
    ),
}

#: Members of a summary besides ``DICOMTags``: the service's own metadata of the image set, no DICOM attribute.
#: A member not listed here (one the service adds later) is removed unless ``include_phi``.
SERVICE_MEMBERS = frozenset(
    {"imageSetId", "version", "createdAt", "updatedAt", "lastAccessedAt", "storageTier", "isPrimary"}
)


_COUNTS = ("DICOMNumberOfStudyRelatedSeries", "DICOMNumberOfStudyRelatedInstances", "DICOMSeriesNumber")


def summary_tags_from_metadata(document: Mapping[str, Any]) -> dict[str, Any]:
    """
    The ``DICOMTags`` of a summary, read from an image set's ``GetImageSetMetadata`` document.

    Series members come from the document's first series (a primary image set holds one); the two counts are the
    document's series and SOP instances. Absent attributes are left out.

    :param document: the decoded ImageSetMetadata document
    """
    study = document.get("Study") or {}
    all_series = study.get("Series") or {}
    first_series: Mapping[str, Any] = next(iter(all_series.values()), {})
    levels = {
        "Patient": (document.get("Patient") or {}).get("DICOM") or {},
        "Study": study.get("DICOM") or {},
        "Series": first_series.get("DICOM") or {},
    }
    tags: dict[str, Any] = {
        "DICOMNumberOfStudyRelatedSeries": len(all_series),
        "DICOMNumberOfStudyRelatedInstances": sum(
            len(series.get("Instances") or {}) for series in all_series.values()
        ),
    }
    for name, rule in DICOM_TAG_ACTIONS.items():
        value = levels[rule.level].get(rule.keyword) if rule.keyword else None
        if value is None:
            continue
        if name in _COUNTS:
            try:
                value = int(float(str(value)))
            except ValueError:
                continue
        tags[name] = value if name in _COUNTS else str(value)
    return tags


def parse_allow_tags(value: Any) -> frozenset[str]:
    """
    Read ``phi_allow_tags``: a list of ``DICOMTags`` member names, or its rendered form (JSON list, or names
    separated by commas); None or empty: none.

    :param value: the argument after templating
    :raises ValueError: for a name that is not a ``DICOMTags`` member (the message lists the known ones)
    """
    if value is None or value == "":
        return frozenset()
    names: Iterable[Any]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"phi_allow_tags is not a JSON list: {err.msg}") from None
        else:
            names = [part.strip() for part in text.split(",") if part.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, Mapping):
        names = value
    else:
        raise ValueError(f"phi_allow_tags must be a list of DICOMTags names, not {type(value).__name__}")
    if not isinstance(names, list | tuple | set | frozenset):
        raise ValueError("phi_allow_tags must be a list of DICOMTags names")
    unknown = sorted(str(name) for name in names if name not in DICOM_TAG_ACTIONS)
    if unknown:
        raise ValueError(
            f"phi_allow_tags names unknown DICOMTags member(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(DICOM_TAG_ACTIONS))}"
        )
    return frozenset(str(name) for name in names)


def new_uid_key() -> bytes:
    """A fresh key for :func:`replacement_uid`: use one per set of summaries (one task's XCom)."""
    return secrets.token_bytes(32)


def replacement_uid(uid: str, key: bytes) -> str:
    """
    Annex E action U: a UID derived from ``uid`` with a keyed hash, so equal UIDs get equal replacements.

    :param uid: the original UID
    :param key: the set's key (:func:`new_uid_key`); without it the original cannot be confirmed by hashing guesses
    :return: a ``2.25.<128-bit integer>`` UID (PS3.5 B.2, a UUID-derived UID)
    """
    digest = hmac.new(key, uid.encode("utf-8"), hashlib.sha256).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def deidentify_summary(
    summary: Mapping[str, Any], *, allow_tags: frozenset[str] = frozenset(), uid_key: bytes
) -> dict[str, Any]:
    """
    Apply the Basic Profile to one image-set summary: its ``DICOMTags`` per :data:`DICOM_TAG_ACTIONS`.

    :param summary: an ``ImageSetsMetadataSummary`` (datetimes already converted or not)
    :param allow_tags: ``DICOMTags`` members to keep unchanged
    :param uid_key: the key of this set of summaries for the U action
    :return: a new summary; service members kept, unknown members removed
    """
    result: dict[str, Any] = {key: value for key, value in summary.items() if key in SERVICE_MEMBERS}
    tags = summary.get("DICOMTags")
    if isinstance(tags, Mapping):
        result["DICOMTags"] = {
            name: kept
            for name, value in tags.items()
            if (kept := _apply(name, value, allow_tags, uid_key)) is not _REMOVED
        }
    return result


_REMOVED = object()


def _apply(name: str, value: Any, allow_tags: frozenset[str], uid_key: bytes) -> Any:
    rule = DICOM_TAG_ACTIONS.get(name)
    if rule is None:
        return _REMOVED
    if name in allow_tags or rule.action is Action.K:
        return value
    if rule.action is Action.Z:
        return ""
    if rule.action is Action.U:
        return replacement_uid(str(value), uid_key) if value not in (None, "") else value
    return _REMOVED


# ------------------------------------------------------------------ search criteria


def criteria_values(criteria: Any) -> list[Any]:
    """
    Every value a SearchImageSets ``searchCriteria`` compares against (nested values included).

    :param criteria: the parsed criteria (a dict); anything else yields nothing
    """
    found: list[Any] = []

    def collect(value: Any) -> None:
        if isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)
        else:
            found.append(value)

    if isinstance(criteria, Mapping):
        for search_filter in criteria.get("filters") or []:
            if isinstance(search_filter, Mapping):
                collect(search_filter.get("values"))
    return found


def redact_search_criteria(criteria: Any) -> Any:
    """
    The criteria with every compared value replaced by ``***``: the attributes, operators and sort stay readable.

    :param criteria: the criteria as a dict, or as rendered (a JSON string)
    :return: the redacted criteria; ``***`` alone when they cannot be read as criteria
    """
    if isinstance(criteria, str):
        try:
            criteria = json.loads(criteria) if criteria.strip() else {}
        except json.JSONDecodeError:
            return REDACTED
    if not isinstance(criteria, Mapping):
        return REDACTED

    def blank(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: blank(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [blank(item) for item in value]
        return REDACTED

    redacted = dict(criteria)
    if isinstance(criteria.get("filters"), list):
        redacted["filters"] = [
            {**f, "values": blank(f.get("values"))} if isinstance(f, Mapping) else REDACTED
            for f in criteria["filters"]
        ]
    return redacted


def mask_search_criteria(criteria: Any) -> None:
    """
    Register the criteria's string values with Airflow's secrets masker, so logs (task, supervisor) show ``***``.

    The masker skips values shorter than ``[logging] min_length_masked_secret`` (default 5); the rendered field
    is redacted whatever the length (:class:`RenderedSearchCriteria`).

    :param criteria: the criteria as a dict or JSON string
    """
    from airflow.sdk.log import mask_secret

    if isinstance(criteria, str):
        try:
            criteria = json.loads(criteria)
        except json.JSONDecodeError:
            mask_secret(criteria)
            return
    for value in criteria_values(criteria):
        if isinstance(value, str):
            mask_secret(value)


class RenderedSearchCriteria:
    """
    A rendered ``search_criteria`` as the operator holds it after templating: the operator reads :attr:`value`,
    while Airflow stores (rendered task-instance fields, shown by the UI and REST API) what :meth:`serialize`
    returns, the criteria with their values redacted.

    :param value: the rendered criteria (dict or JSON string)
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def serialize(self) -> Any:
        """What Airflow stores as the field's rendered value."""
        return redact_search_criteria(self.value)

    def __repr__(self) -> str:
        return json.dumps(self.serialize())

    __str__ = __repr__


def unwrap_search_criteria(value: Any) -> Any:
    """
    The criteria an operator was given, whether rendered (:class:`RenderedSearchCriteria`) or not.

    :param value: the operator's ``search_criteria`` attribute
    """
    return value.value if isinstance(value, RenderedSearchCriteria) else value
