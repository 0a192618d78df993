"""A wait that begins while its job is still to be started: the XCom lookup, the sensor's answers, the trigger's wait.

The real path (a deployment whose waits run beside ``start_imports``) is in
``tests/deployment/test_volume_and_recovery.py``; ``dag.test()`` runs it in ``tests/dags/test_import_pipeline.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException, TaskDeferred

from healthimaging import started_jobs
from healthimaging.sensors import DICOMImportJobSensor
from healthimaging.started_jobs import StartedBy, find_started_job
from healthimaging.triggers import DICOMImportJobTrigger

SOURCE = StartedBy("dag", "run", "start_imports", 1)
JOB = "fedcba9876543210fedcba9876543210"


def _lookup(
    state: str | None, jobs: Any, clear_number: int | None = 0, source: StartedBy = SOURCE
) -> tuple[str, str | None]:
    values = {"jobs_clear_number": clear_number, "jobs": jobs}
    read: list[str] = []

    def get_one(**kwargs: Any) -> Any:
        assert {k: v for k, v in kwargs.items() if k != "key"} == {
            "dag_id": "dag",
            "task_id": "start_imports",
            "run_id": "run",
            "map_index": -1,
        }
        read.append(kwargs["key"])
        return values[kwargs["key"]]

    with (
        mock.patch(
            "airflow.sdk.execution_time.task_runner.RuntimeTaskInstance.get_task_states",
            return_value={"run": {"start_imports": state}} if state else {"run": {}},
        ) as states,
        mock.patch("airflow.sdk.execution_time.xcom.XCom.get_one", side_effect=get_one),
    ):
        decision = find_started_job(source)
    states.assert_called_once_with(dag_id="dag", run_ids=["run"], task_ids=["start_imports"])
    # The clear number is read before the jobs: a fresh number means Airflow already removed the stale jobs.
    assert read in ([], ["jobs_clear_number", "jobs"])
    return decision


@pytest.mark.parametrize(
    ("state", "jobs", "expected"),
    [
        ("running", ["a", JOB], ("found", JOB)),
        ("running", ["a", None], ("waiting", None)),
        ("running", ["a"], ("waiting", None)),  # the list grows with the starts
        ("running", None, ("waiting", None)),  # nothing pushed yet
        ("success", ["a", JOB], ("found", JOB)),
        ("success", ["a", None], ("not_started", None)),  # refused: start_failures names it
        ("failed", ["a", JOB], ("found", JOB)),  # started before the task failed: still its job
        ("failed", ["a"], ("not_started", None)),
        ("upstream_failed", None, ("not_started", None)),
        ("skipped", None, ("not_started", None)),
        # Not begun its current try: the XCom may be a cleared try's (a FAILED job it will replace).
        ("queued", ["a", JOB], ("queued", None)),
        ("scheduled", ["a", JOB], ("pending", None)),
        ("up_for_retry", ["a", JOB], ("pending", None)),
        (None, None, ("pending", None)),
    ],
)
def test_the_lookup_trusts_the_xcom_only_of_a_running_or_ended_try(state, jobs, expected) -> None:
    assert _lookup(state, jobs) == expected


def test_jobs_of_an_earlier_clear_are_not_this_runs() -> None:
    """Airflow removes a try's XCom only after the next try is running: the clear number tells them apart."""
    cleared_twice = StartedBy("dag", "run", "start_imports", 1, clear_number=2)
    assert _lookup("running", ["a", JOB], clear_number=1, source=cleared_twice) == ("waiting", None)
    assert _lookup("running", ["a", JOB], clear_number=None, source=cleared_twice) == ("waiting", None)
    assert _lookup("running", ["a", JOB], clear_number=2, source=cleared_twice) == ("found", JOB)
    # The start task cleared (alone) after the wait began: a later number is this run's too.
    assert _lookup("running", ["a", JOB], clear_number=3, source=cleared_twice) == ("found", JOB)


def test_a_failed_job_counts_as_not_started_while_it_may_be_replaced() -> None:
    after_failure = StartedBy("dag", "run", "start_imports", 1, replaces=JOB)
    assert _lookup("running", ["a", JOB], source=after_failure) == ("waiting", None)
    assert _lookup("running", ["a", "b" * 32], source=after_failure) == ("found", "b" * 32)
    assert _lookup("success", ["a", JOB], source=after_failure) == ("not_started", None)


def _sensor(kit, **kwargs: Any) -> DICOMImportJobSensor:
    args: dict[str, Any] = {
        "task_id": "wait",
        "datastore_id": kit.DATASTORE_ID,
        "started_by": "start_imports",
        "input_s3_uri": "s3://bucket/day/p1/",
        "poke_interval": 5,
        "deferrable": True,
    }
    args.update(kwargs)
    return DICOMImportJobSensor(**args)


def test_the_sensor_needs_a_job_id_or_the_task_that_starts_it(kit) -> None:
    with pytest.raises(ValueError, match="started_by"):
        DICOMImportJobSensor(task_id="wait", datastore_id=kit.DATASTORE_ID)


def test_a_job_not_started_yet_is_waited_for_in_the_triggerer(kit) -> None:
    context = kit.make_context(dag_id="dag", run_id="run", task_id="import_dicom.wait", map_index=1)
    context["dag_run"].clear_number = 3
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=("waiting", None)) as lookup,
        pytest.raises(TaskDeferred) as deferred,
    ):
        _sensor(kit).execute(context)
    lookup.assert_called_once_with(StartedBy("dag", "run", "start_imports", 1, clear_number=3))
    trigger = deferred.value.trigger
    assert isinstance(trigger, DICOMImportJobTrigger)
    assert trigger.job_id is None
    assert trigger.serialize()[1]["started_by"] == {**SOURCE.as_dict(), "clear_number": 3}


def test_a_job_already_started_is_waited_for_in_the_triggerer_at_once(stubber, kit) -> None:
    """No first look at the job from the worker (the stubber has no answer for one): the trigger polls it."""
    context = kit.make_context(dag_id="dag", run_id="run", map_index=1)
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=("found", kit.JOB_ID)),
        pytest.raises(TaskDeferred) as deferred,
    ):
        _sensor(kit).execute(context)
    assert deferred.value.trigger.job_id == kit.JOB_ID
    assert deferred.value.trigger.serialize()[1]["started_by"] is None


@pytest.mark.parametrize("decision", ["waiting", "queued"])
def test_a_running_or_queued_start_task_is_waited_for_in_the_triggerer(kit, decision: str) -> None:
    context = kit.make_context(dag_id="dag", run_id="run", map_index=1)
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=(decision, None)),
        pytest.raises(TaskDeferred),
    ):
        _sensor(kit).execute(context)


def test_a_start_task_not_running_yet_reschedules_the_wait_backing_off(kit) -> None:
    from datetime import UTC, datetime, timedelta

    context = kit.make_context(dag_id="dag", run_id="run", map_index=1)
    with mock.patch.object(started_jobs, "find_started_job", return_value=("pending", None)):
        before = datetime.now(UTC)
        with pytest.raises(AirflowRescheduleException) as first:
            _sensor(kit).execute(context)
        assert first.value.reschedule_date - before < timedelta(seconds=6)  # poke_interval 5 s
        context["ti"].get_first_reschedule_date.return_value = before - timedelta(minutes=20)
        with pytest.raises(AirflowRescheduleException) as later:
            _sensor(kit).execute(context)
        assert timedelta(minutes=4) < later.value.reschedule_date - before <= timedelta(minutes=5, seconds=1)


def test_an_unmapped_sensor_cannot_take_its_job_from_a_list(kit) -> None:
    with pytest.raises(ValueError, match="mapped"):
        _sensor(kit).execute(kit.make_context(map_index=-1))


def test_a_chunk_its_start_task_did_not_start_fails_naming_the_prefix(kit) -> None:
    context = kit.make_context(dag_id="dag", run_id="run", map_index=1)
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=("not_started", None)),
        pytest.raises(AirflowFailException, match=r"start_imports ended without .*s3://bucket/day/p1/"),
    ):
        _sensor(kit).execute(context)


def test_the_triggers_not_started_event_fails_the_wait(kit) -> None:
    with pytest.raises(AirflowFailException, match="ended without starting"):
        _sensor(kit).execute_complete(
            kit.make_context(map_index=1), {"status": "not_started", "message": "x"}
        )


def _failed_job(stubber, kit) -> dict[str, Any]:
    """The job is FAILED; the context of map index 1 of a run."""
    stubber.add_response(
        "get_dicom_import_job",
        {"jobProperties": kit.job_properties("FAILED")},
        {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID},
    )
    return kit.make_context(dag_id="dag", run_id="run", map_index=1)


def test_a_failed_job_is_followed_by_its_replacement(stubber, kit) -> None:
    """A retry or clear of the start task walks past a FAILED job: the wait follows the new one."""
    context = _failed_job(stubber, kit)
    sensor = _sensor(kit)
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=("found", "b" * 32)) as lookup,
        pytest.raises(TaskDeferred) as deferred,
    ):
        sensor.execute_complete(context, {"status": "error", "message": "failed", "job_id": kit.JOB_ID})
    assert lookup.call_args.args[0].replaces == kit.JOB_ID
    assert deferred.value.trigger.job_id == "b" * 32


def test_a_failed_job_waits_while_the_start_task_may_replace_it(stubber, kit) -> None:
    context = _failed_job(stubber, kit)
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=("waiting", None)),
        pytest.raises(TaskDeferred) as deferred,
    ):
        _sensor(kit).execute_complete(context, {"status": "error", "message": "failed", "job_id": kit.JOB_ID})
    assert deferred.value.trigger.job_id is None
    assert deferred.value.trigger.serialize()[1]["started_by"]["replaces"] == kit.JOB_ID


def test_a_failed_job_the_start_task_will_not_replace_fails_the_wait(stubber, s3, kit) -> None:
    context = _failed_job(stubber, kit)
    with (
        mock.patch.object(started_jobs, "find_started_job", return_value=("not_started", None)),
        pytest.raises(AirflowFailException, match="FAILED"),
    ):
        _sensor(kit).execute_complete(context, {"status": "error", "message": "failed", "job_id": kit.JOB_ID})


def test_a_resumed_wait_takes_the_job_id_from_the_event(stubber, s3, kit) -> None:
    stubber.add_response(
        "get_dicom_import_job",
        {"jobProperties": kit.job_properties("COMPLETED")},
        {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID},
    )
    kit.put_job_outputs(s3, kit.manifest(scanned=2, imported=2, image_set_ids=("a" * 32,)))
    sensor = _sensor(kit)
    sensor.manifest_delay = 0
    result = sensor.execute_complete(
        kit.make_context(map_index=1), {"status": "success", "job_id": kit.JOB_ID}
    )
    assert result["jobId"] == kit.JOB_ID


def _trigger(**kwargs: Any) -> DICOMImportJobTrigger:
    args: dict[str, Any] = {
        "datastore_id": "0123456789abcdef0123456789abcdef",
        "started_by": SOURCE.as_dict(),
        "waiter_delay": 0,
        "poll_jitter": 0,
        "waiter_max_attempts": 3,
    }
    args.update(kwargs)
    return DICOMImportJobTrigger(**args)


def test_the_trigger_needs_a_job_id_or_its_start_task() -> None:
    with pytest.raises(ValueError, match="started_by"):
        DICOMImportJobTrigger(datastore_id="d" * 32)


def test_the_trigger_waits_for_the_job_then_polls_it() -> None:
    answers = iter([("waiting", None), ("waiting", None), ("found", JOB)])
    trigger = _trigger()
    with mock.patch.object(
        started_jobs, "find_started_job", side_effect=lambda source, max_age=0: next(answers)
    ):
        assert asyncio.run(trigger._wait_for_started_job()) is None
    assert trigger.job_id == JOB
    assert trigger.waiter_args == {"datastoreId": "0123456789abcdef0123456789abcdef", "jobId": JOB}
    assert trigger.return_value == JOB
    assert JOB in trigger.failure_message


def test_the_trigger_waits_through_a_queued_or_retrying_start_and_ends_when_it_ended() -> None:
    answers = iter([("queued", None), ("pending", None), ("waiting", None), ("not_started", None)])
    trigger = _trigger()
    with mock.patch.object(started_jobs, "find_started_job", side_effect=lambda s, max_age=0: next(answers)):
        event = asyncio.run(trigger._wait_for_started_job())
    assert event is not None
    assert event.payload["status"] == "not_started"
    assert trigger.job_id is None


def test_the_trigger_gives_up_on_a_lasting_fault(monkeypatch) -> None:
    from healthimaging import triggers

    monkeypatch.setattr(triggers, "START_READING_MAX_ERRORS", 3)
    trigger = _trigger()
    with (
        mock.patch.object(started_jobs, "find_started_job", side_effect=TypeError("a bug, not a hiccup")),
        pytest.raises(TypeError),
    ):
        asyncio.run(trigger._wait_for_started_job())


def test_the_trigger_keeps_waiting_through_an_unreadable_xcom() -> None:
    answers: list[Any] = [RuntimeError("api server restarting"), ("found", JOB)]

    def lookup(source: StartedBy, max_age: float = 0) -> tuple[str, str | None]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    trigger = _trigger()
    with mock.patch.object(started_jobs, "find_started_job", side_effect=lookup):
        assert asyncio.run(trigger._wait_for_started_job()) is None
    assert trigger.job_id == JOB


def test_waits_of_one_process_share_a_fresh_reading(monkeypatch) -> None:
    monkeypatch.setattr(started_jobs, "_readings", {})
    reads: list[StartedBy] = []

    def read(source: StartedBy) -> tuple[str, int, list[str | None]]:
        reads.append(source)
        return "running", 0, [JOB, None]

    monkeypatch.setattr(started_jobs, "_read_start_task", read)
    first = find_started_job(StartedBy("dag", "run", "start_imports", 0), max_age=60)
    second = find_started_job(StartedBy("dag", "run", "start_imports", 1), max_age=60)
    assert (first, second) == (("found", JOB), ("waiting", None))
    assert len(reads) == 1
    find_started_job(StartedBy("dag", "run", "start_imports", 1))  # no max_age: always a new reading
    find_started_job(StartedBy("dag", "other-run", "start_imports", 1), max_age=60)  # another run's own
    assert len(reads) == 3
