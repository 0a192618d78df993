"""Fixtures for the HealthImaging Airflow integration: a stubbed medical-imaging client, moto S3, a task context."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

import boto3
import pytest
from botocore.stub import Stubber

from healthimaging.hooks import HealthImagingHook

DATASTORE_ID = "0123456789abcdef0123456789abcdef"
JOB_ID = "fedcba9876543210fedcba9876543210"
ROLE_ARN = "arn:aws:iam::123456789012:role/ImportRole"
INPUT_URI = "s3://input-bucket/dicom/"
OUTPUT_URI = "s3://output-bucket/results/"
JOB_FOLDER = f"{OUTPUT_URI}{DATASTORE_ID}-DicomImport-{JOB_ID}/"
SUBMITTED_AT = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ENDED_AT = datetime(2025, 3, 1, 12, 1, 30, tzinfo=UTC)


def job_properties(status: str, **overrides: Any) -> dict[str, Any]:
    """A GetDICOMImportJob ``jobProperties`` as the service returns it."""
    props: dict[str, Any] = {
        "jobId": JOB_ID,
        "jobName": "job",
        "jobStatus": status,
        "datastoreId": DATASTORE_ID,
        "dataAccessRoleArn": ROLE_ARN,
        "submittedAt": SUBMITTED_AT,
        "inputS3Uri": INPUT_URI,
        "outputS3Uri": JOB_FOLDER,
    }
    if status in ("COMPLETED", "FAILED"):
        props["endedAt"] = ENDED_AT
    if status == "FAILED":
        props["message"] = "DICOM import job has failed. FILE_COUNTS_LIMIT_EXCEEDED"
    props.update(overrides)
    return props


def manifest(
    scanned: int = 3, imported: int = 3, customer_errors: int = 0, image_set_ids: tuple[str, ...] = ()
) -> str:
    """A job-output-manifest.json body."""
    return json.dumps(
        {
            "jobSummary": {
                "jobId": JOB_ID,
                "datastoreId": DATASTORE_ID,
                "inputS3Uri": INPUT_URI,
                "outputS3Uri": JOB_FOLDER,
                "numberOfScannedFiles": scanned,
                "numberOfImportedFiles": imported,
                "numberOfFilesWithCustomerError": customer_errors,
                "numberOfFilesWithServerError": 0,
                "numberOfGeneratedImageSets": len(image_set_ids),
                "imageSetsSummary": [
                    {
                        "imageSetId": i,
                        "imageSetVersion": 1,
                        "isPrimary": True,
                        "numberOfMatchedSOPInstances": 1,
                    }
                    for i in image_set_ids
                ],
            }
        }
    )


def job_summary(job_id: str, status: str, submitted_at: datetime = SUBMITTED_AT) -> dict[str, Any]:
    """A ListDICOMImportJobs ``jobSummaries`` item."""
    return {
        "jobId": job_id,
        "jobName": "job",
        "jobStatus": status,
        "datastoreId": DATASTORE_ID,
        "submittedAt": submitted_at,
    }


def expect_pace(
    stubber: Stubber, submitted: tuple[datetime, ...] = (), in_progress: tuple[datetime, ...] = ()
) -> None:
    """Queue the two ListDICOMImportJobs calls of the start pace (one page each), jobs submitted at these times."""
    for status, times in (("SUBMITTED", submitted), ("IN_PROGRESS", in_progress)):
        stubber.add_response(
            "list_dicom_import_jobs",
            {
                "jobSummaries": [
                    job_summary(f"{status.lower()[:2]}{i:030x}", status, t) for i, t in enumerate(times)
                ]
            },
            {"datastoreId": DATASTORE_ID, "jobStatus": status, "maxResults": 50},
        )


def failure_ndjson(*files: str) -> str:
    return "".join(
        json.dumps(
            {
                "inputFile": name,
                "exception": {"exceptionType": "ValidationException", "message": "not a DICOM P10 file"},
            }
        )
        + "\n"
        for name in files
    )


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"region_name": "us-east-1"},
            }
        ),
    )


@pytest.fixture
def stubber(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    """A real medical-imaging client with a Stubber, used as every HealthImagingHook's ``conn``."""
    client = boto3.client("medical-imaging", region_name="us-east-1")
    monkeypatch.setattr(HealthImagingHook, "conn", client)
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


@pytest.fixture
def s3(aws_env: None) -> Iterator[Any]:
    """moto S3 (in-process) with the input and output buckets; HealthImagingHook.s3_hook talks to it."""
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="input-bucket")
        client.create_bucket(Bucket="output-bucket")
        yield client


def put_job_outputs(s3: Any, body: str, failures: str | None = None) -> None:
    key = JOB_FOLDER.removeprefix("s3://output-bucket/")
    s3.put_object(Bucket="output-bucket", Key=f"{key}job-output-manifest.json", Body=body.encode())
    if failures is not None:
        s3.put_object(Bucket="output-bucket", Key=f"{key}FAILURE/failure.ndjson", Body=failures.encode())


class FakeStateStore:
    """A dict-backed stand-in for Airflow's ``task_state_store`` (``get``/``set``, values must be JSON)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.values[key]) if key in self.values else default

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.values[key] = json.dumps(value)


def make_context(
    dag_id: str = "dag",
    run_id: str = "manual__2025-03-01T12:00:00+00:00",
    task_id: str = "start",
    map_index: int = -1,
    try_number: int = 1,
    store: FakeStateStore | None = None,
) -> dict[str, Any]:
    """A task context with a mocked TaskInstance that records XCom pushes in ``ti.pushed``.

    :param store: the task instance's ``task_state_store`` (a new empty one by default; pass the same one to
        model a retry or a clear of the same task instance)
    """
    ti = mock.MagicMock()
    ti.dag_id, ti.task_id, ti.map_index, ti.try_number, ti.run_id = (
        dag_id,
        task_id,
        map_index,
        try_number,
        run_id,
    )
    ti.pushed = {}
    ti.xcom_push.side_effect = lambda key, value: ti.pushed.__setitem__(key, value)
    ti.get_first_reschedule_date.return_value = None
    return {
        "ti": ti,
        "task_instance": ti,
        "run_id": run_id,
        "dag_run": mock.MagicMock(run_id=run_id),
        "task_state_store": FakeStateStore() if store is None else store,
    }


@pytest.fixture
def context() -> dict[str, Any]:
    return make_context()


@pytest.fixture
def kit() -> Any:
    """This module's constants and builders, for tests (test modules cannot import a conftest)."""
    import sys

    return sys.modules[__name__]


# ------------------------------------------------------------------ real path: the local endpoint


class Live:
    """A running local HealthImaging + S3 endpoint, reached by Airflow through ``AIRFLOW_CONN_AWS_DEFAULT`` only."""

    def __init__(self, endpoint: Any, datastore_id: str) -> None:
        self.endpoint = endpoint
        self.datastore_id = datastore_id
        self.medical_imaging = endpoint.client("medical-imaging")
        self.s3 = endpoint.client("s3")

    def upload(
        self, prefix: str, series_per_study: int = 2, instances_per_series: int = 2, seed: int = 0
    ) -> set[str]:
        """Upload a synthetic study under ``s3://input/<prefix>/``; return its Series Instance UIDs."""
        import pydicom

        series: set[str] = set()
        for key, body in self.sample_files(series_per_study, instances_per_series, seed):
            self.s3.put_object(Bucket="input", Key=f"{prefix}/{key}", Body=body)
            import io

            series.add(str(pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SeriesInstanceUID))
        return series

    @staticmethod
    def sample_files(series_per_study: int, instances_per_series: int, seed: int) -> list[tuple[str, bytes]]:
        from healthimaging_local.sample_data import synthetic_study_files

        return list(synthetic_study_files(1, 1, series_per_study, instances_per_series, seed=seed))

    def start_job(self, input_prefix: str, input_bucket: str = "input") -> str:
        response = self.medical_imaging.start_dicom_import_job(
            datastoreId=self.datastore_id,
            dataAccessRoleArn=ROLE_ARN,
            inputS3Uri=f"s3://{input_bucket}/{input_prefix}/",
            outputS3Uri="s3://output/results/",
        )
        return response["jobId"]

    def wait_for_job(self, job_id: str, *statuses: str, timeout: float = 60.0) -> str:
        """Poll GetDICOMImportJob until the job reaches one of ``statuses``; return that status."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            status = self.medical_imaging.get_dicom_import_job(datastoreId=self.datastore_id, jobId=job_id)[
                "jobProperties"
            ]["jobStatus"]
            if status in statuses or time.monotonic() > deadline:
                return str(status)
            time.sleep(0.2)

    def jobs(self) -> list[dict[str, Any]]:
        return self.medical_imaging.list_dicom_import_jobs(datastoreId=self.datastore_id)["jobSummaries"]


def airflow_connection(url: str) -> str:
    return json.dumps(
        {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {
                "region_name": "us-east-1",
                "endpoint_url": url,
                "config_kwargs": {"inject_host_prefix": False},
            },
        }
    )


@contextlib.contextmanager
def running_endpoint(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, **endpoint_kwargs: Any
) -> Iterator[Live]:
    """A local endpoint with a data store and buckets ``input``/``output``, Airflow's default AWS connection on it.

    :param endpoint_kwargs: arguments of ``LocalEndpoint`` (e.g. ``import_seconds``, ``max_concurrent_imports``)
    """
    import time

    server = pytest.importorskip("healthimaging_local.server")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with server.LocalEndpoint(tmp_path / "state", **endpoint_kwargs) as endpoint:
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", airflow_connection(endpoint.url))
        client = endpoint.client("medical-imaging")
        datastore_id = client.create_datastore(datastoreName="airflow-tests", clientToken="airflow-tests")[
            "datastoreId"
        ]
        for _ in range(100):
            if (
                client.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"]
                == "ACTIVE"
            ):
                break
            time.sleep(0.1)
        live = Live(endpoint, datastore_id)
        live.s3.create_bucket(Bucket="input")
        live.s3.create_bucket(Bucket="output")
        yield live


def run_dag_test(tmp_path: Any, dag_source: str, runner: str, **env: str) -> tuple[dict[str, Any], str]:
    """
    Run ``runner`` (a script that calls ``dag.test()`` and prints ``RESULT <json>``) in a fresh Python process with
    ``dag_source`` as its only DAG file and an AIRFLOW_HOME of its own, against ``AIRFLOW_CONN_AWS_DEFAULT``.

    :param env: more environment variables (for the DAG file)
    :return: the RESULT object (its ``state`` checked to be success) and the process's output (task logs included)
    """
    import subprocess
    import sys
    import textwrap

    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "dag_under_test.py").write_text(textwrap.dedent(dag_source))
    child_env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "AWS_"))}
    child_env |= {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_AWS_DEFAULT": os.environ["AIRFLOW_CONN_AWS_DEFAULT"],
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", runner],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["state"] == "success", done.stdout[-3000:]
    return result, output


@pytest.fixture
def live(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    """A local endpoint whose import jobs stay IN_PROGRESS for 3 s, with a data store and buckets ``input``/``output``."""
    with running_endpoint(tmp_path, monkeypatch, import_seconds=3) as live:
        yield live


@pytest.fixture
def live_slow(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    """As ``live``, with jobs IN_PROGRESS for 15 s: for tests that must see a job still running, on a loaded machine."""
    with running_endpoint(tmp_path, monkeypatch, import_seconds=15) as live:
        yield live
