from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError, WaiterError

from healthimaging import triggers
from healthimaging.hooks import HealthImagingHook
from healthimaging.triggers import DICOMImportJobTrigger, is_transient_error

DS = "0123456789abcdef0123456789abcdef"
JOB = "fedcba9876543210fedcba9876543210"


def _trigger(**kwargs) -> DICOMImportJobTrigger:
    args = {"datastore_id": DS, "job_id": JOB, "waiter_delay": 0, "waiter_max_attempts": 5}
    args.update(kwargs)
    return DICOMImportJobTrigger(**args)


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        DICOMImportJobTrigger(DS, JOB)  # type: ignore[misc]


def test_serialize() -> None:
    trigger = _trigger(
        aws_conn_id="hi",
        region_name="eu-west-1",
        verify="/ca.pem",
        botocore_config={"inject_host_prefix": False},
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "healthimaging.triggers.DICOMImportJobTrigger"
    assert kwargs == {
        "datastore_id": DS,
        "job_id": JOB,
        "started_by": None,
        "poll_jitter": None,
        "end_from_trigger": False,
        "max_failed_files": None,
        "manifest_attempts": 3,
        "manifest_delay": 2.0,
        "do_xcom_push": True,
        "waiter_delay": 0,
        "waiter_max_attempts": 5,
        "aws_conn_id": "hi",
        "region_name": "eu-west-1",
        "verify": "/ca.pem",
        "botocore_config": {"inject_host_prefix": False},
    }


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"poll_jitter": 2.5},
        {"end_from_trigger": True, "max_failed_files": 3, "manifest_attempts": 1, "manifest_delay": 0.5},
        {"aws_conn_id": None},
        {"region_name": "eu-west-1", "verify": False, "botocore_config": {"retries": {"mode": "standard"}}},
    ],
)
def test_serialization_round_trip(extra) -> None:
    """Trigger.from_object -> encrypted kwargs (as stored) -> classpath import -> re-instantiate -> same kwargs."""
    from airflow.jobs.triggerer_job_runner import TriggerRunner
    from airflow.models.trigger import Trigger
    from airflow.serialization.serialized_objects import BaseSerialization

    trigger = _trigger(**extra)
    row = Trigger.from_object(trigger)
    stored = BaseSerialization.deserialize(BaseSerialization.serialize(row.kwargs))
    trigger_class = TriggerRunner().get_trigger_by_classpath(row.classpath)
    rebuilt = trigger_class(**stored)
    assert isinstance(rebuilt, DICOMImportJobTrigger)
    assert rebuilt.serialize() == trigger.serialize()


def test_hook_carries_every_connection_argument() -> None:
    hook = _trigger(
        aws_conn_id="hi", region_name="eu-west-1", verify=False, botocore_config={"inject_host_prefix": False}
    ).hook()
    assert isinstance(hook, HealthImagingHook)
    assert (hook.aws_conn_id, hook._region_name, hook._verify) == ("hi", "eu-west-1", False)
    assert hook._config.inject_host_prefix is False


def _waiter_error(status: str, reason: str = "Max attempts exceeded") -> WaiterError:
    return WaiterError(
        name="dicom_import_job_complete",
        reason=reason,
        last_response={
            "jobProperties": {"jobStatus": status, "message": "bad input" if status == "FAILED" else None}
        },
    )


async def _first_event(
    trigger: DICOMImportJobTrigger, side_effect: list
) -> tuple[TriggerEvent, mock.AsyncMock]:
    inner = mock.MagicMock()
    inner.name = "dicom_import_job_complete"
    inner.wait = mock.AsyncMock(side_effect=side_effect)
    client = mock.MagicMock()
    client.__aenter__ = mock.AsyncMock(return_value=client)
    client.__aexit__ = mock.AsyncMock(return_value=False)
    with (
        mock.patch.object(HealthImagingHook, "get_async_conn", mock.AsyncMock(return_value=client)),
        mock.patch.object(AwsGenericHook, "get_waiter", return_value=inner) as get_waiter,
    ):
        event = await trigger.run().asend(None)
    assert get_waiter.call_args.kwargs["deferrable"] is True
    return event, inner.wait


@pytest.mark.asyncio
async def test_run_success() -> None:
    event, wait = await _first_event(
        _trigger(), [_waiter_error("SUBMITTED"), _waiter_error("IN_PROGRESS"), None]
    )
    assert event.payload == {"status": "success", "job_id": JOB}
    assert wait.await_count == 3
    wait.assert_awaited_with(datastoreId=DS, jobId=JOB, WaiterConfig={"MaxAttempts": 1})


@pytest.mark.asyncio
async def test_run_failure_carries_job_message() -> None:
    terminal = _waiter_error("FAILED", reason="Waiter encountered a terminal failure state")
    event, _ = await _first_event(_trigger(), [_waiter_error("IN_PROGRESS"), terminal])
    assert event.payload["status"] == "error"
    assert event.payload["job_id"] == JOB
    assert "bad input" in event.payload["message"]
    assert f"DICOM import job {JOB} failed" in event.payload["message"]


@pytest.mark.asyncio
async def test_run_dropped_connection_then_success() -> None:
    import aiohttp

    event, wait = await _first_event(
        _trigger(),
        [EndpointConnectionError(endpoint_url="http://x"), aiohttp.ServerDisconnectedError(), None],
    )
    assert event.payload == {"status": "success", "job_id": JOB}
    assert wait.await_count == 3


@pytest.mark.asyncio
async def test_run_dropped_connections_spend_the_attempt_budget() -> None:
    event, wait = await _first_event(
        _trigger(waiter_max_attempts=2), [EndpointConnectionError(endpoint_url="http://x")] * 2
    )
    assert event.payload["status"] == "error"
    assert "max attempts" in event.payload["message"]
    assert wait.await_count == 2


@pytest.mark.asyncio
async def test_run_other_errors_still_raise() -> None:
    with pytest.raises(ValueError, match="boom"):
        await _first_event(_trigger(), [ValueError("boom")])


# ------------------------------------------------------------------ real path: aiobotocore against the local endpoint


@pytest.mark.slow
@pytest.mark.asyncio
async def test_run_against_endpoint_completed(live, caplog) -> None:
    live.upload("study")
    job_id = live.start_job("study")
    trigger = DICOMImportJobTrigger(
        datastore_id=live.datastore_id, job_id=job_id, waiter_delay=1, waiter_max_attempts=30
    )
    with caplog.at_level("INFO", logger="airflow.providers.amazon.aws.utils.waiter_with_logging"):
        event = await trigger.run().asend(None)
    assert event.payload == {"status": "success", "job_id": job_id}
    assert f"Status of DICOM import job {job_id} is: IN_PROGRESS" in caplog.text
    job = live.medical_imaging.get_dicom_import_job(datastoreId=live.datastore_id, jobId=job_id)[
        "jobProperties"
    ]
    assert job["jobStatus"] == "COMPLETED"


def _job_with_one_non_dicom_file(live, max_failed_files: int) -> tuple[str, DICOMImportJobTrigger]:
    """Start a job on a study plus one non-DICOM file; return it and a task-ending trigger waiting for it."""
    live.upload("study")
    live.s3.put_object(Bucket="input", Key="study/notes.txt", Body=b"not dicom")
    job_id = live.start_job("study")
    trigger = DICOMImportJobTrigger(
        datastore_id=live.datastore_id,
        job_id=job_id,
        waiter_delay=1,
        waiter_max_attempts=30,
        end_from_trigger=True,
        max_failed_files=max_failed_files,
    )
    return job_id, trigger


@pytest.mark.slow
@pytest.mark.asyncio
async def test_end_from_trigger_pushes_what_the_worker_would_return(live) -> None:
    """A COMPLETED job ends the task in the triggerer, with the worker path's summary (failed files included)."""
    job_id, trigger = _job_with_one_non_dicom_file(live, max_failed_files=1)
    trigger._log = mock.MagicMock()
    event = await trigger.run().asend(None)
    assert isinstance(event, TaskSuccessEvent)
    job = live.medical_imaging.get_dicom_import_job(datastoreId=live.datastore_id, jobId=job_id)[
        "jobProperties"
    ]
    expected = HealthImagingHook().completed_job_result(job)
    assert expected is not None
    assert expected["failedFiles"] == [
        {"inputFile": "study/notes.txt", "exceptionType": "ValidationException"}
    ]
    assert event.xcoms == {"return_value": expected}
    warned = [call.args[1] for call in trigger._log.warning.call_args_list]
    assert any(f"DICOM import job {job_id} COMPLETED with 1 failed file(s)" in text for text in warned)
    assert "ending the task from the triggerer" in trigger._log.info.call_args.args[0]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_end_from_trigger_leaves_too_many_failed_files_to_the_worker(live) -> None:
    job_id, trigger = _job_with_one_non_dicom_file(live, max_failed_files=0)
    event = await trigger.run().asend(None)
    assert not isinstance(event, TaskSuccessEvent)
    assert event.payload == {"status": "success", "job_id": job_id}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "outcome",
    [None, EndpointConnectionError(endpoint_url="http://x")],
    ids=["manifest-not-there-yet", "s3-unreachable"],
)
async def test_end_from_trigger_resumes_on_a_worker_when_the_manifest_cannot_be_read(outcome) -> None:
    job = {"jobId": JOB, "jobStatus": "COMPLETED", "outputS3Uri": "s3://output/x/"}
    client = mock.MagicMock()
    client.__aenter__ = mock.AsyncMock(return_value=client)
    client.__aexit__ = mock.AsyncMock(return_value=False)
    client.get_dicom_import_job = mock.AsyncMock(return_value={"jobProperties": job})
    result = mock.AsyncMock(side_effect=[outcome]) if outcome else mock.AsyncMock(return_value=None)
    with mock.patch.object(HealthImagingHook, "async_completed_job_result", result):
        event = await _trigger(end_from_trigger=True)._task_end_event(HealthImagingHook(), client)
    assert event is None
    result.assert_awaited_once()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_run_against_endpoint_failed(live) -> None:
    job_id = live.start_job("study", input_bucket="no-such-bucket")
    trigger = DICOMImportJobTrigger(
        datastore_id=live.datastore_id, job_id=job_id, waiter_delay=1, waiter_max_attempts=30
    )
    event = await trigger.run().asend(None)
    assert event.payload["status"] == "error"
    assert event.payload["job_id"] == job_id
    job = live.medical_imaging.get_dicom_import_job(datastoreId=live.datastore_id, jobId=job_id)[
        "jobProperties"
    ]
    assert job["jobStatus"] == "FAILED"
    assert job["message"] in event.payload["message"]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_run_survives_endpoint_restart(live, tmp_path) -> None:
    """The endpoint goes away mid-wait (connection refused) and comes back on the same port: the wait goes on."""
    import asyncio

    from healthimaging_local.server import LocalEndpoint

    live.upload("study")
    job_id = live.start_job("study")
    url = live.endpoint.url
    port = int(url.rsplit(":", 1)[1])
    live.endpoint.stop()
    trigger = DICOMImportJobTrigger(
        datastore_id=live.datastore_id, job_id=job_id, waiter_delay=1, waiter_max_attempts=60
    )
    task = asyncio.ensure_future(trigger.run().asend(None))
    await asyncio.sleep(2.5)
    assert not task.done()
    with LocalEndpoint(live.endpoint.state_dir, port=port, import_seconds=0):
        event = await asyncio.wait_for(task, timeout=60)
    assert event.payload == {"status": "success", "job_id": job_id}


@pytest.mark.asyncio
async def test_polls_come_waiter_delay_apart_on_average() -> None:
    """Each poll waits a random 0..jitter before it, so the sleep between polls is shorter by half the jitter."""
    trigger = _trigger(waiter_delay=10, poll_jitter=2)
    client = mock.MagicMock()
    client.__aenter__ = mock.AsyncMock(return_value=client)
    client.__aexit__ = mock.AsyncMock(return_value=False)
    with (
        mock.patch.object(HealthImagingHook, "get_async_conn", mock.AsyncMock(return_value=client)),
        mock.patch.object(AwsGenericHook, "get_waiter", return_value=mock.MagicMock()),
        mock.patch(
            "airflow.providers.amazon.aws.utils.waiter_with_logging.async_wait", mock.AsyncMock()
        ) as async_wait,
    ):
        event = await trigger.run().asend(None)
    assert event.payload == {"status": "success", "job_id": JOB}
    assert async_wait.await_args.args[1] == 9.0
    assert async_wait.await_args.args[0]._jitter == 2


def test_poll_jitter_defaults_to_a_tenth_of_the_delay() -> None:
    assert _trigger(waiter_delay=30).poll_jitter == 3.0
    assert _trigger(waiter_delay=30, poll_jitter=0).poll_jitter == 0.0
    assert _trigger(waiter_delay=30, poll_jitter=7).poll_jitter == 7.0


@pytest.mark.asyncio
async def test_every_async_poll_waits_a_fresh_random_jitter() -> None:
    inner = mock.MagicMock()
    inner.wait = mock.AsyncMock()
    waiter = triggers.AsyncTransientTolerantWaiter(inner, jitter=4.0)
    with (
        mock.patch.object(triggers.triggerer_poll_rate(), "acquire", new=mock.AsyncMock()),
        mock.patch.object(triggers.asyncio, "sleep", new=mock.AsyncMock()) as sleep,
        mock.patch.object(triggers.random, "uniform", side_effect=[1.5, 3.25]) as uniform,
    ):
        await waiter.wait(datastoreId=DS, jobId=JOB)
        await waiter.wait(datastoreId=DS, jobId=JOB)
    assert [c.args for c in uniform.call_args_list] == [(0, 4.0), (0, 4.0)]
    assert [c.args for c in sleep.await_args_list] == [(1.5,), (3.25,)]
    assert inner.wait.await_count == 2


@pytest.mark.asyncio
async def test_poll_rate_limiter_spaces_calls_of_one_process() -> None:
    limiter = triggers.PollRateLimiter(rate=50.0)
    loop = asyncio.get_running_loop()
    starts = []
    for _ in range(11):
        await limiter.acquire()
        starts.append(loop.time())
    # 11 calls at 50 per second take at least 10 intervals of 20 ms, however fast the caller asks.
    assert starts[-1] - starts[0] >= 10 / 50.0 - 0.005
    unlimited = triggers.PollRateLimiter(rate=0)
    before = loop.time()
    for _ in range(100):
        await unlimited.acquire()
    assert loop.time() - before < 0.5


@pytest.mark.asyncio
async def test_async_polls_go_through_the_process_rate_limiter() -> None:
    inner = mock.MagicMock()
    inner.wait = mock.AsyncMock()
    with mock.patch.object(triggers.triggerer_poll_rate(), "acquire", new=mock.AsyncMock()) as acquire:
        await triggers.AsyncTransientTolerantWaiter(inner).wait(datastoreId=DS, jobId=JOB)
    acquire.assert_awaited_once()
    inner.wait.assert_awaited_once()


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ClientError({"Error": {"Code": "ThrottlingException"}}, "GetDICOMImportJob"), True),
        (ClientError({"Error": {"Code": "InternalServerException"}}, "GetDICOMImportJob"), True),
        (ClientError({"Error": {"Code": "503"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Get"), True),
        (ClientError({"Error": {"Code": "ResourceNotFoundException"}}, "GetDICOMImportJob"), False),
        (ClientError({"Error": {"Code": "AccessDeniedException"}}, "GetDICOMImportJob"), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ValueError("x"), False),
    ],
)
def test_is_transient_error(error: Exception, transient: bool) -> None:
    assert is_transient_error(error) is transient


def test_is_transient_error_aiohttp() -> None:
    import aiohttp

    assert is_transient_error(aiohttp.ServerDisconnectedError())


@pytest.mark.slow
@pytest.mark.asyncio
async def test_connection_is_resolved_once_per_trigger_run(live, caplog) -> None:
    """Issue 12 item 6: one "credentials retrieved" line per run (polls, the end-of-task read and S3 included)."""
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper

    job_id, trigger = _job_with_one_non_dicom_file(live, max_failed_files=1)
    resolve = AwsConnectionWrapper._get_credentials
    with (
        caplog.at_level("INFO", logger="airflow.providers.amazon.aws.utils.waiter_with_logging"),
        mock.patch.object(
            AwsConnectionWrapper, "_get_credentials", autospec=True, side_effect=resolve
        ) as lookups,
    ):
        event = await trigger.run().asend(None)
    assert isinstance(event, TaskSuccessEvent)
    assert caplog.text.count(f"Status of DICOM import job {job_id} is") >= 2
    # AwsConnectionWrapper._get_credentials is what logs "... credentials retrieved from login and password".
    assert lookups.call_count == 1


@pytest.mark.slow
@pytest.mark.asyncio
async def test_end_from_trigger_pushes_nothing_without_do_xcom_push(live) -> None:
    _, trigger = _job_with_one_non_dicom_file(live, max_failed_files=1)
    trigger.do_xcom_push = False
    event = await trigger.run().asend(None)
    assert isinstance(event, TaskSuccessEvent)
    assert event.xcoms is None


def test_triggerer_poll_rate_comes_from_the_config_at_first_use(monkeypatch) -> None:
    triggers.triggerer_poll_rate.cache_clear()
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__TRIGGERER_MAX_POLLS_PER_SECOND", "5")
    try:
        assert triggers.triggerer_poll_rate().rate == 5.0
        assert triggers.triggerer_poll_rate() is triggers.triggerer_poll_rate()  # one per triggerer process
    finally:
        triggers.triggerer_poll_rate.cache_clear()
