"""A day of any size through the real DAG, against the service's own bound, on a real Airflow deployment.

Two shapes, one deployment (CeleryExecutor, PostgreSQL, Redis; ``dags/`` as shipped), one endpoint per shape
(``serve --import-seconds D``, documented StartDICOMImportJob rate 1/s burst 2):

- ``day``: one prefix of ``--files`` synthetic DICOM files in patient/study/series folders (one run, planned into
  chunks of at most ``[healthimaging] max_files_per_job`` files);
- ``prefixes``: ``--prefixes`` small prefixes (4 files each) named in one manual run.

Per shape: the run's wall time (DagRun start_date -> end_date) against the bound ``(jobs - 1) / start_rate +
one job's duration`` (``[healthimaging] start_rate``; the job's duration is the median submittedAt -> endedAt of
the run's jobs); ratio = wall / bound (target at most 1.25). Also checked: one job per chunk, every object
imported once (the run's import report), run success.

Each shape's objects are uploaded once and imported ``--rounds`` times, each run into a new data store (so new
client tokens and new jobs); the result holds every round and the medians.

Usage: ``.venv/bin/python benchmarks/import_day.py --files 100000 --prefixes 200 --import-seconds 60``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.airflow_bench import Site, deployment, parse_time
from benchmarks.harness import ROLE_ARN, client, command_line, create_active_datastore, machine, write_result
from healthimaging_local.sample_data import synthetic_study_files, upload

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "healthimaging_import_dicom_and_search"
BUCKET = "bench-dicom"


def upload_day(url: str, files: int) -> str:
    """Upload ``files`` DICOM files as patient/study/series folders (series of 100, 5 series per study).

    :param url: the endpoint
    :param files: how many
    :return: the day's prefix URI
    """
    s3 = client(url, "s3", max_pool_connections=32)
    patients = max(1, files // 500)

    def put(item: tuple[str, bytes]) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"day/{item[0]}", Body=item[1])

    with ThreadPoolExecutor(max_workers=24) as pool:
        for _ in pool.map(put, synthetic_study_files(patients, 1, 5, 100, seed=7)):
            pass
    return f"s3://{BUCKET}/day/"


def upload_prefixes(url: str, count: int) -> list[str]:
    """Upload ``count`` prefixes of one small study (2 series x 2 instances) each.

    :param url: the endpoint
    :param count: how many prefixes
    """
    s3 = client(url, "s3", max_pool_connections=32)
    uris = []
    for n in range(count):
        upload(synthetic_study_files(1, 1, 2, 2, seed=1000 + n), s3, BUCKET, f"p{n:04d}/")
        uris.append(f"s3://{BUCKET}/p{n:04d}/")
    return uris


def measure(deploy: Any, site: Site, prefixes: list[str], start_rate: float) -> dict[str, Any]:
    """Trigger one run over ``prefixes``, wait for it, and compare its wall time with the bound.

    :param deploy: the deployment
    :param site: the endpoint and data store
    :param prefixes: the run's input prefixes
    :param start_rate: the configured StartDICOMImportJob rate
    """
    api = deploy.api
    conf = {
        "datastore_id": site.datastore_id,
        "data_access_role_arn": ROLE_ARN,
        "input_s3_uri": None,
        "input_s3_uris": prefixes,
        "output_s3_uri": f"s3://{BUCKET}/output/",
    }
    run_id = api.trigger(DAG_ID, conf=conf)
    run = api.wait_for_run(DAG_ID, run_id, timeout=6 * 3600)
    started, ended = parse_time(run["start_date"]), parse_time(run["end_date"])
    assert started
    assert ended
    wall = (ended - started).total_seconds()
    token = None
    all_jobs: list[dict[str, Any]] = []
    while True:
        page = site.hi.list_dicom_import_jobs(
            datastoreId=site.datastore_id, maxResults=50, **({"nextToken": token} if token else {})
        )
        all_jobs.extend(page["jobSummaries"])
        token = page.get("nextToken")
        if not token:
            break
    jobs = all_jobs  # the site is this shape's own
    durations = [(j["endedAt"] - j["submittedAt"]).total_seconds() for j in jobs if j.get("endedAt")]
    submitted = sorted(j["submittedAt"] for j in jobs)
    job_seconds = statistics.median(durations)
    bound = (len(jobs) - 1) / start_rate + job_seconds
    report = api.xcom(DAG_ID, run_id, "import_report", "return_value")
    phases: dict[str, dict[str, Any]] = {}
    durations_by_task: dict[str, list[float]] = {}
    for ti in api.task_instances(DAG_ID, run_id):
        began, done = parse_time(ti.get("start_date")), parse_time(ti.get("end_date"))
        if not began or not done:
            continue
        phase = phases.setdefault(ti["task_id"], {"count": 0, "first_start": None, "last_end": None})
        phase["count"] += 1
        durations_by_task.setdefault(ti["task_id"], []).append((done - began).total_seconds())
        offsets = ((began - started).total_seconds(), (done - started).total_seconds())
        first, last = phase["first_start"], phase["last_end"]
        phase["first_start"] = round(offsets[0] if first is None else min(first, offsets[0]), 1)
        phase["last_end"] = round(offsets[1] if last is None else max(last, offsets[1]), 1)
    for task_id, seconds in durations_by_task.items():
        phases[task_id]["median_seconds"] = round(statistics.median(seconds), 1)
    totals = [r["totals"] for r in report]
    return {
        "run_state": run["state"],
        "jobs": len(jobs),
        "chunks": sum(t["chunks"] for t in totals),
        "objects": sum(t["objects"] for t in totals),
        "imported": sum(t["imported"] for t in totals),
        "wall_seconds": round(wall, 1),
        "job_seconds_median": round(job_seconds, 1),
        "starts_span_seconds": round((submitted[-1] - submitted[0]).total_seconds(), 1),
        "bound_seconds": round(bound, 1),
        "ratio": round(wall / bound, 3),
        "first_job_submitted_at": round((submitted[0] - started).total_seconds(), 1),
        "last_job_ended_at": round(
            (max(j["endedAt"] for j in jobs if j.get("endedAt")) - started).total_seconds(), 1
        ),
        "tasks_seconds_after_run_start": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--prefixes", type=int, default=200)
    parser.add_argument("--import-seconds", type=float, default=60.0)
    parser.add_argument("--start-rate", type=float, default=0.25)
    parser.add_argument("--worker-concurrency", type=int, default=8)
    parser.add_argument(
        "--max-files-per-job",
        type=int,
        default=5000,
        help="[healthimaging] max_files_per_job (chunks of the day)",
    )
    parser.add_argument("--skip", choices=("day", "prefixes"), action="append", default=[])
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per shape (each into a new data store); medians reported"
    )
    args = parser.parse_args()
    env = {
        # Airflow's defaults, as a deployment has them: the tests' deployment re-parses every DAG file every 5 s
        # and heartbeats every task every 2 s, which on 2 cores cost more CPU than the pipeline itself.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "300",
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "30",
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "5",
        "AIRFLOW__HEALTHIMAGING__START_RATE": str(args.start_rate),
        "AIRFLOW__HEALTHIMAGING__POLL_INTERVAL": "5",
        "AIRFLOW__HEALTHIMAGING__MAX_FILES_PER_JOB": str(args.max_files_per_job),
    }
    dag_files = {p.name: str(p) for p in (ROOT / "dags").iterdir() if p.suffix in (".py", ".md")}
    result: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "settings": {**vars(args), "env": env},
        "bound": "(jobs - 1) / start_rate + median job duration (submittedAt -> endedAt)",
    }
    with deployment(dag_files, args.worker_concurrency, env) as deploy:
        deploy.api.wait_for_dag(DAG_ID)
        deploy.api.unpause(DAG_ID)
        for shape in ("day", "prefixes"):
            if shape in args.skip:
                continue
            site = Site(deploy, ["--import-seconds", str(args.import_seconds)])
            try:
                began = time.monotonic()
                prefixes = (
                    [upload_day(site.url, args.files)]
                    if shape == "day"
                    else upload_prefixes(site.url, args.prefixes)
                )
                print(f"{shape}: uploaded in {time.monotonic() - began:.0f} s", file=sys.stderr)
                rounds = []
                for number in range(args.rounds):
                    if number:  # the same objects into a new data store: new tokens, new jobs
                        site.datastore_id = create_active_datastore(site.hi, f"bench-{uuid.uuid4().hex[:8]}")
                    rounds.append(measure(deploy, site, prefixes, args.start_rate))
                    print(f"{shape} round {number + 1}: {rounds[-1]}", file=sys.stderr)
                result[shape] = {
                    "median_ratio": statistics.median(r["ratio"] for r in rounds),
                    "median_wall_seconds": statistics.median(r["wall_seconds"] for r in rounds),
                    "median_bound_seconds": statistics.median(r["bound_seconds"] for r in rounds),
                    "rounds": rounds,
                }
            finally:
                site.stop()
    print(write_result("import_day", result))


if __name__ == "__main__":
    main()
