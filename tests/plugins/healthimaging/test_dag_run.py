"""The three classes in a real Airflow task runner (``dag.test()`` in a separate process) against the local endpoint."""

from __future__ import annotations

import json
from unittest import mock

import pytest

DAG_FILE = """
from __future__ import annotations

import os

from airflow.sdk import DAG
from healthimaging.operators import SearchImageSetsOperator, StartDICOMImportOperator
from healthimaging.sensors import DICOMImportJobSensor

DATASTORE_ID = os.environ["TEST_DATASTORE_ID"]

with DAG("healthimaging_classes", schedule=None):
    start = StartDICOMImportOperator(
        task_id="start",
        datastore_id=DATASTORE_ID,
        data_access_role_arn="arn:aws:iam::123456789012:role/ImportRole",
        input_s3_uri="s3://input/study/",
        output_s3_uri="s3://output/results/",
        deferrable=True,
        waiter_delay=1,
        waiter_max_attempts=30,
    )
    wait = DICOMImportJobSensor(
        task_id="wait",
        datastore_id=DATASTORE_ID,
        job_id="{{ ti.xcom_pull(task_ids='start') }}",
        mode="reschedule",
        deferrable=False,
        poke_interval=1,
        timeout=120,
    )
    search = SearchImageSetsOperator(
        task_id="search",
        datastore_id=DATASTORE_ID,
        import_job_id="{{ ti.xcom_pull(task_ids='start') }}",
        phi_allow_tags="{{ ['DICOMSeriesInstanceUID'] | tojson }}",
    )
    start >> wait >> search
"""

RUNNER = """
import json, sys
from airflow.utils import db
db.resetdb()
from airflow.dag_processing.dagbag import DagBag
from airflow.models.task_state_store import TaskStateStoreModel
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

run = DagBag().get_dag("healthimaging_classes").test()
with create_session() as session:
    rows = session.scalars(select(XComModel).where(XComModel.dag_id == "healthimaging_classes"))
    xcoms = {f"{row.task_id}.{row.key}": row.value for row in rows}
    rows = session.scalars(select(TaskStateStoreModel).where(TaskStateStoreModel.dag_id == "healthimaging_classes"))
    state = {f"{row.task_id}.{row.key}": row.value for row in rows}
print("RESULT " + json.dumps({"state": str(run.state), "xcoms": xcoms, "task_state": state}, default=str))
"""


@pytest.mark.slow
def test_start_wait_search_in_dag_test(live, tmp_path, kit) -> None:
    series = live.upload("study", series_per_study=2)
    result, _ = kit.run_dag_test(tmp_path, DAG_FILE, RUNNER, TEST_DATASTORE_ID=live.datastore_id)
    xcoms = result["xcoms"]
    job_id = xcoms["start.return_value"]
    assert xcoms["start.jobStatus"] in {"SUBMITTED", "IN_PROGRESS"}  # as GetDICOMImportJob confirmed it
    assert not {"start.jobId", "start.submittedAt", "start.datastoreId"} & set(xcoms)  # the job id once
    # the job is kept in Airflow's own task_state_store, where a retry or a clear finds it
    stored = result["task_state"]["start.healthimaging_import_job"]
    assert (json.loads(stored) if isinstance(stored, str) else stored) == {
        "jobId": job_id,
        "clientToken": mock.ANY,
        "request": mock.ANY,
    }
    assert xcoms["start._link_HealthImagingImportJobLink"].endswith(
        f"/data-stores/{live.datastore_id}/import-jobs/{job_id}"
    )
    assert xcoms["wait.return_value"]["jobStatus"] == "COMPLETED"
    assert xcoms["wait.return_value"]["numberOfImportedFiles"] == 4
    summaries = xcoms["search.imageSetsMetadataSummaries"]
    assert {s["DICOMTags"]["DICOMSeriesInstanceUID"] for s in summaries} == series
    assert all(s["DICOMTags"]["DICOMPatientId"] == "" for s in summaries)  # Annex E: Z
    assert all(s["DICOMTags"]["DICOMStudyInstanceUID"].startswith("2.25.") for s in summaries)  # U
    assert "search.return_value" not in xcoms  # the summaries are stored once
    assert [job["jobId"] for job in live.jobs()] == [job_id]
