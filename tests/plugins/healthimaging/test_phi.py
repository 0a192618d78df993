"""The Annex E rule for summaries in XCom, and search criteria kept out of what Airflow stores, shows and logs."""

from __future__ import annotations

import json
from typing import Any

import botocore.session
import pytest

from healthimaging.phi import (
    DICOM_TAG_ACTIONS,
    REDACTED,
    SERVICE_MEMBERS,
    Action,
    RenderedSearchCriteria,
    deidentify_summary,
    new_uid_key,
    parse_allow_tags,
    redact_search_criteria,
    replacement_uid,
    summary_tags_from_metadata,
)


def _model_members(shape: str) -> set[str]:
    return set(botocore.session.get_session().get_service_model("medical-imaging").shape_for(shape).members)


def test_every_dicom_tag_of_the_model_has_an_annex_e_action() -> None:
    """Fails when botocore's model gains a ``DICOMTags`` member this package has no action for (or loses one)."""
    assert set(DICOM_TAG_ACTIONS) == _model_members("DICOMTags")


def test_every_summary_member_is_a_service_member_or_the_dicom_tags() -> None:
    assert _model_members("ImageSetsMetadataSummary") == SERVICE_MEMBERS | {"DICOMTags"}


def test_the_table_is_the_basic_profile() -> None:
    """The Basic Profile column of PS3.15 Table E.1-1 for the summary's attributes, written down once more."""
    expected = {
        "Z": {
            "DICOMPatientName",
            "DICOMPatientId",
            "DICOMPatientBirthDate",
            "DICOMPatientSex",
            "DICOMAccessionNumber",
            "DICOMStudyId",
            "DICOMStudyDate",
            "DICOMStudyTime",
        },
        "X": {"DICOMStudyDescription"},
        "U": {"DICOMStudyInstanceUID", "DICOMSeriesInstanceUID"},
        "K": {
            "DICOMSeriesModality",
            "DICOMSeriesBodyPart",
            "DICOMSeriesNumber",
            "DICOMNumberOfStudyRelatedSeries",
            "DICOMNumberOfStudyRelatedInstances",
        },
    }
    assert {a.value: {n for n, r in DICOM_TAG_ACTIONS.items() if r.action is a} for a in Action} == expected


TAGS: dict[str, Any] = {
    "DICOMPatientName": "DOE^JANE",
    "DICOMPatientId": "PID-12345",
    "DICOMPatientBirthDate": "19700101",
    "DICOMPatientSex": "F",
    "DICOMAccessionNumber": "ACC-999",
    "DICOMStudyId": "S1",
    "DICOMStudyDate": "20250301",
    "DICOMStudyTime": "120000",
    "DICOMStudyDescription": "CT chest - 55F Dr. Smith",
    "DICOMStudyInstanceUID": "1.2.3",
    "DICOMSeriesInstanceUID": "1.2.3.4",
    "DICOMSeriesModality": "CT",
    "DICOMSeriesBodyPart": "CHEST",
    "DICOMSeriesNumber": 3,
    "DICOMNumberOfStudyRelatedSeries": 2,
    "DICOMNumberOfStudyRelatedInstances": 40,
}


def _summary(**tags: Any) -> dict[str, Any]:
    return {
        "imageSetId": "a" * 32,
        "version": 1,
        "createdAt": "2025-03-01T12:00:00+00:00",
        "isPrimary": True,
        "DICOMTags": {**TAGS, **tags},
    }


def test_deidentify_applies_each_action() -> None:
    key = new_uid_key()
    out = deidentify_summary(_summary(), uid_key=key)
    tags = out["DICOMTags"]
    for name, rule in DICOM_TAG_ACTIONS.items():
        if rule.action is Action.Z:
            assert tags[name] == "", name
        elif rule.action is Action.X:
            assert name not in tags
        elif rule.action is Action.U:
            assert tags[name] == replacement_uid(TAGS[name], key) != TAGS[name]
            assert tags[name].startswith("2.25.")
            assert len(tags[name]) <= 64
        else:
            assert tags[name] == TAGS[name], name
    assert {k: v for k, v in out.items() if k != "DICOMTags"} == {
        k: v for k, v in _summary().items() if k != "DICOMTags"
    }
    for value in ("DOE^JANE", "PID-12345", "19700101", "ACC-999", "Smith", "20250301", "1.2.3.4"):
        assert value not in json.dumps(out)


def test_replacement_uids_are_consistent_within_a_set_only() -> None:
    key = new_uid_key()
    first = deidentify_summary(_summary(), uid_key=key)["DICOMTags"]
    second = deidentify_summary(_summary(DICOMSeriesInstanceUID="1.2.3.5"), uid_key=key)["DICOMTags"]
    assert first["DICOMStudyInstanceUID"] == second["DICOMStudyInstanceUID"]  # same study, same replacement
    assert first["DICOMSeriesInstanceUID"] != second["DICOMSeriesInstanceUID"]
    other_set = deidentify_summary(_summary(), uid_key=new_uid_key())["DICOMTags"]
    assert other_set["DICOMStudyInstanceUID"] != first["DICOMStudyInstanceUID"]


def test_unknown_members_are_removed_and_empty_values_stay_empty() -> None:
    summary = {**_summary(DICOMFutureTag="secret", DICOMStudyInstanceUID=""), "futureMember": "x"}
    out = deidentify_summary(summary, uid_key=new_uid_key())
    assert "futureMember" not in out
    assert "DICOMFutureTag" not in out["DICOMTags"]
    assert out["DICOMTags"]["DICOMStudyInstanceUID"] == ""


def test_allow_tags_keep_named_tags() -> None:
    allow = parse_allow_tags(["DICOMStudyInstanceUID", "DICOMSeriesInstanceUID", "DICOMStudyDate"])
    tags = deidentify_summary(_summary(), allow_tags=allow, uid_key=new_uid_key())["DICOMTags"]
    assert (tags["DICOMStudyInstanceUID"], tags["DICOMSeriesInstanceUID"]) == ("1.2.3", "1.2.3.4")
    assert tags["DICOMStudyDate"] == "20250301"
    assert tags["DICOMPatientId"] == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, set()),
        ("", set()),
        ([], set()),
        ("DICOMStudyDate", {"DICOMStudyDate"}),
        (" DICOMStudyDate , DICOMSeriesInstanceUID ", {"DICOMStudyDate", "DICOMSeriesInstanceUID"}),
        ('["DICOMStudyDate"]', {"DICOMStudyDate"}),
        (("DICOMPatientSex",), {"DICOMPatientSex"}),
    ],
)
def test_parse_allow_tags(value: Any, expected: set[str]) -> None:
    assert parse_allow_tags(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["PatientName"], "unknown DICOMTags member.*PatientName.*known: DICOMAccessionNumber"),
        ("[not json", "not a JSON list"),
        ('{"a": 1}', "unknown DICOMTags member"),
        (5, "must be a list"),
        ({"DICOMStudyDate": True}, "must be a list"),
    ],
)
def test_parse_allow_tags_refuses(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_allow_tags(value)


def test_summary_tags_from_metadata() -> None:
    document = {
        "Patient": {"DICOM": {"PatientID": "P1", "PatientName": "A^B"}},
        "Study": {
            "DICOM": {"StudyInstanceUID": "1.2", "AccessionNumber": "X1"},
            "Series": {
                "1.2.1": {"DICOM": {"Modality": "MR", "SeriesNumber": "4"}, "Instances": {"a": {}, "b": {}}}
            },
        },
    }
    assert summary_tags_from_metadata(document) == {
        "DICOMPatientId": "P1",
        "DICOMPatientName": "A^B",
        "DICOMStudyInstanceUID": "1.2",
        "DICOMAccessionNumber": "X1",
        "DICOMSeriesModality": "MR",
        "DICOMSeriesNumber": 4,
        "DICOMNumberOfStudyRelatedSeries": 1,
        "DICOMNumberOfStudyRelatedInstances": 2,
    }


# ------------------------------------------------------------------ search criteria

CRITERIA = {
    "filters": [
        {"operator": "EQUAL", "values": [{"DICOMPatientId": "P1"}]},
        {
            "operator": "BETWEEN",
            "values": [
                {"DICOMStudyDateAndTime": {"DICOMStudyDate": "19900101"}},
                {"DICOMStudyDateAndTime": {"DICOMStudyDate": "20230101", "DICOMStudyTime": "000000"}},
            ],
        },
    ],
    "sort": {"sortOrder": "ASC", "sortField": "updatedAt"},
}
REDACTED_CRITERIA = {
    "filters": [
        {"operator": "EQUAL", "values": [{"DICOMPatientId": REDACTED}]},
        {
            "operator": "BETWEEN",
            "values": [
                {"DICOMStudyDateAndTime": {"DICOMStudyDate": REDACTED}},
                {"DICOMStudyDateAndTime": {"DICOMStudyDate": REDACTED, "DICOMStudyTime": REDACTED}},
            ],
        },
    ],
    "sort": {"sortOrder": "ASC", "sortField": "updatedAt"},
}


@pytest.mark.parametrize("given", [CRITERIA, json.dumps(CRITERIA)])
def test_redact_search_criteria_keeps_the_structure(given: Any) -> None:
    assert redact_search_criteria(given) == REDACTED_CRITERIA


@pytest.mark.parametrize("given", ["{not json P1", ["P1"], 12345])
def test_redact_search_criteria_that_cannot_be_read(given: Any) -> None:
    assert redact_search_criteria(given) == REDACTED


def test_airflow_stores_the_rendered_criteria_redacted() -> None:
    """What Airflow's task runner sends as the rendered fields of a rendered search (any value length)."""
    import jinja2
    from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

    from healthimaging.operators import SearchImageSetsOperator

    op = SearchImageSetsOperator(
        task_id="search", datastore_id="0" * 32, search_criteria="{{ params.criteria | tojson }}"
    )
    op.render_template_fields({"params": {"criteria": CRITERIA}}, jinja_env=jinja2.Environment())  # type: ignore[arg-type]
    assert isinstance(op.search_criteria, RenderedSearchCriteria)
    assert json.loads(op.search_criteria.value) == CRITERIA
    stored = _serialize_rendered_fields(op)
    assert stored["search_criteria"] == REDACTED_CRITERIA
    assert "P1" not in json.dumps(stored)
    assert "19900101" not in json.dumps(stored)
    assert "19900101" not in repr(op.search_criteria)


# ------------------------------------------------------------------ real path: dag.test() against the endpoint

CANARY_PATIENT_ID = "PHICANARY4711"

DAG_FILE = """
from __future__ import annotations

import os

from airflow.sdk import DAG, Param
from healthimaging.operators import SearchImageSetsOperator

CRITERIA = {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": os.environ["TEST_CANARY"]}]}]}

with DAG("phi_criteria", schedule=None, params={"criteria": Param(CRITERIA, type="object")}):
    SearchImageSetsOperator(
        task_id="search_job",
        datastore_id=os.environ["TEST_DATASTORE_ID"],
        import_job_id=os.environ["TEST_JOB_ID"],
        search_criteria="{{ params.criteria | tojson }}",
        all_pages=True,
    )
    SearchImageSetsOperator(
        task_id="search_store",
        datastore_id=os.environ["TEST_DATASTORE_ID"],
        search_criteria="{{ params.criteria | tojson }}",
    )
"""

RUNNER = """
import json
from airflow.utils import db
db.resetdb()
from airflow.dag_processing.dagbag import DagBag
from airflow.models.renderedtifields import RenderedTaskInstanceFields
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

run = DagBag().get_dag("phi_criteria").test()
with create_session() as session:
    xcoms = {
        f"{row.task_id}.{row.key}": row.value
        for row in session.scalars(select(XComModel).where(XComModel.dag_id == "phi_criteria"))
    }
    rendered = {
        row.task_id: row.rendered_fields
        for row in session.scalars(select(RenderedTaskInstanceFields))
    }
    tis = [
        {c.name: str(getattr(ti, c.name)) for c in TaskInstance.__table__.columns}
        for ti in session.scalars(select(TaskInstance))
    ]
print("RESULT " + json.dumps({"state": str(run.state), "xcoms": xcoms, "rendered": rendered, "tis": tis}, default=str))
"""


def _canary_files() -> list[tuple[str, bytes]]:
    from io import BytesIO

    import pydicom

    from healthimaging_local.sample_data import synthetic_study_files

    files = []
    for key, data in synthetic_study_files(1, 1, 2, 2, seed=77):
        dataset = pydicom.dcmread(BytesIO(data))
        dataset.PatientID = CANARY_PATIENT_ID
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        files.append((key, out.getvalue()))
    return files


@pytest.mark.slow
def test_canary_patient_id_in_criteria_never_stored_shown_or_logged(live, tmp_path, kit) -> None:
    import time

    for key, body in _canary_files():
        live.s3.put_object(Bucket="input", Key=f"phi/{key}", Body=body)
    job_id = live.start_job("phi")
    while live.jobs()[0]["jobStatus"] not in ("COMPLETED", "FAILED"):
        time.sleep(0.3)
    result, output = kit.run_dag_test(
        tmp_path,
        DAG_FILE,
        RUNNER,
        TEST_DATASTORE_ID=live.datastore_id,
        TEST_JOB_ID=job_id,
        TEST_CANARY=CANARY_PATIENT_ID,
    )
    # The criteria were really used: the search by the canary found both series of the import.
    assert len(result["xcoms"]["search_job.imageSetIds"]) == 2
    assert len(result["xcoms"]["search_store.imageSetIds"]) == 2
    assert "Found 2 image set(s)" in output  # the task logs are in the output
    # The rendered field Airflow stores (and the UI/REST API show) keeps the structure, not the value.
    for task_id in ("search_job", "search_store"):
        assert result["rendered"][task_id]["search_criteria"] == {
            "filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": REDACTED}]}]
        }
    home = tmp_path / "airflow"
    logs = "".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file())
    places = {
        "rendered fields": json.dumps(result["rendered"]),
        "task instances": json.dumps(result["tis"]),
        "XCom": json.dumps(result["xcoms"]),
        "output (task logs)": output,
        "AIRFLOW_HOME/logs": logs,
    }
    for where, text in places.items():
        assert CANARY_PATIENT_ID not in text, where
