"""``scripts/wire_arrivals.py`` against the local endpoint: the same boto3 calls as on AWS, idempotent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wiring() -> Any:
    spec = importlib.util.spec_from_file_location("wire_arrivals", ROOT / "scripts" / "wire_arrivals.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session() -> Any:
    return boto3.session.Session(
        region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def bodies(sqs: Any, url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
            "Messages", []
        )
        if not messages:
            return out
        for m in messages:
            out.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def test_notification_wiring_delivers_created_keys_under_the_prefix(wiring: Any, endpoint: Any) -> None:
    s3, sqs = endpoint.client("s3"), endpoint.client("sqs")
    s3.create_bucket(Bucket="dicom")
    other = sqs.create_queue(QueueName="someone-elses")["QueueUrl"]
    other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3.put_bucket_notification_configuration(
        Bucket="dicom",
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "Id": "keep-me",
                    "QueueArn": other_arn,
                    "Events": ["s3:ObjectRemoved:*"],
                }
            ]
        },
    )
    kwargs = {
        "bucket": "dicom",
        "prefix": "incoming/",
        "arrivals_queue": "arrivals",
        "events_queue": "image-set-events",
        "s3_via": "notification",
        "datastore_id": None,
        "endpoint_url": endpoint.url,
    }
    result = wiring.wire(session(), **kwargs)
    assert wiring.wire(session(), **kwargs) == result  # idempotent
    url = result["arrivals_queue_url"]
    assert set(result["environment"]) == {
        "HEALTHIMAGING_ARRIVALS_QUEUE_URL",
        "HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL",
    }
    ids = [c["Id"] for c in s3.get_bucket_notification_configuration(Bucket="dicom")["QueueConfigurations"]]
    assert sorted(ids) == ["healthimaging-arrivals", "keep-me"]
    policy = json.loads(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"]
    )
    statement = policy["Statement"][0]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Condition"]["ArnLike"]["aws:SourceArn"] == "arn:aws:s3:::dicom"
    bodies(sqs, url)  # the test events
    s3.put_object(Bucket="dicom", Key="incoming/P1/S1/a.dcm", Body=b"x")
    s3.put_object(Bucket="dicom", Key="elsewhere/b.dcm", Body=b"x")
    keys = [r["s3"]["object"]["key"] for b in bodies(sqs, url) for r in b.get("Records", [])]
    assert keys == ["incoming/P1/S1/a.dcm"]
    rule = endpoint.client("events").describe_rule(Name="healthimaging-image-set-events")
    assert json.loads(rule["EventPattern"])["source"] == ["aws.medical-imaging"]


def test_eventbridge_wiring_replaces_the_notification(wiring: Any, endpoint: Any) -> None:
    s3, sqs = endpoint.client("s3"), endpoint.client("sqs")
    s3.create_bucket(Bucket="dicom")
    kwargs = {
        "bucket": "dicom",
        "prefix": "incoming/",
        "arrivals_queue": "arrivals",
        "events_queue": None,
        "s3_via": "notification",
        "datastore_id": None,
        "endpoint_url": endpoint.url,
    }
    wiring.wire(session(), **kwargs)
    url = wiring.wire(session(), **{**kwargs, "s3_via": "eventbridge"})["arrivals_queue_url"]
    config = s3.get_bucket_notification_configuration(Bucket="dicom")
    assert not config.get("QueueConfigurations")  # (moto does not echo EventBridgeConfiguration back)
    bodies(sqs, url)
    s3.put_object(Bucket="dicom", Key="incoming/P1/S1/a.dcm", Body=b"x")
    s3.put_object(Bucket="dicom", Key="elsewhere/b.dcm", Body=b"x")
    events = bodies(sqs, url)
    assert [(e["detail-type"], e["detail"]["object"]["key"]) for e in events] == [
        ("Object Created", "incoming/P1/S1/a.dcm")
    ]
