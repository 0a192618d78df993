"""Persistence: everything (SQLite state and S3 objects) survives a restart; interrupted jobs finish."""

from __future__ import annotations

from pathlib import Path

from endpoint_helpers import (
    ROLE_ARN,
    create_active_datastore,
    read_json,
    run_import,
    synthetic,
    upload,
    wait_for,
    wait_job,
)

from healthimaging_local.s3 import backend
from healthimaging_local.server import LocalEndpoint
from healthimaging_local.store import normalize_study_date_time


def test_restart_keeps_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LocalEndpoint(state) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        datastore_id = create_active_datastore(mi)
        upload(s3, "persist-in", "a/", synthetic(series=2, instances=2))
        upload(s3, "persist-out", "", [])
        s3.put_object(Bucket="persist-in", Key="gone.txt", Body=b"x")
        s3.delete_object(Bucket="persist-in", Key="gone.txt")
        job = run_import(mi, datastore_id, "s3://persist-in/a/", "s3://persist-out/")
        before = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"]
    backend().reset()  # a new process starts with an empty moto
    with LocalEndpoint(state) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        assert (
            mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] == "ACTIVE"
        )
        assert mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job["jobId"])["jobProperties"] == job
        assert mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"] == before
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="persist-in")["Contents"]}
        assert len(keys) == 4
        assert "gone.txt" not in keys
        manifest = read_json(s3, job["outputS3Uri"] + "job-output-manifest.json")
        assert manifest["jobSummary"]["numberOfImportedFiles"] == 4
        s3.delete_object(
            Bucket="persist-out",
            Key=job["outputS3Uri"][len("s3://persist-out/") :] + "job-output-manifest.json",
        )
    backend().reset()
    with LocalEndpoint(state) as endpoint:
        listed = endpoint.client("s3").list_objects_v2(Bucket="persist-out")["Contents"]
        assert not any(o["Key"].endswith("job-output-manifest.json") for o in listed)


def test_interrupted_job_finishes_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LocalEndpoint(state, import_seconds=60) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        datastore_id = create_active_datastore(mi)
        upload(s3, "crash-in", "", synthetic(instances=2))
        upload(s3, "crash-out", "", [])
        job_id = mi.start_dicom_import_job(
            datastoreId=datastore_id,
            dataAccessRoleArn=ROLE_ARN,
            inputS3Uri="s3://crash-in/",
            outputS3Uri="s3://crash-out/",
        )["jobId"]
        wait_for(
            lambda: (
                mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]["jobStatus"]
                == "IN_PROGRESS"
            )
        )
    backend().reset()
    with LocalEndpoint(state) as endpoint:
        mi = endpoint.client("medical-imaging")
        job = wait_job(mi, datastore_id, job_id)
        assert job["jobStatus"] == "COMPLETED"
        assert len(mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"]) == 1


def test_study_date_time_normalisation() -> None:
    assert normalize_study_date_time("20230101", None) == "20230101000000.000000"
    assert normalize_study_date_time("20230101", "1015") == "20230101101500.000000"
    assert normalize_study_date_time("20230101", "101500.12") == "20230101101500.120000"
    assert normalize_study_date_time(None, "101500") == ""
