"""
Credentials and PHI never leak: an end-to-end ``dag.test()`` of the import DAG and of a search with PHI criteria.

The endpoint runs as ``healthimaging-local serve`` (a subprocess, INFO logging, stdout/stderr captured) and
verifies signatures with the Airflow connection's distinctive access key, so the credentials in the connection are
the ones really used. The DICOM files carry canary patient names, ids, birth date and accession number. Afterwards
no canary and no secret appears in the captured output, the task logs under AIRFLOW_HOME/logs or the endpoint's
output; XCom holds the PHI canaries only for the run that opted in with ``include_phi``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dag_test_helpers import IMPORT_DAG_ID, ROOT, load_dag_module, run_xcoms, task_states

ACCESS_KEY = "AKIDCANARYCREDS01"
SECRET_KEY = "SECRET-CANARY-7f3a9c2e"
SESSION_TOKEN = "TOKEN-CANARY-b81c44d0"
PHI = {
    "PatientName": "PHI^CANARY^ZETA",
    "PatientID": "PHICANARY001",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACCCANARY77",
}
#: What must never appear in logs: the PHI (also as DICOM shows it, name components split) and the secrets.
PHI_CANARIES = ["PHI^CANARY^ZETA", "CANARY^ZETA", "PHICANARY001", "19010203", "ACCCANARY77"]
SECRETS = [SECRET_KEY, SESSION_TOKEN]
ROLE_ARN = "arn:aws:iam::123456789012:role/HealthImagingImport"
BIN = Path(sys.executable).parent


@dataclass
class Served:
    """``healthimaging-local serve`` as a subprocess, its output going to files."""

    process: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@dataclass
class Runs:
    served: Served
    datastore_id: str
    captured: str
    airflow_home: Path
    xcoms: dict[str, dict[Any, Any]] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)

    def logs(self) -> str:
        """Every file under AIRFLOW_HOME/logs (task and trigger logs, if ``dag.test()`` wrote any)."""
        folder = self.airflow_home / "logs"
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        return "\n".join(p.read_text(errors="replace") for p in files)


def canary_files() -> list[tuple[str, bytes]]:
    """Synthetic P10 files (2 series x 2 instances) rewritten to carry the PHI canaries."""
    import pydicom

    from healthimaging_local.sample_data import synthetic_study_files

    files = []
    for key, data in synthetic_study_files(1, 1, 2, 2, seed=7):
        dataset = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in PHI.items():
            setattr(dataset, keyword, value)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files.append((key, buffer.getvalue()))
    return files


def serve(state_dir: Path, logs: Path) -> Served:
    stdout, stderr = logs / "endpoint.out", logs / "endpoint.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [
                BIN / "healthimaging-local",
                "serve",
                "--port",
                "0",
                "--state-dir",
                str(state_dir),
                "--log-level",
                "INFO",
                "--verify-signatures",
                "--access-key",
                f"{ACCESS_KEY}:{SECRET_KEY}",
            ],
            stdout=out,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while "serving on" not in stdout.read_text():
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "endpoint did not start"
        time.sleep(0.1)
    url = stdout.read_text().split("serving on ", 1)[1].split()[0]
    return Served(process, url, stdout, stderr)


def connection(url: str) -> str:
    """``AIRFLOW_CONN_AWS_DEFAULT`` with the distinctive key, secret and session token."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": ACCESS_KEY,
            "password": SECRET_KEY,
            "extra": {
                "aws_session_token": SESSION_TOKEN,
                "region_name": "us-east-1",
                "endpoint_url": url,
                "config_kwargs": {"inject_host_prefix": False},
            },
        }
    )


def search_by_canary(datastore_id: str) -> dict[tuple[str, int, str], Any]:
    """Search by the canary patient id with ``SearchImageSetsOperator``, masked and with ``include_phi``.

    (``dag.test()`` runs only DAGs of the dags folder, so the operator runs with a task context of its own.)

    :return: the XComs pushed, keyed like :func:`run_xcoms`.
    """
    from unittest import mock

    from healthimaging.operators import SearchImageSetsOperator

    criteria = {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": PHI["PatientID"]}]}]}
    pushed: dict[tuple[str, int, str], Any] = {}
    for task_id, include_phi, given in (
        ("masked", False, criteria),
        ("with_phi", True, json.dumps(criteria)),
    ):
        ti = mock.MagicMock(dag_id="phi_search", task_id=task_id, map_index=-1, run_id="manual__phi")
        ti.xcom_push.side_effect = lambda key, value, task_id=task_id: pushed.__setitem__(
            (task_id, -1, key), value
        )
        operator = SearchImageSetsOperator(
            task_id=task_id, datastore_id=datastore_id, search_criteria=given, include_phi=include_phi
        )
        operator.execute({"ti": ti, "run_id": "manual__phi"})  # type: ignore[arg-type]
    return pushed


@pytest.fixture
def runs(
    airflow_db: Path, tmp_path_factory: pytest.TempPathFactory, capfd: pytest.CaptureFixture[str]
) -> Iterator[Runs]:
    """The import DAG twice (masked, then ``include_phi``) and a search by the canary, against one served endpoint.

    ``captured`` holds the log records and everything written to stdout/stderr meanwhile (task logs included).
    """
    import boto3
    from botocore.config import Config

    from healthimaging_local.sample_data import upload

    work = tmp_path_factory.mktemp("phi")
    served = serve(work / "state", work)
    saved = dict(os.environ)
    try:
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
        )
        s3 = session.client("s3", endpoint_url=served.url, config=Config(s3={"addressing_style": "path"}))
        mi = session.client(
            "medical-imaging", endpoint_url=served.url, config=Config(inject_host_prefix=False)
        )
        s3.create_bucket(Bucket="phi-dicom")
        upload(canary_files(), s3, "phi-dicom", "incoming/")
        datastore_id = mi.create_datastore(datastoreName="phi")["datastoreId"]
        while (
            mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] != "ACTIVE"
        ):
            time.sleep(0.1)

        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(
            AIRFLOW_CONN_AWS_DEFAULT=connection(served.url),
            AIRFLOW_VAR_HEALTHIMAGING_DATA_ACCESS_ROLE_ARN=ROLE_ARN,
            AIRFLOW_VAR_HEALTHIMAGING_OUTPUT_S3_URI="s3://phi-dicom/output/",
            AIRFLOW__HEALTHIMAGING__POLL_INTERVAL="1",
        )
        records: list[str] = []
        handler = _Collect(records)
        logging.getLogger().addHandler(handler)
        previous_level = logging.getLogger().level
        logging.getLogger().setLevel(logging.INFO)  # Airflow's default level
        result = Runs(served, datastore_id, "", airflow_db)
        try:
            dag = load_dag_module(IMPORT_DAG_ID, {"HEALTHIMAGING_POKE_INTERVAL": "1"}).dag
            for label, include_phi in (("masked", False), ("with_phi", True)):
                conf = {
                    "datastore_id": datastore_id,
                    "input_s3_uri": "s3://phi-dicom/incoming/",
                    "include_phi": include_phi,
                    "client_token": f"phi-{label}",
                }
                run = dag.test(logical_date=None, run_conf=conf)
                result.states[label] = (run.state, task_states(run))
                result.xcoms[label] = run_xcoms(IMPORT_DAG_ID, run.run_id)
            result.xcoms["search"] = search_by_canary(datastore_id)
        finally:
            logging.getLogger().removeHandler(handler)
            logging.getLogger().setLevel(previous_level)
        out, err = capfd.readouterr()
        result.captured = "\n".join([*records, out, err])
        yield result
    finally:
        os.environ.clear()
        os.environ.update(saved)
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


class _Collect(logging.Handler):
    """Keeps every formatted record (with exception text) of the run."""

    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.INFO)
        self.records = records
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _absent(needles: list[str], haystack: str, where: str) -> None:
    assert haystack is not None
    found = [needle for needle in needles if needle in haystack]
    assert not found, f"{found} found in {where}"


@pytest.mark.slow
def test_end_to_end_leaks_neither_credentials_nor_phi(runs: Runs) -> None:
    """One run, four checks: it worked with the connection's credentials; no secret and no PHI in any log
    (task output, log records, AIRFLOW_HOME/logs, the endpoint's output) or XCom; PHI in XCom only on opt-in."""
    for label, (state, states) in runs.states.items():
        assert state == "success", (label, states)
    endpoint_output = runs.served.output()
    # The endpoint verified every signature: the connection's secret key is the one botocore signed with.
    assert "Rejected" not in endpoint_output
    assert "searchImageSets" in endpoint_output  # its access log is on (INFO), so the checks below can fail
    assert "Found 2 image set(s)" in runs.captured  # the operators' own log lines were captured
    logs = {
        "the runs' output and log records": runs.captured,
        "AIRFLOW_HOME/logs": runs.logs(),
        "the endpoint's stdout/stderr": endpoint_output,
    }
    for where, text in logs.items():
        _absent(SECRETS, text, where)
        _absent(PHI_CANARIES, text, where)  # includes the search by the canary patient id

    def xcom(label: str, task_prefix: str = "") -> str:
        values = {str(k): v for k, v in runs.xcoms[label].items() if k[0].startswith(task_prefix)}
        return json.dumps(values, default=str)

    for label in runs.xcoms:
        _absent(SECRETS, xcom(label), f"XCom of {label}")
    _absent(PHI_CANARIES, xcom("masked"), "XCom of the masked import run")
    assert PHI["PatientName"] in xcom("with_phi", "search_image_sets")
    assert PHI["PatientID"] in xcom("with_phi", "search_image_sets")
    assert xcom("with_phi", "publish_image_sets") != "{}"  # the check below reads something
    _absent(PHI_CANARIES, xcom("with_phi", "publish_image_sets"), "the asset event task's XCom")
    _absent(PHI_CANARIES, xcom("search", "masked"), "XCom of the masked search")
    assert PHI["PatientID"] in xcom("search", "with_phi")
    masked = runs.xcoms["search"][("masked", -1, "imageSetsMetadataSummaries")]
    assert len(masked) == 2  # the search by the canary found both series
    assert {s["DICOMTags"]["DICOMPatientId"] for s in masked} == {""}  # Annex E action Z


def test_compose_secrets_come_from_an_ignored_untracked_env_file() -> None:
    """``.env`` (where a compose file takes credentials from) is git-ignored and not tracked."""
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".env", "*.env"], cwd=ROOT, capture_output=True, text=True
    )
    assert tracked.stdout.strip() == ""
    for compose in [*ROOT.glob("docker-compose*.y*ml"), *ROOT.glob("compose*.y*ml")]:
        text = compose.read_text()
        for secret_key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AIRFLOW_CONN_AWS_DEFAULT"):
            for line in text.splitlines():
                if secret_key in line and ":" in line:
                    value = line.split(":", 1)[1].strip().strip("\"'")
                    assert not value or value.startswith("${"), f"{compose.name}: {secret_key} set inline"
