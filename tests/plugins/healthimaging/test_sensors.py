from __future__ import annotations

from datetime import UTC, datetime, timedelta
from unittest import mock

import jinja2
import pytest
from airflow.providers.common.compat.sdk import AirflowException, PokeReturnValue
from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)
from airflow.triggers.base import TaskSuccessEvent
from botocore.exceptions import EndpointConnectionError

from healthimaging.hooks import HealthImagingHook
from healthimaging.sensors import DICOMImportJobSensor
from healthimaging.triggers import DICOMImportJobTrigger


def _sensor(kit, **kwargs) -> DICOMImportJobSensor:
    args = {
        "task_id": "wait",
        "datastore_id": kit.DATASTORE_ID,
        "job_id": kit.JOB_ID,
        "poke_interval": 0,
        "deferrable": True,
    }
    args.update(kwargs)
    sensor = DICOMImportJobSensor(**args)
    sensor.manifest_delay = 0
    return sensor


def _expect_job(stubber, kit, *statuses: str) -> None:
    for status in statuses:
        stubber.add_response(
            "get_dicom_import_job",
            {"jobProperties": kit.job_properties(status)},
            {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID},
        )


@pytest.mark.parametrize("status", ["SUBMITTED", "IN_PROGRESS"])
def test_poke_running(stubber, kit, context, status: str) -> None:
    _expect_job(stubber, kit, status)
    assert _sensor(kit).poke(context) is False


def test_poke_completed_returns_manifest_summary(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(s3, kit.manifest(scanned=5, imported=5, image_set_ids=("a" * 32,)))
    result = _sensor(kit).poke(context)
    assert isinstance(result, PokeReturnValue)
    assert result.is_done
    assert result.xcom_value == {
        "jobId": kit.JOB_ID,
        "jobStatus": "COMPLETED",
        "endedAt": kit.ENDED_AT.isoformat(),
        "outputS3Uri": kit.JOB_FOLDER,
        "numberOfScannedFiles": 5,
        "numberOfImportedFiles": 5,
        "numberOfFilesWithCustomerError": 0,
        "numberOfFilesWithServerError": 0,
        "numberOfGeneratedImageSets": 1,
        "failedFiles": [],
    }


def test_poke_completed_waits_for_lagging_manifest(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    assert _sensor(kit).poke(context) is False


def test_poke_failed_raises_with_message_and_reasons(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "FAILED")
    kit.put_job_outputs(s3, kit.manifest(), kit.failure_ndjson(*[f"dicom/{i}.dcm" for i in range(6)]))
    with pytest.raises(AirflowFailException) as error:  # terminal: no retry would change a FAILED job
        _sensor(kit).poke(context)
    text = str(error.value)
    assert "FILE_COUNTS_LIMIT_EXCEEDED" in text
    assert "dicom/0.dcm: ValidationException" in text
    assert "dicom/4.dcm" in text
    assert "dicom/5.dcm" not in text


def test_completed_with_failed_files_warns(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(
        s3, kit.manifest(scanned=3, imported=2, customer_errors=1), kit.failure_ndjson("dicom/x.txt")
    )
    sensor = _sensor(kit)
    with mock.patch.object(DICOMImportJobSensor, "log", new_callable=mock.PropertyMock) as log:
        result = sensor.poke(context)
    assert result.xcom_value["failedFiles"] == [
        {"inputFile": "dicom/x.txt", "exceptionType": "ValidationException"}
    ]
    warnings = [call.args for call in log.return_value.warning.call_args_list]
    assert any("1 failed file(s)" in str(args) for args in warnings)


def test_completed_with_too_many_failed_files_fails(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(
        s3, kit.manifest(scanned=3, imported=1, customer_errors=2), kit.failure_ndjson("a", "b")
    )
    with pytest.raises(AirflowException, match="max_failed_files=1"):
        _sensor(kit, max_failed_files=1).poke(context)


def test_templated_max_failed_files_string(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(
        s3, kit.manifest(scanned=3, imported=1, customer_errors=2), kit.failure_ndjson("a", "b")
    )
    with pytest.raises(AirflowException, match="max_failed_files=1"):
        _sensor(kit, max_failed_files="1").poke(context)


def test_invalid_max_failed_files_before_any_call(stubber, kit, context) -> None:
    with pytest.raises(ValueError, match="max_failed_files"):
        _sensor(kit, max_failed_files="many").execute(context)


@pytest.mark.parametrize(
    "error",
    [
        {"service_error_code": "ThrottlingException", "http_status_code": 429},
        {"service_error_code": "InternalServerException", "http_status_code": 500},
    ],
)
def test_poke_waits_out_transient_errors(stubber, kit, context, error) -> None:
    stubber.add_client_error("get_dicom_import_job", **error)
    assert _sensor(kit).poke(context) is False


def test_poke_waits_out_dropped_connection(kit, context) -> None:
    with mock.patch.object(
        HealthImagingHook, "get_import_job", side_effect=EndpointConnectionError(endpoint_url="http://x")
    ):
        assert _sensor(kit).poke(context) is False


def test_poke_fails_on_not_found(stubber, kit, context) -> None:
    stubber.add_client_error(
        "get_dicom_import_job", service_error_code="ResourceNotFoundException", http_status_code=404
    )
    with pytest.raises(Exception, match="ResourceNotFoundException"):
        _sensor(kit).poke(context)


def test_deferrable_pokes_once_then_defers(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    sensor = _sensor(
        kit,
        poke_interval=7,
        timeout=70,
        botocore_config={"retries": {"max_attempts": 2}},
        region_name="eu-west-1",
        verify=False,
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context)
    assert deferred.value.timeout == timedelta(seconds=70)
    assert deferred.value.method_name == "execute_complete"
    trigger = deferred.value.trigger
    assert isinstance(trigger, DICOMImportJobTrigger)
    assert trigger.waiter_delay == 7
    assert trigger.attempts >= 10
    assert trigger.serialize()[1] == {
        "datastore_id": kit.DATASTORE_ID,
        "job_id": kit.JOB_ID,
        "started_by": None,
        "poll_jitter": None,
        "end_from_trigger": True,
        "max_failed_files": None,
        "manifest_attempts": 3,
        "manifest_delay": 0,
        "do_xcom_push": True,
        "waiter_delay": 7,
        "waiter_max_attempts": trigger.attempts,
        "aws_conn_id": "aws_default",
        "region_name": "eu-west-1",
        "verify": False,
        "botocore_config": {"retries": {"max_attempts": 2}},
    }


def test_deferrable_returns_without_deferring_when_done(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(s3, kit.manifest())
    assert _sensor(kit).execute(context)["jobStatus"] == "COMPLETED"


def test_deferrable_failed_before_deferring(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "FAILED")
    with pytest.raises(AirflowException, match="FAILED"):
        _sensor(kit).execute(context)


def test_poke_mode_runs_until_completed(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "SUBMITTED", "IN_PROGRESS", "COMPLETED")
    kit.put_job_outputs(s3, kit.manifest())
    result = _sensor(kit, deferrable=False, mode="poke").execute(context)
    assert result["numberOfImportedFiles"] == 3


def test_poke_mode_timeout(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with pytest.raises(AirflowSensorTimeout):
        _sensor(kit, deferrable=False, timeout=0).execute(context)


def test_reschedule_mode_reschedules(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with pytest.raises(AirflowRescheduleException):
        _sensor(kit, deferrable=False, mode="reschedule", timeout=3600).execute(context)


def test_first_poke_jitter(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with mock.patch("healthimaging.sensors.sleep") as sleep, pytest.raises(AirflowRescheduleException):
        _sensor(kit, deferrable=False, mode="reschedule", first_poke_jitter=5).execute(context)
    (pause,), _ = sleep.call_args
    assert 0 <= pause <= 5


def test_no_jitter_on_later_reschedules(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    context["ti"].get_first_reschedule_date.return_value = datetime.now(UTC)
    with mock.patch("healthimaging.sensors.sleep") as sleep, pytest.raises(AirflowRescheduleException):
        _sensor(kit, deferrable=False, mode="reschedule", first_poke_jitter=5).execute(context)
    sleep.assert_not_called()


def test_execute_complete_success(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(s3, kit.manifest())
    result = _sensor(kit).execute_complete(context, {"status": "success", "job_id": kit.JOB_ID})
    assert result["outputS3Uri"] == kit.JOB_FOLDER


def test_execute_complete_after_a_task_ending_event_under_dag_test(stubber, s3, kit, context) -> None:
    """``dag.test()`` resumes a task whose trigger ended it, with the state as the event: same result."""
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(s3, kit.manifest())
    result = _sensor(kit).execute_complete(context, "success")
    assert result["outputS3Uri"] == kit.JOB_FOLDER


@pytest.mark.parametrize(
    ("setting", "listeners", "expected"),
    [(None, False, True), (None, True, False), (False, False, False), (True, True, True)],
)
def test_end_from_trigger_unless_listeners(stubber, kit, context, setting, listeners, expected) -> None:
    """By default the trigger ends the task, except where listener plugins would miss its success."""
    _expect_job(stubber, kit, "IN_PROGRESS")
    sensor = _sensor(kit, end_from_trigger=setting, max_failed_files="{{ 2 }}")
    sensor.render_template_fields(context, jinja_env=jinja2.Environment())
    manager = mock.MagicMock(has_listeners=listeners)
    with (
        mock.patch("airflow.sdk.listener.get_listener_manager", return_value=manager),
        pytest.raises(TaskDeferred) as deferred,
    ):
        sensor.execute(context)
    trigger = deferred.value.trigger
    assert trigger.end_from_trigger is expected
    assert trigger.max_failed_files == 2


def test_execute_complete_error(stubber, s3, kit, context) -> None:
    _expect_job(stubber, kit, "FAILED")
    with pytest.raises(AirflowException, match="FILE_COUNTS_LIMIT_EXCEEDED"):
        _sensor(kit).execute_complete(context, {"status": "error", "message": "failed", "job_id": kit.JOB_ID})


def test_execute_complete_none(kit, context) -> None:
    with pytest.raises(AirflowException, match="event is None"):
        _sensor(kit).execute_complete(context, None)


def test_invalid_job_id_before_any_call(stubber, kit, context) -> None:
    with pytest.raises(ValueError, match="job_id"):
        _sensor(kit, job_id="BAD ID").execute(context)


def test_template_fields(kit, context) -> None:
    sensor = _sensor(kit, datastore_id="{{ params.ds }}", job_id="{{ ti.xcom_pull('start') }}")
    context["params"] = {"ds": kit.DATASTORE_ID}
    context["ti"].xcom_pull.return_value = kit.JOB_ID
    sensor.render_template_fields(context, jinja_env=jinja2.Environment())
    assert (sensor.datastore_id, sensor.job_id) == (kit.DATASTORE_ID, kit.JOB_ID)


def test_max_failed_files_is_templated(stubber, s3, kit, context) -> None:
    sensor = _sensor(kit, max_failed_files="{{ params.max_failed }}")
    context["params"] = {"max_failed": 1}
    sensor.render_template_fields(context, jinja_env=jinja2.Environment())
    assert sensor.max_failed_files == "1"
    _expect_job(stubber, kit, "COMPLETED")
    kit.put_job_outputs(
        s3, kit.manifest(scanned=3, imported=1, customer_errors=2), kit.failure_ndjson("a", "b")
    )
    with pytest.raises(AirflowException, match="max_failed_files=1"):
        sensor.poke(context)


# ------------------------------------------------------------------ real path: the local endpoint


def _poll_until_done(sensor: DICOMImportJobSensor, context, limit: int = 60):
    import time

    for _ in range(limit):
        result = sensor.poke(context)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError("job did not end")


@pytest.mark.slow
def test_poke_against_endpoint(live_slow, kit) -> None:
    live = live_slow
    live.upload("study", series_per_study=2, instances_per_series=2)
    live.s3.put_object(Bucket="input", Key="study/notes.txt", Body=b"not dicom")
    job_id = live.start_job("study")
    sensor = _sensor(kit, datastore_id=live.datastore_id, job_id=job_id, deferrable=False)
    assert sensor.poke(kit.make_context()) is False  # import_seconds=15: still running
    result = _poll_until_done(sensor, kit.make_context()).xcom_value
    assert result["jobStatus"] == "COMPLETED"
    assert result["numberOfScannedFiles"] == 5
    assert result["numberOfImportedFiles"] == 4
    assert result["numberOfFilesWithCustomerError"] == 1
    assert result["numberOfGeneratedImageSets"] == 2
    assert result["failedFiles"] == [{"inputFile": "study/notes.txt", "exceptionType": "ValidationException"}]
    assert result["outputS3Uri"].startswith(f"s3://output/results/{live.datastore_id}-DicomImport-{job_id}")

    with pytest.raises(AirflowException, match="max_failed_files=0"):
        _sensor(kit, datastore_id=live.datastore_id, job_id=job_id, max_failed_files=0).poke(
            kit.make_context()
        )


@pytest.mark.slow
def test_reschedule_mode_against_endpoint(live_slow, kit) -> None:
    live = live_slow
    import time

    live.upload("study")
    job_id = live.start_job("study")
    sensor = _sensor(
        kit, datastore_id=live.datastore_id, job_id=job_id, deferrable=False, mode="reschedule", timeout=120
    )
    context = kit.make_context()
    context["ti"].get_first_reschedule_date.return_value = datetime.now(UTC)
    reschedules = 0
    while True:
        try:
            result = sensor.execute(context)
            break
        except AirflowRescheduleException:
            reschedules += 1
            assert reschedules < 120
            time.sleep(0.5)
    assert reschedules >= 1
    assert result["jobStatus"] == "COMPLETED"
    assert result["numberOfImportedFiles"] == 4


@pytest.mark.slow
def test_failed_job_against_endpoint(live, kit) -> None:
    job_id = live.start_job("study", input_bucket="no-such-bucket")
    sensor = _sensor(kit, datastore_id=live.datastore_id, job_id=job_id, deferrable=False)
    with pytest.raises(
        AirflowException, match=f"DICOM import job {job_id} FAILED: DICOM import job has failed"
    ):
        _poll_until_done(sensor, kit.make_context())


@pytest.mark.slow
def test_deferrable_against_endpoint(live_slow, kit) -> None:
    live = live_slow
    """poke -> defer -> the trigger over aiobotocore -> execute_complete, as the triggerer would run it."""
    import asyncio

    live.upload("study")
    job_id = live.start_job("study")
    sensor = _sensor(kit, datastore_id=live.datastore_id, job_id=job_id, poke_interval=1, timeout=60)
    context = kit.make_context()
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context)
    event = asyncio.run(deferred.value.trigger.run().asend(None))
    # The trigger ends the task with the result the worker would have returned.
    assert isinstance(event, TaskSuccessEvent)
    result = sensor.execute_complete(context, event.payload)
    assert result["jobStatus"] == "COMPLETED"
    assert result["numberOfImportedFiles"] == 4
    assert event.xcoms == {"return_value": result}


@pytest.mark.slow
def test_deferrable_without_end_from_trigger_resumes_on_a_worker(live_slow, kit) -> None:
    live = live_slow
    import asyncio

    live.upload("study")
    job_id = live.start_job("study")
    sensor = _sensor(
        kit,
        datastore_id=live.datastore_id,
        job_id=job_id,
        poke_interval=1,
        timeout=60,
        end_from_trigger=False,
    )
    context = kit.make_context()
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context)
    event = asyncio.run(deferred.value.trigger.run().asend(None))
    assert not isinstance(event, TaskSuccessEvent)
    assert event.payload == {"status": "success", "job_id": job_id}
    assert sensor.execute_complete(context, event.payload)["numberOfImportedFiles"] == 4


@pytest.mark.parametrize("setting", ["True", "False"])
def test_deferrable_follows_operators_default_deferrable(kit, setting) -> None:
    """Issue 13: no hard-coded ``deferrable=True``; ``[operators] default_deferrable`` decides, as for the operator."""
    import os
    import subprocess
    import sys

    code = (
        "from healthimaging.sensors import DICOMImportJobSensor as S; "
        "from healthimaging.operators import StartDICOMImportOperator as O; "
        "import inspect; "
        f"print(S(task_id='w', datastore_id='{kit.DATASTORE_ID}', job_id='{kit.JOB_ID}').deferrable, "
        "inspect.signature(O.__init__).parameters['deferrable'].default)"
    )
    env = dict(os.environ, AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE=setting)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [setting, setting]


def test_do_xcom_push_false_reaches_the_trigger(stubber, kit, context) -> None:
    _expect_job(stubber, kit, "IN_PROGRESS")
    with pytest.raises(TaskDeferred) as deferred:
        _sensor(kit, do_xcom_push=False, end_from_trigger=True).execute(context)
    assert deferred.value.trigger.do_xcom_push is False


def _wait_for_end(live, job_id: str) -> None:
    import time

    for _ in range(120):
        job = live.medical_imaging.get_dicom_import_job(datastoreId=live.datastore_id, jobId=job_id)
        if job["jobProperties"]["jobStatus"] in ("COMPLETED", "FAILED"):
            return
        time.sleep(0.25)
    raise AssertionError("job did not end")


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["soft_fail", "never_fail"])
def test_failed_job_skips_in_deferrable_mode_before_deferring(live, kit, flag) -> None:
    """Issue 13: the first check of a deferrable sensor honours soft_fail/never_fail as poke mode does."""
    job_id = live.start_job("study", input_bucket="no-such-bucket")
    _wait_for_end(live, job_id)
    for deferrable in (False, True):
        sensor = _sensor(
            kit, datastore_id=live.datastore_id, job_id=job_id, deferrable=deferrable, **{flag: True}
        )
        with pytest.raises(AirflowSkipException):
            sensor.execute(kit.make_context())
    with pytest.raises(AirflowFailException, match="FAILED"):
        _sensor(kit, datastore_id=live.datastore_id, job_id=job_id).execute(kit.make_context())


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["soft_fail", "never_fail"])
def test_failed_job_seen_by_the_trigger_skips(live, kit, flag) -> None:
    """Deferred -> the trigger sees FAILED -> resumed on the worker: skipped, not failed."""
    import asyncio

    job_id = live.start_job("study", input_bucket="no-such-bucket")
    _wait_for_end(live, job_id)
    sensor = _sensor(
        kit, datastore_id=live.datastore_id, job_id=job_id, poke_interval=1, timeout=60, **{flag: True}
    )
    context = kit.make_context()
    with pytest.raises(TaskDeferred) as deferred:
        sensor._defer()  # as execute() does while the job runs; the job has ended already, for a test that cannot race
    event = asyncio.run(deferred.value.trigger.run().asend(None))
    assert event.payload["status"] == "error"
    with pytest.raises(AirflowSkipException):
        sensor.resume_execution("execute_complete", {"event": event.payload}, context)
