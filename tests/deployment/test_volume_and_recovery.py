"""Volume and recovery of the planner pipeline on a real deployment (CeleryExecutor, PostgreSQL, Redis).

- Volume: 12,100 real DICOM files (patient/study/series folders, one study of 1,200 instances, and 5,300 loose files
  in one folder that only a staging prefix can reach) are imported exactly once, one primary image set per series.
- Bad input: a prefix that needs staging, without a staging prefix, fails the run in ``plan_imports`` before any job.
- Recovery with Airflow's own verbs: clear while a job is IN_PROGRESS and clear after COMPLETED re-attach; after a
  FAILED job (endpoint ``--fail-jobs 1``) clearing the import starts one new job; a changed Variable starts a new
  job; ``backfill --reprocess-behavior completed|failed`` re-attaches to a COMPLETED job and replaces a FAILED one.
- Pacing: at ``start_rate`` 0.5/s, six chunks' StartDICOMImportJob calls are >= ~2 s apart and no throttling
  reaches a task log.

The fixtures (a fresh endpoint with a data store per test, the unpaused import DAG) are those of test_deployment.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import test_deployment
from harness import REPO_ROOT, AirflowApi, AirflowDeployment, wait_until
from test_deployment import (
    BUCKET,
    DAG_ID,
    OUTPUT_BUCKET,
    PLAN,
    REPORT,
    ROLE_ARN,
    START,
    WAIT,
    Site,
    describe,
    new_run_id,
    start_state,
    started_job_ids,
    state_of,
)

from healthimaging_local import sample_data
from healthimaging_local.dicom import parse_p10
from healthimaging_local.sample_data import synthetic_study_files, upload

pytestmark = pytest.mark.deployment
api = test_deployment.api
make_site = test_deployment.make_site
variables = test_deployment.variables

STAGING_BUCKET = "dicom-staging"
STAGING_URI = f"s3://{STAGING_BUCKET}/stage/"
CACHE_DIR = REPO_ROOT / "test-artifacts" / "cache"
#: (label, patients, series per study, instances per series, seed, loose): the volume cohort. Keys are
#: ``patient-NNNN/study-001/series-NNN/instance-NNNNN.dcm``, loose files ``loose/<series>-<instance>.dcm``.
COHORTS = (
    ("big-study", 1, 3, 400, 71, False),  # one study of 1,200 instances
    ("patients", 28, 2, 100, 72, False),  # 5,600 files in 28 patient folders
    ("loose", 1, 4, 1325, 73, True),  # 5,300 loose files in one folder: more than one job takes
)
MAX_FILES_PER_JOB = 5_000


# --- data ------------------------------------------------------------------------------------------------


def _cohort(spec: tuple[str, int, int, int, int, bool], patient_offset: int) -> list[tuple[str, bytes]]:
    """The files of one cohort with their keys in the volume layout (runs in a worker process)."""
    _, patients, series, instances, seed, loose = spec
    files = []
    for key, data in synthetic_study_files(patients, 1, series, instances, seed):
        patient, study, series_dir, instance = key.split("/")
        if loose:
            files.append((f"loose/{series_dir}-{instance}", data))
        else:
            number = int(patient.removeprefix("patient-")) + patient_offset
            files.append((f"patient-{number:04d}/{study}/{series_dir}/{instance}", data))
    return files


def volume_files() -> list[tuple[str, bytes]]:
    """The 12,100 files of the volume test, generated once (two processes) and cached in test-artifacts/.

    The cache key is the cohort layout and the source of ``sample_data``, so a change of either regenerates.
    """
    source = Path(sample_data.__file__).read_bytes()
    key = hashlib.sha256(source + repr(COHORTS).encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"volume-{key}.pickle.gz"
    if cache.exists():
        with gzip.open(cache, "rb") as stream:
            cached: list[tuple[str, bytes]] = pickle.load(stream)
            return cached
    offsets, offset = [], 0
    for spec in COHORTS:
        offsets.append(offset)
        offset += 0 if spec[5] else spec[1]
    with ProcessPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(_cohort, COHORTS, offsets))
    files = [item for part in parts for item in part]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp")
    with gzip.open(partial, "wb", compresslevel=1) as stream:
        pickle.dump(files, stream)
    partial.rename(cache)
    return files


@pytest.fixture(scope="module")
def volume() -> list[tuple[str, bytes]]:
    return volume_files()


def series_of(files: list[tuple[str, bytes]]) -> dict[str, int]:
    """Instances per Series Instance UID."""
    return dict(Counter(parse_p10(data).series_uid for _, data in files))


# --- reading what the endpoint did ----------------------------------------------------------------------


def ndjson(site: Site, uri: str) -> list[dict[str, Any]]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    body = site.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def imported_originals(site: Site, job: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The original keys (in ``BUCKET``) a COMPLETED job's success manifest lists, and its failure lines.

    A staged job read ``<staging prefix>/<run scope>/<chunk id>/<original key>``: the original key is what
    follows the job's input prefix.
    """
    bucket, _, prefix = str(job["inputS3Uri"]).removeprefix("s3://").partition("/")
    folder = str(job["outputS3Uri"])
    keys = []
    for line in ndjson(site, folder + "SUCCESS/success.ndjson"):
        key = str(line["inputFile"]).removeprefix(f"s3://{bucket}/")
        keys.append(key[len(prefix) :] if bucket == STAGING_BUCKET else key)
    return keys, ndjson(site, folder + "FAILURE/failure.ndjson")


def all_image_sets(site: Site) -> list[dict[str, Any]]:
    client = site.client("medical-imaging")
    summaries: list[dict[str, Any]] = []
    for page in client.get_paginator("search_image_sets").paginate(
        datastoreId=site.datastore_id, searchCriteria={}
    ):
        summaries.extend(page["imageSetsMetadataSummaries"])
    return summaries


def instances_in_image_set(site: Site, image_set_id: str) -> int:
    """SOP instances in the image set's metadata (GetImageSetMetadata)."""
    body = (
        site.client("medical-imaging")
        .get_image_set_metadata(datastoreId=site.datastore_id, imageSetId=image_set_id)[
            "imageSetMetadataBlob"
        ]
        .read()
    )
    document = json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
    series = document["Study"]["Series"]
    return sum(len(s["Instances"]) for s in series.values())


def task_logs(api: AirflowApi, run_id: str, task_id: str) -> str:
    """Every try's log of every map index of a task."""
    parts = []
    for ti in api.task_instances(DAG_ID, run_id):
        if ti["task_id"] == task_id:
            for attempt in range(1, int(ti["try_number"] or 0) + 1):
                parts.append(api.task_log(DAG_ID, run_id, task_id, attempt, ti["map_index"]))
    return "\n".join(parts)


def wait_for_rerun(
    api: AirflowApi, run_id: str, task_id: str, tries_before: int, timeout: float = 300
) -> str:
    """After a clear: wait until ``task_id`` ran again and the run ended; return the run's state."""
    wait_until(
        lambda: int(api.task_instance(DAG_ID, run_id, task_id)["try_number"] or 0) > tries_before,
        timeout=120,
        what=f"{task_id} to run again",
    )
    return str(api.wait_for_run(DAG_ID, run_id, timeout=timeout)["state"])


def start_tries(api: AirflowApi, run_id: str) -> int:
    return int(api.task_instance(DAG_ID, run_id, START)["try_number"] or 0)


# --- a: volume -------------------------------------------------------------------------------------------


def test_twelve_thousand_files_imported_exactly_once(
    api: AirflowApi, make_site: Callable[..., Site], volume: list[tuple[str, bytes]]
) -> None:
    site = make_site("--import-seconds", "1")
    s3 = site.client("s3")
    s3.create_bucket(Bucket=STAGING_BUCKET)
    prefix = "incoming/volume/"
    summary = upload(volume, s3, BUCKET, prefix)
    assert summary.files == len(volume) >= 12_000
    expected = series_of(volume)
    assert max(Counter(k.rsplit("/", 2)[0] for k, _ in volume if k.startswith("patient-")).values()) > 1_000
    assert sum(k.startswith("loose/") for k, _ in volume) > MAX_FILES_PER_JOB
    keys = {f"{prefix}{k}" for k, _ in volume}

    run_id = api.trigger(
        DAG_ID, conf=site.conf(prefix, staging_s3_uri=STAGING_URI), run_id=new_run_id("volume")
    )
    run = api.wait_for_run(DAG_ID, run_id, timeout=480)
    assert run["state"] == "success", describe(api, run_id)

    # The plan: every file in one chunk, the loose folder staged in chunks of at most one job's quota.
    (plan,) = api.xcom(DAG_ID, run_id, PLAN, "plans")
    assert plan["totals"]["files"] == len(volume)
    assert plan["totals"]["staged_files"] == sum(k.startswith("loose/") for k, _ in volume)
    assert plan["totals"]["staged_chunks"] == 2
    assert all(c["files"] <= MAX_FILES_PER_JOB for c in plan["chunks"])
    chunks = api.xcom(DAG_ID, run_id, PLAN)
    assert len(chunks) == len(plan["chunks"]) == plan["totals"]["chunks"]

    # One job per chunk, no other job, each COMPLETED.
    job_ids = started_job_ids(api, run_id)
    assert len(job_ids) == len(set(job_ids)) == len(chunks)
    assert {j["jobId"] for j in site.jobs()} == set(job_ids)
    jobs = [site.job(job_id) for job_id in job_ids]
    assert {j["jobStatus"] for j in jobs} == {"COMPLETED"}
    assert sorted(j["inputS3Uri"] for j in jobs) == sorted(c["input_s3_uri"] for c in chunks)

    # Every object imported exactly once across the success manifests; nothing failed.
    imported: Counter[str] = Counter()
    for job in jobs:
        originals, failures = imported_originals(site, job)
        imported.update(originals)
        assert failures == [], (job["jobId"], failures[:3])
    assert set(imported) == keys
    assert set(imported.values()) == {1}

    # The report agrees.
    (report,) = api.xcom(DAG_ID, run_id, REPORT)
    totals = report["totals"]
    assert totals["objects"] == totals["planned"] == totals["imported"] == len(volume), totals
    assert (totals["failed"], totals["not_reached"], totals["unaccounted"], totals["duplicates"]) == (
        0,
        0,
        0,
        0,
    )
    assert totals["chunks_completed"] == len(chunks)
    assert totals["image_sets"] == len(expected)
    assert report["problems"] == []

    # One primary image set per series, holding all its instances (the loose series span two staged jobs).
    primaries: dict[str, list[str]] = defaultdict(list)
    for s in all_image_sets(site):
        if s.get("isPrimary"):
            primaries[s["DICOMTags"]["DICOMSeriesInstanceUID"]].append(s["imageSetId"])
    assert set(primaries) == set(expected)
    assert {len(ids) for ids in primaries.values()} == {1}, {k: v for k, v in primaries.items() if len(v) > 1}
    client = site.client("medical-imaging")
    for series_uid, (image_set_id,) in primaries.items():
        image_set = client.get_image_set(datastoreId=site.datastore_id, imageSetId=image_set_id)
        assert image_set["imageSetState"] == "ACTIVE"
        assert image_set["isPrimary"] is True
        assert instances_in_image_set(site, image_set_id) == expected[series_uid], series_uid

    # The staged copies of completed chunks are gone.
    assert s3.list_objects_v2(Bucket=STAGING_BUCKET).get("KeyCount", 0) == 0


# --- b: staging needed, none given ------------------------------------------------------------------------


def test_prefix_needing_staging_without_staging_prefix_fails_before_any_job(
    api: AirflowApi, make_site: Callable[..., Site], volume: list[tuple[str, bytes]]
) -> None:
    site = make_site()
    prefix = "incoming/nostaging/"
    loose = [(k, d) for k, d in volume if k.startswith("loose/")]
    upload(
        loose + [(k, d) for k, d in volume if k.startswith("patient-0002/")],
        site.client("s3"),
        BUCKET,
        prefix,
    )
    run_id = api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id("nostaging"))
    run = api.wait_for_run(DAG_ID, run_id, timeout=240)
    assert run["state"] == "failed", run
    plan = api.task_instance(DAG_ID, run_id, PLAN)
    assert plan["state"] == "failed", describe(api, run_id)
    assert plan["try_number"] == 1, "a retry cannot fix the input: no retries"
    log = api.task_log(DAG_ID, run_id, PLAN, 1)
    assert "No import started" in log, log[-3000:]
    assert f"s3://{BUCKET}/{prefix}loose/" in log, log[-3000:]
    assert "staging_s3_uri" in log, log[-3000:]
    assert str(len(loose)) in log
    assert site.jobs() == []
    never_ran = {None, "upstream_failed", "removed", "skipped"}
    ran = [
        t for t in api.task_instances(DAG_ID, run_id) if t["task_id"] == START and t["state"] not in never_ran
    ]
    assert ran == [], ran


# --- c: recovery -----------------------------------------------------------------------------------------


def test_clear_while_in_progress_and_after_completed_reattach(
    api: AirflowApi, make_site: Callable[..., Site]
) -> None:
    site = make_site("--import-seconds", "25")
    prefix = "incoming/clear/"
    site.upload_sample(prefix, seed=811)
    run_id = api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id("clear"))
    wait_until(lambda: start_state(api, run_id) == "success", timeout=180, what="the start to succeed")
    (job,) = site.jobs_under(prefix)
    wait_until(lambda: site.job(job["jobId"])["jobStatus"] == "IN_PROGRESS", timeout=60, what="IN_PROGRESS")

    # Clear the start (and what follows it) while the job runs: the new try re-attaches to the same job.
    api.clear_task_instances(DAG_ID, run_id, [START])
    wait_until(lambda: start_tries(api, run_id) >= 2, timeout=60, what="the start's second try")
    assert site.job(job["jobId"])["jobStatus"] == "IN_PROGRESS", "the job ended before the clear took effect"
    run = api.wait_for_run(DAG_ID, run_id, timeout=300)
    assert run["state"] == "success", describe(api, run_id)
    assert start_tries(api, run_id) == 2
    assert started_job_ids(api, run_id) == [job["jobId"]]
    assert [j["jobId"] for j in site.jobs()] == [job["jobId"]]

    # Clear the whole run after the job COMPLETED: every task runs again, the start attaches to the same job.
    api.clear_run(DAG_ID, run_id)
    assert wait_for_rerun(api, run_id, START, 2) == "success", describe(api, run_id)
    assert started_job_ids(api, run_id) == [job["jobId"]]
    assert [j["jobId"] for j in site.jobs()] == [job["jobId"]]
    assert site.job(job["jobId"])["jobStatus"] == "COMPLETED"
    (report,) = api.xcom(DAG_ID, run_id, REPORT)
    assert report["totals"]["imported"] == len(site.uploads[prefix])
    assert report["totals"]["duplicates"] == 0


def test_failed_job_then_clear_starts_one_new_job(api: AirflowApi, make_site: Callable[..., Site]) -> None:
    site = make_site("--fail-jobs", "1")
    prefix = "incoming/refail/"
    site.upload_sample(prefix, seed=822)
    run_id = api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id("refail"))
    run = api.wait_for_run(DAG_ID, run_id, timeout=240)
    assert run["state"] == "failed", describe(api, run_id)
    (failed,) = site.jobs()
    assert failed["jobStatus"] == "FAILED"
    assert "INJECTED_FAILURE" in str(site.job(failed["jobId"])["message"])

    # Clear the run (the chunks' waits run beside the start, so they are not the start's downstream): the start
    # walks past the FAILED job and the chunk's wait follows the new one.
    api.clear_run(DAG_ID, run_id)
    assert wait_for_rerun(api, run_id, START, 1) == "success", describe(api, run_id)
    jobs = {j["jobId"]: j["jobStatus"] for j in site.jobs()}
    assert len(jobs) == 2, jobs
    (new_job,) = started_job_ids(api, run_id)
    assert new_job != failed["jobId"]
    assert jobs == {failed["jobId"]: "FAILED", new_job: "COMPLETED"}
    assert "FAILED earlier: starting a new job" in task_logs(api, run_id, START)
    (report,) = api.xcom(DAG_ID, run_id, REPORT)
    assert report["totals"]["imported"] == len(site.uploads[prefix])
    assert report["problems"] == []

    # Clearing the now successful run again re-attaches to the COMPLETED job.
    api.clear_run(DAG_ID, run_id)
    assert wait_for_rerun(api, run_id, START, 2) == "success", describe(api, run_id)
    assert started_job_ids(api, run_id) == [new_job]
    assert len(site.jobs()) == 2


def test_clear_with_a_changed_variable_starts_a_new_job(
    api: AirflowApi, make_site: Callable[..., Site], variables: Callable[[dict[str, str]], None]
) -> None:
    site = make_site()
    prefix = "incoming/changed/"
    site.upload_sample(prefix, seed=833)
    variables({"healthimaging_output_s3_uri": f"s3://{OUTPUT_BUCKET}/first/"})
    conf = {k: v for k, v in site.conf(prefix).items() if k != "output_s3_uri"}
    run_id = api.trigger(DAG_ID, conf=conf, run_id=new_run_id("changed"))
    assert api.wait_for_run(DAG_ID, run_id, timeout=240)["state"] == "success", describe(api, run_id)
    (first,) = site.jobs()
    assert site.job(first["jobId"])["outputS3Uri"].startswith(f"s3://{OUTPUT_BUCKET}/first/")

    variables({"healthimaging_output_s3_uri": f"s3://{OUTPUT_BUCKET}/second/"})
    api.clear_run(DAG_ID, run_id)
    assert wait_for_rerun(api, run_id, START, 1) == "success", describe(api, run_id)
    jobs = site.jobs()
    assert len(jobs) == 2, jobs
    (second,) = started_job_ids(api, run_id)
    assert second != first["jobId"]
    assert site.job(second)["outputS3Uri"].startswith(f"s3://{OUTPUT_BUCKET}/second/")
    assert site.job(second)["jobStatus"] == "COMPLETED"


def _backfill_day(
    api: AirflowApi, deployment: AirflowDeployment, day: str, *reprocess: str, tries_before: int = 0
) -> dict[str, Any]:
    """``airflow backfill create`` over one day; wait for its run to (re)run its start and end; return the run.

    :param day: ``YYYY-MM-DD``
    :param reprocess: extra CLI arguments (``--reprocess-behavior ...``)
    :param tries_before: the start's try number before this backfill (0: the day has no run yet)
    """
    # Airflow runs one backfill per DAG at a time: wait until the scheduler has marked earlier ones complete.
    wait_until(
        lambda: all(
            b["completed_at"]
            for b in api.json("GET", "/api/v2/backfills", params={"dag_id": DAG_ID})["backfills"]
        ),
        timeout=120,
        interval=2,
        what="earlier backfills of the DAG to complete",
    )
    deployment.airflow_cli(
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        f"{day}T00:00:00",
        "--to-date",
        f"{day}T23:59:59",
        *reprocess,
    )

    def the_run() -> dict[str, Any] | None:
        runs = [r for r in api.dag_runs(DAG_ID) if (r["logical_date"] or "").startswith(day)]
        return runs[0] if len(runs) == 1 else None

    run: dict[str, Any] = wait_until(the_run, timeout=120, interval=2, what=f"the backfill run of {day}")
    run_id = run["dag_run_id"]
    wait_until(
        lambda: start_tries(api, run_id) > tries_before,
        timeout=180,
        interval=2,
        what=f"the backfill to (re)run the start of {day} (try > {tries_before})",
    )
    return api.wait_for_run(DAG_ID, run_id, timeout=300)


@pytest.fixture
def backfill_site(
    make_site: Callable[..., Site], variables: Callable[[dict[str, str]], None]
) -> Callable[..., tuple[Site, str]]:
    """Factory: a site whose Variables point the DAG at it, and a day of 2026 no other test has used."""

    def make(*options: str) -> tuple[Site, str]:
        site = make_site(*options)
        variables(
            {
                "healthimaging_datastore_id": site.datastore_id,
                "healthimaging_data_access_role_arn": ROLE_ARN,
                "healthimaging_output_s3_uri": f"s3://{OUTPUT_BUCKET}/backfill/",
                "healthimaging_input_s3_uri_template": (
                    f"s3://{BUCKET}/daily/{{{{ data_interval_start.strftime('%Y/%m/%d') }}}}/"
                ),
            }
        )
        n = uuid.uuid4().int
        day = f"2026-{1 + n % 10:02d}-{1 + (n >> 8) % 27:02d}"
        site.upload_sample(f"daily/{day.replace('-', '/')}/", seed=840 + n % 100)
        return site, day

    return make


def test_backfill_reprocess_completed_reattaches_and_failed_starts_anew(
    api: AirflowApi, deployment: AirflowDeployment, backfill_site: Callable[..., tuple[Site, str]]
) -> None:
    site, day = backfill_site()
    first = _backfill_day(api, deployment, day)
    assert first["state"] == "success", describe(api, first["dag_run_id"])
    (job,) = site.jobs()
    tries = start_tries(api, first["dag_run_id"])
    again = _backfill_day(api, deployment, day, "--reprocess-behavior", "completed", tries_before=tries)
    assert again["dag_run_id"] == first["dag_run_id"]
    assert again["run_type"] == "backfill"
    assert again["state"] == "success", describe(api, again["dag_run_id"])
    assert [j["jobId"] for j in site.jobs()] == [job["jobId"]]
    assert started_job_ids(api, again["dag_run_id"]) == [job["jobId"]]


def test_backfill_reprocess_failed_starts_a_new_job(
    api: AirflowApi, deployment: AirflowDeployment, backfill_site: Callable[..., tuple[Site, str]]
) -> None:
    site, day = backfill_site("--fail-jobs", "1")
    first = _backfill_day(api, deployment, day)
    assert first["state"] == "failed", describe(api, first["dag_run_id"])
    (failed,) = site.jobs()
    assert failed["jobStatus"] == "FAILED"
    tries = start_tries(api, first["dag_run_id"])
    again = _backfill_day(api, deployment, day, "--reprocess-behavior", "failed", tries_before=tries)
    assert again["dag_run_id"] == first["dag_run_id"]
    assert again["state"] == "success", describe(api, again["dag_run_id"])
    jobs = {j["jobId"]: j["jobStatus"] for j in site.jobs()}
    assert len(jobs) == 2, jobs
    (new_job,) = started_job_ids(api, again["dag_run_id"])
    assert jobs == {failed["jobId"]: "FAILED", new_job: "COMPLETED"}


# --- d: pacing -------------------------------------------------------------------------------------------

#: 2 s between starts. One task (``start_imports``) starts every chunk's job in a loop, milliseconds apart without
#: its pacer, so gaps of 2 s are the pacer's.
PACED_RATE = 0.5


@pytest.fixture
def paced_worker(deployment: AirflowDeployment) -> Iterator[None]:
    """The worker restarted with ``[healthimaging] start_rate`` at ``PACED_RATE``; restarted with the session's env
    after."""
    worker = deployment.component("worker")
    original = worker.env
    worker.env = {**original, "AIRFLOW__HEALTHIMAGING__START_RATE": str(PACED_RATE)}
    worker.restart()
    try:
        yield
    finally:
        worker.env = original
        worker.restart()


def test_starts_are_paced(api: AirflowApi, make_site: Callable[..., Site], paced_worker: None) -> None:
    site = make_site("--import-seconds", "2")
    prefixes = [f"incoming/paced/{n}/" for n in range(6)]
    for n, prefix in enumerate(prefixes):
        site.upload_sample(prefix, seed=870 + n, series=1, instances=1)
    conf = site.conf(prefixes[0], input_s3_uris=[f"s3://{BUCKET}/{p}" for p in prefixes[1:]])
    run_id = api.trigger(DAG_ID, conf=conf, run_id=new_run_id("paced"))
    run = api.wait_for_run(DAG_ID, run_id, timeout=420)
    assert run["state"] == "success", describe(api, run_id)
    jobs = site.jobs()
    assert len(jobs) == 6, jobs
    submitted = sorted(j["submittedAt"] for j in jobs)
    gaps = [(b - a).total_seconds() for a, b in zip(submitted, submitted[1:], strict=False)]
    # 1 / start_rate between starts; the service stamps submittedAt, so allow for its clock granularity.
    assert min(gaps) >= 1 / PACED_RATE - 0.25, gaps
    logs = task_logs(api, run_id, START)
    assert "ThrottlingException" not in logs
    assert state_of(api, run_id, WAIT, 5) == "success"
    # The waits run beside the paced starts: the first chunk's wait began before the last job was started.
    start = api.task_instance(DAG_ID, run_id, START)
    first_wait = api.task_instance(DAG_ID, run_id, WAIT, 0)
    began, start_ended = (
        datetime.fromisoformat(t.replace("Z", "+00:00"))
        for t in (first_wait["start_date"], start["end_date"])
    )
    assert began < submitted[-1] < start_ended, (first_wait, start)
    labels = {t["rendered_map_index"] for t in api.task_instances(DAG_ID, run_id) if t["task_id"] == WAIT}
    assert labels == {f"s3://{BUCKET}/{p}" for p in prefixes}
