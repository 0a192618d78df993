"""The DICOM import DAG on a real deployment (CeleryExecutor, PostgreSQL, Redis) and the faults it must survive.

Each test gets a fresh ``healthimaging-local`` endpoint (own state dir, data store and bucket); the
connection ``aws_default`` is pointed at it through the REST API. Airflow itself is shared by the session.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import psutil
import pydicom
import pytest
from botocore.config import Config
from harness import REPO_ROOT, AirflowApi, AirflowDeployment, LocalEndpoint, living, wait_until

from healthimaging_local.dicom import parse_p10
from healthimaging_local.sample_data import synthetic_study_files, upload
from healthimaging_local.server import endpoint_settings

pytestmark = pytest.mark.deployment

DAG_ID = "healthimaging_import_dicom_and_search"
RESOLVE = "resolve_imports"
START = "start_imports"  # one task starts every chunk's job, at the pace
WAIT = "import_dicom.wait_for_import_job"
SEARCH = "search_image_sets"  # the run's one search (every job's image sets)
PLAN = "plan_imports"
REPORT = "import_report"
ROLE_ARN = "arn:aws:iam::123456789012:role/HealthImagingImportRole"
BUCKET = "dicom-input"
OUTPUT_BUCKET = "dicom-output"
AWS_CONN_ID = "aws_default"
VARIABLES = (
    "healthimaging_datastore_id",
    "healthimaging_data_access_role_arn",
    "healthimaging_input_s3_uri_template",
    "healthimaging_output_s3_uri",
)
RESULTS_FILE = REPO_ROOT / "benchmarks" / "results" / "deployment_twenty_runs.json"


@dataclass
class Site:
    """A fresh endpoint with one ACTIVE data store and two buckets, and ``aws_default`` pointing at it."""

    endpoint: LocalEndpoint
    datastore_id: str
    uploads: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)

    def client(self, service: str, throttle_tolerant: bool = True) -> Any:
        assert self.endpoint.url is not None
        config: dict[str, Any] = {"inject_host_prefix": False}
        if service == "s3":
            config["s3"] = {"addressing_style": "path"}
        if throttle_tolerant:
            config["retries"] = {"mode": "standard", "max_attempts": 20}
        settings = endpoint_settings(self.endpoint.url)["boto3"]
        return boto3.session.Session().client(
            service,
            endpoint_url=settings["endpoint_url"],
            region_name=settings["region_name"],
            aws_access_key_id=settings["aws_access_key_id"],
            aws_secret_access_key=settings["aws_secret_access_key"],
            config=Config(**config),
        )

    def upload_sample(
        self, prefix: str, seed: int, patients: int = 1, series: int = 2, instances: int = 2
    ) -> None:
        """Upload a small synthetic cohort under ``s3://BUCKET/<prefix>``."""
        files = list(synthetic_study_files(patients, 1, series, instances, seed))
        upload(files, self.client("s3"), BUCKET, prefix)
        self.uploads.setdefault(prefix, []).extend(files)

    def series_uids(self, prefix: str) -> set[str]:
        """Series Instance UIDs of the DICOM files uploaded under ``prefix``."""
        return {parse_p10(data).series_uid for _, data in self.uploads[prefix]}

    def conf(self, prefix: str, **extra: Any) -> dict[str, Any]:
        return {
            "datastore_id": self.datastore_id,
            "data_access_role_arn": ROLE_ARN,
            "input_s3_uri": f"s3://{BUCKET}/{prefix}",
            "output_s3_uri": f"s3://{OUTPUT_BUCKET}/out/",
            **extra,
        }

    def jobs(self) -> list[dict[str, Any]]:
        """Every import job of the data store (ListDICOMImportJobs, all pages)."""
        client = self.client("medical-imaging")
        jobs: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"datastoreId": self.datastore_id}
        while True:
            page = client.list_dicom_import_jobs(**kwargs)
            jobs.extend(page["jobSummaries"])
            if not page.get("nextToken"):
                return jobs
            kwargs["nextToken"] = page["nextToken"]

    def jobs_under(self, prefix: str, bucket: str = BUCKET) -> list[dict[str, Any]]:
        """The data store's jobs (``jobProperties``) whose ``inputS3Uri`` lies under ``s3://<bucket>/<prefix>``.

        Job names no longer name the run (``<dag_id>.<content digest>``), and one job can serve several runs: the
        input is what ties a job to the objects it imports.
        """
        wanted = f"s3://{bucket}/{prefix}"
        jobs = [self.job(summary["jobId"]) for summary in self.jobs()]
        return [job for job in jobs if str(job["inputS3Uri"]).startswith(wanted)]

    def job(self, job_id: str) -> dict[str, Any]:
        props = self.client("medical-imaging").get_dicom_import_job(
            datastoreId=self.datastore_id, jobId=job_id
        )
        return dict(props["jobProperties"])

    def manifest(self, job_id: str) -> dict[str, Any]:
        """``jobSummary`` of the job's ``job-output-manifest.json``, read from the endpoint's S3."""
        folder = str(self.job(job_id)["outputS3Uri"])
        bucket, _, key = folder.removeprefix("s3://").partition("/")
        body = (
            self.client("s3").get_object(Bucket=bucket, Key=f"{key}job-output-manifest.json")["Body"].read()
        )
        return dict(json.loads(body)["jobSummary"])

    def image_set_ids(self) -> set[str]:
        client = self.client("medical-imaging")
        ids: set[str] = set()
        for page in client.get_paginator("search_image_sets").paginate(
            datastoreId=self.datastore_id, searchCriteria={}
        ):
            ids.update(s["imageSetId"] for s in page["imageSetsMetadataSummaries"])
        return ids


@pytest.fixture
def make_site(
    deployment: AirflowDeployment, make_endpoint: Callable[..., LocalEndpoint]
) -> Callable[..., Site]:
    """Factory: ``make_site(*endpoint_options)`` -> a ``Site`` that the DAG's ``aws_default`` now points at."""
    api = deployment.api
    assert api is not None

    def make(*options: str) -> Site:
        endpoint = make_endpoint(*options)
        assert endpoint.url is not None
        site = Site(endpoint, "")
        medical_imaging = site.client("medical-imaging")
        datastore_id = medical_imaging.create_datastore(datastoreName=f"deploy-{uuid.uuid4().hex[:8]}")[
            "datastoreId"
        ]
        wait_until(
            lambda: (
                medical_imaging.get_datastore(datastoreId=datastore_id)["datastoreProperties"][
                    "datastoreStatus"
                ]
                == "ACTIVE"
            ),
            timeout=30,
            what="the data store to be ACTIVE",
        )
        site.datastore_id = datastore_id
        s3 = site.client("s3")
        for bucket in (BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        connection = endpoint_settings(endpoint.url)["airflow_connection"]
        api.set_connection(AWS_CONN_ID, **connection)
        return site

    return make


@pytest.fixture
def api(deployment: AirflowDeployment) -> AirflowApi:
    assert deployment.api is not None
    deployment.api.wait_for_dag(DAG_ID)
    deployment.api.unpause(DAG_ID)
    return deployment.api


def started_job_ids(api: AirflowApi, run_id: str) -> list[str]:
    """The job id of every chunk of the run that was started (``start_imports``' XCom ``jobs``, in chunk order)."""
    return [str(job_id) for job_id in api.xcom(DAG_ID, run_id, START, "jobs") if job_id]


def start_state(api: AirflowApi, run_id: str) -> str | None:
    return api.ti_states(DAG_ID, run_id).get(START)


def new_run_id(label: str) -> str:
    return f"{label}_{uuid.uuid4().hex[:10]}"


def ti_of(api: AirflowApi, run_id: str, task_id: str, map_index: int = 0) -> dict[str, Any]:
    return api.task_instance(DAG_ID, run_id, task_id, map_index)


def state_of(api: AirflowApi, run_id: str, task_id: str, map_index: int = 0) -> str | None:
    return api.ti_states(DAG_ID, run_id).get(f"{task_id}[{map_index}]")


def describe(api: AirflowApi, run_id: str) -> str:
    return json.dumps(api.ti_states(DAG_ID, run_id), sort_keys=True)


def assert_run_matches_manifest(api: AirflowApi, site: Site, run_id: str, prefix: str) -> dict[str, Any]:
    """The run's XCom (sensor and search) equals the job's output manifest; returns the sensor result."""
    job_id = started_job_ids(api, run_id)[0]
    manifest = site.manifest(job_id)
    result = api.xcom(DAG_ID, run_id, WAIT, "return_value", map_index=0)
    assert result["jobId"] == job_id
    assert result["jobStatus"] == "COMPLETED"
    for key in (
        "numberOfScannedFiles",
        "numberOfImportedFiles",
        "numberOfFilesWithCustomerError",
        "numberOfFilesWithServerError",
        "numberOfGeneratedImageSets",
    ):
        assert result[key] == int(manifest.get(key) or 0), key
    manifest_ids = [summary["imageSetId"] for summary in manifest["imageSetsSummary"]]
    search_ids = api.xcom(DAG_ID, run_id, SEARCH, "imageSetIds")
    assert sorted(search_ids) == sorted(set(manifest_ids))
    summaries = api.xcom(DAG_ID, run_id, SEARCH, "imageSetsMetadataSummaries")
    # Without include_phi the UIDs are Annex E replacements (action U): one per series, none of the real ones.
    found_series = {s["DICOMTags"]["DICOMSeriesInstanceUID"] for s in summaries}
    assert len(found_series) == len(site.series_uids(prefix))
    assert all(uid.startswith("2.25.") for uid in found_series), found_series
    assert not found_series & site.series_uids(prefix)
    return dict(result)


# --- 1 ---------------------------------------------------------------------------------------------------


def test_run_succeeds_and_sensor_is_deferred_while_in_progress(
    api: AirflowApi, make_site: Callable[..., Site]
) -> None:
    site = make_site("--import-seconds", "12")
    site.upload_sample("incoming/one/", seed=101)
    run_id = api.trigger(DAG_ID, conf=site.conf("incoming/one/"), run_id=new_run_id("defer"))

    job = wait_until(lambda: site.jobs_under("incoming/one/"), timeout=180, what="the import job")[0]
    observations = []
    while site.job(job["jobId"])["jobStatus"] in {"SUBMITTED", "IN_PROGRESS"}:
        status = site.job(job["jobId"])["jobStatus"]
        states = api.ti_states(DAG_ID, run_id)
        if status == "IN_PROGRESS" and states.get(f"{WAIT}[0]") is not None:
            observations.append(states)
        time.sleep(0.5)
    in_progress_deferred = [s for s in observations if s.get(f"{WAIT}[0]") == "deferred"]
    assert in_progress_deferred, f"sensor never seen deferred while the job was IN_PROGRESS: {observations}"
    # Deferred means the task left its worker slot: no instance of the run runs or waits for a slot then
    # (but start_imports, which runs beside the waits and may still be finishing after its one start).
    for states in in_progress_deferred:
        assert not {k: v for k, v in states.items() if v in {"running", "queued"} and k != START}, states

    run = api.wait_for_run(DAG_ID, run_id, timeout=240)
    assert run["state"] == "success", describe(api, run_id)
    assert_run_matches_manifest(api, site, run_id, "incoming/one/")
    assert len(site.jobs()) == 1
    # The triggerer ended the sensor and pushed the summary checked above: no worker resumed it.
    log = api.task_log(DAG_ID, run_id, WAIT, ti_of(api, run_id, WAIT)["try_number"], 0)
    assert "ending the task from the triggerer" in log, log[-3000:]


# --- 2 ---------------------------------------------------------------------------------------------------


def test_triggerer_killed_while_deferred(
    api: AirflowApi, deployment: AirflowDeployment, make_site: Callable[..., Site]
) -> None:
    site = make_site("--import-seconds", "20")
    site.upload_sample("incoming/two/", seed=202)
    run_id = api.trigger(DAG_ID, conf=site.conf("incoming/two/"), run_id=new_run_id("triggerer"))
    # The wait defers beside start_imports, possibly before the job exists: wait for both.
    wait_until(
        lambda: state_of(api, run_id, WAIT) == "deferred" and started_job_ids(api, run_id),
        timeout=180,
        what="the sensor to defer and the job to be started",
    )
    job_id = started_job_ids(api, run_id)[0]
    old = set(deployment.pids("triggerer"))
    deployment.kill("triggerer")
    assert living(old) == []
    assert site.job(job_id)["jobStatus"] in {"SUBMITTED", "IN_PROGRESS"}, "killed too late: job already ended"
    assert state_of(api, run_id, WAIT) == "deferred"
    time.sleep(3)
    deployment.restart("triggerer")
    assert old.isdisjoint(deployment.pids("triggerer"))

    run = api.wait_for_run(DAG_ID, run_id, timeout=300)
    assert run["state"] == "success", describe(api, run_id)
    assert len(site.jobs()) == 1
    assert ti_of(api, run_id, WAIT)["try_number"] == 1
    assert_run_matches_manifest(api, site, run_id, "incoming/two/")


# --- 3 ---------------------------------------------------------------------------------------------------


def _freeze_worker_when_job_appears(
    deployment: AirflowDeployment, api: AirflowApi, site: Site, run_id: str, known: set[str]
) -> bool:
    """SIGSTOP the worker group the moment a job not in ``known`` exists; True if the start task had not succeeded yet."""
    worker = deployment.component("worker")
    client = site.client("medical-imaging", throttle_tolerant=False)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        summaries = client.list_dicom_import_jobs(datastoreId=site.datastore_id)["jobSummaries"]
        if {job["jobId"] for job in summaries} - known:
            os.killpg(worker.pid, signal.SIGSTOP)
            return start_state(api, run_id) == "running"
        time.sleep(0.01)
    raise TimeoutError(f"no job for {run_id}: {describe(api, run_id)}")


def test_worker_killed_during_start_reattaches_to_the_same_job(
    api: AirflowApi, deployment: AirflowDeployment, make_site: Callable[..., Site]
) -> None:
    site = make_site("--import-seconds", "3")
    worker = deployment.component("worker")
    for attempt in range(1, 5):
        # A prefix of its own per attempt: the same objects would attach to the previous attempt's job.
        prefix = f"incoming/three/{attempt}/"
        site.upload_sample(prefix, seed=303 + attempt)
        known = {job["jobId"] for job in site.jobs()}
        run_id = api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id("worker"))
        if _freeze_worker_when_job_appears(deployment, api, site, run_id, known):
            print(f"caught the start task between its job and its success at attempt {attempt}")
            break
        # The start task had already recorded success: let this run finish and try a new one.
        os.killpg(worker.pid, signal.SIGCONT)
        api.wait_for_run(DAG_ID, run_id, timeout=240)
    else:
        pytest.fail("never caught the start task between StartDICOMImportJob and its success")

    deployment.kill("worker")  # the frozen worker dies without reporting anything
    assert len(site.jobs_under(prefix)) == 1
    deployment.restart("worker")
    # The scheduler sees the heartbeat stop, fails the try and retries it on the new worker.
    run = api.wait_for_run(DAG_ID, run_id, timeout=420)
    assert run["state"] == "success", describe(api, run_id)
    start = api.task_instance(DAG_ID, run_id, START)
    assert start["try_number"] >= 2, start
    jobs = site.jobs_under(prefix)
    assert len(jobs) == 1, jobs
    assert started_job_ids(api, run_id) == [jobs[0]["jobId"]]
    assert_run_matches_manifest(api, site, run_id, prefix)


# --- 4 ---------------------------------------------------------------------------------------------------


def test_thirty_percent_throttling(api: AirflowApi, make_site: Callable[..., Site]) -> None:
    site = make_site("--throttle-rate", "0.3", "--import-seconds", "4", "--seed", "7", "--log-level", "INFO")
    site.upload_sample("incoming/four/", seed=404)
    log_path = site.endpoint.component.log_path
    offset = log_path.stat().st_size
    run_id = api.trigger(DAG_ID, conf=site.conf("incoming/four/"), run_id=new_run_id("throttle"))
    run = api.wait_for_run(DAG_ID, run_id, timeout=300)
    # While the run ran, only Airflow talked to the endpoint: its access log shows what Airflow got.
    with log_path.open("rb") as stream:
        stream.seek(offset)
        during_run = stream.read().decode(errors="replace").splitlines()
    assert run["state"] == "success", describe(api, run_id)
    throttled = [line for line in during_run if line.endswith(" 429")]
    assert throttled, "no request of the run was throttled: the fault was not injected"
    assert len(site.jobs()) == 1
    assert_run_matches_manifest(api, site, run_id, "incoming/four/")


# --- 5 ---------------------------------------------------------------------------------------------------


def test_endpoint_killed_mid_import_and_restarted(api: AirflowApi, make_site: Callable[..., Site]) -> None:
    site = make_site("--import-seconds", "15")
    site.upload_sample("incoming/five/", seed=505, patients=2)
    run_id = api.trigger(DAG_ID, conf=site.conf("incoming/five/"), run_id=new_run_id("endpoint"))
    job = wait_until(lambda: site.jobs_under("incoming/five/"), timeout=180, what="the import job")[0]
    wait_until(lambda: site.job(job["jobId"])["jobStatus"] == "IN_PROGRESS", timeout=60, what="IN_PROGRESS")
    wait_until(lambda: state_of(api, run_id, WAIT) == "deferred", timeout=120, what="the sensor to defer")
    site.endpoint.kill()
    time.sleep(6)  # the trigger polls a dead endpoint meanwhile
    site.endpoint.restart()

    run = api.wait_for_run(DAG_ID, run_id, timeout=300)
    jobs = site.jobs()
    assert len(jobs) == 1, jobs
    if run["state"] == "success":
        result = assert_run_matches_manifest(api, site, run_id, "incoming/five/")
        assert result["numberOfGeneratedImageSets"] == len(site.series_uids("incoming/five/"))
        assert site.image_set_ids() == set(api.xcom(DAG_ID, run_id, SEARCH, "imageSetIds"))
    else:
        failed = {k: v for k, v in api.ti_states(DAG_ID, run_id).items() if v == "failed"}
        assert failed, describe(api, run_id)
        task_id, _, index = next(iter(failed)).partition("[")
        ti = ti_of(api, run_id, task_id, int(index.rstrip("]") or -1))
        log = api.task_log(DAG_ID, run_id, task_id, ti["try_number"], ti["map_index"])
        assert "import job" in log.lower(), log[-3000:]
    assert len(site.image_set_ids()) == len(site.series_uids("incoming/five/"))


# --- 6 ---------------------------------------------------------------------------------------------------


def test_failed_job_fails_the_sensor_and_the_run(api: AirflowApi, make_site: Callable[..., Site]) -> None:
    """A job that ends FAILED (``--fail-jobs 1``: the endpoint fails the data store's first job) fails the sensor
    at once with the service's message, the search finds nothing of it, and the report fails the run."""
    site = make_site("--fail-jobs", "1")
    prefix = "incoming/failed/"
    site.upload_sample(prefix, seed=606)
    run_id = api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id("failed"))

    def sensor_done() -> dict[str, Any] | None:
        ti = ti_of(api, run_id, WAIT)
        return ti if ti["state"] in {"up_for_retry", "failed"} else None

    sensor = wait_until(sensor_done, timeout=240, what="the sensor to fail")
    jobs = site.jobs_under(prefix)
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert job["jobStatus"] == "FAILED"
    assert "INJECTED_FAILURE" in str(job["message"])
    log = api.task_log(DAG_ID, run_id, WAIT, sensor["try_number"], 0)
    assert f"DICOM import job {job['jobId']} FAILED" in log, log[-3000:]
    assert str(job["message"]) in log, log[-3000:]
    # A FAILED job stays FAILED: the sensor fails at once instead of spending its retries.
    assert sensor["state"] == "failed", sensor
    assert sensor["try_number"] == 1, sensor
    run = api.wait_for_run(DAG_ID, run_id, timeout=180)
    assert run["state"] == "failed", run
    # The run's search leaves the FAILED job out: it finds no image set.
    assert api.xcom(DAG_ID, run_id, SEARCH, "imageSetIds") == []
    assert api.xcom(DAG_ID, run_id, SEARCH, "imageSetIdsByJob") == {}
    assert api.ti_states(DAG_ID, run_id)[REPORT] == "failed", describe(api, run_id)
    assert len(site.jobs()) == 1


# --- 7 ---------------------------------------------------------------------------------------------------


def test_non_dicom_files_are_reported(api: AirflowApi, make_site: Callable[..., Site]) -> None:
    site = make_site()
    prefix = "incoming/mixed/"
    site.upload_sample(prefix, seed=707)
    junk = [("notes/readme.txt", b"not a dicom file"), ("scan.jpg", b"\xff\xd8\xff\xe0 fake jpeg")]
    upload(junk, site.client("s3"), BUCKET, prefix)
    run_id = api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id("mixed"))
    run = api.wait_for_run(DAG_ID, run_id, timeout=240)
    assert run["state"] == "success", describe(api, run_id)
    result = assert_run_matches_manifest(api, site, run_id, prefix)
    assert result["numberOfFilesWithCustomerError"] == len(junk)
    reported = {f["inputFile"].rsplit("/", 1)[-1] for f in result["failedFiles"]}
    assert reported == {"readme.txt", "scan.jpg"}
    log = api.task_log(DAG_ID, run_id, WAIT, ti_of(api, run_id, WAIT)["try_number"], 0)
    assert f"COMPLETED with {len(junk)} failed file(s)" in log, log[-3000:]
    assert "readme.txt" in log


# --- 8 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"datastore_id": "NOT-A-DATASTORE"},
        {"data_access_role_arn": "arn:aws:iam::12:role/x"},
        {"input_s3_uri": "https://not-s3/bucket/"},
        {"max_results": 500},
        {"client_token": "spaces are not allowed"},
    ],
    ids=["datastore_id", "role_arn", "input_s3_uri", "max_results", "client_token"],
)
def test_invalid_params_are_refused(
    api: AirflowApi, make_site: Callable[..., Site], override: dict[str, Any]
) -> None:
    site = make_site()
    before = {run["dag_run_id"] for run in api.dag_runs(DAG_ID)}
    response = api.trigger_run(DAG_ID, conf={**site.conf("incoming/bad/"), **override})
    assert 400 <= response.status_code < 500, response.text
    assert {run["dag_run_id"] for run in api.dag_runs(DAG_ID)} == before
    assert site.jobs() == []


# --- 9 ---------------------------------------------------------------------------------------------------


@pytest.fixture
def variables(api: AirflowApi) -> Iterator[Callable[[dict[str, str]], None]]:
    def set_all(values: dict[str, str]) -> None:
        for key, value in values.items():
            api.set_variable(key, value)

    yield set_all
    for key in VARIABLES:
        api.delete_variable(key)


def test_backfill_three_days(
    api: AirflowApi,
    deployment: AirflowDeployment,
    make_site: Callable[..., Site],
    variables: Callable[[dict[str, str]], None],
) -> None:
    site = make_site()
    variables(
        {
            "healthimaging_datastore_id": site.datastore_id,
            "healthimaging_data_access_role_arn": ROLE_ARN,
            "healthimaging_output_s3_uri": f"s3://{OUTPUT_BUCKET}/backfill/",
            "healthimaging_input_s3_uri_template": (
                f"s3://{BUCKET}/incoming/{{{{ data_interval_start.strftime('%Y/%m/%d') }}}}/"
            ),
        }
    )
    # Three days after the DAG's start_date that no other run in this database has used.
    month = 2 + uuid.uuid4().int % 10
    from_date, to_date = f"2025-{month:02d}-01", f"2025-{month:02d}-04"
    dry = api.json(
        "POST",
        "/api/v2/backfills/dry_run",
        json={"dag_id": DAG_ID, "from_date": f"{from_date}T00:00:00Z", "to_date": f"{to_date}T00:00:00Z"},
    )
    logical_dates = sorted(datetime.fromisoformat(b["logical_date"]) for b in dry["backfills"])
    assert len(logical_dates) == 3, dry
    prefixes = {}
    for seed, logical_date in enumerate(logical_dates, start=900):
        prefix = f"incoming/{logical_date.astimezone(UTC).strftime('%Y/%m/%d')}/"
        site.upload_sample(prefix, seed=seed)
        prefixes[logical_date] = prefix

    deployment.airflow_cli(
        "backfill", "create", "--dag-id", DAG_ID, "--from-date", from_date, "--to-date", to_date
    )
    runs = wait_until(
        lambda: (
            (
                r := [
                    run
                    for run in api.dag_runs(DAG_ID, run_type="backfill")
                    if run["logical_date"] and run["logical_date"].startswith(f"2025-{month:02d}-")
                ]
            )
            and len(r) == 3
            and r
        ),
        timeout=120,
        what="three backfill runs",
    )
    for run in runs:
        finished = api.wait_for_run(DAG_ID, run["dag_run_id"], timeout=300)
        assert finished["state"] == "success", describe(api, run["dag_run_id"])
    jobs = site.jobs()
    assert len(jobs) == 3, jobs
    seen: set[str] = set()
    for run in runs:
        logical_date = datetime.fromisoformat(run["logical_date"])
        prefix = prefixes[logical_date]
        run_id = run["dag_run_id"]
        assert api.xcom(DAG_ID, run_id, RESOLVE)[0]["input_s3_uri"] == f"s3://{BUCKET}/{prefix}"
        assert_run_matches_manifest(api, site, run_id, prefix)
        ids = set(api.xcom(DAG_ID, run_id, SEARCH, "imageSetIds"))
        assert ids.isdisjoint(seen)
        seen |= ids


# --- 10 --------------------------------------------------------------------------------------------------


def test_twenty_runs_at_once(
    api: AirflowApi, deployment: AirflowDeployment, make_site: Callable[..., Site]
) -> None:
    site = make_site("--import-seconds", "20")
    runs = 20
    # One prefix per run: runs of the same objects would all attach to one job.
    prefixes = [f"incoming/twenty/{i:02d}/" for i in range(runs)]
    for i, prefix in enumerate(prefixes):
        site.upload_sample(prefix, seed=1000 + i, patients=1, series=1, instances=2)
    started = time.monotonic()
    with deployment.sample("triggerer") as sampler:
        run_ids = [
            api.trigger(DAG_ID, conf=site.conf(prefix), run_id=new_run_id(f"twenty{i:02d}"))
            for i, prefix in enumerate(prefixes)
        ]
        max_deferred = 0
        pending = set(run_ids)
        deadline = time.monotonic() + 900
        while pending and time.monotonic() < deadline:
            deferred = 0
            for run_id in list(pending):
                if api.dag_run(DAG_ID, run_id)["state"] in {"success", "failed"}:
                    pending.discard(run_id)
                elif state_of(api, run_id, WAIT) == "deferred":
                    deferred += 1
            max_deferred = max(max_deferred, deferred)
            time.sleep(2)
    wall = time.monotonic() - started
    assert not pending, f"{len(pending)} runs still running"
    states = {run_id: api.dag_run(DAG_ID, run_id)["state"] for run_id in run_ids}
    assert set(states.values()) == {"success"}, states
    assert len(site.jobs()) == runs
    usage = sampler.usage
    record = {
        "test": "tests/deployment/test_deployment.py::test_twenty_runs_at_once",
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "import_seconds": 20,
        "dag_max_active_runs": api.dag(DAG_ID).get("max_active_runs"),
        "max_sensors_deferred_at_once": max_deferred,
        "wall_seconds": round(wall, 1),
        "triggerer": usage.as_dict(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor() or platform.machine(),
        },
        "executor": "CeleryExecutor",
        "worker_concurrency": deployment.settings.worker_concurrency,
    }
    # The recorded figures are updated only on request, so that a test run leaves the work tree clean.
    if os.environ.get("RECORD_BENCHMARKS") == "1":
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    assert usage.samples > 0


# --- PHI (issue 7): patient identity stays out of every log file, and out of XCom unless opted in ------------
# Sample DICOM carries canary patient attributes. After runs with and without ``include_phi`` (one of them
# searching by the canary patient id), every file under the deployment's log folder (scheduler, dag-processor,
# api-server, triggerer and worker output, task logs, trigger logs, and the endpoint's own log) is scanned.

CANARIES = {
    "PatientName": "PHI^CANARY^ZETA",
    "PatientID": "PHICANARY001",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACCCANARY9",
}


def canary_files() -> list[tuple[str, bytes]]:
    """Synthetic P10 files whose patient attributes are the canaries."""
    files = []
    for key, data in synthetic_study_files(1, 1, 2, 2, seed=4242):
        dataset = pydicom.dcmread(BytesIO(data))
        for keyword, value in CANARIES.items():
            setattr(dataset, keyword, value)
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        files.append((key, out.getvalue()))
    return files


def files_mentioning(folder: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every file under ``folder`` that contains one of ``needles`` (as bytes), with the needles it contains."""
    found: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [n for n in needles if n.encode() in data]
            if hits:
                found[str(path)] = hits
    return found


def test_no_phi_in_any_log_and_xcom_only_when_opted_in(
    api: AirflowApi, make_site: Callable[..., Site], deployment: AirflowDeployment
) -> None:
    site = make_site("--import-seconds", "8")  # long enough that the sensors defer: trigger logs get written
    prefix = "incoming/phi/"
    files = canary_files()
    upload(files, site.client("s3"), BUCKET, prefix)
    by_patient = {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": CANARIES["PatientID"]}]}]}

    masked_run = api.trigger(
        DAG_ID, conf=site.conf(prefix, search_criteria=by_patient), run_id=new_run_id("phi_masked")
    )
    assert api.wait_for_run(DAG_ID, masked_run, timeout=240)["state"] == "success", describe(api, masked_run)
    opted_in_run = api.trigger(
        DAG_ID, conf=site.conf(prefix, include_phi=True), run_id=new_run_id("phi_opted_in")
    )
    assert api.wait_for_run(DAG_ID, opted_in_run, timeout=240)["state"] == "success", describe(
        api, opted_in_run
    )

    masked: list[dict[str, Any]] = api.xcom(DAG_ID, masked_run, SEARCH, "imageSetsMetadataSummaries")
    opted_in: list[dict[str, Any]] = api.xcom(DAG_ID, opted_in_run, SEARCH, "imageSetsMetadataSummaries")
    # The search by the canary patient id found this import's image sets, so the criteria were really used.
    assert len(masked) == 2
    assert all(s["DICOMTags"]["DICOMPatientId"] == "" for s in masked)  # Annex E action Z
    assert all(s["DICOMTags"]["DICOMPatientName"] == "" for s in masked)
    assert CANARIES["PatientID"] not in repr(masked)
    assert {s["DICOMTags"]["DICOMPatientId"] for s in opted_in} == {CANARIES["PatientID"]}
    assert {s["DICOMTags"]["DICOMPatientName"] for s in opted_in} == {CANARIES["PatientName"]}

    # Every XCom of the masked run, on every task: no canary.
    for ti in api.task_instances(DAG_ID, masked_run):
        for key in api.xcom_keys(DAG_ID, masked_run, ti["task_id"], ti.get("map_index", -1)):
            value = api.xcom(DAG_ID, masked_run, ti["task_id"], key, map_index=ti.get("map_index", -1))
            assert not [c for c in CANARIES.values() if c in repr(value)], (ti["task_id"], key)

    # search_criteria (issue 13): the canary patient id is in no rendered field, no task instance the REST API
    # (and so the UI) answers with, and no task log read through the API. Only the run's conf holds it: the
    # package cannot redact dag_run.conf (docs/phi.md), which this pins.
    search_ti = ti_of(api, masked_run, SEARCH, map_index=-1)
    assert search_ti["rendered_fields"]["search_criteria"] == {
        "filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "***"}]}]
    }
    answers = {
        "task instances (list)": api.task_instances(DAG_ID, masked_run),
        **{
            f"task instance {ti['task_id']}[{ti['map_index']}]": api.task_instance(
                DAG_ID, masked_run, ti["task_id"], ti["map_index"]
            )
            for ti in api.task_instances(DAG_ID, masked_run)
        },
        "search task log": api.task_log(DAG_ID, masked_run, SEARCH, search_ti["try_number"]),
    }
    for where, answer in answers.items():
        assert CANARIES["PatientID"] not in json.dumps(answer, default=str), where
    assert CANARIES["PatientID"] in json.dumps(api.dag_run(DAG_ID, masked_run)["conf"])

    log_dir = deployment.log_dir
    trigger_logs = [p for p in log_dir.rglob("*") if p.is_file() and ".trigger." in p.name]
    task_logs = [p for p in (log_dir / "tasks").rglob("*") if p.is_file()]
    endpoint_logs = [p for p in log_dir.glob("endpoint*.log")]
    # The scan below must have something to read: task logs, the sensors' trigger logs and the endpoint log.
    assert trigger_logs, "no trigger log file was written"
    assert task_logs
    assert endpoint_logs
    leaks = files_mentioning(log_dir, list(CANARIES.values()))
    assert leaks == {}, leaks
