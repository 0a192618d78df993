"""Plan, stage, import and account for a prefix through the real path: the local endpoint over HTTP, plain boto3."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from healthimaging.planner import ImportLimits, PlanSettings, plan_prefix, read_plan, write_plan
from healthimaging.report import ChunkJob, build_report, write_report
from healthimaging.staging import remove_staged_copies, stage_chunks
from healthimaging_local.sample_data import synthetic_study_files

ROLE_ARN = "arn:aws:iam::123456789012:role/ImportRole"


def layout() -> dict[str, bytes]:
    """2,162 objects under day/: 12 patients (P1..P12: the P1/P10 trap) x 2 series x 40 instances, 1,200 loose
    files of 3 series in day/loose/, a non-DICOM README beside the patient folders, and a file over the
    per-file limit inside P3/."""
    files: dict[str, bytes] = {}
    for key, body in synthetic_study_files(12, 1, 2, 40, seed=1):
        patient = int(key.split("/")[0].removeprefix("patient-"))
        files[f"day/P{patient}/" + key.split("/", 1)[1]] = body
    for key, body in synthetic_study_files(1, 1, 3, 400, seed=2):
        series, instance = re.findall(r"series-(\d+)/instance-(\d+)", key)[0]
        files[f"day/loose/s{int(series)}-i{instance}.dcm"] = body
    files["day/README.txt"] = b"not a DICOM file"
    files["day/P3/big.bin"] = bytes(20_000)
    return files


def wait_all(
    mi: Any, datastore_id: str, job_ids: list[str], timeout: float = 240
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(job_ids):
        assert time.monotonic() < deadline, f"{len(job_ids) - len(done)} job(s) still running"
        for job_id in set(job_ids) - set(done):
            properties = mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]
            if properties["jobStatus"] in ("COMPLETED", "FAILED"):
                done[job_id] = properties
        time.sleep(0.5)
    return done


def read_lines(s3: Any, folder: str, name: str) -> list[dict[str, Any]]:
    bucket, _, prefix = folder.removeprefix("s3://").partition("/")
    text = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read().decode()
    return [json.loads(line) for line in text.splitlines() if line]


@pytest.mark.slow
def test_a_prefix_is_planned_staged_imported_and_every_object_accounted_for(live: Any) -> None:
    s3, mi = live.s3, live.medical_imaging
    files = layout()
    s3.create_bucket(Bucket="staging")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket="input", Key=item[0], Body=item[1]), files.items()))

    limits = ImportLimits(max_files_per_job=400, max_file_bytes=10_000)
    settings = PlanSettings(limits, staging_s3_uri="s3://staging/runs/", run_scope="run-1")
    plan = plan_prefix(s3, "s3://input/day/", settings)
    prefix_chunks = [c.input_s3_uri for c in plan.chunks if not c.staged]
    assert prefix_chunks == [
        "s3://input/day/P1",  # P1/, P10/, P11/, P12/: 320 files
        "s3://input/day/P2/",
        "s3://input/day/P3/study-001/",  # P3/ itself holds the refused file
        *(f"s3://input/day/P{n}/" for n in range(4, 10)),
    ]
    assert [c.files for c in plan.staged_chunks] == [400, 400, 400, 1]  # README + the 1,200 loose files
    assert [r.key for r in plan.refused] == ["day/P3/big.bin"]

    assert stage_chunks(s3, plan).copied == 1201
    assert stage_chunks(s3, plan).already_staged == 1201  # a re-run copies nothing

    job_ids = {}
    for chunk in plan.chunks:
        job_ids[chunk.id] = mi.start_dicom_import_job(
            datastoreId=live.datastore_id,
            dataAccessRoleArn=ROLE_ARN,
            inputS3Uri=chunk.input_s3_uri,
            outputS3Uri="s3://output/jobs/",
            clientToken=chunk.digest,
            jobName=chunk.id,
        )["jobId"]
    jobs = wait_all(mi, live.datastore_id, list(job_ids.values()))
    assert {p["jobStatus"] for p in jobs.values()} == {"COMPLETED"}

    # Independently of the report: every uploaded object appears exactly once across the success manifests.
    imported: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for chunk in plan.chunks:
        folder = jobs[job_ids[chunk.id]]["outputS3Uri"]
        staging_key = chunk.input_s3_uri.removeprefix("s3://staging/")
        for counter, name in ((imported, "SUCCESS/success.ndjson"), (failed, "FAILURE/failure.ndjson")):
            for line in read_lines(s3, folder, name):
                key = line["inputFile"]
                counter[key.removeprefix(staging_key) if chunk.staged else key] += 1
    importable = set(files) - {"day/README.txt", "day/P3/big.bin"}
    assert imported == Counter(importable)
    assert failed == Counter(["day/README.txt"])

    report = build_report(
        s3, plan, [ChunkJob.from_job_properties(c.id, jobs[job_ids[c.id]]) for c in plan.chunks]
    )
    totals = report.totals()
    assert totals["objects"] == len(files) == 2162
    assert (totals["imported"], totals["failed"], totals["refused"]) == (len(importable), 1, 1)
    assert (totals["not_reached"], totals["unaccounted"], totals["duplicates"], totals["unexpected"]) == (
        0,
        0,
        0,
        0,
    )
    assert (
        totals["image_sets"] == 12 * 2 + 3
    )  # one primary image set per series, the loose series across jobs
    assert report.problems() == []
    readme = next(row for row in report.document()["objects"] if row["key"] == "day/README.txt")
    assert readme["status"] == "failed"
    assert readme["exception_type"]

    plan_uri = write_plan(s3, plan, "s3://output/plans/run-1/plan.json.gz")
    assert read_plan(s3, plan_uri).summary() == plan.summary()
    write_report(s3, report, "s3://output/reports/run-1/import-report.json.gz")

    assert remove_staged_copies(s3, plan) == 1201
    assert s3.list_objects_v2(Bucket="staging").get("KeyCount") == 0
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="input", Prefix="day/")
    assert sum(page["KeyCount"] for page in pages) == len(files)  # the originals stay
