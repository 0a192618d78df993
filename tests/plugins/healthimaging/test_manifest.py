from __future__ import annotations

import asyncio
from typing import Any

import pytest

from healthimaging import manifest


def _reader(files: dict[str, str]) -> tuple[list[str], Any]:
    reads: list[str] = []

    def read(uri: str) -> str | None:
        reads.append(uri)
        return files.get(uri)

    return reads, read


def test_parse_summary(kit) -> None:
    assert manifest.parse_summary(kit.manifest(scanned=4, imported=2))["numberOfImportedFiles"] == 2


def test_parse_failed_files_first_entries_and_blank_lines(kit) -> None:
    text = kit.failure_ndjson(*[f"dicom/{i}.dcm" for i in range(7)]) + "\n\n"
    failed = manifest.parse_failed_files(text)
    assert [f["inputFile"] for f in failed] == [f"dicom/{i}.dcm" for i in range(5)]
    assert failed[0] == {
        "inputFile": "dicom/0.dcm",
        "exceptionType": "ValidationException",
        "message": "not a DICOM P10 file",
    }
    assert manifest.parse_failed_files(None) == []


def test_build_result_leaves_messages_out(kit) -> None:
    summary = manifest.parse_summary(kit.manifest(scanned=2, imported=1, customer_errors=1))
    result = manifest.build_result(
        kit.job_properties("COMPLETED"), summary, manifest.parse_failed_files(kit.failure_ndjson("a.txt"))
    )
    assert result["endedAt"] == kit.ENDED_AT.isoformat()
    assert result["numberOfFilesWithCustomerError"] == 1
    assert result["failedFiles"] == [{"inputFile": "a.txt", "exceptionType": "ValidationException"}]


def test_completed_job_result_reads_failures_only_when_files_failed(kit) -> None:
    folder = kit.JOB_FOLDER.rstrip("/")
    reads, read = _reader({f"{folder}/job-output-manifest.json": kit.manifest()})
    result = manifest.drive(manifest.completed_job_result(kit.job_properties("COMPLETED"), 1, 0), read, print)
    assert result is not None
    assert result["failedFiles"] == []
    assert reads == [f"{folder}/job-output-manifest.json"]


def test_lagging_manifest_is_read_again_after_a_pause(kit) -> None:
    uri = kit.JOB_FOLDER + "job-output-manifest.json"
    answers = [None, None, kit.manifest()]
    sleeps: list[float] = []
    summary = manifest.drive(
        manifest.job_summary(kit.JOB_FOLDER, attempts=3, delay=1.5), lambda u: answers.pop(0), sleeps.append
    )
    assert summary is not None
    assert summary["numberOfImportedFiles"] == 3
    assert sleeps == [1.5, 1.5]
    assert manifest.join_s3(kit.JOB_FOLDER, "job-output-manifest.json") == uri


def test_missing_manifest_after_every_attempt(kit) -> None:
    sleeps: list[float] = []
    steps = manifest.job_summary(kit.JOB_FOLDER, attempts=2, delay=1)
    assert manifest.drive(steps, lambda u: None, sleeps.append) is None
    assert sleeps == [1]  # none after the last attempt


def test_sync_and_async_drivers_agree(kit) -> None:
    folder = kit.JOB_FOLDER.rstrip("/")
    files = {
        f"{folder}/job-output-manifest.json": kit.manifest(scanned=3, imported=2, customer_errors=1),
        f"{folder}/FAILURE/failure.ndjson": kit.failure_ndjson("x.txt"),
    }
    job = kit.job_properties("COMPLETED")
    _, read = _reader(files)

    async def async_read(uri: str) -> str | None:
        return read(uri)

    async def async_sleep(seconds: float) -> None:
        return None

    sync = manifest.drive(manifest.completed_job_result(job, 2, 0), read, lambda s: None)
    in_loop = asyncio.run(
        manifest.async_drive(manifest.completed_job_result(job, 2, 0), async_read, async_sleep)
    )
    assert sync == in_loop
    assert sync is not None
    assert sync["failedFiles"] == [{"inputFile": "x.txt", "exceptionType": "ValidationException"}]


@pytest.mark.parametrize(("failed", "suffix"), [([], ""), (None, None)])
def test_failed_job_message(kit, failed, suffix) -> None:
    entries = manifest.parse_failed_files(kit.failure_ndjson("a.dcm")) if failed is None else failed
    text = manifest.failed_job_message(kit.job_properties("FAILED"), entries)
    assert text.startswith(f"DICOM import job {kit.JOB_ID} FAILED: DICOM import job has failed")
    if suffix == "":
        assert text.endswith("FILE_COUNTS_LIMIT_EXCEEDED")
    else:
        assert text.endswith("First failed files: a.dcm: ValidationException not a DICOM P10 file")


def test_to_iso_nested(kit) -> None:
    assert manifest.to_iso({"a": [kit.ENDED_AT], "b": 1}) == {"a": [kit.ENDED_AT.isoformat()], "b": 1}
