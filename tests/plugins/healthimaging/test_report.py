"""The import report: every object of a plan marked from the jobs' outputs; duplicates, unexpected, unaccounted."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from healthimaging.planner import ImportLimits, Plan, PlanSettings, S3Object, plan_objects
from healthimaging.report import (
    ChunkJob,
    ReportBuilder,
    build_report,
    ndjson_lines,
    read_object,
    write_report,
)

INPUT = "s3://input-bucket/day/"
STAGING = "s3://staging-bucket/stage/"
GB = 1000**3


def obj(key: str, size: int = 10) -> S3Object:
    return S3Object(key, size, "e")


@pytest.fixture
def plan() -> Plan:
    """Chunks: day/P1/ (3 files), day/P2/ (3 files), one staged chunk (day/n1.txt, day/n2.txt); day/big refused."""
    listing = [
        *(obj(f"day/P1/f{i}.dcm") for i in range(3)),
        *(obj(f"day/P2/f{i}.dcm") for i in range(3)),
        obj("day/n1.txt"),
        obj("day/n2.txt"),
        obj("day/big", 11 * GB),
    ]
    return plan_objects(
        listing, INPUT, PlanSettings(ImportLimits(max_files_per_job=4), staging_s3_uri=STAGING)
    )


def success(*keys: str, image_set: str = "is-1") -> list[dict[str, Any]]:
    return [{"inputFile": k, "importResponse": {"imageSetId": image_set, "isPrimary": True}} for k in keys]


def failure(*keys: str) -> list[dict[str, Any]]:
    return [
        {"inputFile": k, "exception": {"exceptionType": "ValidationException", "message": "not DICOM"}}
        for k in keys
    ]


def manifest(
    scanned: int, imported: int, failed: int = 0, image_sets: tuple[str, ...] = ("is-1",)
) -> dict[str, Any]:
    return {
        "numberOfScannedFiles": scanned,
        "numberOfImportedFiles": imported,
        "numberOfFilesWithCustomerError": failed,
        "numberOfFilesWithServerError": 0,
        "numberOfGeneratedImageSets": len(image_sets),
        "imageSetsSummary": [{"imageSetId": i, "imageSetVersion": 1, "isPrimary": True} for i in image_sets],
    }


def statuses(document: dict[str, Any]) -> dict[str, str]:
    return {row["key"]: row["status"] for row in document["objects"]}


def test_every_object_is_marked_imported_failed_refused_or_not_reached(plan: Plan) -> None:
    p1, p2, staged = plan.chunks
    builder = ReportBuilder(plan)
    builder.add_job(
        ChunkJob(p1.id, "job-1", "COMPLETED", "s3://out/j1/"),
        manifest(3, 2, 1),
        success("day/P1/f0.dcm", "day/P1/f1.dcm"),
        failure("day/P1/f2.dcm"),
    )
    builder.add_job(ChunkJob(p2.id, "job-2", "FAILED", "s3://out/j2/", "DICOM import job has failed."))
    staged_keys = [staged.staged_key(o.key) for o in staged.objects]
    builder.add_job(
        ChunkJob(staged.id, "job-3", "COMPLETED", "s3://out/j3/"),
        manifest(2, 0, 2, ()),
        (),
        failure(*staged_keys),
    )
    report = builder.build()
    document = report.document()
    assert statuses(document) == {
        "day/P1/f0.dcm": "imported",
        "day/P1/f1.dcm": "imported",
        "day/P1/f2.dcm": "failed",
        **{f"day/P2/f{i}.dcm": "not_reached" for i in range(3)},
        "day/n1.txt": "failed",  # staged copies mapped back to their original keys
        "day/n2.txt": "failed",
        "day/big": "refused",
    }
    rows = {row["key"]: row for row in report.document()["objects"]}
    assert rows["day/P1/f0.dcm"] == {
        "key": "day/P1/f0.dcm",
        "chunk": p1.id,
        "status": "imported",
        "image_set_id": "is-1",
    }
    assert rows["day/P1/f2.dcm"]["exception_type"] == "ValidationException"
    assert rows["day/P1/f2.dcm"]["message"] == "not DICOM"
    assert rows["day/P2/f0.dcm"]["reason"] == "job_failed"
    assert rows["day/big"] == {
        "key": "day/big",
        "chunk": None,
        "status": "refused",
        "reason": "FILE_TOO_LARGE",
        "size": 11 * GB,
    }
    totals = report.totals()
    assert totals == {
        "objects": 9,
        "planned": 8,
        "imported": 2,
        "failed": 3,
        "refused": 1,
        "not_reached": 3,
        "unaccounted": 0,
        "duplicates": 0,
        "unexpected": 0,
        "image_sets": 1,
        "chunks": 3,
        "chunks_completed": 2,
        "chunks_job_failed": 1,
        "chunks_not_started": 0,
        "chunks_job_not_finished": 0,
    }
    assert report.problems() == [f"3 object(s) not reached: chunk(s) {p2.id} did not complete"]
    chunk_rows = document["chunks"]
    assert chunk_rows[0]["jobs"][0]["manifest"]["numberOfScannedFiles"] == 3
    assert [c["outcome"] for c in chunk_rows] == ["completed", "job_failed", "completed"]


def test_a_chunk_whose_start_failed_or_that_has_no_job_is_not_started(plan: Plan) -> None:
    builder = ReportBuilder(plan)
    builder.add_job(ChunkJob(plan.chunks[0].id, message="ServiceQuotaExceededException"))
    builder.add_job(ChunkJob(plan.chunks[1].id, "job-2", "IN_PROGRESS"))
    report = builder.build()
    assert report.outcomes == ["not_started", "job_not_finished", "not_started"]
    reasons = {row["key"]: row.get("reason") for row in report.document()["objects"]}
    assert reasons["day/P1/f0.dcm"] == "not_started"
    assert reasons["day/P2/f0.dcm"] == "job_not_finished"
    assert reasons["day/n1.txt"] == "not_started"


def test_objects_a_completed_job_lists_nowhere_are_unaccounted(plan: Plan) -> None:
    builder = ReportBuilder(plan)
    builder.add_job(
        ChunkJob(plan.chunks[0].id, "job-1", "COMPLETED", "s3://out/j1/"),
        manifest(3, 3),
        success("day/P1/f0.dcm", "day/P1/f1.dcm"),
    )
    builder.add_job(ChunkJob(plan.chunks[1].id, "job-2", "COMPLETED", "s3://out/j2/"))  # manifest unreadable
    report = builder.build()
    assert report.totals()["unaccounted"] == 4
    job_1, job_2 = (f"chunk {c.id} job job-{n}" for n, c in enumerate(plan.chunks[:2], 1))
    assert report.problems()[0] == "4 object(s) unaccounted for: a COMPLETED job lists them nowhere"
    assert f"{job_1}: the manifest counts 3 imported file(s), success.ndjson lists 2" in report.problems()
    assert f"{job_2}: the job COMPLETED but its manifest could not be read" in report.problems()


def test_objects_imported_twice_and_objects_not_in_the_plan_are_reported_apart(plan: Plan) -> None:
    p1 = plan.chunks[0]
    builder = ReportBuilder(plan)
    builder.add_job(ChunkJob(p1.id, "job-1", "FAILED", "s3://out/j1/"), None, success("day/P1/f0.dcm"))
    builder.add_job(
        ChunkJob(p1.id, "job-2", "COMPLETED", "s3://out/j2/"),
        manifest(4, 4),
        success("day/P1/f0.dcm", "day/P1/f1.dcm", "day/P1/f2.dcm", "day/P1/late.dcm"),
    )
    report = builder.build()
    document = report.document()
    assert document["duplicates"] == [{"key": "day/P1/f0.dcm", "chunk": p1.id, "imports": 2, "failures": 0}]
    assert document["unexpected"] == [
        {"key": "day/P1/late.dcm", "chunk": p1.id, "job_id": "job-2", "outcome": "imported"}
    ]
    assert statuses(document)["day/P1/f0.dcm"] == "imported"
    assert report.outcomes[0] == "completed"  # the chunk's last job decides
    assert report.totals()["duplicates"] == 1
    assert report.totals()["unexpected"] == 1
    problems = report.problems()
    assert "1 object(s) listed more than once across the jobs' outputs" in problems
    assert "1 object(s) in the jobs' outputs are not in the plan" in problems
    assert f"chunk {p1.id} job job-2: the job scanned 4 file(s), the plan holds 3" in problems


def test_warning_lines_count_as_imports_once(plan: Plan) -> None:
    p1 = plan.chunks[0]
    builder = ReportBuilder(plan)
    builder.add_job(
        ChunkJob(p1.id, "job-1", "COMPLETED", "s3://out/j1/"),
        manifest(4, 4),
        success("day/P1/f0.dcm", "day/P1/f1.dcm", "day/P1/late.dcm"),
        (),
        success("day/P1/f1.dcm", "day/P1/f2.dcm", "day/P1/late.dcm"),
    )
    report = builder.build()
    assert report.totals()["imported"] == 3
    assert report.totals()["duplicates"] == 0
    assert report.totals()["unexpected"] == 1
    assert [p for p in report.problems() if "job-1" in p] == [
        f"chunk {p1.id} job job-1: the job scanned 4 file(s), the plan holds 3"
    ]


def test_summary_and_text_hold_counts_and_ids_but_no_keys(plan: Plan) -> None:
    builder = ReportBuilder(plan)
    builder.add_job(
        ChunkJob(plan.chunks[0].id, "job-1", "COMPLETED", "s3://out/j1/"),
        manifest(3, 3),
        success(*(f"day/P1/f{i}.dcm" for i in range(3))),
    )
    report = builder.build()
    summary = json.dumps(report.summary())
    text = report.text()
    for key in ("f0.dcm", "n1.txt", "big"):
        assert key not in summary
        assert key not in text
    assert report.summary()["chunks"][0] == {
        "id": plan.chunks[0].id,
        "label": "P1/",
        "files": 3,
        "outcome": "completed",
        "job_id": "job-1",
        "job_status": "COMPLETED",
        "scanned": 3,
        "imported": 3,
        "failed": 0,
        "not_reached": 0,
        "unaccounted": 0,
        "image_sets": 1,
    }
    assert text.splitlines()[0] == (
        f"Import report for {INPUT}: 9 object(s), 3 chunk(s) (1 completed, 0 FAILED, 2 not started, 0 not finished)"
    )
    assert f"  chunk {plan.chunks[0].id} P1/: job job-1 COMPLETED, 3 file(s): 3 imported" in text


def test_a_job_for_a_chunk_the_plan_does_not_hold_is_refused(plan: Plan) -> None:
    with pytest.raises(ValueError, match="names chunk 'nope'"):
        ReportBuilder(plan).add_job(ChunkJob("nope", "job-1"))


# ------------------------------------------------------------------------------------------- S3


def put_outputs(s3: Any, folder: str, summary: dict[str, Any] | None, ok: list[Any], bad: list[Any]) -> None:
    prefix = folder.removeprefix("s3://output-bucket/")
    if summary is not None:
        s3.put_object(
            Bucket="output-bucket",
            Key=f"{prefix}job-output-manifest.json",
            Body=json.dumps({"jobSummary": summary}),
        )
    for name, lines in (("SUCCESS/success.ndjson", ok), ("FAILURE/failure.ndjson", bad)):
        s3.put_object(
            Bucket="output-bucket", Key=prefix + name, Body="".join(json.dumps(x) + "\n" for x in lines)
        )


def test_build_report_reads_each_job_folder_and_writes_the_report(s3: Any, plan: Plan) -> None:
    p1, p2, staged = plan.chunks
    folders = [f"s3://output-bucket/out/ds-DicomImport-job-{n}/" for n in (1, 2, 3)]
    put_outputs(s3, folders[0], manifest(3, 3), success(*(o.key for o in p1.objects)), [])
    put_outputs(
        s3,
        folders[2],
        manifest(2, 1, 1),
        success(staged.staged_key("day/n1.txt")),
        failure(staged.staged_key("day/n2.txt")),
    )
    slept: list[float] = []
    jobs = [
        ChunkJob.from_job_properties(
            p1.id, {"jobId": "job-1", "jobStatus": "COMPLETED", "outputS3Uri": folders[0]}
        ),
        ChunkJob(p2.id, "job-2", "COMPLETED", folders[1]),  # its manifest never appears
        ChunkJob(staged.id, "job-3", "COMPLETED", folders[2]),
    ]
    report = build_report(s3, plan, jobs, manifest_attempts=3, manifest_delay=0.5, sleep=slept.append)
    assert slept == [0.5, 0.5]
    totals = report.totals()
    assert (totals["imported"], totals["failed"], totals["unaccounted"], totals["refused"]) == (4, 1, 3, 1)
    uri = write_report(s3, report, "s3://output-bucket/reports/run/import-report.json.gz")
    assert report.summary()["report_s3_uri"] == uri
    body = s3.get_object(Bucket="output-bucket", Key="reports/run/import-report.json.gz")
    assert body["ContentEncoding"] == "gzip"
    document = json.loads(gzip.decompress(body["Body"].read()))
    assert document["format"] == "healthimaging-import-report/1"
    assert statuses(document)["day/n1.txt"] == "imported"
    assert statuses(document)["day/P2/f0.dcm"] == "unaccounted"
    assert len(document["objects"]) == 9
    assert f"full report (object keys): {uri}" in report.text()


def test_ndjson_is_read_as_lines_and_a_missing_file_as_empty(s3: Any) -> None:
    s3.put_object(Bucket="output-bucket", Key="x.ndjson", Body=b'{"a": 1}\n\n{"a": 2}\n')
    assert list(ndjson_lines(read_object(s3, "s3://output-bucket/x.ndjson"))) == [{"a": 1}, {"a": 2}]
    assert read_object(s3, "s3://output-bucket/missing.ndjson") == b""
    assert list(ndjson_lines([b'{"a": 3}', b"  "])) == [{"a": 3}]
