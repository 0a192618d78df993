"""Benchmark DAG of ``benchmarks/triggerer_scale.py``: one deferrable sensor per job id of the run's conf.

Parse-time settings (environment): ``BENCH_SCALE_POLL`` (sensor ``poke_interval``, default 30 s as the sensor's
own default) and ``BENCH_SCALE_JITTER`` (``first_poke_jitter``, default 0).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from healthimaging.sensors import DICOMImportJobSensor

POLL = float(os.environ.get("BENCH_SCALE_POLL", "30"))
JITTER = float(os.environ.get("BENCH_SCALE_JITTER", "0"))

with DAG(
    dag_id="bench_triggerer_scale",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=1000,
    default_args={"retries": 0},
    params={"datastore_id": "", "job_ids": []},
    tags=["benchmark"],
) as dag:

    @task
    def job_ids(params: dict | None = None) -> list[str]:
        """The run's job ids, to map the sensor over."""
        assert params is not None
        return list(params["job_ids"])

    DICOMImportJobSensor.partial(
        task_id="wait",
        datastore_id="{{ params.datastore_id }}",
        deferrable=True,
        poke_interval=POLL,
        first_poke_jitter=JITTER,
        timeout=6 * 3600,
        execution_timeout=timedelta(hours=6),
        max_active_tis_per_dag=1000,
    ).expand(job_id=job_ids())
