from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import jinja2
import pytest
from airflow.providers.common.compat.sdk import AirflowException
from airflow.sdk.exceptions import TaskDeferred

from healthimaging.operators import (
    SearchImageSetsOperator,
    StartDICOMImportOperator,
    default_client_token,
    default_job_name,
)
from healthimaging.triggers import DICOMImportJobTrigger


@pytest.fixture(autouse=True)
def no_sleep():
    with mock.patch("healthimaging.operators.sleep") as sleep:
        yield sleep


def _operator(kit, **kwargs) -> StartDICOMImportOperator:
    args = {
        "task_id": "start",
        "datastore_id": kit.DATASTORE_ID,
        "data_access_role_arn": kit.ROLE_ARN,
        "input_s3_uri": kit.INPUT_URI,
        "output_s3_uri": kit.OUTPUT_URI,
        "waiter_delay": 0,
    }
    args.update(kwargs)
    return StartDICOMImportOperator(**args)


def _start_response(kit) -> dict:
    return {
        "datastoreId": kit.DATASTORE_ID,
        "jobId": kit.JOB_ID,
        "jobStatus": "SUBMITTED",
        "submittedAt": kit.SUBMITTED_AT,
    }


def _expect_start(stubber, kit, context, **params) -> None:
    expected = {
        "jobName": default_job_name("dag", context["run_id"]),
        "dataAccessRoleArn": kit.ROLE_ARN,
        "clientToken": default_client_token("dag", context["run_id"], "start", -1),
        "datastoreId": kit.DATASTORE_ID,
        "inputS3Uri": kit.INPUT_URI,
        "outputS3Uri": kit.OUTPUT_URI,
    }
    expected.update(params)
    stubber.add_response("start_dicom_import_job", _start_response(kit), expected)


def _expect_job(stubber, kit, *statuses: str) -> None:
    for status in statuses:
        stubber.add_response(
            "get_dicom_import_job",
            {"jobProperties": kit.job_properties(status)},
            {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID},
        )


@pytest.mark.parametrize(
    ("wait_for_completion", "deferrable"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_start_matrix(stubber, s3, kit, context, wait_for_completion: bool, deferrable: bool) -> None:
    op = _operator(kit, wait_for_completion=wait_for_completion, deferrable=deferrable, waiter_max_attempts=7)
    _expect_start(stubber, kit, context)
    if deferrable:
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)
        trigger = deferred.value.trigger
        assert isinstance(trigger, DICOMImportJobTrigger)
        assert deferred.value.method_name == "execute_complete"
        assert deferred.value.timeout == timedelta(seconds=0)
        assert trigger.serialize()[1]["job_id"] == kit.JOB_ID
        assert trigger.attempts == 7
    else:
        if wait_for_completion:
            _expect_job(stubber, kit, "SUBMITTED", "IN_PROGRESS", "COMPLETED", "COMPLETED")
            kit.put_job_outputs(s3, kit.manifest())
        assert op.execute(context) == kit.JOB_ID
    pushed = context["ti"].pushed
    assert pushed["jobId"] == kit.JOB_ID
    assert pushed["jobStatus"] == "SUBMITTED"
    assert pushed["submittedAt"] == kit.SUBMITTED_AT.isoformat()
    assert pushed["datastoreId"] == kit.DATASTORE_ID
    assert pushed["healthimaging_import_job"] == {
        "region_name": "us-east-1",
        "aws_domain": "aws.amazon.com",
        "datastore_id": kit.DATASTORE_ID,
        "job_id": kit.JOB_ID,
    }
    assert pushed["healthimaging_datastore"]["datastore_id"] == kit.DATASTORE_ID


def test_sync_wait_failed_job_surfaces_message_and_reasons(stubber, s3, kit, context) -> None:
    op = _operator(kit, wait_for_completion=True)
    _expect_start(stubber, kit, context)
    _expect_job(stubber, kit, "IN_PROGRESS", "FAILED", "FAILED")
    kit.put_job_outputs(s3, kit.manifest(), kit.failure_ndjson("dicom/bad.dcm"))
    with pytest.raises(AirflowException, match=r"FILE_COUNTS_LIMIT_EXCEEDED.*dicom/bad\.dcm"):
        op.execute(context)


def test_sync_wait_max_failed_files(stubber, s3, kit, context) -> None:
    op = _operator(kit, wait_for_completion=True, max_failed_files=0)
    _expect_start(stubber, kit, context)
    _expect_job(stubber, kit, "COMPLETED", "COMPLETED")
    kit.put_job_outputs(
        s3, kit.manifest(scanned=2, imported=1, customer_errors=1), kit.failure_ndjson("dicom/x")
    )
    with pytest.raises(AirflowException, match="max_failed_files=0"):
        op.execute(context)


def test_explicit_job_name_token_and_owner(stubber, kit, context) -> None:
    op = _operator(kit, job_name="my-job", client_token="tok-1", input_owner_account_id="123456789012")
    _expect_start(
        stubber, kit, context, jobName="my-job", clientToken="tok-1", inputOwnerAccountId="123456789012"
    )
    assert op.execute(context) == kit.JOB_ID


def test_client_token_is_stable_across_tries_and_differs_by_map_index(stubber, kit) -> None:
    sent: list[dict] = []
    stubber.client.meta.events.register(
        "before-parameter-build.medical-imaging.StartDICOMImportJob",
        lambda params, **_: sent.append(dict(params)),
    )
    for try_number, map_index in [(1, 0), (2, 0), (5, 0), (1, 1)]:
        stubber.add_response("start_dicom_import_job", _start_response(kit))
        _operator(kit).execute(kit.make_context(map_index=map_index, try_number=try_number))
    tokens = [params["clientToken"] for params in sent]
    assert tokens[0] == tokens[1] == tokens[2]
    assert tokens[3] != tokens[0]
    assert len(tokens[0]) <= 64


def test_default_token_and_name_fit_the_model() -> None:
    import re

    token = default_client_token("d" * 300, "r" * 300, "t", None)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", token)
    assert default_client_token("a", "b", "c", None) == default_client_token("a", "b", "c", -1)
    name = default_job_name("my dag!" * 20, "manual__2025-03-01T12:00:00+00:00")
    assert re.fullmatch(r"[A-Za-z0-9._/#-]{1,64}", name)
    assert default_job_name("a" * 100, "run1") != default_job_name("a" * 100, "run2")
    assert (
        default_job_name("dag", "manual__2025-03-01T12:00:00+00:00")
        == "dag.manual__2025-03-01T12-00-00-00-00"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("datastore_id", "NOT-VALID", "datastore_id"),
        ("data_access_role_arn", "arn:aws:iam::123:role/x", "data_access_role_arn"),
        ("input_s3_uri", "https://bucket/x", "input_s3_uri"),
        ("output_s3_uri", "s3://B/x", "output_s3_uri"),
        ("job_name", "bad name", "job_name"),
        ("job_name", "a" * 65, "job_name"),
        ("client_token", "bad token", "client_token"),
        ("output_s3_uri", "s3://input-bucket/dicom/out/", "inside input_s3_uri"),
        ("output_s3_uri", "s3://input-bucket/dicom", "inside input_s3_uri"),
    ],
)
def test_validation_before_any_call(stubber, kit, context, field: str, value: str, message: str) -> None:
    op = _operator(kit, **{field: value})
    with pytest.raises(ValueError, match=message):
        op.execute(context)
    # the Stubber has no responses queued: any AWS call would have raised StubResponseError


def test_throttling_and_quota_are_retried(stubber, kit, context, no_sleep) -> None:
    stubber.add_client_error(
        "start_dicom_import_job", service_error_code="ThrottlingException", http_status_code=429
    )
    stubber.add_client_error(
        "start_dicom_import_job", service_error_code="ServiceQuotaExceededException", http_status_code=402
    )
    _expect_start(stubber, kit, context)
    assert _operator(kit).execute(context) == kit.JOB_ID
    assert no_sleep.call_count == 2
    first, second = (call.args[0] for call in no_sleep.call_args_list)
    assert 0 <= first <= 2.0
    assert 0 <= second <= 4.0


def test_retries_are_bounded(stubber, kit, context, no_sleep) -> None:
    for _ in range(3):
        stubber.add_client_error(
            "start_dicom_import_job", service_error_code="ServiceQuotaExceededException", http_status_code=402
        )
    with pytest.raises(AirflowException, match="ServiceQuotaExceededException"):
        _operator(kit, start_retries=2).execute(context)
    assert no_sleep.call_count == 2


def test_other_client_errors_fail_clearly(stubber, kit, context, no_sleep) -> None:
    stubber.add_client_error(
        "start_dicom_import_job",
        service_error_code="ConflictException",
        service_message="token reused",
        http_status_code=409,
    )
    with pytest.raises(
        AirflowException, match=f"data store {kit.DATASTORE_ID} failed: ConflictException: token reused"
    ):
        _operator(kit).execute(context)
    no_sleep.assert_not_called()


def test_execute_complete(stubber, s3, kit, context) -> None:
    op = _operator(kit)
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(s3, kit.manifest())
    assert op.execute_complete(context, {"status": "success", "job_id": kit.JOB_ID}) == kit.JOB_ID


def test_execute_complete_error_event(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "FAILED")
    with pytest.raises(AirflowException, match="FILE_COUNTS_LIMIT_EXCEEDED"):
        _operator(kit).execute_complete(context, {"status": "error", "message": "x", "job_id": kit.JOB_ID})


def test_execute_complete_error_event_job_still_running(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with pytest.raises(AirflowException, match="max attempts reached"):
        _operator(kit).execute_complete(
            context,
            {"status": "error", "message": "Waiter error: max attempts reached", "job_id": kit.JOB_ID},
        )


def test_execute_complete_none_event(kit, context) -> None:
    with pytest.raises(AirflowException, match="event is None"):
        _operator(kit).execute_complete(context, None)


def test_template_rendering(kit, context) -> None:
    op = _operator(
        kit,
        datastore_id="{{ params.ds }}",
        input_s3_uri="s3://input-bucket/{{ params.prefix }}/",
        job_name="{{ params.name }}",
        client_token="{{ params.token }}",
    )
    context["params"] = {"ds": kit.DATASTORE_ID, "prefix": "p", "name": "n1", "token": "t1"}
    op.render_template_fields(context, jinja_env=jinja2.Environment())
    assert (op.datastore_id, op.input_s3_uri, op.job_name, op.client_token) == (
        kit.DATASTORE_ID,
        "s3://input-bucket/p/",
        "n1",
        "t1",
    )
    assert set(op.template_fields) >= {
        "datastore_id",
        "data_access_role_arn",
        "input_s3_uri",
        "output_s3_uri",
        "job_name",
        "client_token",
        "aws_conn_id",
        "region_name",
        "verify",
    }


def test_client_token_not_computed_in_init(kit) -> None:
    assert _operator(kit).client_token is None


def test_check_input_quota_refuses_and_lists_sub_prefixes(stubber, s3, kit, context, monkeypatch) -> None:
    monkeypatch.setattr("healthimaging.operators.MAX_FILES_PER_JOB", 3)
    for name in ["a/1.dcm", "a/2.dcm", "a/3.dcm", "b/1.dcm", "top.dcm"]:
        s3.put_object(Bucket="input-bucket", Key=f"dicom/{name}", Body=b"x")
    with pytest.raises(AirflowException, match=r"holds 5 files(.|\n)*s3://input-bucket/dicom/a/: 3 files"):
        _operator(kit, check_input_quota=True).execute(context)


def test_check_input_quota_accepts_small_prefix(stubber, s3, kit, context) -> None:
    s3.put_object(Bucket="input-bucket", Key="dicom/1.dcm", Body=b"x")
    _expect_start(stubber, kit, context)
    assert _operator(kit, check_input_quota=True).execute(context) == kit.JOB_ID


# ---------------------------------------------------------------- SearchImageSetsOperator

PATIENT_TAGS = {
    "DICOMPatientName": "DOE^JANE",
    "DICOMPatientId": "PID-12345",
    "DICOMPatientBirthDate": "19700101",
    "DICOMAccessionNumber": "ACC-999",
    "DICOMSeriesInstanceUID": "1.2.3.4",
    "DICOMStudyInstanceUID": "1.2.3",
}


def _summary(image_set_id: str) -> dict:
    return {
        "imageSetId": image_set_id,
        "version": 1,
        "createdAt": datetime(2025, 3, 1, 12, 0, 10, tzinfo=UTC),
        "updatedAt": datetime(2025, 3, 1, 12, 0, 20, tzinfo=UTC),
        "DICOMTags": dict(PATIENT_TAGS),
        "isPrimary": True,
    }


def _search(kit, **kwargs) -> SearchImageSetsOperator:
    return SearchImageSetsOperator(task_id="search", datastore_id=kit.DATASTORE_ID, **kwargs)


def _run(operator: SearchImageSetsOperator, context) -> dict:
    """Execute; return the XComs it pushed (it returns nothing, so no ``return_value`` repeats them)."""
    assert operator.execute(context) is None
    return context["ti"].pushed


IDS = ["a" * 32, "b" * 32, "c" * 32]


def test_search_first_page_masks_phi(stubber, kit, context) -> None:
    criteria = {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "PID-12345"}]}]}
    stubber.add_response(
        "search_image_sets",
        {"imageSetsMetadataSummaries": [_summary(IDS[0]), _summary(IDS[1])], "nextToken": "tok2"},
        {"datastoreId": kit.DATASTORE_ID, "searchCriteria": criteria, "maxResults": 10},
    )
    result = _run(_search(kit, search_criteria=json.dumps(criteria), max_results="10"), context)
    assert sorted(result) == [
        "firstImageSetId",
        "healthimaging_datastore",  # the extra link
        "imageSetIds",
        "imageSetsMetadataSummaries",
        "nextToken",
    ]
    assert result["imageSetIds"] == IDS[:2]
    assert result["firstImageSetId"] == IDS[0]
    assert result["nextToken"] == "tok2"
    tags = result["imageSetsMetadataSummaries"][0]["DICOMTags"]
    assert tags["DICOMPatientName"] == tags["DICOMPatientId"] == ""
    # Annex E action U: a replacement UID, the same for both summaries of this search (same series)
    uids = {s["DICOMTags"]["DICOMSeriesInstanceUID"] for s in result["imageSetsMetadataSummaries"]}
    (uid,) = uids
    assert uid.startswith("2.25.")
    assert "1.2.3.4" not in uid
    assert result["imageSetsMetadataSummaries"][0]["createdAt"] == "2025-03-01T12:00:10+00:00"
    pushed = json.dumps(context["ti"].pushed)
    for value in ("DOE^JANE", "PID-12345", "19700101", "ACC-999"):
        assert value not in pushed
    assert context["ti"].pushed["imageSetIds"] == IDS[:2]


def test_search_include_phi(stubber, kit, context) -> None:
    stubber.add_response("search_image_sets", {"imageSetsMetadataSummaries": [_summary(IDS[0])]})
    result = _run(_search(kit, include_phi=True), context)
    assert result["imageSetsMetadataSummaries"][0]["DICOMTags"]["DICOMPatientName"] == "DOE^JANE"
    assert result["nextToken"] is None


def test_search_never_logs_criteria_or_phi(stubber, kit, context) -> None:
    criteria = {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "PID-12345"}]}]}
    stubber.add_response("search_image_sets", {"imageSetsMetadataSummaries": [_summary(IDS[0])]})
    with mock.patch.object(SearchImageSetsOperator, "log", new_callable=mock.PropertyMock) as log:
        _search(kit, search_criteria=criteria).execute(context)
    logged = str(log.return_value.mock_calls)
    assert "Found %d image set(s)" in logged
    assert "PID-12345" not in logged
    assert "DOE^JANE" not in logged


def test_search_templated_include_phi_string_false_still_masks(stubber, kit, context) -> None:
    stubber.add_response("search_image_sets", {"imageSetsMetadataSummaries": [_summary(IDS[0])]})
    result = _run(_search(kit, include_phi="False"), context)
    assert result["imageSetsMetadataSummaries"][0]["DICOMTags"]["DICOMPatientName"] == ""


def test_search_all_pages(stubber, kit, context) -> None:
    stubber.add_response(
        "search_image_sets", {"imageSetsMetadataSummaries": [_summary(IDS[0])], "nextToken": "t2"}
    )
    stubber.add_response(
        "search_image_sets",
        {"imageSetsMetadataSummaries": [_summary(IDS[1])]},
        {"datastoreId": kit.DATASTORE_ID, "searchCriteria": {}, "maxResults": 1, "nextToken": "t2"},
    )
    result = _run(_search(kit, all_pages=True, max_results=1), context)
    assert result["imageSetIds"] == IDS[:2]
    assert result["nextToken"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_results": 51}, "max_results"),
        ({"max_results": "abc"}, "max_results"),
        ({"search_criteria": "{not json"}, "search_criteria"),
        ({"search_criteria": {"filters": []}}, "filters"),
        (
            {"search_criteria": {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientName": "x"}]}]}},
            "exactly one key",
        ),
        ({"import_job_id": "NOT VALID"}, "job_id"),
        ({"phi_allow_tags": ["PatientName"]}, "phi_allow_tags names unknown DICOMTags member"),
        ({"phi_allow_tags": "[DICOMStudyDate"}, "phi_allow_tags is not a JSON list"),
        ({"max_image_set_lookups": "many"}, "max_image_set_lookups"),
        ({"max_image_set_lookups": -1}, "max_image_set_lookups"),
    ],
)
def test_search_validation_before_any_call(stubber, kit, context, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _search(kit, **kwargs).execute(context)


def test_search_template_rendering(kit, context) -> None:
    op = _search(
        kit,
        search_criteria="{{ params.criteria | tojson }}",
        max_results="{{ params.n }}",
        import_job_id="{{ params.job }}",
    )
    context["params"] = {"criteria": {"filters": []}, "n": 5, "job": "abc"}
    op.render_template_fields(context, jinja_env=jinja2.Environment())
    # the operator keeps the rendered criteria; what Airflow stores of them is redacted (see test_phi.py)
    assert json.loads(op.search_criteria.value) == {"filters": []}
    assert op.max_results == "5"
    assert op.import_job_id == "abc"


def test_search_import_job_returns_exactly_the_manifest_image_sets(stubber, s3, kit, context) -> None:
    kit.put_job_outputs(s3, kit.manifest(image_set_ids=(IDS[0], IDS[1])))
    _expect_job(stubber, kit, "COMPLETED")
    window = {
        "datastoreId": kit.DATASTORE_ID,
        "searchCriteria": {
            "filters": [
                {
                    "operator": "BETWEEN",
                    "values": [
                        {"updatedAt": kit.SUBMITTED_AT - timedelta(seconds=5)},
                        {"updatedAt": kit.ENDED_AT + timedelta(seconds=5)},
                    ],
                }
            ]
        },
        "maxResults": 50,
    }
    # another job's image set (IDS[2]) shares the window and must not be returned
    stubber.add_response(
        "search_image_sets",
        {"imageSetsMetadataSummaries": [_summary(IDS[2]), _summary(IDS[1]), _summary(IDS[0])]},
        window,
    )
    result = _run(_search(kit, import_job_id=kit.JOB_ID), context)
    assert result["imageSetIds"] == IDS[:2]
    assert [s["imageSetId"] for s in result["imageSetsMetadataSummaries"]] == IDS[:2]


def test_search_import_job_with_criteria_keeps_the_jobs_matching_image_sets(
    stubber, s3, kit, context
) -> None:
    kit.put_job_outputs(s3, kit.manifest(image_set_ids=(IDS[0], IDS[1])))
    _expect_job(stubber, kit, "COMPLETED")
    stubber.add_response(
        "search_image_sets", {"imageSetsMetadataSummaries": [_summary(IDS[1]), _summary(IDS[0])]}
    )
    criteria = {
        "filters": [{"operator": "EQUAL", "values": [{"DICOMSeriesInstanceUID": "1.2.3.4"}]}],
        "sort": {"sortOrder": "DESC", "sortField": "createdAt"},
    }
    # the criteria match IDS[2] (another job's) and IDS[0]; in the search's order
    stubber.add_response(
        "search_image_sets",
        {"imageSetsMetadataSummaries": [_summary(IDS[2]), _summary(IDS[0])]},
        {"datastoreId": kit.DATASTORE_ID, "searchCriteria": criteria, "maxResults": 50},
    )
    with mock.patch.object(SearchImageSetsOperator, "log", new_callable=mock.PropertyMock) as log:
        result = _run(_search(kit, import_job_id=kit.JOB_ID, search_criteria=json.dumps(criteria)), context)
    assert result["imageSetIds"] == [IDS[0]]
    assert result["firstImageSetId"] == IDS[0]
    assert "1.2.3.4" not in str(log.return_value.mock_calls)


def test_templated_include_phi_and_max_failed_files(kit, context) -> None:
    search = _search(
        kit,
        include_phi="{{ params.phi }}",
        phi_allow_tags="{{ params.allow | tojson }}",
        max_image_set_lookups="{{ params.lookups }}",
    )
    start = _operator(kit, max_failed_files="{{ params.max_failed }}")
    assert "include_phi" in search.template_fields
    assert "max_failed_files" in start.template_fields
    context["params"] = {"phi": True, "max_failed": 2, "allow": ["DICOMStudyDate"], "lookups": 7}
    search.render_template_fields(context, jinja_env=jinja2.Environment())
    start.render_template_fields(context, jinja_env=jinja2.Environment())
    assert (search.include_phi, start.max_failed_files) == ("True", "2")
    assert (search.phi_allow_tags, search.max_image_set_lookups) == ('["DICOMStudyDate"]', "7")


def test_aws_arguments_come_from_default_args_and_build_the_hook(kit) -> None:
    """Like the provider's AwsBaseOperator: default_args fill the AWS arguments; .partial() accepts them."""
    from airflow.sdk import DAG

    from healthimaging.hooks import HealthImagingHook

    with DAG("d", schedule=None, default_args={"aws_conn_id": "other", "region_name": "eu-west-1"}):
        op = _operator(kit, verify=False, botocore_config={"retries": {"max_attempts": 2}})
        mapped = StartDICOMImportOperator.partial(
            task_id="mapped",
            datastore_id=kit.DATASTORE_ID,
            data_access_role_arn=kit.ROLE_ARN,
            output_s3_uri=kit.OUTPUT_URI,
            aws_conn_id="third",
        ).expand(input_s3_uri=["s3://input-bucket/a/", "s3://input-bucket/b/"])
    assert (op.aws_conn_id, op.region_name, op.verify) == ("other", "eu-west-1", False)
    assert isinstance(op.hook, HealthImagingHook)
    assert (op.hook.aws_conn_id, op.hook._region_name, op.hook._verify, op.hook._config) == (
        "other",
        "eu-west-1",
        False,
        op.hook._config,
    )
    assert op.hook is op.hook
    assert mapped.partial_kwargs["aws_conn_id"] == "third"
    with pytest.raises(TypeError, match="unexpected keyword argument 'aws_con_id'"):
        StartDICOMImportOperator.partial(task_id="typo", aws_con_id="x")


def _metadata_response(patient_id: str, series_uid: str) -> dict:
    import gzip
    import io

    from botocore.response import StreamingBody

    document = {
        "SchemaVersion": "1.1",
        "Patient": {"DICOM": {"PatientID": patient_id, "PatientName": "DOE^JANE", "PatientSex": "F"}},
        "Study": {
            "DICOM": {
                "StudyInstanceUID": "1.2.3",
                "StudyDescription": "CT DOE JANE",
                "StudyDate": "20250301",
            },
            "Series": {
                series_uid: {
                    "DICOM": {"SeriesInstanceUID": series_uid, "Modality": "CT", "SeriesNumber": "7"},
                    "Instances": {"1.2.3.4.1": {}, "1.2.3.4.2": {}},
                }
            },
        },
    }
    blob = gzip.compress(json.dumps(document).encode())
    return {
        "imageSetMetadataBlob": StreamingBody(io.BytesIO(blob), len(blob)),
        "contentType": "application/json",
        "contentEncoding": "gzip",
    }


def _expect_window_search(stubber, kit, *summaries: dict) -> None:
    """The one search over the job's own window (submittedAt..endedAt with the skew), never widened to now."""
    skew = timedelta(seconds=SearchImageSetsOperator.job_window_skew)
    window = [{"updatedAt": kit.SUBMITTED_AT - skew}, {"updatedAt": kit.ENDED_AT + skew}]
    stubber.add_response(
        "search_image_sets",
        {"imageSetsMetadataSummaries": list(summaries)},
        {
            "datastoreId": kit.DATASTORE_ID,
            "searchCriteria": {"filters": [{"operator": "BETWEEN", "values": window}]},
            "maxResults": 50,
        },
    )


def test_search_import_job_reads_image_sets_outside_the_window_one_by_one(stubber, s3, kit, context) -> None:
    kit.put_job_outputs(s3, kit.manifest(image_set_ids=(IDS[0], IDS[1])))
    _expect_job(stubber, kit, "COMPLETED")
    _expect_window_search(stubber, kit, _summary(IDS[0]))
    by_id = {"datastoreId": kit.DATASTORE_ID, "imageSetId": IDS[1]}
    stubber.add_response(
        "get_image_set",
        {
            "datastoreId": kit.DATASTORE_ID,
            "imageSetId": IDS[1],
            "versionId": "2",
            "imageSetState": "ACTIVE",
            "imageSetArn": "arn:aws:medical-imaging:us-east-1:123456789012:datastore/x/imageset/y",
            "createdAt": kit.SUBMITTED_AT,
            "updatedAt": kit.ENDED_AT,
            "isPrimary": True,
        },
        by_id,
    )
    stubber.add_response("get_image_set_metadata", _metadata_response("PID-12345", "1.2.3.5"), by_id)
    result = _run(_search(kit, import_job_id=kit.JOB_ID, include_phi=True), context)
    assert result["imageSetIds"] == IDS[:2]
    searched, looked_up = result["imageSetsMetadataSummaries"]
    assert sorted(looked_up) == sorted(searched)  # the same shape on both paths
    assert looked_up["version"] == 2
    assert looked_up["DICOMTags"] == {
        "DICOMPatientId": "PID-12345",
        "DICOMPatientName": "DOE^JANE",
        "DICOMPatientSex": "F",
        "DICOMStudyInstanceUID": "1.2.3",
        "DICOMStudyDescription": "CT DOE JANE",
        "DICOMStudyDate": "20250301",
        "DICOMSeriesInstanceUID": "1.2.3.5",
        "DICOMSeriesModality": "CT",
        "DICOMSeriesNumber": 7,
        "DICOMNumberOfStudyRelatedSeries": 1,
        "DICOMNumberOfStudyRelatedInstances": 2,
    }


def test_search_import_job_one_by_one_reads_are_limited(stubber, s3, kit, context) -> None:
    kit.put_job_outputs(s3, kit.manifest(image_set_ids=tuple(IDS)))
    _expect_job(stubber, kit, "COMPLETED")
    _expect_window_search(stubber, kit, _summary(IDS[0]))
    with pytest.raises(AirflowException, match=r"2 image set\(s\).*max_image_set_lookups=1"):
        _search(kit, import_job_id=kit.JOB_ID, max_image_set_lookups="1").execute(context)
    assert context["ti"].pushed == {}


def test_search_import_job_leaves_out_deleted_image_sets(stubber, s3, kit, context) -> None:
    kit.put_job_outputs(s3, kit.manifest(image_set_ids=(IDS[0], IDS[1])))
    _expect_job(stubber, kit, "COMPLETED")
    _expect_window_search(stubber, kit, _summary(IDS[0]))
    stubber.add_client_error("get_image_set", "ResourceNotFoundException", http_status_code=404)
    result = _run(_search(kit, import_job_id=kit.JOB_ID), context)
    assert result["imageSetIds"] == [IDS[0]]


def test_search_import_job_window_search_stops_once_all_are_found(stubber, s3, kit, context) -> None:
    kit.put_job_outputs(s3, kit.manifest(image_set_ids=(IDS[0],)))
    _expect_job(stubber, kit, "COMPLETED")
    skew = timedelta(seconds=SearchImageSetsOperator.job_window_skew)
    window = [{"updatedAt": kit.SUBMITTED_AT - skew}, {"updatedAt": kit.ENDED_AT + skew}]
    # a first page holding the job's only image set and a next token: the second page is never asked for
    stubber.add_response(
        "search_image_sets",
        {"imageSetsMetadataSummaries": [_summary(IDS[1]), _summary(IDS[0])], "nextToken": "more"},
        {
            "datastoreId": kit.DATASTORE_ID,
            "searchCriteria": {"filters": [{"operator": "BETWEEN", "values": window}]},
            "maxResults": 50,
        },
    )
    assert _run(_search(kit, import_job_id=kit.JOB_ID), context)["imageSetIds"] == [IDS[0]]


def test_search_import_job_not_completed(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with pytest.raises(AirflowException, match="IN_PROGRESS"):
        _search(kit, import_job_id=kit.JOB_ID).execute(context)


# ------------------------------------------------------------------ real path: the local endpoint


def _live_operator(live, **kwargs) -> StartDICOMImportOperator:
    args = {
        "task_id": "start",
        "datastore_id": live.datastore_id,
        "data_access_role_arn": "arn:aws:iam::123456789012:role/ImportRole",
        "input_s3_uri": "s3://input/study/",
        "output_s3_uri": "s3://output/results/",
    }
    args.update(kwargs)
    return StartDICOMImportOperator(**args)


@pytest.mark.slow
def test_start_twice_for_one_task_instance_starts_one_job(live, kit) -> None:
    live.upload("study")
    first = _live_operator(live).execute(kit.make_context(try_number=1))
    again = _live_operator(live).execute(kit.make_context(try_number=2))
    assert first == again
    assert [job["jobId"] for job in live.jobs()] == [first]
    other = _live_operator(live).execute(kit.make_context(map_index=3))
    assert other != first
    assert sorted(job["jobId"] for job in live.jobs()) == sorted([first, other])


@pytest.mark.slow
def test_start_and_wait_against_endpoint(live, kit) -> None:
    live.upload("study")
    context = kit.make_context()
    job_id = _live_operator(live, wait_for_completion=True, waiter_delay=1, waiter_max_attempts=30).execute(
        context
    )
    assert context["ti"].pushed["jobId"] == job_id
    assert live.jobs()[0]["jobStatus"] == "COMPLETED"


@pytest.mark.slow
def test_start_deferrable_against_endpoint(live, kit) -> None:
    import asyncio

    live.upload("study")
    op = _live_operator(live, deferrable=True, waiter_delay=1, waiter_max_attempts=30)
    context = kit.make_context()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    event = asyncio.run(deferred.value.trigger.run().asend(None))
    assert op.execute_complete(context, event.payload) == context["ti"].pushed["jobId"]


@pytest.mark.slow
def test_search_import_job_returns_exactly_its_series(live, kit) -> None:
    import time

    from healthimaging.sensors import DICOMImportJobSensor

    mine = live.upload("study", series_per_study=3, seed=1)
    others = live.upload("other", series_per_study=2, seed=2)
    job_id = _live_operator(live).execute(kit.make_context(run_id="mine"))
    other_job = _live_operator(live, input_s3_uri="s3://input/other/").execute(
        kit.make_context(run_id="other")
    )
    for job in (job_id, other_job):
        sensor = DICOMImportJobSensor(
            task_id="w", datastore_id=live.datastore_id, job_id=job, deferrable=False
        )
        while not sensor.poke(kit.make_context()):
            time.sleep(0.5)

    context = kit.make_context(task_id="search")
    result = _run(
        SearchImageSetsOperator(
            task_id="search",
            datastore_id=live.datastore_id,
            import_job_id=job_id,
            phi_allow_tags="DICOMSeriesInstanceUID",
        ),
        context,
    )
    series = {s["DICOMTags"]["DICOMSeriesInstanceUID"] for s in result["imageSetsMetadataSummaries"]}
    assert series == mine
    assert not series & others
    assert len(result["imageSetIds"]) == 3
    assert result["firstImageSetId"] == result["imageSetIds"][0]
    for summary in result["imageSetsMetadataSummaries"]:
        assert summary["DICOMTags"]["DICOMPatientName"] == ""
        assert summary["DICOMTags"]["DICOMPatientId"] == ""
        assert summary["DICOMTags"]["DICOMStudyInstanceUID"].startswith("2.25.")
    pushed = json.dumps(context["ti"].pushed)
    assert "SYN1-" not in pushed  # the synthetic patient ids

    everything = _run(
        SearchImageSetsOperator(
            task_id="search", datastore_id=live.datastore_id, all_pages=True, max_results=2, include_phi=True
        ),
        kit.make_context(task_id="search"),
    )
    assert len(everything["imageSetIds"]) == 5
    assert everything["nextToken"] is None
    assert any(
        s["DICOMTags"]["DICOMPatientId"].startswith("SYN") for s in everything["imageSetsMetadataSummaries"]
    )


@pytest.mark.slow
def test_search_import_job_reads_changed_image_sets_one_by_one_with_the_same_summaries(live, kit) -> None:
    """An image set updated again by a later import is outside the first job's window: it is read with
    GetImageSet and GetImageSetMetadata, and its summary equals the one SearchImageSets gives."""
    import time

    from healthimaging.sensors import DICOMImportJobSensor

    def imported(run_id: str) -> str:
        job_id = _live_operator(live).execute(kit.make_context(run_id=run_id))
        sensor = DICOMImportJobSensor(
            task_id="w", datastore_id=live.datastore_id, job_id=job_id, deferrable=False
        )
        while not sensor.poke(kit.make_context()):
            time.sleep(0.5)
        return job_id

    live.upload("study", series_per_study=2, seed=5)
    first = imported("first")
    time.sleep(2)
    second = imported("second")  # the same files again: the same image sets, updated after the first job

    def search(job_id: str, **kwargs: Any) -> dict:
        op = SearchImageSetsOperator(
            task_id="search", datastore_id=live.datastore_id, import_job_id=job_id, include_phi=True, **kwargs
        )
        op.job_window_skew = 0.5
        return _run(op, kit.make_context(task_id="search"))

    searched = search(second)
    looked_up = search(first)
    assert looked_up["imageSetIds"] == searched["imageSetIds"]
    assert len(looked_up["imageSetIds"]) == 2
    assert looked_up["imageSetsMetadataSummaries"] == searched["imageSetsMetadataSummaries"]
    with pytest.raises(AirflowException, match="max_image_set_lookups=1"):
        search(first, max_image_set_lookups=1)
