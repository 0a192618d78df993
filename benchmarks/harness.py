"""Shared benchmark plumbing: the endpoint as a ``serve`` subprocess, stock boto3 clients, statistics, records.

Every benchmark talks to the endpoint over real HTTP with stock boto3 clients; the endpoint runs in its own
process (``healthimaging-local serve``), so its work and the client's work are on separate interpreters.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.config import Config

from healthimaging_local.server import endpoint_settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SERVE = Path(sys.executable).with_name("healthimaging-local")
ROLE_ARN = "arn:aws:iam::123456789012:role/ImportRole"
READY_PREFIX = "healthimaging-local: serving on "


class ServeProcess:
    """``healthimaging-local serve --port 0`` in a subprocess (context manager); stderr goes to a log file.

    ``BENCH_SERVE_COMMAND`` (environment) replaces the ``healthimaging-local`` executable, for example to
    measure a proposed patch served by a launcher script.

    :param state_dir: the endpoint's state folder.
    :param log_path: where the process's stderr goes.
    """

    def __init__(self, state_dir: Path, log_path: Path) -> None:
        prefix = (
            shlex.split(os.environ["BENCH_SERVE_COMMAND"])
            if os.environ.get("BENCH_SERVE_COMMAND")
            else [str(SERVE)]
        )
        self.command = [
            *prefix,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--state-dir",
            str(state_dir),
            "--import-seconds",
            "0",
            # These benchmarks measure the emulator's own work: the service's request rates are switched off.
            "--start-rate",
            "0",
            "--get-rate",
            "0",
        ]
        self.log_path = log_path
        self._log = log_path.open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline().strip()
        if not first.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"endpoint did not start: {first!r}; see {log_path}")
        self.start_seconds = time.perf_counter() - started
        self.url = first[len(READY_PREFIX) :]
        self.ps = psutil.Process(self.process.pid)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM the endpoint and wait for it (killed after 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()
        self._log.close()

    def rss_bytes(self) -> int:
        """The endpoint's current resident set size."""
        return int(self.ps.memory_info().rss)

    def peak_rss_bytes(self) -> int:
        """The endpoint's high-water mark of resident memory (``VmHWM``) since start or the last reset."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found")

    def reset_peak_rss(self) -> None:
        """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the endpoint has used so far."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)


def client(url: str, service: str, **config: Any) -> Any:
    """A stock boto3 client for the endpoint, configured as the endpoint's own settings say.

    :param url: the endpoint URL.
    :param service: ``"medical-imaging"`` or ``"s3"``.
    :param config: extra ``botocore.config.Config`` keyword arguments.
    """
    settings = dict(endpoint_settings(url)["boto3"])
    options: dict[str, Any] = dict(settings.pop("config_kwargs"))
    if service == "s3":
        options["s3"] = {"addressing_style": "path"}
    options.update(config)
    return boto3.session.Session().client(service, config=Config(**options), **settings)


def create_active_datastore(hi: Any, name: str) -> str:
    """Create a data store and wait until it is ACTIVE; return its id.

    :param hi: a medical-imaging client.
    :param name: the data store name.
    """
    datastore_id: str = hi.create_datastore(datastoreName=name)["datastoreId"]
    while hi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] != "ACTIVE":
        time.sleep(0.05)
    return datastore_id


def run_import_job(
    hi: Any, datastore_id: str, input_uri: str, output_uri: str, poll: float = 0.2
) -> dict[str, Any]:
    """Start an import job and poll GetDICOMImportJob every ``poll`` seconds until it ends.

    :param hi: a medical-imaging client.
    :param datastore_id: the target data store.
    :param input_uri: the input prefix.
    :param output_uri: the output prefix.
    :param poll: seconds between polls.
    :return: the wall seconds from the start call to the terminal status, and the job's own timestamps.
    """
    started = time.perf_counter()
    job_id = hi.start_dicom_import_job(
        datastoreId=datastore_id, dataAccessRoleArn=ROLE_ARN, inputS3Uri=input_uri, outputS3Uri=output_uri
    )["jobId"]
    while True:
        properties = hi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]
        if properties["jobStatus"] not in ("SUBMITTED", "IN_PROGRESS"):
            break
        time.sleep(poll)
    wall = time.perf_counter() - started
    return {
        "job_id": job_id,
        "status": properties["jobStatus"],
        "wall_s": wall,
        "job_s": (properties["endedAt"] - properties["submittedAt"]).total_seconds(),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and p99 (inclusive method) and the count of ``values``.

    :param values: the samples.
    """
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"n": len(values), "p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": max(values)}


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    """The median of ``key`` over runs.

    :param runs: per-run figures.
    :param key: the figure.
    """
    return float(statistics.median(run[key] for run in runs))


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``.

    :param path: a folder.
    """
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu_model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": psutil.virtual_memory().total,
        "git_head": commit,
        "note": "working tree may hold uncommitted changes on top of git_head",
    }


def command_line() -> str:
    """The command that ran this benchmark, relative to the repository."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def write_result(name: str, result: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``result`` as ``benchmarks/results/<name>.json`` (or ``path``) and print it.

    :param name: the benchmark name.
    :param result: the figures.
    :param path: override of the output file.
    """
    target = path or RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    target.write_text(text + "\n")
    print(text)
    return target
