"""Test helpers: wire-level output validation against the service model, data set-up and job polling."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from botocore.model import OperationModel, Shape

from healthimaging_local.sample_data import synthetic_study_files

ROLE_ARN = "arn:aws:iam::123456789012:role/ImportRole"


class WireRecorder:
    """Records the raw JSON body of every medical-imaging response a client receives."""

    def __init__(self, client: Any) -> None:
        self.bodies: dict[str, list[Any]] = {}
        client.meta.events.register("before-parse.medical-imaging", self._record)

    def _record(self, operation_model: OperationModel, response_dict: dict[str, Any], **_: Any) -> None:
        if response_dict["status_code"] >= 300 or operation_model.has_streaming_output:
            return
        self.bodies.setdefault(operation_model.name, []).append(json.loads(response_dict["body"] or b"{}"))


def wire_problems(shape: Shape, value: Any, where: str = "") -> list[str]:
    """Differences between a wire JSON value and the model shape (empty when it conforms)."""
    kind = shape.type_name
    if value is None:
        return [f"{where}: null instead of omitted"]
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        members = {m.serialization.get("name", n): m for n, m in shape.members.items()}  # type: ignore[attr-defined]
        problems = [f"{where}.{k}: unknown member" for k in value if k not in members]
        problems += [
            f"{where}.{r}: required member missing" for r in shape.required_members if r not in value
        ]  # type: ignore[attr-defined]
        for key, item in value.items():
            if key in members:
                problems += wire_problems(members[key], item, f"{where}.{key}")
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [p for i, item in enumerate(value) for p in wire_problems(shape.member, item, f"{where}[{i}]")]  # type: ignore[attr-defined]
    if kind == "map":
        return [] if isinstance(value, dict) else [f"{where}: not a map"]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: not a string"]
        if shape.enum and value not in shape.enum:
            return [f"{where}: {value!r} not in enum"]
        pattern = shape.metadata.get("pattern", "").replace(r"\p{ASCII}", r"[\x00-\x7f]")
        if pattern and not re.fullmatch(pattern, value):
            return [f"{where}: does not match {shape.metadata['pattern']}"]
        return []
    if kind in ("integer", "long"):
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{where}: not an integer"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: not a boolean"]
    if kind == "timestamp":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [f"{where}: timestamp is not an epoch number"]
        return [] if round(value, 3) == value else [f"{where}: more than millisecond precision"]
    return []


def assert_wire_conforms(client: Any, recorder: WireRecorder) -> set[str]:
    """Validate every recorded response against its output shape; return the operations seen."""
    for name, bodies in recorder.bodies.items():
        shape = client.meta.service_model.operation_model(name).output_shape
        for body in bodies:
            problems = wire_problems(shape, body, name)
            assert not problems, problems
    return set(recorder.bodies)


def upload(s3: Any, bucket: str, prefix: str, files: Iterable[tuple[str, bytes]]) -> list[str]:
    """Create the bucket if needed and upload files; return their keys."""
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    keys = []
    for name, data in files:
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=data)
        keys.append(prefix + name)
    return keys


def synthetic(
    series: int = 1, instances: int = 2, seed: int = 0, patients: int = 1
) -> list[tuple[str, bytes]]:
    """Synthetic P10 files: ``patients`` x 1 study x ``series`` x ``instances``."""
    return list(synthetic_study_files(patients, 1, series, instances, seed=seed))


def create_active_datastore(mi: Any, name: str = "test") -> str:
    """Create a data store and wait until it is ACTIVE; return its id."""
    datastore_id: str = mi.create_datastore(datastoreName=name)["datastoreId"]
    wait_for(
        lambda: (
            mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] == "ACTIVE"
        )
    )
    return datastore_id


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it is truthy (fails the test after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def start_job(mi: Any, datastore_id: str, input_uri: str, output_uri: str, **extra: Any) -> dict[str, Any]:
    """StartDICOMImportJob with the test role; return its answer."""
    answer: dict[str, Any] = mi.start_dicom_import_job(
        datastoreId=datastore_id,
        dataAccessRoleArn=ROLE_ARN,
        inputS3Uri=input_uri,
        outputS3Uri=output_uri,
        **extra,
    )
    return answer


def run_import(mi: Any, datastore_id: str, input_uri: str, output_uri: str, **extra: Any) -> dict[str, Any]:
    """Start an import job and wait for its terminal state; return the job properties."""
    job_id = start_job(mi, datastore_id, input_uri, output_uri, **extra)["jobId"]
    return wait_job(mi, datastore_id, job_id)


def wait_job(mi: Any, datastore_id: str, job_id: str) -> dict[str, Any]:
    """Wait until a job is COMPLETED or FAILED; return its properties."""
    result: dict[str, Any] = {}

    def done() -> bool:
        result.update(mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"])
        return result["jobStatus"] in ("COMPLETED", "FAILED")

    wait_for(done)
    return result


def read_json(s3: Any, uri: str) -> Any:
    """Read a JSON (or NDJSON, as a list) object from an s3:// URI."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    if key.endswith(".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line]
    return json.loads(text)


def create_queue(sqs: Any, name: str, **attributes: str) -> tuple[str, str]:
    """Create an SQS queue; return its URL and ARN."""
    url: str = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn: str = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def receive_all(sqs: Any, url: str, expected: int | None = None, timeout: float = 10.0) -> list[Any]:
    """Receive and delete exactly ``expected`` messages (or until the queue is empty, when None), in queue order.

    Bodies are JSON-decoded. Fails the test after ``timeout`` seconds without the expected count.
    """
    bodies: list[Any] = []
    deadline = time.monotonic() + timeout
    while expected is None or len(bodies) < expected:
        assert time.monotonic() < deadline, f"received {len(bodies)} of {expected} messages"
        wait = (
            0 if expected is None else 1
        )  # moto delivers S3 and EventBridge messages before the call returns
        batch = 10 if expected is None else min(10, expected - len(bodies))
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=batch, WaitTimeSeconds=wait).get(
            "Messages", []
        )
        if not messages and expected is None:
            break
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


def route_events(endpoint: Any, rule: str, pattern: dict[str, Any], queue: str) -> str:
    """An EventBridge rule on the default bus sending what ``pattern`` matches to a new queue; return its URL."""
    url, arn = create_queue(endpoint.client("sqs"), queue)
    events = endpoint.client("events")
    events.put_rule(Name=rule, EventPattern=json.dumps(pattern))
    events.put_targets(Rule=rule, Targets=[{"Id": queue, "Arn": arn}])
    return url
