"""Import throughput: a 5,000-file StartDICOMImportJob against a plain read-and-parse loop over the same objects.

Set-up (once): start ``healthimaging-local serve`` in a subprocess on a fresh state folder and upload 5,000
synthetic DICOM files (10 patients x 5 series x 100 instances = 50 series) to one prefix.

Then, alternating within one run, ``--rounds`` times each:

- baseline: what a user would write with stock boto3 over HTTP against the same endpoint: ``list_objects_v2``
  (paginated) + ``get_object`` of every object + ``pydicom.dcmread`` reading the Study, Series and SOP
  Instance UIDs, single thread (and a threaded variant with ``--threads`` workers);
- job: a fresh data store, StartDICOMImportJob (import_seconds 0), wall time from the start call until
  GetDICOMImportJob, polled every 0.2 s, reports COMPLETED; the job's own submittedAt->endedAt is recorded too.

The figure is median(job files/s) / median(single-thread baseline files/s); target at least 0.7.

Usage: ``.venv/bin/python benchmarks/import_throughput.py [--rounds 5] [--threads 8]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from harness import (
    ServeProcess,
    client,
    command_line,
    create_active_datastore,
    machine,
    median_of,
    run_import_job,
    write_result,
)

from healthimaging_local.sample_data import synthetic_study_files, upload

BUCKET = "bench-import"
INPUT_PREFIX = "input/"
OUTPUT_URI = f"s3://{BUCKET}/output/"
SHAPE = {"patients": 10, "studies_per_patient": 1, "series_per_study": 5, "instances_per_series": 100}


def read_and_parse(s3: Any, bucket: str, prefix: str, threads: int) -> dict[str, Any]:
    """List every object under ``prefix``, get each one and read its UIDs with pydicom.

    :param s3: a boto3 S3 client.
    :param bucket: the bucket.
    :param prefix: the prefix.
    :param threads: 1 for a plain loop, more for a thread pool over the gets.
    :return: files, distinct series and wall seconds.
    """
    started = time.perf_counter()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))

    def uids(key: str) -> tuple[str, str, str]:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        ds = pydicom.dcmread(BytesIO(body))
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)

    if threads == 1:
        found = [uids(key) for key in keys]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            found = list(pool.map(uids, keys))
    wall = time.perf_counter() - started
    return {
        "files": len(found),
        "series": len({(study, series) for study, series, _ in found}),
        "wall_s": wall,
        "files_per_s": len(found) / wall,
    }


def main() -> int:
    """Run the benchmark and record it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8, help="workers of the threaded baseline (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="output file (default results/...)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    with ServeProcess(work / "state", work / "endpoint.log") as endpoint:
        s3 = client(endpoint.url, "s3", max_pool_connections=max(args.threads, 10))
        hi = client(endpoint.url, "medical-imaging")
        s3.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        uploaded = upload(synthetic_study_files(**SHAPE, seed=7), s3, BUCKET, INPUT_PREFIX)
        upload_s = time.perf_counter() - started
        print(f"uploaded {uploaded.files} files ({uploaded.bytes} bytes) in {upload_s:.1f} s", flush=True)

        baseline: list[dict[str, Any]] = []
        threaded: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        for round_ in range(1, args.rounds + 1):
            cpu = endpoint.cpu_seconds()
            run = read_and_parse(s3, BUCKET, INPUT_PREFIX, threads=1)
            run["endpoint_cpu_s"] = endpoint.cpu_seconds() - cpu
            baseline.append(run)
            print(f"round {round_} baseline: {run['files_per_s']:.0f} files/s", flush=True)

            datastore_id = create_active_datastore(hi, f"bench-import-{round_}")
            cpu = endpoint.cpu_seconds()
            job = run_import_job(hi, datastore_id, f"s3://{BUCKET}/{INPUT_PREFIX}", OUTPUT_URI)
            job["endpoint_cpu_s"] = endpoint.cpu_seconds() - cpu
            if job["status"] != "COMPLETED":
                raise SystemExit(f"import job ended {job['status']}; see {endpoint.log_path}")
            manifest = json.loads(
                s3.get_object(
                    Bucket=BUCKET,
                    Key=f"output/{datastore_id}-DicomImport-{job['job_id']}/job-output-manifest.json",
                )["Body"].read()
            )["jobSummary"]
            if manifest["numberOfImportedFiles"] != uploaded.files:
                raise SystemExit(
                    f"the job imported {manifest['numberOfImportedFiles']} of {uploaded.files} files"
                )
            job.update(
                files=uploaded.files,
                imported_files=manifest["numberOfImportedFiles"],
                generated_image_sets=manifest["numberOfGeneratedImageSets"],
                files_per_s=uploaded.files / job["wall_s"],
                job_files_per_s=uploaded.files / job["job_s"],
            )
            jobs.append(job)
            print(
                f"round {round_} job: {job['files_per_s']:.0f} files/s (wall {job['wall_s']:.2f} s)",
                flush=True,
            )

            if args.threads:
                cpu = endpoint.cpu_seconds()
                run = read_and_parse(s3, BUCKET, INPUT_PREFIX, threads=args.threads)
                run["endpoint_cpu_s"] = endpoint.cpu_seconds() - cpu
                threaded.append(run)
                print(f"round {round_} threaded baseline: {run['files_per_s']:.0f} files/s", flush=True)
        endpoint_rss = endpoint.rss_bytes()

    job_median = median_of(jobs, "files_per_s")
    baseline_median = median_of(baseline, "files_per_s")
    result: dict[str, Any] = {
        "benchmark": "import_throughput",
        "command": command_line(),
        "machine": machine(),
        "endpoint_command": " ".join(endpoint.command),
        "set_up": {
            "files": uploaded.files,
            "bytes": uploaded.bytes,
            "series": uploaded.series,
            "shape": SHAPE,
            "upload_s": upload_s,
        },
        "rounds": args.rounds,
        "runs": {
            "baseline_single_thread": baseline,
            "job": jobs,
            f"baseline_{args.threads}_threads": threaded,
        },
        "medians": {
            "baseline_single_thread_files_per_s": baseline_median,
            "job_wall_files_per_s": job_median,
            "job_wall_s": median_of(jobs, "wall_s"),
            "job_own_s": median_of(jobs, "job_s"),
            "job_own_files_per_s": median_of(jobs, "job_files_per_s"),
            "job_endpoint_cpu_s": median_of(jobs, "endpoint_cpu_s"),
            "baseline_endpoint_cpu_s": median_of(baseline, "endpoint_cpu_s"),
        },
        "ratio_of_medians": job_median / baseline_median,
        "target_ratio_at_least": 0.7,
        "endpoint_rss_bytes_at_end": endpoint_rss,
    }
    if threaded:
        result["medians"]["baseline_threaded_files_per_s"] = median_of(threaded, "files_per_s")
        result["ratio_to_threaded_baseline"] = job_median / median_of(threaded, "files_per_s")
    result["passed"] = result["ratio_of_medians"] >= 0.7
    result["spread"] = {
        "job_files_per_s_stdev": statistics.pstdev(j["files_per_s"] for j in jobs),
        "baseline_files_per_s_stdev": statistics.pstdev(b["files_per_s"] for b in baseline),
    }
    write_result("import_throughput", result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
