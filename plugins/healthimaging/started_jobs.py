"""
Find the import job that another task of the same run started for one map index, while that task still runs.

The import pipeline's ``start_imports`` starts every chunk's job at the service's pace and pushes the XCom
``jobs`` (one job id per chunk, None until started) after every start. Each chunk's wait reads its own entry, so it
begins as soon as its job exists instead of after the last start. The same code runs on a worker (the sensor) and
in the triggerer (its trigger): both reach XCom and task states through the Task SDK.

When to trust the XCom:

- Only while the starting task runs or after it ended. Before its current try begins (scheduled, queued, up for
  retry) the XCom is the previous try's.
- Only when its ``jobs_clear_number`` XCom (pushed first by every try: the run's ``clear_number``) is at least the
  waiting task's: Airflow deletes a try's XCom only after the next try is already ``running`` and has parsed its
  DAG file, so for that moment a cleared run still shows the previous clear's jobs.
- An entry that names a job the waiting task saw FAILED (``replaces``) counts as not started yet while the
  starting task may still replace it (a retry or a clear walks past a FAILED job to a new one).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

#: XCom key of the starting task: a list of job ids (None for a chunk not started), index = map index.
JOBS_KEY = "jobs"
#: XCom key of the starting task: the run's ``clear_number`` when its try began (pushed before ``jobs``).
CLEAR_NUMBER_KEY = "jobs_clear_number"
#: States of the starting task in which its ``jobs`` XCom is its current try's.
READABLE_STATES = frozenset({"running", "success", "failed"})
#: States in which the starting task will start nothing more.
ENDED_STATES = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})

Decision = Literal["found", "waiting", "queued", "pending", "not_started"]


@dataclass(frozen=True)
class StartedBy:
    """The task that starts the job of a waiting task, and the waiting task's place in its ``jobs`` XCom.

    :param dag_id: the DAG
    :param run_id: the run (the waiting task's own)
    :param task_id: the starting task (not mapped)
    :param index: the waiting task's index in the ``jobs`` list (its map index)
    :param clear_number: the run's ``clear_number`` when the waiting task ran; older XCom is a previous clear's
    :param replaces: a job the waiting task saw FAILED: wait for the entry to name another one
    """

    dag_id: str
    run_id: str
    task_id: str
    index: int
    clear_number: int = 0
    replaces: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The trigger-kwargs form."""
        return asdict(self)


def find_started_job(source: StartedBy, max_age: float = 0.0) -> tuple[Decision, str | None]:
    """Look up the job the starting task started for ``source.index``.

    :param source: where to look
    :param max_age: reuse a reading of the starting task at most this many seconds old (the triggerer's waits of
        one run share one reading instead of asking the API server three calls each)
    :return: ``("found", job_id)``; ``("waiting", None)`` while the starting task runs and has not started it;
        ``("queued", None)`` while an executor holds its next try (it runs soon); ``("pending", None)`` while it
        waits to be scheduled or retried; ``("not_started", None)`` when it ended without starting it. Before
        its try runs (queued, pending) its XCom may be the previous try's, so it is not read
    """
    state, clear_number, jobs = _reading(source, max_age)
    if state in READABLE_STATES:
        fresh = clear_number is not None and clear_number >= source.clear_number
        job = (
            jobs[source.index] if fresh and isinstance(jobs, list) and 0 <= source.index < len(jobs) else None
        )
        if job and str(job) != source.replaces:
            return "found", str(job)
        return ("waiting", None) if state == "running" else ("not_started", None)
    if state in ENDED_STATES:
        return "not_started", None
    return ("queued", None) if state == "queued" else ("pending", None)


def _reading(source: StartedBy, max_age: float) -> tuple[str | None, int | None, Any]:
    """The starting task's state, clear number and jobs: a shared reading at most ``max_age`` old, or a new one."""
    key = (source.dag_id, source.run_id, source.task_id)
    now = time.monotonic()
    cached = _readings.get(key)
    if cached is not None and max_age > 0 and now - cached[0] <= max_age:
        return cached[1]
    reading = _read_start_task(source)
    if max_age > 0:
        for stale in [k for k, (at, _) in _readings.items() if now - at > max_age]:
            _readings.pop(stale, None)
        _readings[key] = (now, reading)
    return reading


def _read_start_task(source: StartedBy) -> tuple[str | None, int | None, Any]:
    """The starting task's state and, when it is readable, its clear number and ``jobs`` XCom (in that order)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
    from airflow.sdk.execution_time.xcom import XCom

    states = RuntimeTaskInstance.get_task_states(
        dag_id=source.dag_id, run_ids=[source.run_id], task_ids=[source.task_id]
    )
    state = (states.get(source.run_id) or {}).get(source.task_id)
    state = str(state) if state else None
    if state not in READABLE_STATES:
        return state, None, None
    where = {"dag_id": source.dag_id, "task_id": source.task_id, "run_id": source.run_id, "map_index": -1}
    clear_number = XCom.get_one(key=CLEAR_NUMBER_KEY, **where)
    jobs = XCom.get_one(key=JOBS_KEY, **where)
    return state, (int(clear_number) if clear_number is not None else None), jobs


#: (dag_id, run_id, task_id) -> (monotonic time, reading): readings shared by the waits of one process.
_readings: dict[tuple[str, str, str], tuple[float, tuple[str | None, int | None, Any]]] = {}
