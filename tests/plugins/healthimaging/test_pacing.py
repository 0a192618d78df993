"""The start pace: jobs in flight and the last start, read from ListDICOMImportJobs; the operator defers on it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from airflow.providers.common.compat.sdk import AirflowException
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from healthimaging.operators import STATE_KEY, StartDICOMImportOperator
from healthimaging.pacing import FULL_WAIT, MIN_WAIT, StartPace, jobs_in_flight, seconds_until_start

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_sleep():
    with mock.patch("healthimaging.operators.sleep") as sleep:
        yield sleep


def _list(
    stubber, kit, status: str, jobs: list[dict], next_token: str | None = None, after: str | None = None
):
    expected = {"datastoreId": kit.DATASTORE_ID, "jobStatus": status, "maxResults": 50}
    if after:
        expected["nextToken"] = after
    response: dict = {"jobSummaries": jobs}
    if next_token:
        response["nextToken"] = next_token
    stubber.add_response("list_dicom_import_jobs", response, expected)


def _jobs(kit, status: str, *ages: float) -> list[dict]:
    return [
        kit.job_summary(f"{status[:2].lower()}{i:030x}", status, NOW - timedelta(seconds=a))
        for i, a in enumerate(ages)
    ]


def test_in_flight_counts_both_statuses_and_every_page(stubber, kit) -> None:
    _list(stubber, kit, "SUBMITTED", _jobs(kit, "SUBMITTED", 30, 40), next_token="page2")
    # the newest job is on the second page
    _list(stubber, kit, "SUBMITTED", _jobs(kit, "SUBMITTED", 2), after="page2")
    _list(stubber, kit, "IN_PROGRESS", _jobs(kit, "IN_PROGRESS", 50, 60, 70))
    assert jobs_in_flight(stubber.client, kit.DATASTORE_ID, 100) == (6, NOW - timedelta(seconds=2))


def test_counting_stops_at_the_limit(stubber, kit) -> None:
    _list(stubber, kit, "SUBMITTED", _jobs(kit, "SUBMITTED", 30, 40), next_token="page2")
    # no second page and no IN_PROGRESS listing: the Stubber refuses any further call
    assert jobs_in_flight(stubber.client, kit.DATASTORE_ID, 2)[0] == 2


def test_full_data_store_waits(stubber, kit) -> None:
    _list(stubber, kit, "SUBMITTED", _jobs(kit, "SUBMITTED", 300))
    _list(stubber, kit, "IN_PROGRESS", _jobs(kit, "IN_PROGRESS", 600))
    assert seconds_until_start(stubber.client, kit.DATASTORE_ID, StartPace(1.0, 2), now=NOW) == FULL_WAIT


@pytest.mark.parametrize(
    ("newest_age", "wait"),
    [
        (1.0, 3.0),  # 1 / 0.25 s between starts, 1 s of them gone
        (2.5, 1.5),
        (3.5, MIN_WAIT),  # 0.5 s left: wait the shortest wait
        (4.0, 0.0),
        (600.0, 0.0),
    ],
)
def test_recent_start_waits_the_rest_of_the_interval(stubber, kit, newest_age: float, wait: float) -> None:
    _list(stubber, kit, "SUBMITTED", [])
    _list(stubber, kit, "IN_PROGRESS", _jobs(kit, "IN_PROGRESS", newest_age, 900))
    assert seconds_until_start(stubber.client, kit.DATASTORE_ID, StartPace(0.25, 100), now=NOW) == wait


def test_no_job_in_flight_starts_now(stubber, kit) -> None:
    kit.expect_pace(stubber)
    assert seconds_until_start(stubber.client, kit.DATASTORE_ID, StartPace(0.25, 1), now=NOW) == 0.0


def test_pace_from_config_and_its_checks(monkeypatch) -> None:
    assert StartPace.from_config() == StartPace(0.25, 100)
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__START_RATE", "2")
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_IMPORTS_IN_FLIGHT", "20")
    assert StartPace.from_config() == StartPace(2.0, 20)
    with pytest.raises(ValueError, match="start_rate"):
        StartPace(0, 1)
    with pytest.raises(ValueError, match="max_imports_in_flight"):
        StartPace(1, 0)


# ------------------------------------------------------------------ the operator at the pace


def _operator(datastore_id: str, **kwargs) -> StartDICOMImportOperator:
    args = {
        "task_id": "start",
        "datastore_id": datastore_id,
        "data_access_role_arn": "arn:aws:iam::123456789012:role/ImportRole",
        "input_s3_uri": "s3://input/study/",
        "output_s3_uri": "s3://output/results/",
        "confirm_status": False,
    }
    args.update(kwargs)
    return StartDICOMImportOperator(**args)


def _moment(deferred: pytest.ExceptionInfo[TaskDeferred]) -> datetime:
    trigger = deferred.value.trigger
    assert isinstance(trigger, DateTimeTrigger)
    assert deferred.value.method_name == "resume_start"
    return trigger.moment


def test_recent_start_defers_to_resume_start_then_starts(stubber, kit, context, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__START_RATE", "0.01")  # 100 s between starts
    op = _operator(kit.DATASTORE_ID)
    recent = datetime.now(UTC)
    kit.expect_pace(stubber, submitted=(recent,))
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    after = datetime.now(UTC)
    # the rest of the interval; no StartDICOMImportJob (the Stubber has none queued), nothing kept or pushed
    assert recent + timedelta(seconds=100) <= _moment(deferred) <= after + timedelta(seconds=100)
    assert context["task_state_store"].get(STATE_KEY) is None
    assert context["ti"].pushed == {}

    kit.expect_pace(stubber, in_progress=(recent - timedelta(seconds=200),))
    stubber.add_response(
        "start_dicom_import_job",
        {
            "datastoreId": kit.DATASTORE_ID,
            "jobId": kit.JOB_ID,
            "jobStatus": "SUBMITTED",
            "submittedAt": recent,
        },
    )
    assert op.resume_start(context, None) == kit.JOB_ID
    assert context["task_state_store"].get(STATE_KEY)["jobId"] == kit.JOB_ID


def test_full_data_store_defers_for_the_full_wait(stubber, kit, context, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_IMPORTS_IN_FLIGHT", "2")
    kit.expect_pace(stubber, submitted=(NOW,), in_progress=(NOW,))
    before = datetime.now(UTC)
    with pytest.raises(TaskDeferred) as deferred:
        _operator(kit.DATASTORE_ID).execute(context)
    assert _moment(deferred) >= before + timedelta(seconds=FULL_WAIT)


def test_no_pace_no_listing(stubber, kit, context) -> None:
    stubber.add_response(
        "start_dicom_import_job",
        {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID, "jobStatus": "SUBMITTED", "submittedAt": NOW},
    )
    assert _operator(kit.DATASTORE_ID, pace_starts=False).execute(context) == kit.JOB_ID


# ------------------------------------------------------------------ real path: the local endpoint


@pytest.fixture
def real_sleep(no_sleep):
    import time

    no_sleep.side_effect = time.sleep
    return no_sleep


@pytest.fixture
def quota_live(tmp_path, monkeypatch, kit):
    """An endpoint whose data store takes two jobs in flight (402 beyond), each IN_PROGRESS for 8 s."""
    with kit.running_endpoint(tmp_path, monkeypatch, import_seconds=8, max_concurrent_imports=2) as live:
        yield live


@pytest.mark.slow
def test_full_data_store_on_the_endpoint_defers_instead_of_a_quota_error(
    quota_live, kit, real_sleep, monkeypatch
) -> None:
    live = quota_live
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_IMPORTS_IN_FLIGHT", "2")
    busy = [live.start_job("a"), live.start_job("b")]
    real_sleep(1.0)  # past the endpoint's start rate (1/s, burst 2): a refusal is the quota's
    # without the pace, the service refuses the start (a retry of the task may succeed later)
    with pytest.raises(AirflowException, match="ServiceQuotaExceededException") as refused:
        _operator(live.datastore_id, pace_starts=False, start_retries=0).execute(kit.make_context())
    assert not isinstance(refused.value, AirflowFailException)

    # with it, the task defers before asking
    context = kit.make_context()
    op = _operator(live.datastore_id)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert _moment(deferred) > datetime.now(UTC)
    assert len(live.jobs()) == 2

    for job_id in busy:
        live.wait_for_job(job_id, "COMPLETED", "FAILED")
    live.upload("study")
    job_id = op.resume_start(context, None)
    assert job_id not in busy
    assert len(live.jobs()) == 3
    assert context["task_state_store"].get(STATE_KEY)["jobId"] == job_id


@pytest.mark.slow
def test_start_rate_on_the_endpoint_spaces_two_runs(live, kit, real_sleep, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__START_RATE", "0.05")  # 20 s between starts
    live.upload("study")
    first = _operator(live.datastore_id).execute(kit.make_context(run_id="run1"))
    second_run = kit.make_context(run_id="run2")
    op = _operator(live.datastore_id)
    before = datetime.now(UTC)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(second_run)
    after = datetime.now(UTC)
    assert before + timedelta(seconds=MIN_WAIT) <= _moment(deferred) <= after + timedelta(seconds=20)
    assert [job["jobId"] for job in live.jobs()] == [first]

    # the pace is asked again on resuming: a faster pace now lets the start through
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__START_RATE", "1000")
    second = op.resume_start(second_run, None)
    assert second != first
    assert len(live.jobs()) == 2


class _FakeService:
    """``list_dicom_import_jobs`` answering from a list of (status, submittedAt) the test controls."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, datetime]] = []
        self.calls = 0

    def list_dicom_import_jobs(self, datastoreId: str, jobStatus: str, maxResults: int, **_: str) -> dict:
        self.calls += 1
        return {
            "jobSummaries": [
                {"jobId": f"j{n}", "jobStatus": s, "submittedAt": at}
                for n, (s, at) in enumerate(self.jobs)
                if s == jobStatus
            ]
        }


def _fake_time(
    start: float, after_sleep: Callable[[list[float]], object] | None = None
) -> tuple[list[float], list[float], Callable[[float], None]]:
    """A monotonic clock (``clock[0]``) that a fake sleep advances, and the list of what was slept."""
    clock, slept = [start], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds
        if after_sleep is not None:
            after_sleep(slept)

    return clock, slept, sleep


def test_pacer_spaces_its_own_starts_and_waits_while_the_data_store_is_full() -> None:
    from healthimaging.pacing import StartPacer

    service = _FakeService()
    # the full data store empties while the pacer waits (its second sleep)
    clock, slept, sleep = _fake_time(1000.0, lambda slept: len(slept) == 2 and service.jobs.clear())
    pacer = StartPacer(service, "d" * 32, StartPace(0.5, 2), sleep=sleep, clock=lambda: clock[0])
    pacer()  # nothing in flight: start now
    assert slept == []
    pacer()  # the listing does not show the first start yet: the pacer's own spacing (2 s) still holds
    assert slept == [pytest.approx(2.0)]
    service.jobs = [("SUBMITTED", datetime.now(UTC) - timedelta(hours=1))] * 2
    pacer()  # full: wait, ask again, then start
    assert slept[1] == FULL_WAIT
    assert len(slept) == 2
    assert service.calls >= 3 * 2


def test_pacer_sleeps_exactly_the_time_left_and_asks_once_per_start() -> None:
    """Starts come ``1 / start_rate`` apart, not that plus a second listing or the deferral's shortest wait."""
    from healthimaging.pacing import StartPacer

    service = _FakeService()
    service.jobs = [("SUBMITTED", datetime.now(UTC) - timedelta(seconds=0.3))]
    slept: list[float] = []
    pacer = StartPacer(service, "d" * 32, StartPace(1.0, 10), sleep=slept.append, clock=lambda: 0.0)
    pacer()
    assert slept == [pytest.approx(0.7, abs=0.05)]  # not MIN_WAIT (1 s)
    assert service.calls == 2  # one listing per status, no second round after the sleep


def test_pacer_spaces_from_its_own_clock_when_the_newest_job_is_its_own() -> None:
    """The service stamps submittedAt a moment after the call: spacing from it would lengthen every interval."""
    from healthimaging.pacing import StartPacer

    service = _FakeService()
    clock, slept, sleep = _fake_time(100.0)
    pacer = StartPacer(service, "d" * 32, StartPace(1.0, 10), sleep=sleep, clock=lambda: clock[0])
    pacer()
    service.jobs = [("SUBMITTED", datetime.now(UTC) + timedelta(seconds=0.2))]  # our start, stamped later
    clock[0] += 0.3  # the start call and its bookkeeping
    pacer()
    assert slept == [pytest.approx(0.7)]  # 1 s after our own call, not after the service's stamp
    service.jobs.append(("SUBMITTED", datetime.now(UTC) + timedelta(seconds=30)))  # another run's, newer
    pacer()
    assert slept[-1] > 1.0


def test_pacer_lists_again_only_when_the_listing_is_old_or_the_data_store_nearly_full() -> None:
    """A listing per start cost more than the start: between listings the pacer counts its own starts."""
    from healthimaging.pacing import LISTING_MAX_AGE, StartPacer

    service = _FakeService()
    clock, slept, sleep = _fake_time(100.0)
    pacer = StartPacer(service, "d" * 32, StartPace(5.0, 70), sleep=sleep, clock=lambda: clock[0])
    for _ in range(5):  # 0.2 s apart: within one listing's age
        pacer()
    assert service.calls == 2  # one listing (both statuses)
    assert slept == [pytest.approx(0.2)] * 4
    clock[0] += LISTING_MAX_AGE
    pacer()
    assert service.calls == 4  # the listing grew old
    # 70 - 50 (other runs' starts unseen within a listing's age) - 2 seen: from the 18th own start, list every time
    service.jobs = [("IN_PROGRESS", datetime.now(UTC) - timedelta(hours=1))] * 2
    clock[0] += LISTING_MAX_AGE
    pacer()
    calls = service.calls
    for _ in range(17):
        pacer()
    assert service.calls == calls
    pacer()
    assert service.calls == calls + 2
