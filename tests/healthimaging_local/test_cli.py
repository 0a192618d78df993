"""The command line: ``serve`` as a subprocess, the AWS CLI and the Arazzo workflow against the endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from endpoint_helpers import ROLE_ARN, create_active_datastore, synthetic, upload

from healthimaging_local.server import LocalEndpoint

BIN = Path(sys.executable).parent
#: The repository's copy of the Arazzo workflow and the OpenAPI description it names.
DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_serve_prints_settings_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [BIN / "healthimaging-local", "serve", "--port", "0", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        assert first.startswith("healthimaging-local: serving on http://127.0.0.1:")
        url = first.rsplit(" ", 1)[1]
        lines = [process.stdout.readline() for _ in range(10)]
        assert f"export AWS_ENDPOINT_URL={url}\n" in lines
        assert "export AWS_DISABLE_HOST_PREFIX_INJECTION=true\n" in lines
        connection = json.loads(lines[-1])
        assert connection["extra"]["endpoint_url"] == url
        assert connection["extra"]["config_kwargs"] == {"inject_host_prefix": False}
        result = subprocess.run(
            [BIN / "aws", "medical-imaging", "list-datastores", "--endpoint-url", url],
            env=cli_env(url),
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(result.stdout) == {"datastoreSummaries": []}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def cli_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_DISABLE_HOST_PREFIX_INJECTION="true",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    )
    return env


def aws(url: str, *args: str) -> Any:
    result = subprocess.run(
        [BIN / "aws", "medical-imaging", *args, "--endpoint-url", url],
        env=cli_env(url),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_aws_cli(endpoint: LocalEndpoint) -> None:
    datastore_id = aws(endpoint.url, "create-datastore", "--datastore-name", "cli")["datastoreId"]
    assert [d["datastoreId"] for d in aws(endpoint.url, "list-datastores")["datastoreSummaries"]] == [
        datastore_id
    ]
    criteria = json.dumps({"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "nobody"}]}]})
    found = aws(
        endpoint.url, "search-image-sets", "--datastore-id", datastore_id, "--search-criteria", criteria
    )
    assert found["imageSetsMetadataSummaries"] == []


def test_arazzo_workflow(endpoint: LocalEndpoint, tmp_path: Path) -> None:
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    datastore_id = create_active_datastore(mi)
    upload(s3, "arazzo-in", "dicom/", synthetic(series=1, instances=2))
    upload(s3, "arazzo-out", "", [])
    (tmp_path / "openapi").mkdir()
    (tmp_path / "arazzo").mkdir()
    spec = yaml.safe_load((DOCS / "openapi/amazon-healthimaging-openapi.yaml").read_text())
    spec["servers"] = [{"url": endpoint.url}]
    (tmp_path / "openapi" / "amazon-healthimaging-openapi.yaml").write_text(yaml.safe_dump(spec))
    workflow = tmp_path / "arazzo" / "workflow.yml"
    document = yaml.safe_load(
        (DOCS / "arazzo/amazon-healthimaging-import-dicom-and-search-workflow.yml").read_text()
    )
    for step in document["workflows"][0]["steps"]:
        for action in step.get("onSuccess", []):
            # arazzo-runner (jsonpath_ng) cannot evaluate `$.a.b == "X"` as JSONPath: use the equivalent simple form.
            for criterion in action["criteria"]:
                status = criterion["condition"].rsplit("==", 1)[1].strip()
                criterion.update(
                    condition=f"$steps.pollImportJob.outputs.jobStatus == {status}", type="simple"
                )
                criterion.pop("context")
    workflow.write_text(yaml.safe_dump(document, sort_keys=False))
    inputs = {
        "datastoreId": datastore_id,
        "jobName": "arazzo",
        "dataAccessRoleArn": ROLE_ARN,
        "clientToken": "arazzo-token",
        "inputS3Uri": "s3://arazzo-in/dicom/",
        "outputS3Uri": "s3://arazzo-out/",
    }
    result = subprocess.run(
        [
            BIN / "arazzo-runner",
            "execute-workflow",
            str(workflow),
            "--workflow-id",
            "import-dicom-and-search",
            "--inputs",
            json.dumps(inputs),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(endpoint.url),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = mi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"][0]["jobId"]
    image_set_id = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"][0][
        "imageSetId"
    ]
    assert job_id in result.stdout
    assert "COMPLETED" in result.stdout
    assert image_set_id in result.stdout
