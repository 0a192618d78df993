from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import jinja2
import pytest
from airflow.providers.common.compat.sdk import AirflowException
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from healthimaging.operators import (
    MAX_TOKEN_CHAIN,
    START_FATAL_CODES,
    STATE_KEY,
    SearchImageSetsOperator,
    StartDICOMImportOperator,
    default_client_token,
    default_job_name,
    next_client_token,
    request_digest,
    task_instance_scope,
)
from healthimaging.triggers import DICOMImportJobTrigger

DIGEST = "0123456789abcdef" * 4
OTHER_JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def no_sleep():
    with mock.patch("healthimaging.operators.sleep") as sleep:
        yield sleep


def _operator(kit, **kwargs) -> StartDICOMImportOperator:
    """The operator on the kit's data store; the start pace is off unless a test is about it."""
    args = {
        "task_id": "start",
        "datastore_id": kit.DATASTORE_ID,
        "data_access_role_arn": kit.ROLE_ARN,
        "input_s3_uri": kit.INPUT_URI,
        "output_s3_uri": kit.OUTPUT_URI,
        "waiter_delay": 0,
        "pace_starts": False,
        "confirm_status": False,  # tests of the confirmation turn it on
    }
    args.update(kwargs)
    return StartDICOMImportOperator(**args)


def _start_response(kit, job_id: str | None = None, status: str = "SUBMITTED") -> dict:
    return {
        "datastoreId": kit.DATASTORE_ID,
        "jobId": job_id or kit.JOB_ID,
        "jobStatus": status,
        "submittedAt": kit.SUBMITTED_AT,
    }


def _request(kit, context, **params) -> dict:
    """The StartDICOMImportJob request the operator sends for ``context``, without its client token."""
    request = {
        "jobName": default_job_name(context["ti"].dag_id, context["run_id"], context["ti"].map_index),
        "dataAccessRoleArn": kit.ROLE_ARN,
        "datastoreId": kit.DATASTORE_ID,
        "inputS3Uri": kit.INPUT_URI,
        "outputS3Uri": kit.OUTPUT_URI,
    }
    request.update(params)
    return request


def _ti_token(context, request: dict) -> str:
    ti = context["ti"]
    return default_client_token(
        request, task_instance_scope(ti.dag_id, context["run_id"], ti.task_id, ti.map_index)
    )


def _expect_start(
    stubber, kit, context, *, job_id: str | None = None, status: str = "SUBMITTED", **params
) -> str:
    """Queue one StartDICOMImportJob with the exact request expected; return the client token expected."""
    token = params.pop("clientToken", None)
    request = _request(kit, context, **params)
    token = token or _ti_token(context, request)
    stubber.add_response(
        "start_dicom_import_job", _start_response(kit, job_id, status), {**request, "clientToken": token}
    )
    return token


def _expect_job(stubber, kit, *statuses: str, job_id: str | None = None) -> None:
    for status in statuses:
        stubber.add_response(
            "get_dicom_import_job",
            {"jobProperties": kit.job_properties(status, jobId=job_id or kit.JOB_ID)},
            {"datastoreId": kit.DATASTORE_ID, "jobId": job_id or kit.JOB_ID},
        )


def _sent_tokens(stubber) -> list[str]:
    """The client tokens of every StartDICOMImportJob the client sends from now on."""
    sent: list[str] = []
    stubber.client.meta.events.register(
        "before-parameter-build.medical-imaging.StartDICOMImportJob",
        lambda params, **_: sent.append(params["clientToken"]),
    )
    return sent


@pytest.mark.parametrize(
    ("wait_for_completion", "deferrable"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_start_matrix(stubber, s3, kit, context, wait_for_completion: bool, deferrable: bool) -> None:
    op = _operator(
        kit,
        wait_for_completion=wait_for_completion,
        deferrable=deferrable,
        waiter_max_attempts=7,
        pace_starts=True,
    )
    kit.expect_pace(stubber)
    token = _expect_start(stubber, kit, context)
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
    assert set(pushed) == {"jobStatus", "healthimaging_import_job", "healthimaging_datastore"}
    assert pushed["jobStatus"] == "SUBMITTED"
    assert pushed["healthimaging_import_job"] == {
        "region_name": "us-east-1",
        "aws_domain": "aws.amazon.com",
        "datastore_id": kit.DATASTORE_ID,
        "job_id": kit.JOB_ID,
    }
    assert pushed["healthimaging_datastore"]["datastore_id"] == kit.DATASTORE_ID
    assert context["task_state_store"].get(STATE_KEY) == {
        "jobId": kit.JOB_ID,
        "clientToken": token,
        "request": request_digest(_request(kit, context)),
    }


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
    assert context["task_state_store"].get(STATE_KEY)["clientToken"] == "tok-1"


def test_client_token_is_stable_across_tries_and_differs_by_map_index(stubber, kit) -> None:
    sent = _sent_tokens(stubber)
    for try_number, map_index in [(1, 0), (2, 0), (5, 0), (1, 1)]:
        stubber.add_response("start_dicom_import_job", _start_response(kit))
        # a new store each time: the token alone must bring a retry back to its job
        _operator(kit).execute(kit.make_context(map_index=map_index, try_number=try_number))
    assert sent[0] == sent[1] == sent[2]
    assert sent[3] != sent[0]
    assert len(sent[0]) <= 64


def test_token_changes_with_every_request_member_and_with_the_scope() -> None:
    request = {
        "jobName": "job",
        "dataAccessRoleArn": "arn:aws:iam::123456789012:role/ImportRole",
        "datastoreId": "0" * 32,
        "inputS3Uri": "s3://in/a/",
        "outputS3Uri": "s3://out/b/",
    }
    scope = task_instance_scope("dag", "run", "start", 0)
    token = default_client_token(request, scope)
    changed = {name: {**request, name: value + "x"} for name, value in request.items()}
    changed["inputOwnerAccountId"] = {**request, "inputOwnerAccountId": "123456789012"}
    tokens = {name: default_client_token(other, scope) for name, other in changed.items()}
    assert token not in tokens.values()
    assert len(set(tokens.values())) == len(tokens)
    for other_scope in (
        task_instance_scope("dag", "run", "start", 1),
        task_instance_scope("dag", "run2", "start", 0),
        task_instance_scope("dag", "run", "other", 0),
        task_instance_scope("dag2", "run", "start", 0),
        f"content:{DIGEST}",
    ):
        assert default_client_token(request, other_scope) != token
    # the token is not part of the request it identifies, and absent members are absent
    assert default_client_token({**request, "clientToken": "t", "inputOwnerAccountId": None}, scope) == token
    assert default_client_token(dict(reversed(request.items())), scope) == token


def test_default_token_and_name_fit_the_model() -> None:
    import re

    request = {"jobName": "j" * 64, "inputS3Uri": "s3://b/" + "k" * 900}
    token = default_client_token(request, task_instance_scope("d" * 300, "r" * 300, "t", None))
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", token)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", next_client_token(token, OTHER_JOB))
    assert task_instance_scope("a", "b", "c", None) == task_instance_scope("a", "b", "c", -1)
    name = default_job_name("my dag!" * 20, "manual__2025-03-01T12:00:00+00:00")
    assert re.fullmatch(r"[A-Za-z0-9._/#-]{1,64}", name)
    assert default_job_name("a" * 100, "run1") != default_job_name("a" * 100, "run2")
    assert (
        default_job_name("dag", "manual__2025-03-01T12:00:00+00:00")
        == "dag.manual__2025-03-01T12-00-00-00-00"
    )


def test_content_scoped_token_is_equal_across_runs_and_map_indexes(stubber, kit) -> None:
    sent = _sent_tokens(stubber)
    contexts = [
        kit.make_context(run_id="scheduled__2025-03-01", map_index=0),
        kit.make_context(run_id="backfill__2025-03-01", map_index=4),
        kit.make_context(run_id="manual__2025-03-02", task_id="import_dicom", map_index=-1),
    ]
    for context in contexts:
        request = _request(kit, context, jobName=f"dicom-import.{DIGEST[:16]}")
        stubber.add_response(
            "start_dicom_import_job",
            _start_response(kit),
            {**request, "clientToken": default_client_token(request, f"content:{DIGEST}")},
        )
        assert _operator(kit, content_digest=DIGEST).execute(context) == kit.JOB_ID
    assert sent[0] == sent[1] == sent[2]
    assert sent[0] != _ti_token(
        contexts[0], _request(kit, contexts[0], jobName=f"dicom-import.{DIGEST[:16]}")
    )
    # other content, other token
    stubber.add_response("start_dicom_import_job", _start_response(kit))
    _operator(kit, content_digest="f" * 64).execute(contexts[0])
    assert sent[3] != sent[0]


@pytest.mark.parametrize("status", ["SUBMITTED", "IN_PROGRESS", "COMPLETED"])
def test_retry_or_clear_reattaches_from_the_store_without_a_start(stubber, kit, context, status) -> None:
    _expect_start(stubber, kit, context)
    _operator(kit).execute(context)
    stored = context["task_state_store"].get(STATE_KEY)

    # the next try of the same task instance: the store is the same, the pace is on
    again = kit.make_context(try_number=2, store=context["task_state_store"])
    _expect_job(stubber, kit, status)
    assert _operator(kit, pace_starts=True).execute(again) == kit.JOB_ID
    stubber.assert_no_pending_responses()  # no StartDICOMImportJob, no ListDICOMImportJobs
    assert again["ti"].pushed["jobStatus"] == status
    assert again["ti"].pushed["healthimaging_import_job"]["job_id"] == kit.JOB_ID
    assert again["task_state_store"].get(STATE_KEY) == stored


def test_stored_job_of_other_parameters_is_not_reattached(stubber, kit, context) -> None:
    _expect_start(stubber, kit, context)
    _operator(kit).execute(context)
    # cleared after the input was changed: a new request, a new token, a new job
    token = _expect_start(stubber, kit, context, job_id=OTHER_JOB, inputS3Uri="s3://input-bucket/other/")
    assert _operator(kit, input_s3_uri="s3://input-bucket/other/").execute(context) == OTHER_JOB
    assert context["task_state_store"].get(STATE_KEY)["clientToken"] == token


def test_stored_failed_job_moves_to_the_next_token_and_a_new_job(stubber, kit, context) -> None:
    first = _expect_start(stubber, kit, context)
    _operator(kit).execute(context)

    _expect_job(stubber, kit, "FAILED")
    second = _expect_start(
        stubber, kit, context, job_id=OTHER_JOB, clientToken=next_client_token(first, kit.JOB_ID)
    )
    assert _operator(kit).execute(context) == OTHER_JOB
    assert context["task_state_store"].get(STATE_KEY) == {
        "jobId": OTHER_JOB,
        "clientToken": second,
        "request": request_digest(_request(kit, context)),
    }

    # a third try finds the new job running
    _expect_job(stubber, kit, "IN_PROGRESS", job_id=OTHER_JOB)
    assert _operator(kit).execute(context) == OTHER_JOB


def test_replayed_failed_job_walks_the_token_chain(stubber, kit, context) -> None:
    first = _expect_start(stubber, kit, context, status="FAILED")
    second = _expect_start(
        stubber, kit, context, job_id=OTHER_JOB, clientToken=next_client_token(first, kit.JOB_ID)
    )
    assert _operator(kit).execute(context) == OTHER_JOB
    assert context["ti"].pushed["jobStatus"] == "SUBMITTED"
    assert context["task_state_store"].get(STATE_KEY)["clientToken"] == second
    assert context["task_state_store"].get(STATE_KEY)["jobId"] == OTHER_JOB


def test_explicit_client_token_of_a_failed_job_fails(stubber, kit, context) -> None:
    _expect_start(stubber, kit, context, clientToken="tok-1", status="FAILED")
    with pytest.raises(AirflowFailException, match=f"{kit.JOB_ID} of client_token tok-1 FAILED"):
        _operator(kit, client_token="tok-1").execute(context)
    assert context["task_state_store"].get(STATE_KEY) is None


def test_explicit_client_token_of_a_stored_failed_job_fails_without_a_start(stubber, kit, context) -> None:
    _expect_start(stubber, kit, context, clientToken="tok-1")
    _operator(kit, client_token="tok-1").execute(context)
    _expect_job(stubber, kit, "FAILED")
    with pytest.raises(AirflowFailException, match="pass a new client_token"):
        _operator(kit, client_token="tok-1").execute(context)


def test_exhausted_token_chain_fails(stubber, kit, context) -> None:
    token = _ti_token(context, _request(kit, context))
    for i in range(MAX_TOKEN_CHAIN):
        job_id = f"{i:032x}"
        _expect_start(stubber, kit, context, job_id=job_id, status="FAILED", clientToken=token)
        token = next_client_token(token, job_id)
    with pytest.raises(
        AirflowFailException, match=f"{MAX_TOKEN_CHAIN} import jobs of {kit.INPUT_URI} FAILED"
    ):
        _operator(kit).execute(context)
    assert context["task_state_store"].get(STATE_KEY) is None


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
        ("content_digest", "NOT-HEX-0123456789", "content_digest"),
        ("content_digest", "abc", "content_digest"),
        ("max_failed_files", "-1", "max_failed_files"),
    ],
)
def test_validation_before_any_call(stubber, kit, context, field: str, value: str, message: str) -> None:
    op = _operator(kit, pace_starts=True, **{field: value})
    with pytest.raises(AirflowFailException, match=message):
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
    with pytest.raises(AirflowException, match="ServiceQuotaExceededException") as raised:
        _operator(kit, start_retries=2).execute(context)
    assert not isinstance(raised.value, AirflowFailException)  # Airflow's own retries may still succeed
    assert no_sleep.call_count == 2


@pytest.mark.parametrize("code", sorted(START_FATAL_CODES))
def test_errors_a_retry_cannot_fix_fail_at_once(stubber, kit, context, no_sleep, code: str) -> None:
    stubber.add_client_error(
        "start_dicom_import_job", service_error_code=code, service_message="refused", http_status_code=400
    )
    with pytest.raises(AirflowFailException, match=f"data store {kit.DATASTORE_ID} failed: {code}: refused"):
        _operator(kit).execute(context)
    no_sleep.assert_not_called()
    assert context["task_state_store"].get(STATE_KEY) is None


def test_fatal_codes_are_the_documented_client_errors() -> None:
    assert {
        "ValidationException",
        "ResourceNotFoundException",
        "ConflictException",
        "AccessDeniedException",
    } == (START_FATAL_CODES)


def test_other_client_errors_fail_the_try_only(stubber, kit, context, no_sleep) -> None:
    stubber.add_client_error(
        "start_dicom_import_job",
        service_error_code="InternalServerException",
        service_message="try later",
        http_status_code=500,
    )
    with pytest.raises(
        AirflowException, match=f"data store {kit.DATASTORE_ID} failed: InternalServerException: try later"
    ) as raised:
        _operator(kit).execute(context)
    assert not isinstance(raised.value, AirflowFailException)
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
        content_digest="{{ params.digest }}",
    )
    context["params"] = {"ds": kit.DATASTORE_ID, "prefix": "p", "name": "n1", "token": "t1", "digest": DIGEST}
    op.render_template_fields(context, jinja_env=jinja2.Environment())
    assert (op.datastore_id, op.input_s3_uri, op.job_name, op.client_token, op.content_digest) == (
        kit.DATASTORE_ID,
        "s3://input-bucket/p/",
        "n1",
        "t1",
        DIGEST,
    )
    assert set(op.template_fields) >= {
        "datastore_id",
        "data_access_role_arn",
        "input_s3_uri",
        "output_s3_uri",
        "job_name",
        "client_token",
        "content_digest",
        "aws_conn_id",
        "region_name",
        "verify",
    }


def test_client_token_not_computed_in_init(kit) -> None:
    assert _operator(kit).client_token is None


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


def test_search_import_jobs_leaves_out_jobs_not_completed(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with mock.patch.object(SearchImageSetsOperator, "log", new_callable=mock.PropertyMock) as log:
        result = _run(_search(kit, import_job_ids=json.dumps([None, kit.JOB_ID, None])), context)
    assert result["imageSetIds"] == []
    assert result["firstImageSetId"] is None
    assert result["imageSetIdsByJob"] == {}
    assert kit.JOB_ID in str(log.return_value.warning.call_args)


def test_search_import_jobs_rendered_none_searches_nothing(stubber, kit, context) -> None:
    """A missing XCom renders ``null``: no jobs, never a search of the whole data store (no call is stubbed)."""
    for rendered in ("null", "None", ""):
        result = _run(_search(kit, import_job_ids=rendered), context)
        assert result["imageSetIds"] == []
        assert result["imageSetIdsByJob"] == {}


def test_search_import_jobs_pushes_what_it_found_before_failing_for_one_job(
    stubber, s3, kit, context
) -> None:
    _expect_job(stubber, kit, "COMPLETED")  # no manifest in S3: its image sets cannot be found
    with (
        mock.patch("healthimaging.hooks.time.sleep"),
        pytest.raises(AirflowException, match="could not be found"),
    ):
        _search(kit, import_job_ids=[kit.JOB_ID]).execute(context)
    pushed = context["ti"].pushed
    assert pushed["imageSetIds"] == []
    assert "manifest" in pushed["importJobs"][kit.JOB_ID]["error"].lower()
    assert pushed["importJobs"][kit.JOB_ID]["jobStatus"] == "COMPLETED"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("None", None),
        ("", None),
        ("[]", []),
        ('["a", null, "a", "b"]', ["a", "b"]),
        (["c"], ["c"]),
    ],
)
def test_import_job_ids_are_read_from_a_list_or_its_json(value, expected) -> None:
    from healthimaging.operators import coerce_job_ids

    assert coerce_job_ids(value) == expected


@pytest.mark.parametrize("value", ["[not json", '"abc"', '{"a": 1}', '["NOT VALID"]'])
def test_import_job_ids_refuse_anything_but_a_list_of_job_ids(value) -> None:
    from healthimaging.operators import coerce_job_ids

    with pytest.raises((AirflowFailException, ValueError), match="import_job_ids|job_id"):
        coerce_job_ids(value)


def test_search_takes_one_job_or_many_not_both(kit) -> None:
    with pytest.raises(ValueError, match="not both"):
        _search(kit, import_job_id=kit.JOB_ID, import_job_ids=[kit.JOB_ID])


# ------------------------------------------------------------------ real path: the local endpoint


def _live_operator(live, **kwargs) -> StartDICOMImportOperator:
    """The operator on the endpoint's data store; the start pace (test_pacing.py) is off unless asked for."""
    args = {
        "task_id": "start",
        "datastore_id": live.datastore_id,
        "data_access_role_arn": "arn:aws:iam::123456789012:role/ImportRole",
        "input_s3_uri": "s3://input/study/",
        "output_s3_uri": "s3://output/results/",
        "pace_starts": False,
    }
    args.update(kwargs)
    return StartDICOMImportOperator(**args)


@pytest.fixture
def real_sleep(no_sleep):
    """Really wait out the operator's backoff (the endpoint keeps StartDICOMImportJob's rate, 1/s, burst 2)."""
    import time

    no_sleep.side_effect = time.sleep
    return no_sleep


@pytest.mark.slow
def test_start_twice_for_one_task_instance_starts_one_job(live, kit, real_sleep) -> None:
    live.upload("study")
    first_try = kit.make_context(try_number=1)
    first = _live_operator(live).execute(first_try)
    # a retry with the store: re-attached from it; one whose store was lost: the token replays the job
    again = _live_operator(live).execute(kit.make_context(try_number=2, store=first_try["task_state_store"]))
    lost = _live_operator(live).execute(kit.make_context(try_number=3))
    assert first == again == lost
    assert [job["jobId"] for job in live.jobs()] == [first]
    other = _live_operator(live).execute(kit.make_context(map_index=3))
    assert other != first
    assert sorted(job["jobId"] for job in live.jobs()) == sorted([first, other])


@pytest.mark.slow
def test_same_content_in_two_runs_starts_one_job(live, kit, real_sleep) -> None:
    live.upload("study")
    digest = "ab" * 32
    first = _live_operator(live, content_digest=digest).execute(
        kit.make_context(run_id="scheduled__2025-03-01", map_index=0)
    )
    second_run = kit.make_context(run_id="backfill__2025-03-01", map_index=3)
    assert _live_operator(live, content_digest=digest).execute(second_run) == first
    assert [(job["jobId"], job["jobName"]) for job in live.jobs()] == [(first, f"dicom-import.{digest[:16]}")]
    assert live.wait_for_job(first, "COMPLETED", "FAILED") == "COMPLETED"
    # a later run of the same content gets the COMPLETED job: nothing is imported twice
    third_run = kit.make_context(run_id="manual__2025-03-02")
    assert _live_operator(live, content_digest=digest).execute(third_run) == first
    assert third_run["ti"].pushed["jobStatus"] == "COMPLETED"
    assert len(live.jobs()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("same_store", [True, False], ids=["store-kept", "store-lost"])
def test_failed_job_then_clear_starts_a_new_job(live, kit, real_sleep, same_store: bool) -> None:
    uri = "s3://late/study/"  # the bucket does not exist yet: the job FAILS
    store = kit.FakeStateStore()
    failed = _live_operator(live, input_s3_uri=uri).execute(kit.make_context(store=store))
    assert live.wait_for_job(failed, "COMPLETED", "FAILED") == "FAILED"

    # the cause fixed, the task cleared
    live.s3.create_bucket(Bucket="late")
    for key, body in live.sample_files(2, 2, 0):
        live.s3.put_object(Bucket="late", Key=f"study/{key}", Body=body)
    cleared = kit.make_context(try_number=2, store=store if same_store else None)
    new = _live_operator(live, input_s3_uri=uri, wait_for_completion=True, waiter_delay=1).execute(cleared)
    assert new != failed
    assert {job["jobId"]: job["jobStatus"] for job in live.jobs()} == {failed: "FAILED", new: "COMPLETED"}
    assert cleared["task_state_store"].get(STATE_KEY)["jobId"] == new

    # cleared once more: the COMPLETED job again, no third job
    again = kit.make_context(try_number=3, store=cleared["task_state_store"])
    assert _live_operator(live, input_s3_uri=uri).execute(again) == new
    assert again["ti"].pushed["jobStatus"] == "COMPLETED"
    assert len(live.jobs()) == 2


@pytest.mark.slow
def test_start_and_wait_against_endpoint(live, kit) -> None:
    live.upload("study")
    context = kit.make_context()
    job_id = _live_operator(live, wait_for_completion=True, waiter_delay=1, waiter_max_attempts=30).execute(
        context
    )
    assert context["task_state_store"].get(STATE_KEY)["jobId"] == job_id
    # the status GetDICOMImportJob confirmed right after the start (confirm_status)
    assert context["ti"].pushed["jobStatus"] in {"SUBMITTED", "IN_PROGRESS"}
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
    assert op.execute_complete(context, event.payload) == context["task_state_store"].get(STATE_KEY)["jobId"]


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

    # Both jobs in one task (as the import pipeline's run-level search): each job's own image sets, each once.
    both = _run(
        SearchImageSetsOperator(
            task_id="search",
            datastore_id=live.datastore_id,
            import_job_ids=json.dumps([job_id, None, other_job]),
            phi_allow_tags="DICOMSeriesInstanceUID",
        ),
        kit.make_context(task_id="search"),
    )
    assert both["imageSetIdsByJob"][job_id] == result["imageSetIds"]
    assert len(both["imageSetIdsByJob"][other_job]) == 2
    assert both["imageSetIds"] == both["imageSetIdsByJob"][job_id] + both["imageSetIdsByJob"][other_job]
    assert {
        s["DICOMTags"]["DICOMSeriesInstanceUID"] for s in both["imageSetsMetadataSummaries"]
    } == mine | others

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


def test_sync_wait_without_manifest_fails_as_the_sensor_does(stubber, s3, kit, context) -> None:
    """Issue 13: one max_failed_files rule; a manifest that never appears fails the wait (it no longer only warns)."""
    op = _operator(kit, wait_for_completion=True, max_failed_files=0)
    _expect_start(stubber, kit, context)
    _expect_job(stubber, kit, "COMPLETED", "COMPLETED")
    with (
        mock.patch("healthimaging.hooks.time.sleep"),
        pytest.raises(AirflowException, match="job-output-manifest.json was not found") as raised,
    ):
        op.execute(context)
    assert f"DICOM import job {kit.JOB_ID} is COMPLETED" in str(raised.value)


@pytest.mark.slow
def test_missing_manifest_is_one_rule_for_operator_and_sensor(live, kit) -> None:
    from healthimaging.sensors import DICOMImportJobSensor

    live.upload("study")
    op = _live_operator(live, wait_for_completion=True, waiter_delay=1, waiter_max_attempts=30)
    job_id = op.execute(kit.make_context())
    job = live.medical_imaging.get_dicom_import_job(datastoreId=live.datastore_id, jobId=job_id)[
        "jobProperties"
    ]
    folder = job["outputS3Uri"].removeprefix("s3://output/").rstrip("/")
    live.s3.delete_object(Bucket="output", Key=f"{folder}/job-output-manifest.json")
    sensor = DICOMImportJobSensor(task_id="wait", datastore_id=live.datastore_id, job_id=job_id)
    sensor.manifest_delay = 0
    with mock.patch("healthimaging.hooks.time.sleep"):
        with pytest.raises(AirflowException, match="was not found") as from_operator:
            op._check_completed(job_id)
        with pytest.raises(AirflowException, match="was not found") as from_sensor:
            sensor.execute_complete(kit.make_context(), {"status": "success", "job_id": job_id})
    assert str(from_operator.value) == str(from_sensor.value)


def test_a_replay_answering_submitted_is_confirmed_and_a_failed_job_followed(
    stubber, s3, kit, context
) -> None:
    """AWS may answer a replayed token with the job's first response: the status comes from GetDICOMImportJob."""
    op = _operator(kit, confirm_status=True)
    first = "f" * 32
    stubber.add_response("start_dicom_import_job", _start_response(kit, job_id=first))
    _expect_job(stubber, kit, "FAILED", job_id=first)
    stubber.add_response("start_dicom_import_job", _start_response(kit))
    _expect_job(stubber, kit, "SUBMITTED")
    assert op.execute(context) == kit.JOB_ID
    stored = context["task_state_store"].get(STATE_KEY)
    assert stored["jobId"] == kit.JOB_ID
    assert stored["clientToken"] == next_client_token(op._token(context, op._request(context)), first)


def test_a_job_this_call_created_is_not_confirmed_so_an_instant_failure_is_the_sensors(
    stubber, s3, kit, context
) -> None:
    """Only a replayed token's answer is checked: a fresh job that fails at once is not silently replaced."""
    from datetime import UTC, datetime

    op = _operator(kit, confirm_status=True)
    stubber.add_response("start_dicom_import_job", {**_start_response(kit), "submittedAt": datetime.now(UTC)})
    assert op.execute(context) == kit.JOB_ID  # no GetDICOMImportJob queued: the Stubber would fail on one
