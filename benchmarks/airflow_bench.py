"""Plumbing for the benchmarks that run on a real Airflow deployment (``tests/deployment/harness.py``).

Starts the deployment with this folder's benchmark DAGs, a ``healthimaging-local serve`` endpoint with its
access log on (``--log-level INFO``: method, path, status per request), points ``aws_default`` at it, starts
import jobs directly with boto3, counts GetDICOMImportJob calls from the access log and integrates the time
task instances spend in ``running`` from the REST API.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "deployment"))
sys.path.insert(0, str(ROOT))

from harness import (  # noqa: E402
    ADMIN_USER,
    PG_HOST,
    PG_PORT,
    PG_USER,
    AirflowApi,
    AirflowDeployment,
    DeploymentSettings,
    LocalEndpoint,
    tail,
    wait_until,
)

from benchmarks.harness import ROLE_ARN, client, create_active_datastore  # noqa: E402
from healthimaging_local.server import endpoint_settings  # noqa: E402

BENCH_DAGS = ROOT / "benchmarks" / "dags"
BUCKET = "bench-dicom"
INPUT_URI = f"s3://{BUCKET}/one-file/"
OUTPUT_URI = f"s3://{BUCKET}/output/"
#: ``2026-11-27 18:10:00,123 healthimaging_local.access GET /getDICOMImportJob/datastore/D/job/J 200``
GET_JOB_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) healthimaging_local\.access GET "
    r"/getDICOMImportJob/datastore/(\w+)/job/(\w+) (\d+)"
)


@contextlib.contextmanager
def deployment(
    dag_files: list[str] | dict[str, str], worker_concurrency: int, extra_env: dict[str, str]
) -> Iterator[Any]:
    """A started ``AirflowDeployment`` whose DAGs folder holds only ``dag_files`` (from ``benchmarks/dags``).

    Every component is stopped and the temporary folder removed on exit; the log tails are printed on error.

    :param dag_files: file names in ``benchmarks/dags``, or a mapping of link names in the DAGs folder to them
    :param worker_concurrency: Celery worker slots
    :param extra_env: environment added to every Airflow component (parse-time DAG settings)
    """
    base = Path(tempfile.mkdtemp(prefix="airflow_bench_"))
    dags = base / "dags"
    dags.mkdir()
    links = dag_files if isinstance(dag_files, dict) else {name: name for name in dag_files}
    for link, name in links.items():
        (dags / link).symlink_to(BENCH_DAGS / name)
    settings = DeploymentSettings(
        dags_folder=dags, extra_env=extra_env, worker_concurrency=worker_concurrency
    )
    deploy = AirflowDeployment(settings, base_dir=base)
    try:
        deploy.start()
        yield deploy
    except BaseException:
        print(deploy.log_tails(lines=40), file=sys.stderr)
        raise
    finally:
        deploy.stop()
        kept = Path(tempfile.gettempdir()) / f"{base.name}_logs"
        shutil.copytree(deploy.log_dir, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tasks"))
        print(f"deployment logs kept in {kept}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


class Site:
    """The endpoint (access log on), one ACTIVE data store, a one-file input prefix, ``aws_default`` set.

    :param deploy: the running deployment (its log folder receives the endpoint log)
    :param options: extra ``serve`` options, e.g. ``["--import-seconds", "30"]``
    """

    def __init__(self, deploy: AirflowDeployment, options: list[str]) -> None:
        state = Path(tempfile.mkdtemp(prefix="state_", dir=deploy.base_dir))
        self.endpoint = LocalEndpoint(state, deploy.log_dir, ["--log-level", "INFO", *options])
        self.url = self.endpoint.start()
        self.hi = client(self.url, "medical-imaging")
        s3 = client(self.url, "s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="one-file/1.dcm", Body=sample_dicom())
        self.datastore_id = create_active_datastore(self.hi, f"bench-{uuid.uuid4().hex[:8]}")
        assert deploy.api is not None
        deploy.api.set_connection("aws_default", **endpoint_settings(self.url)["airflow_connection"])

    def stop(self) -> None:
        self.endpoint.stop()

    def start_jobs(self, count: int) -> list[str]:
        """Start ``count`` import jobs of the one-file prefix and return their ids.

        :param count: how many
        """
        return [
            str(
                self.hi.start_dicom_import_job(
                    datastoreId=self.datastore_id,
                    dataAccessRoleArn=ROLE_ARN,
                    inputS3Uri=INPUT_URI,
                    outputS3Uri=OUTPUT_URI,
                )["jobId"]
            )
            for _ in range(count)
        ]

    def jobs(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """``jobProperties`` of each job (these calls show up in the access log: read counts first).

        :param job_ids: the jobs
        """
        return {
            job_id: dict(
                self.hi.get_dicom_import_job(datastoreId=self.datastore_id, jobId=job_id)["jobProperties"]
            )
            for job_id in job_ids
        }

    def log_offset(self) -> int:
        """Current size of the endpoint log (to read only what comes after)."""
        path = self.endpoint.component.log_path
        return path.stat().st_size if path.exists() else 0

    def get_job_calls(self, offset: int = 0) -> list[tuple[datetime, str]]:
        """``(local time, job id)`` of every GetDICOMImportJob answered since ``offset`` of the log.

        :param offset: byte offset from ``log_offset``
        """
        calls = []
        with self.endpoint.component.log_path.open("rb") as stream:
            stream.seek(offset)
            for line in stream.read().decode(errors="replace").splitlines():
                match = GET_JOB_LINE.match(line)
                if match:
                    calls.append((datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f"), match[3]))
        return calls

    def calls_per_job(self, offset: int) -> Counter[str]:
        """GetDICOMImportJob calls per job id since ``offset``.

        :param offset: byte offset from ``log_offset``
        """
        return Counter(job_id for _, job_id in self.get_job_calls(offset))


def sample_dicom() -> bytes:
    """One small real DICOM file (pydicom's bundled CT) as bytes."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return Path(str(path)).read_bytes()


def parse_time(value: str | None) -> datetime | None:
    """A REST API timestamp as an aware datetime.

    :param value: ISO 8601 text or None
    """
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class RunningTimeSampler:
    """Integrates, per task instance, the seconds it is seen in ``running`` (REST API polled in a thread).

    :param deploy: the deployment (a separate API client is used in the thread)
    :param dag_id: the DAG
    :param run_id: the run
    :param interval: seconds between polls
    """

    def __init__(self, deploy: AirflowDeployment, dag_id: str, run_id: str, interval: float = 0.5) -> None:
        assert deploy.api is not None
        self.api = AirflowApi(deploy.api.base_url, ADMIN_USER, deploy.password)
        self.dag_id, self.run_id, self.interval = dag_id, run_id, interval
        self.running_seconds: defaultdict[str, float] = defaultdict(float)
        #: per task instance, every sample as (UTC time, state, seconds since the previous sample)
        self.timeline: defaultdict[str, list[tuple[datetime, str, float]]] = defaultdict(list)
        self.state_seconds: defaultdict[str, float] = defaultdict(float)
        self.max_running = 0
        self.max_deferred = 0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                tis = self.api.task_instances(self.dag_id, self.run_id)
            except Exception:
                tis = None
            now = time.monotonic()
            if tis is not None:
                dt = now - last
                sampled = utcnow()
                for ti in tis:
                    key = f"{ti['task_id']}[{ti['map_index']}]"
                    self.timeline[key].append((sampled, str(ti["state"]), dt))
                running = [ti for ti in tis if ti["state"] == "running"]
                for ti in running:
                    self.running_seconds[f"{ti['task_id']}[{ti['map_index']}]"] += dt
                for ti in tis:
                    self.state_seconds[str(ti["state"])] += dt
                self.max_running = max(self.max_running, len(running))
                self.max_deferred = max(self.max_deferred, sum(ti["state"] == "deferred" for ti in tis))
                self.polls += 1
            last = now
            self._stop.wait(self.interval)

    def __enter__(self) -> RunningTimeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.api.close()


def utcnow() -> datetime:
    return datetime.now(UTC)


__all__ = [
    "PG_HOST",
    "PG_PORT",
    "PG_USER",
    "AirflowDeployment",
    "RunningTimeSampler",
    "Site",
    "deployment",
    "parse_time",
    "tail",
    "utcnow",
    "wait_until",
]
