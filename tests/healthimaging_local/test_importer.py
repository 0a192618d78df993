"""Import jobs through real HTTP: outputs, grouping, versions, conflicts, idempotency, quotas, failures."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
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

from healthimaging_local.sample_data import pydicom_bundled_files
from healthimaging_local.server import LocalEndpoint


@pytest.fixture
def clients(endpoint: LocalEndpoint) -> tuple[Any, Any, str]:
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    upload(s3, "results", "", [])
    return mi, s3, create_active_datastore(mi)


def with_patient_name(data: bytes, name: str) -> bytes:
    ds = pydicom.dcmread(BytesIO(data))
    ds.PatientName = name
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_real_files_bad_files_and_manifest(clients: tuple[Any, Any, str]) -> None:
    mi, s3, datastore_id = clients
    files = list(pydicom_bundled_files(include_dicomdir=True))[:40]
    files += [("notes/readme.txt", b"not dicom"), ("broken.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00")]
    upload(s3, "real-files", "in/", files)
    job = run_import(mi, datastore_id, "s3://real-files/in/", "s3://results/out/")
    assert job["jobStatus"] == "COMPLETED"
    summary = read_json(s3, job["outputS3Uri"] + "job-output-manifest.json")["jobSummary"]
    successes = read_json(s3, job["outputS3Uri"] + "SUCCESS/success.ndjson")
    failures = read_json(s3, job["outputS3Uri"] + "FAILURE/failure.ndjson")
    assert summary["numberOfScannedFiles"] == len(files)
    assert summary["numberOfScannedFiles"] == (
        summary["numberOfImportedFiles"]
        + summary["numberOfFilesWithCustomerError"]
        + summary["numberOfFilesWithServerError"]
    )
    assert len(successes) == summary["numberOfImportedFiles"] > 0
    failed = {f["inputFile"] for f in failures}
    assert {"in/notes/readme.txt", "in/broken.dcm"} <= failed
    assert all(f["exception"]["exceptionType"] == "ValidationException" for f in failures)
    assert summary["numberOfGeneratedImageSets"] == len(summary["imageSetsSummary"])
    assert {s["importResponse"]["imageSetId"] for s in successes} == {
        s["imageSetId"] for s in summary["imageSetsSummary"]
    }
    assert summary["successOutputS3Uri"] == job["outputS3Uri"] + "SUCCESS/"


def test_one_primary_per_series_and_reimport_bumps_version(clients: tuple[Any, Any, str]) -> None:
    mi, s3, datastore_id = clients
    files = synthetic(series=2, instances=3)
    upload(s3, "series-in", "", files)
    first = run_import(mi, datastore_id, "s3://series-in/", "s3://results/")
    sets = read_json(s3, first["outputS3Uri"] + "job-output-manifest.json")["jobSummary"]["imageSetsSummary"]
    assert sorted(s["numberOfMatchedSOPInstances"] for s in sets) == [3, 3]
    assert all(s["isPrimary"] and s["imageSetVersion"] == 1 for s in sets)
    second = run_import(mi, datastore_id, "s3://series-in/", "s3://results/")
    again = read_json(s3, second["outputS3Uri"] + "job-output-manifest.json")["jobSummary"][
        "imageSetsSummary"
    ]
    assert {s["imageSetId"] for s in again} == {s["imageSetId"] for s in sets}
    assert all(s["imageSetVersion"] == 2 for s in again)
    image_set_id = sets[0]["imageSetId"]
    versions = mi.list_image_set_versions(datastoreId=datastore_id, imageSetId=image_set_id)[
        "imageSetPropertiesList"
    ]
    assert [v["versionId"] for v in versions] == ["2", "1"]
    assert mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)["versionId"] == "2"
    assert (
        mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id, versionId="1")["versionId"] == "1"
    )
    assert len(mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"]) == 2


def test_conflicting_patient_makes_a_non_primary_image_set(clients: tuple[Any, Any, str]) -> None:
    mi, s3, datastore_id = clients
    (name, data), *_ = synthetic(instances=1)
    upload(s3, "conflict-a", "", [(name, data)])
    first = run_import(mi, datastore_id, "s3://conflict-a/", "s3://results/")
    upload(s3, "conflict-b", "", [(name, with_patient_name(data, "Other^Person"))])
    second = run_import(mi, datastore_id, "s3://conflict-b/", "s3://results/")
    (primary,) = read_json(s3, first["outputS3Uri"] + "job-output-manifest.json")["jobSummary"][
        "imageSetsSummary"
    ]
    (other,) = read_json(s3, second["outputS3Uri"] + "job-output-manifest.json")["jobSummary"][
        "imageSetsSummary"
    ]
    assert primary["isPrimary"]
    assert not other["isPrimary"]
    assert other["imageSetId"] != primary["imageSetId"]
    success = read_json(s3, second["outputS3Uri"] + "SUCCESS/success.ndjson")
    assert success[0]["importResponse"] == {"imageSetId": other["imageSetId"], "isPrimary": False}
    assert mi.get_image_set(datastoreId=datastore_id, imageSetId=other["imageSetId"])["isPrimary"] is False


def test_client_token_idempotency(clients: tuple[Any, Any, str]) -> None:
    mi, s3, datastore_id = clients
    upload(s3, "token-in", "", synthetic(instances=1))
    kwargs = {"dataAccessRoleArn": ROLE_ARN, "inputS3Uri": "s3://token-in/", "outputS3Uri": "s3://results/"}
    first = mi.start_dicom_import_job(datastoreId=datastore_id, clientToken="token-1", **kwargs)
    same = mi.start_dicom_import_job(datastoreId=datastore_id, clientToken="token-1", **kwargs)
    assert same["jobId"] == first["jobId"]
    with pytest.raises(mi.exceptions.ConflictException):
        mi.start_dicom_import_job(datastoreId=datastore_id, clientToken="token-1", jobName="other", **kwargs)
    other_store = create_active_datastore(mi, "other")
    elsewhere = mi.start_dicom_import_job(datastoreId=other_store, clientToken="token-1", **kwargs)
    assert elsewhere["jobId"] != first["jobId"]
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_dicom_import_job(datastoreId=other_store, jobId=first["jobId"])


def test_job_level_failures(endpoint: LocalEndpoint, clients: tuple[Any, Any, str]) -> None:
    mi, s3, datastore_id = clients
    missing_input = run_import(mi, datastore_id, "s3://no-such-bucket/", "s3://results/")
    assert missing_input["jobStatus"] == "FAILED"
    assert "no-such-bucket" in missing_input["message"]
    upload(s3, "limit-in", "", synthetic(instances=4))
    missing_output = run_import(mi, datastore_id, "s3://limit-in/", "s3://no-such-output/")
    assert missing_output["jobStatus"] == "FAILED"
    assert "OUTPUT" in missing_output["message"]
    endpoint.importer.limits.max_files = 3
    too_many = run_import(mi, datastore_id, "s3://limit-in/", "s3://results/")
    assert too_many["jobStatus"] == "FAILED"
    assert too_many["message"].startswith("DICOM import job has failed. FILE_COUNTS_LIMIT_EXCEEDED")
    manifest = read_json(s3, too_many["outputS3Uri"] + "job-output-manifest.json")["jobSummary"]
    assert manifest["numberOfImportedFiles"] == 0
    endpoint.importer.limits.max_files = 5_000
    endpoint.importer.limits.max_bytes = 10
    too_big = run_import(mi, datastore_id, "s3://limit-in/", "s3://results/")
    assert "FILE_SIZE_LIMIT_EXCEEDED" in too_big["message"]
    endpoint.importer.limits.max_bytes = 10 * 1024**3
    upload(s3, "folders-in", "", [(f"f{i}/x.dcm", b"x") for i in range(3)])
    endpoint.importer.limits.max_folders = 2
    too_deep = run_import(mi, datastore_id, "s3://folders-in/", "s3://results/")
    assert "FOLDER_COUNTS_LIMIT_EXCEEDED" in too_deep["message"]
    failed = mi.list_dicom_import_jobs(datastoreId=datastore_id, jobStatus="FAILED")["jobSummaries"]
    assert len(failed) == 5
    assert all("message" in j and "endedAt" in j for j in failed)
    assert mi.list_dicom_import_jobs(datastoreId=datastore_id, jobStatus="COMPLETED")["jobSummaries"] == []


def test_status_progression_and_inactive_datastore(tmp_path: Path) -> None:
    with LocalEndpoint(tmp_path / "state", import_seconds=1.0, datastore_seconds=30) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        creating = mi.create_datastore(datastoreName="slow")["datastoreId"]
        upload(s3, "progress-in", "", synthetic(instances=1))
        upload(s3, "progress-out", "", [])
        kwargs = {
            "dataAccessRoleArn": ROLE_ARN,
            "inputS3Uri": "s3://progress-in/",
            "outputS3Uri": "s3://progress-out/",
        }
        with pytest.raises(mi.exceptions.ConflictException):
            mi.start_dicom_import_job(datastoreId=creating, **kwargs)
        with endpoint.store.transaction() as db:
            db.execute("UPDATE datastores SET status='ACTIVE', settle_at=NULL WHERE id=?", (creating,))
        started = mi.start_dicom_import_job(datastoreId=creating, **kwargs)
        assert started["jobStatus"] == "SUBMITTED"
        seen: list[str] = []

        def finished() -> bool:
            job = mi.get_dicom_import_job(datastoreId=creating, jobId=started["jobId"])["jobProperties"]
            seen.append(job["jobStatus"])
            assert ("endedAt" in job) == (job["jobStatus"] in ("COMPLETED", "FAILED"))
            return job["jobStatus"] == "COMPLETED"

        wait_for(finished)
        assert "IN_PROGRESS" in seen


def test_concurrent_reimports_of_one_series_get_consecutive_versions(tmp_path: Path) -> None:
    """Jobs that overlap in time and touch the same series must each commit the next version (no lost update)."""
    jobs = 6
    # Six starts back to back: the StartDICOMImportJob rate (1/s, burst 2) is not what this test is about.
    with LocalEndpoint(tmp_path / "state", import_seconds=1.0, rate_limits={}) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        upload(s3, "results", "", [])
        datastore_id = create_active_datastore(mi)
        files = synthetic(series=1, instances=2, seed=11)
        for n in range(jobs):
            upload(s3, "same-series", f"copy{n}/", files)
        started = [
            mi.start_dicom_import_job(
                datastoreId=datastore_id,
                dataAccessRoleArn=ROLE_ARN,
                inputS3Uri=f"s3://same-series/copy{n}/",
                outputS3Uri="s3://results/",
            )["jobId"]
            for n in range(jobs)
        ]
        # All jobs are in flight at the same time (the least IN_PROGRESS time does not serialise them).
        statuses = [
            mi.get_dicom_import_job(datastoreId=datastore_id, jobId=j)["jobProperties"]["jobStatus"]
            for j in started
        ]
        assert "COMPLETED" not in statuses, statuses
        finished = [wait_job(mi, datastore_id, j) for j in started]
        assert [f["jobStatus"] for f in finished] == ["COMPLETED"] * jobs, [
            f.get("message") for f in finished
        ]
        versions = []
        for job in finished:
            summary = read_json(s3, job["outputS3Uri"] + "job-output-manifest.json")["jobSummary"]
            [image_set] = summary["imageSetsSummary"]
            versions.append((image_set["imageSetId"], image_set["imageSetVersion"]))
        assert len({image_set_id for image_set_id, _ in versions}) == 1
        assert sorted(v for _, v in versions) == list(range(1, jobs + 1))
        listed = mi.list_image_set_versions(datastoreId=datastore_id, imageSetId=versions[0][0])
        assert [v["versionId"] for v in listed["imageSetPropertiesList"]] == [
            str(v) for v in range(jobs, 0, -1)
        ]


def test_fail_jobs_fails_the_first_jobs_of_each_datastore(tmp_path: Path) -> None:
    """``--fail-jobs 2``: jobs 1 and 2 of every data store end FAILED with the injected message; job 3 runs."""
    from healthimaging_local.cli import build_parser

    assert build_parser().parse_args(["serve", "--state-dir", "s", "--fail-jobs", "2"]).fail_jobs == 2
    assert build_parser().parse_args(["serve", "--state-dir", "s"]).fail_jobs == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--state-dir", "s", "--fail-jobs", "-1"])
    with LocalEndpoint(tmp_path / "state", fail_jobs=2, rate_limits={}) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        upload(s3, "results", "", [])
        upload(s3, "fail-in", "", synthetic(instances=2, seed=5))
        stores = [create_active_datastore(mi, "first"), create_active_datastore(mi, "second")]
        for datastore_id in stores:
            outcomes = [run_import(mi, datastore_id, "s3://fail-in/", "s3://results/") for _ in range(3)]
            assert [job["jobStatus"] for job in outcomes] == ["FAILED", "FAILED", "COMPLETED"]
            for n, job in enumerate(outcomes[:2], start=1):
                assert job["message"].startswith(f"DICOM import job has failed. INJECTED_FAILURE: job {n} ")
                assert "--fail-jobs 2" in job["message"]
            assert (
                read_json(s3, outcomes[2]["outputS3Uri"] + "job-output-manifest.json")["jobSummary"][
                    "numberOfImportedFiles"
                ]
                == 2
            )
