"""
End-to-end demo (``make demo``): import sample DICOM into the local HealthImaging endpoint with the real DAG.

1. start ``healthimaging-local serve`` (S3 + HealthImaging on one URL) as a subprocess;
2. upload synthetic studies and pydicom's real files to two S3 prefixes with ``healthimaging-local sample-data``;
3. create a data store with boto3 and wait until it is ACTIVE;
4. ``airflow db migrate`` + ``airflow dags test healthimaging_import_dicom_and_search -c '<conf>'`` on SQLite in a
   temporary AIRFLOW_HOME: one mapped import per prefix, the sensor defers and its trigger polls over HTTP;
5. print what the run left in XCom (job ids, status, manifest counts, image sets: id, modality, series UID; no
   patient names) and the asset event, stop the endpoint, print the wall time; exit non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAG_ID = "healthimaging_import_dicom_and_search"
BUCKET = "demo-dicom"
PREFIXES = {"incoming/synthetic/": [], "incoming/pydicom/": ["--patients", "0", "--include-pydicom-files"]}
ROLE_ARN = "arn:aws:iam::123456789012:role/HealthImagingImportRole"
OUTPUT_S3_URI = f"s3://{BUCKET}/import-output/"
STATE_DIR = ROOT / ".demo" / "state"


def _step(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def start_endpoint(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """
    Start ``healthimaging-local serve`` on a free port and return the process and its URL.

    :param log_path: file that receives the endpoint's output.
    """
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True)
    command = [str(BIN / "healthimaging-local"), "serve", "--host", "127.0.0.1", "--port", "0"]
    command += ["--state-dir", str(STATE_DIR), "--import-seconds", "5"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = log_path.read_text(errors="replace").partition("\n")
        if first[1] and "serving on " in first[0]:
            return process, first[0].rsplit("serving on ", 1)[1].strip()
        if process.poll() is not None:
            break
        time.sleep(0.1)
    stop_endpoint(process)
    raise RuntimeError(f"healthimaging-local did not start:\n{log_path.read_text(errors='replace')}")


def stop_endpoint(process: subprocess.Popen[bytes]) -> None:
    """
    Stop the endpoint process (SIGTERM, then SIGKILL after 10 s).

    :param process: the ``healthimaging-local serve`` process.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def create_datastore(url: str) -> str:
    """
    Create a data store on the endpoint and wait until it is ACTIVE.

    :param url: the endpoint URL.
    :return: the data store id.
    """
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "medical-imaging",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(inject_host_prefix=False),
    )
    datastore_id = str(client.create_datastore(datastoreName="airflow-demo")["datastoreId"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"]
        if status == "ACTIVE":
            return datastore_id
        if status.endswith("FAILED"):
            raise RuntimeError(f"data store {datastore_id} is {status}")
        time.sleep(0.5)
    raise RuntimeError(f"data store {datastore_id} did not become ACTIVE")


def airflow_env(airflow_home: Path, url: str, datastore_id: str) -> dict[str, str]:
    """
    Environment for the Airflow CLI: temp home on SQLite, this repo's dags/plugins, connection and Variables.

    :param airflow_home: the temporary AIRFLOW_HOME.
    :param url: the endpoint URL.
    :param datastore_id: the demo data store.
    """
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {
            "region_name": "us-east-1",
            "endpoint_url": url,
            "config_kwargs": {"inject_host_prefix": False},
        },
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
            # Configuration as a nightly run would read it: Airflow Variables, here from the environment.
            "AIRFLOW_VAR_HEALTHIMAGING_DATASTORE_ID": datastore_id,
            "AIRFLOW_VAR_HEALTHIMAGING_DATA_ACCESS_ROLE_ARN": ROLE_ARN,
            "AIRFLOW_VAR_HEALTHIMAGING_OUTPUT_S3_URI": OUTPUT_S3_URI,
            "AIRFLOW__HEALTHIMAGING__POLL_INTERVAL": "2",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def run(command: list[str], env: dict[str, str], log_path: Path) -> None:
    """
    Run a command, its output to ``log_path``; raise with the log's tail if it fails.

    :param command: the command.
    :param env: its environment.
    :param log_path: where its output goes.
    """
    with log_path.open("ab") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"{' '.join(command[:3])} ... exited {result.returncode}; log tail:\n{tail}")


def read_run(env: dict[str, str]) -> dict[str, Any]:
    """
    Read the last run's state, XComs and asset events from the metadata DB (in a child process, so this
    script never imports Airflow with another AIRFLOW_HOME).

    :param env: the Airflow environment of the run.
    """
    code = f"""
import json
from sqlalchemy import select
from airflow.models.asset import AssetEvent
from airflow.models.dagrun import DagRun
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
with create_session() as session:
    run = session.scalars(select(DagRun).where(DagRun.dag_id == {DAG_ID!r}).order_by(DagRun.id.desc())).first()
    rows = session.scalars(select(XComModel).where(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id))
    xcoms = [[r.task_id, r.map_index, r.key, XComModel.deserialize_value(r)] for r in rows]
    events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run.run_id))
    print(json.dumps({{"run_id": run.run_id, "state": str(run.state), "xcoms": xcoms,
                      "asset_events": [e.extra for e in events], "start_date": run.start_date,
                      "end_date": run.end_date}}, default=str))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def report(result: dict[str, Any]) -> int:
    """
    Print the imports of a run (ids and counts only, no PHI); return the number of imports.

    :param result: from :func:`read_run`.
    """
    by_index: dict[int, dict[tuple[str, str], Any]] = {}
    for task_id, map_index, key, value in result["xcoms"]:
        by_index.setdefault(map_index, {})[(task_id.rsplit(".", 1)[-1], key)] = value
    print(f"\nDAG run {result['run_id']}: {result['state']}")
    imports = 0
    search = by_index.get(-1, {})
    by_job = search.get(("search_image_sets", "imageSetIdsByJob")) or {}
    summaries_by_id = {
        s["imageSetId"]: s for s in search.get(("search_image_sets", "imageSetsMetadataSummaries")) or []
    }
    for map_index in sorted(i for i in by_index if i >= 0):
        x = by_index[map_index]
        job = x.get(("wait_for_import_job", "return_value")) or {}
        if isinstance(
            job, str
        ):  # Airflow 3.3.2 stores the XCom of a task ended in the triggerer as JSON text
            job = json.loads(job)
        print(f"\nImport #{map_index}: job {job.get('jobId')} -> {job.get('jobStatus')}")
        for name in (
            "numberOfScannedFiles",
            "numberOfImportedFiles",
            "numberOfFilesWithCustomerError",
            "numberOfFilesWithServerError",
            "numberOfGeneratedImageSets",
        ):
            print(f"  {name}: {job.get(name)}")
        summaries = [
            summaries_by_id[i] for i in by_job.get(str(job.get("jobId")), []) if i in summaries_by_id
        ]
        print(f"  image sets of this import ({len(summaries)}):")
        for summary in summaries:
            tags = summary.get("DICOMTags") or {}
            print(
                f"    {summary['imageSetId']}  {tags.get('DICOMSeriesModality', '?'):<3} "
                f"series {tags.get('DICOMSeriesInstanceUID', '?')}"
            )
        imports += 1
    print(f"\nfirstImageSetId of the run: {search.get(('search_image_sets', 'firstImageSetId'))}")
    for extra in result["asset_events"]:
        print(
            f"\nAsset event healthimaging_image_sets: job(s) {', '.join(extra.get('jobIds') or [])}, "
            f"{len(extra.get('imageSetIds') or [])} image set id(s)"
        )
    for summary in by_index.get(-1, {}).get(("import_report", "return_value")) or []:
        totals = summary["totals"]
        print(
            f"\nImport report {summary['input_s3_uri']}: {totals['objects']} object(s) in {totals['chunks']} job(s):"
            f" {totals['imported']} imported, {totals['failed']} failed, {totals['refused']} refused,"
            f" {totals['not_reached']} not reached; full report {summary['report_s3_uri']}"
        )
    return imports


def main() -> int:
    """Run the demo; the exit code is non-zero on any failure."""
    started = time.monotonic()
    (ROOT / ".demo").mkdir(exist_ok=True)
    logs = ROOT / ".demo"
    airflow_home = Path(tempfile.mkdtemp(prefix="airflow-demo-"))
    endpoint, url = start_endpoint(logs / "endpoint.log")
    try:
        _step(f"local endpoint serving on {url} (log: .demo/endpoint.log)", started)
        for prefix, options in PREFIXES.items():
            command = [str(BIN / "healthimaging-local"), "sample-data", "--endpoint-url", url]
            command += ["--bucket", BUCKET, "--prefix", prefix, *options]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
            _step(out, started)
        datastore_id = create_datastore(url)
        _step(f"data store {datastore_id} is ACTIVE", started)

        env = airflow_env(airflow_home, url, datastore_id)
        airflow_log = logs / "airflow.log"
        airflow_log.unlink(missing_ok=True)
        run([str(BIN / "airflow"), "db", "migrate"], env, airflow_log)
        _step(f"airflow db migrate done (AIRFLOW_HOME={airflow_home})", started)
        conf = {"input_s3_uris": [f"s3://{BUCKET}/{prefix}" for prefix in PREFIXES]}
        _step(f"airflow dags test {DAG_ID} -c '{json.dumps(conf)}' (log: .demo/airflow.log)", started)
        run([str(BIN / "airflow"), "dags", "test", DAG_ID, "-c", json.dumps(conf)], env, airflow_log)
        result = read_run(env)
        imports = report(result)
        print(f"DEMO_RUN {json.dumps({k: str(result.get(k)) for k in ('run_id', 'start_date', 'end_date')})}")
        if result["state"] != "success" or imports != len(PREFIXES):
            raise RuntimeError(f"run {result['run_id']} is {result['state']} with {imports} import(s)")
        log_text = airflow_log.read_text(errors="replace")
        if "running trigger in line" not in log_text:
            raise RuntimeError("the sensor did not defer (no inline trigger run in the log)")
    except Exception as error:
        print(f"\nDEMO FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        stop_endpoint(endpoint)
        shutil.rmtree(airflow_home, ignore_errors=True)
        print(f"\nWall time: {time.monotonic() - started:.1f} s", flush=True)
    print("Demo OK: the sensor deferred and its trigger polled the local endpoint over HTTP.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
