"""Benchmark DAGs of ``benchmarks/waiting_cost.py``: one DAG per way of waiting, one task per import job.

Linked into the DAGs folder once per mode as ``bench_wait_<mode>.py``. Parse-time settings (environment): ``BENCH_WAIT_N`` tasks per DAG, ``BENCH_WAIT_POLL`` seconds between polls.
Each run's conf names the data store, the job ids (task ``wait_<i>`` waits for ``job_ids[i]``) and, for the
hand-written PythonOperator, the endpoint URL.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from healthimaging.sensors import DICOMImportJobSensor

N = int(os.environ.get("BENCH_WAIT_N", "20"))
POLL = float(os.environ.get("BENCH_WAIT_POLL", "5"))
TIMEOUT = 3600.0


def wait_by_hand(datastore_id: str, job_id: str, endpoint_url: str, poll: float) -> str:
    """What a user writes without the sensor: GetDICOMImportJob every ``poll`` seconds until it ends.

    :param datastore_id: the data store
    :param job_id: the import job
    :param endpoint_url: the HealthImaging endpoint
    :param poll: seconds between calls
    """
    import boto3
    from botocore.config import Config

    hi = boto3.client(
        "medical-imaging",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(inject_host_prefix=False),
    )
    while True:
        status = hi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]["jobStatus"]
        if status == "COMPLETED":
            return status
        if status == "FAILED":
            raise RuntimeError(f"import job {job_id} failed")
        time.sleep(poll)


def _dag(mode: str) -> DAG:
    return DAG(
        dag_id=f"bench_wait_{mode}",
        schedule=None,
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        max_active_tasks=max(64, N),
        default_args={"retries": 0},
        params={"datastore_id": "", "job_ids": [], "endpoint_url": ""},
        tags=["benchmark"],
    )


def _sensor_kwargs(i: int) -> dict[str, Any]:
    return {
        "task_id": f"wait_{i:03d}",
        "datastore_id": "{{ params.datastore_id }}",
        "job_id": f"{{{{ params.job_ids[{i}] }}}}",
        "poke_interval": POLL,
        "timeout": TIMEOUT,
        "execution_timeout": timedelta(hours=1),
    }


def _build(mode: str) -> DAG:
    with _dag(mode) as dag:
        for i in range(N):
            if mode == "python":
                PythonOperator(
                    task_id=f"wait_{i:03d}",
                    python_callable=wait_by_hand,
                    op_kwargs={
                        "datastore_id": "{{ params.datastore_id }}",
                        "job_id": f"{{{{ params.job_ids[{i}] }}}}",
                        "endpoint_url": "{{ params.endpoint_url }}",
                        "poll": POLL,
                    },
                    execution_timeout=timedelta(hours=1),
                )
            else:
                DICOMImportJobSensor(**_sensor_kwargs(i), **SENSOR_MODES[mode])
    return dag


SENSOR_MODES: dict[str, dict[str, Any]] = {
    "deferrable": {"deferrable": True},
    "deferrable_resume": {"deferrable": True, "end_from_trigger": False},
    "poke": {"deferrable": False, "mode": "poke"},
    "reschedule": {"deferrable": False, "mode": "reschedule"},
}
MODES = (*SENSOR_MODES, "python")

# Linked into the DAGs folder as bench_wait_<mode>.py, this file builds only that mode's DAG, so a task start
# parses one DAG of N tasks, as it would in a user's deployment; under its own name it builds them all.
_own_mode = Path(__file__).stem.removeprefix("bench_wait_")
for _mode in [_own_mode] if _own_mode in MODES else MODES:
    globals()[f"{_mode}_dag"] = _build(_mode)
