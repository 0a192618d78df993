"""``start_imports``: every chunk started in plan order through StartDICOMImportOperator.start_job; a chunk that
cannot be started is left out and named, a transient error fails the try (the retry re-attaches)."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from healthimaging import import_tasks

DATASTORE = "d" * 32


def _chunk(n: int) -> dict[str, Any]:
    return {
        "datastore_id": DATASTORE,
        "data_access_role_arn": "arn:aws:iam::123456789012:role/r",
        "input_s3_uri": f"s3://in/day/P{n}/",
        "output_s3_uri": "s3://out/",
        "content_digest": f"{n:064x}",
        "job_name": None,
        "client_token": None,
        "max_failed_files": None,
        "max_results": 50,
        "include_phi": False,
        "phi_allow_tags": [],
        "plan_index": 0,
        "chunk_id": f"000{n}-abc",
    }


class _Context(dict):
    pass


def _run(
    outcomes: dict[int, Any], pushed: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pushed = {} if pushed is None else pushed
    ti = mock.Mock()
    ti.xcom_push.side_effect = lambda key, value: pushed.__setitem__(key, value)
    context = _Context(ti=ti, task_state_store=None)
    calls: list[str] = []

    def start_job(self: Any, ctx: Any, *, state_key: str, before_start: Any) -> tuple[str, str]:
        n = int(self.content_digest, 16)
        calls.append(state_key)
        outcome = outcomes[n]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, "SUBMITTED"

    with (
        mock.patch("airflow.sdk.get_current_context", return_value=context),
        mock.patch.object(import_tasks.StartDICOMImportOperator, "start_job", start_job),
        mock.patch("healthimaging.pacing.StartPacer"),
        mock.patch("healthimaging.hooks.HealthImagingHook"),
    ):
        started = import_tasks.start_imports.function([_chunk(n) for n in sorted(outcomes)])
    assert calls == [f"job:{n:064x}" for n in sorted(outcomes)][: len(calls)]
    return started, pushed


def test_every_chunk_started_in_order_and_a_refused_one_named() -> None:
    started, pushed = _run({1: "j1", 2: AirflowFailException("ConflictException: no"), 3: "j3"})
    assert [s["job_id"] for s in started] == ["j1", "j3"]
    assert set(started[0]) == {"datastore_id", "job_id", "chunk_id"}  # the run's one search has the settings
    assert pushed["jobs"] == ["j1", None, "j3"]
    # the run's clear number comes first: waits tell this try's jobs from a cleared run's (started_jobs)
    assert next(iter(pushed)) == "jobs_clear_number"
    assert pushed["start_failures"] == [
        {"chunk_id": "0002-abc", "plan_index": 0, "message": "ConflictException: no"}
    ]


def test_a_transient_error_fails_the_try_and_the_jobs_started_are_kept() -> None:
    pushed: dict[str, Any] = {}
    with pytest.raises(AirflowException, match="Throttling"):
        _run({1: "j1", 2: AirflowException("ThrottlingException after retries"), 3: "j3"}, pushed)
    # The report of a run whose start_imports failed for good still finds the job started before the error.
    assert pushed["jobs"] == ["j1", None, None]
