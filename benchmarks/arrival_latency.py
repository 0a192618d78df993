"""
Import on arrival (issue 15): latency from a study's last object to its image sets being searchable, and the SQS
calls of an idle watcher.

Real Airflow (``tests/deployment/harness.py``: CeleryExecutor, PostgreSQL, Redis, a triggerer) runs
``dags/healthimaging_import_on_arrival.py`` against a ``healthimaging-local serve`` endpoint (access log on),
wired by ``scripts/wire_arrivals.py``.

- **Latency**, per round: one study is dripped into the bucket over ``--drip-seconds``; ``last`` is when the
  last PutObject returned. SearchImageSets (EQUAL DICOMStudyInstanceUID) is polled every 0.5 s until it finds the
  study's image sets: ``searchable``. The bound is the settle period plus the one import job's own duration
  (``submittedAt`` -> ``endedAt``); target: ``searchable - last <= 1.2 * bound + 10 s``.
- **Idle SQS calls**: with the DAG unpaused and nothing arriving, the endpoint's access log counts the requests
  SQS receives (``POST /`` with nothing else running: HealthImaging and S3 requests have their own paths) over
  ``--idle-seconds``, scaled to one hour, with the DAG's shipped poll settings (20 s long poll, 10 s pause).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.airflow_bench import deployment  # noqa: E402
from benchmarks.harness import ROLE_ARN, client, command_line, create_active_datastore, machine, write_result  # noqa: E402
from healthimaging_local.sample_data import synthetic_study_files  # noqa: E402
from healthimaging_local.server import endpoint_settings  # noqa: E402

DAG_ID = "healthimaging_import_on_arrival"
BUCKET = "arrivals-bench"
QUEUE_NAME = "healthimaging-arrivals"
QUEUE_URL = f"http://127.0.0.1:4566/123456789012/{QUEUE_NAME}"


def wire(url: str) -> None:
    """The wiring script's calls against the endpoint (arrivals queue only)."""
    import boto3
    import wire_arrivals

    session = boto3.session.Session(
        region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    wire_arrivals.wire(
        session,
        bucket=BUCKET,
        prefix="incoming/",
        arrivals_queue=QUEUE_NAME,
        events_queue=None,
        s3_via="notification",
        datastore_id=None,
        endpoint_url=url,
    )


def sqs_calls(log_path: Path, offset: int) -> int:
    """``POST /`` requests in the endpoint's access log after ``offset`` (SQS's JSON protocol posts to ``/``)."""
    with log_path.open("rb") as stream:
        stream.seek(offset)
        text = stream.read().decode(errors="replace")
    return sum(1 for line in text.splitlines() if "healthimaging_local.access POST / " in line)


def one_round(s3: Any, hi: Any, datastore_id: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Drip one study, wait until it is searchable, and relate the wait to settle + job duration."""
    from io import BytesIO

    import pydicom

    files = list(synthetic_study_files(1, 1, args.series, args.instances, seed))
    study_uid = str(pydicom.dcmread(BytesIO(files[0][1]), stop_before_pixels=True).StudyInstanceUID)
    folder = f"incoming/round-{seed}/study/"
    gap = args.drip_seconds / max(1, len(files) - 1)
    for i, (key, data) in enumerate(files):
        s3.put_object(Bucket=BUCKET, Key=folder + key, Body=data)
        if i < len(files) - 1:
            time.sleep(gap)
    last = time.time()
    criteria = {"filters": [{"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": study_uid}]}]}
    deadline = last + args.timeout
    while time.time() < deadline:
        found = hi.search_image_sets(datastoreId=datastore_id, searchCriteria=criteria)[
            "imageSetsMetadataSummaries"
        ]
        if found:
            break
        time.sleep(0.5)
    else:
        raise TimeoutError(f"round {seed}: study not searchable {args.timeout} s after its last object")
    searchable = time.time()
    jobs = [
        j
        for j in hi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"]
        if folder
        in hi.get_dicom_import_job(datastoreId=datastore_id, jobId=j["jobId"])["jobProperties"]["inputS3Uri"]
    ]
    props = [
        hi.get_dicom_import_job(datastoreId=datastore_id, jobId=j["jobId"])["jobProperties"] for j in jobs
    ]
    durations = [(p["endedAt"] - p["submittedAt"]).total_seconds() for p in props if p.get("endedAt")]
    job_seconds = max(durations) if durations else float("nan")
    latency = searchable - last
    bound = args.settle_seconds + job_seconds
    return {
        "files": len(files),
        "jobs": len(jobs),
        "latency_s": round(latency, 2),
        "job_seconds": round(job_seconds, 2),
        "bound_s": round(bound, 2),
        "ratio": round(latency / bound, 3),
        "target_s": round(1.2 * bound + 10, 2),
        "pass": latency <= 1.2 * bound + 10,
    }


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--drip-seconds", type=float, default=20)
    parser.add_argument("--settle-seconds", type=float, default=30)
    parser.add_argument("--settle-poke", type=float, default=5)
    parser.add_argument("--import-seconds", type=float, default=20)
    parser.add_argument("--import-poke", type=float, default=5)
    parser.add_argument("--idle-seconds", type=float, default=300)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--skip-latency", action="store_true", help="measure the idle calls only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    env = {
        "HEALTHIMAGING_ARRIVALS_QUEUE_URL": QUEUE_URL,
        "HEALTHIMAGING_SETTLE_POKE_INTERVAL": str(args.settle_poke),
        "HEALTHIMAGING_POKE_INTERVAL": str(args.import_poke),
    }
    link = {"healthimaging_import_on_arrival.py": str(ROOT / "dags" / "healthimaging_import_on_arrival.py")}
    result: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "settings": vars(args) | {"json": None},
    }
    with deployment(link, worker_concurrency=4, extra_env=env) as deploy:
        from harness import LocalEndpoint

        state = Path(deploy.base_dir) / f"state_{uuid.uuid4().hex[:6]}"
        endpoint = LocalEndpoint(
            state, deploy.log_dir, ["--log-level", "INFO", "--import-seconds", str(args.import_seconds)]
        )
        url = endpoint.start()
        try:
            s3, hi = client(url, "s3"), client(url, "medical-imaging")
            s3.create_bucket(Bucket=BUCKET)
            datastore_id = create_active_datastore(hi, f"arrivals-{uuid.uuid4().hex[:6]}")
            wire(url)
            api = deploy.api
            api.set_connection("aws_default", **endpoint_settings(url)["airflow_connection"])
            for key, value in {
                "healthimaging_datastore_id": datastore_id,
                "healthimaging_data_access_role_arn": ROLE_ARN,
                "healthimaging_output_s3_uri": f"s3://{BUCKET}/output/",
                "healthimaging_staging_s3_uri": f"s3://{BUCKET}/staging/",
                "healthimaging_arrivals_grouping": json.dumps({"depth": 2, "base_prefix": "incoming/"}),
                "healthimaging_arrivals_settle_seconds": str(args.settle_seconds),
            }.items():
                api.set_variable(key, value)
            api.wait_for_dag(DAG_ID)
            api.unpause(DAG_ID)
            time.sleep(30)  # the dag-processor registers the watcher; the triggerer starts it

            # Idle: nothing arrives (drain the wiring's TestEvent run first).
            time.sleep(30)
            offset = endpoint.component.log_path.stat().st_size
            started = time.time()
            time.sleep(args.idle_seconds)
            calls = sqs_calls(endpoint.component.log_path, offset)
            elapsed = time.time() - started
            result["idle"] = {
                "seconds": round(elapsed, 1),
                "sqs_calls": calls,
                "sqs_calls_per_hour": round(calls * 3600 / elapsed, 1),
                "long_poll_s": 20,
                "pause_s": 10,
            }
            print(json.dumps(result["idle"]), flush=True)

            if not args.skip_latency:
                rounds = [one_round(s3, hi, datastore_id, 4100 + r, args) for r in range(args.rounds)]
                result["rounds"] = rounds
                result["median"] = {
                    key: statistics.median(r[key] for r in rounds)
                    for key in ("latency_s", "bound_s", "ratio")
                }
                result["pass"] = all(r["pass"] for r in rounds)
        finally:
            endpoint.stop()
    write_result("arrival_latency", result, args.json)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "arrival_latency"
    sys.exit(main())
