"""The planner-driven import pipeline through ``dag.test()`` on the local endpoint (real HTTP, real DICOM).

A prefix over ``[healthimaging] max_files_per_job`` becomes several jobs, each object imported once and accounted
for in the report; an empty prefix and a prefix that needs staging without a staging prefix fail before any job.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from dag_test_helpers import IMPORT_DAG_ID, load_dag_module, run_xcoms, task_states
from test_healthimaging_import_dicom_and_search import BUCKET, prepare_endpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _jobs(mi: Any, datastore_id: str) -> list[dict[str, Any]]:
    return list(mi.list_dicom_import_jobs(datastoreId=datastore_id, maxResults=50)["jobSummaries"])


def _success_keys(s3: Any, mi: Any, datastore_id: str, job_id: str) -> list[str]:
    folder = mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]["outputS3Uri"]
    key = folder.split("/", 3)[3] + "SUCCESS/success.ndjson"
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(line)["inputFile"] for line in body.splitlines() if line.strip()]


def test_a_prefix_over_the_file_quota_is_imported_by_several_jobs_once(
    airflow_db: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from healthimaging_local.sample_data import synthetic_study_files, upload

    datastore_id, s3, mi = prepare_endpoint(endpoint, monkeypatch, [])
    # Three patients x 2 series x 2 instances = 12 files in patient folders; a job takes 5 here.
    upload(synthetic_study_files(3, 1, 2, 2, seed=41), s3, BUCKET, "day/")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="day/")["Contents"])
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_FILES_PER_JOB", "5")
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__START_RATE", "10")
    dag = load_dag_module(IMPORT_DAG_ID).dag
    run = dag.test(logical_date=None, run_conf={"input_s3_uri": f"s3://{BUCKET}/day/"})

    assert run.state == "success", task_states(run)
    xcoms = run_xcoms(IMPORT_DAG_ID, run.run_id)
    chunks = xcoms[("plan_imports", -1, "return_value")]
    assert len(chunks) >= 3
    started = xcoms[("start_imports", -1, "return_value")]
    jobs = _jobs(mi, datastore_id)
    assert sorted(j["job_id"] for j in started) == sorted(j["jobId"] for j in jobs)
    assert len(jobs) == len(chunks)
    imported = [k for job in jobs for k in _success_keys(s3, mi, datastore_id, job["jobId"])]
    assert sorted(k.split("/", 3)[-1] if k.startswith("s3://") else k for k in imported) == keys
    (report,) = xcoms[("import_report", -1, "return_value")]
    assert report["totals"]["objects"] == len(keys)
    assert report["totals"]["imported"] == len(keys)
    assert report["problems"] == []
    body = s3.get_object(Bucket=BUCKET, Key=report["report_s3_uri"].split("/", 3)[3])["Body"].read()
    document = json.loads(gzip.decompress(body))
    assert document["totals"]["imported"] == len(keys)
    # The summary in XCom names no object key (keys can name patients).
    assert not any(key in json.dumps(report) for key in keys)

    # The same objects again, in another run: every chunk re-attaches to its job, nothing is imported twice.
    again = dag.test(logical_date=None, run_conf={"input_s3_uri": f"s3://{BUCKET}/day/"})
    assert again.state == "success", task_states(again)
    assert len(_jobs(mi, datastore_id)) == len(chunks)


def test_an_empty_prefix_fails_before_any_job(
    airflow_db: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    datastore_id, _, mi = prepare_endpoint(endpoint, monkeypatch, [])
    dag = load_dag_module(IMPORT_DAG_ID).dag
    run = dag.test(logical_date=None, run_conf={"input_s3_uri": f"s3://{BUCKET}/nothing-here/"})
    assert run.state == "failed"
    states = task_states(run)
    assert states[("plan_imports", -1)] == "failed"
    assert _jobs(mi, datastore_id) == []


def test_loose_files_beyond_one_job_need_a_staging_prefix(
    airflow_db: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from healthimaging_local.sample_data import synthetic_study_files, upload

    datastore_id, s3, mi = prepare_endpoint(endpoint, monkeypatch, [])
    # Six loose files in one folder, beside a sub-folder; a job takes 5.
    flat = [
        (f"IMG{n:04d}.dcm", data) for n, (_, data) in enumerate(synthetic_study_files(1, 1, 2, 3, seed=43))
    ]
    upload(flat, s3, BUCKET, "loose/")
    upload(synthetic_study_files(1, 1, 1, 2, seed=44), s3, BUCKET, "loose/sub/")
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_FILES_PER_JOB", "5")
    dag = load_dag_module(IMPORT_DAG_ID).dag
    run = dag.test(logical_date=None, run_conf={"input_s3_uri": f"s3://{BUCKET}/loose/"})
    assert run.state == "failed"
    assert task_states(run)[("plan_imports", -1)] == "failed"
    assert _jobs(mi, datastore_id) == []


def test_an_import_over_max_failed_files_fails_its_wait_and_is_not_announced(
    airflow_db: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's one search finds every COMPLETED job's image sets; the asset event names only the imports whose
    wait succeeded, and the run fails."""
    from datetime import datetime

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    datastore_id, s3, mi = prepare_endpoint(endpoint, monkeypatch, ["good/", "bad/"])
    s3.put_object(Bucket=BUCKET, Key="bad/not-dicom.dcm", Body=b"this is not a DICOM file")
    dag = load_dag_module(IMPORT_DAG_ID).dag
    run = dag.test(
        logical_date=None,
        run_conf={"input_s3_uris": [f"s3://{BUCKET}/good/", f"s3://{BUCKET}/bad/"], "max_failed_files": 0},
    )

    assert run.state == "failed"
    states = task_states(run)
    assert states[("import_dicom.wait_for_import_job", 0)] == "success"
    assert states[("import_dicom.wait_for_import_job", 1)] == "failed"
    assert states[("search_image_sets", -1)] == "success"
    xcoms = run_xcoms(IMPORT_DAG_ID, run.run_id)
    good, bad = xcoms[("start_imports", -1, "jobs")]
    jobs = xcoms[("search_image_sets", -1, "importJobs")]
    assert {jobs[good]["jobStatus"], jobs[bad]["jobStatus"]} == {"COMPLETED"}
    assert datetime.fromisoformat(jobs[bad]["submittedAt"]) <= datetime.fromisoformat(jobs[bad]["endedAt"])
    by_job = xcoms[("search_image_sets", -1, "imageSetIdsByJob")]
    assert len(by_job[good]) == 2
    assert len(by_job[bad]) == 2  # its DICOM files imported; the bad file did not
    with create_session() as session:
        (event,) = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run.run_id)).all()
    assert event.extra["jobIds"] == [good]
    assert sorted(event.extra["imageSetIds"]) == sorted(by_job[good])
    assert states[("import_report", -1)] == "failed"
