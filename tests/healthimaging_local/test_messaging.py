"""SQS and EventBridge on the endpoint's URL: S3 notifications, rules with SQS targets, dispatch and restarts.

Everything goes through real HTTP with stock boto3 (and aiobotocore, which Airflow's SQS trigger uses).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.config import Config
from endpoint_helpers import create_queue, receive_all, route_events

from healthimaging_local.server import LocalEndpoint

# The record members S3 documents for an ObjectCreated event
# (https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html).
RECORD_MEMBERS = {
    "eventVersion",
    "eventSource",
    "awsRegion",
    "eventTime",
    "eventName",
    "userIdentity",
    "requestParameters",
    "responseElements",
    "s3",
}
ENVELOPE_MEMBERS = {
    "version",
    "id",
    "detail-type",
    "source",
    "account",
    "time",
    "region",
    "resources",
    "detail",
}


def notify_queue(s3: Any, bucket: str, queue_arn: str, prefix: str, notification_id: str) -> None:
    """Send the bucket's ObjectCreated events (under ``prefix``, if any) to the queue."""
    configuration: dict[str, Any] = {
        "Id": notification_id,
        "QueueArn": queue_arn,
        "Events": ["s3:ObjectCreated:*"],
    }
    if prefix:
        configuration["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [configuration]}
    )


def test_bucket_notifications_reach_sqs_in_the_documented_record_format(endpoint: LocalEndpoint) -> None:
    s3, sqs = endpoint.client("s3"), endpoint.client("sqs")
    url, arn = create_queue(sqs, "arrivals")
    s3.create_bucket(Bucket="scanner")
    notify_queue(s3, "scanner", arn, "incoming/", "dicom-arrivals")
    [test_event] = receive_all(sqs, url)
    assert (test_event["Event"], test_event["Bucket"]) == ("s3:TestEvent", "scanner")

    s3.put_object(Bucket="scanner", Key="incoming/study 1/a+b.dcm", Body=b"put")
    s3.copy_object(
        Bucket="scanner",
        Key="incoming/study 1/copy.dcm",
        CopySource={"Bucket": "scanner", "Key": "incoming/study 1/a+b.dcm"},
    )
    upload = s3.create_multipart_upload(Bucket="scanner", Key="incoming/big.dcm")
    part = s3.upload_part(
        Bucket="scanner", Key="incoming/big.dcm", UploadId=upload["UploadId"], PartNumber=1, Body=b"m" * 100
    )
    s3.complete_multipart_upload(
        Bucket="scanner",
        Key="incoming/big.dcm",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    s3.put_object(Bucket="scanner", Key="elsewhere/x.dcm", Body=b"not announced")

    bodies = receive_all(sqs, url)
    records = [record for body in bodies for record in body["Records"]]
    assert all(len(body["Records"]) == 1 for body in bodies)
    assert [(r["eventName"], r["s3"]["object"]["key"]) for r in records] == [
        ("ObjectCreated:Put", "incoming/study+1/a%2Bb.dcm"),
        ("ObjectCreated:Copy", "incoming/study+1/copy.dcm"),
        ("ObjectCreated:CompleteMultipartUpload", "incoming/big.dcm"),  # announced once, not also as Put
    ]
    sequencers = []
    for record, key in zip(
        records, ["incoming/study 1/a+b.dcm", "incoming/study 1/copy.dcm", "incoming/big.dcm"], strict=True
    ):
        assert set(record) == RECORD_MEMBERS
        assert record["eventVersion"] == "2.1"
        assert record["eventSource"] == "aws:s3"
        assert record["awsRegion"] == "us-east-1"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["eventTime"])
        assert set(record["userIdentity"]) == {"principalId"}
        assert set(record["requestParameters"]) == {"sourceIPAddress"}
        assert set(record["responseElements"]) == {"x-amz-request-id", "x-amz-id-2"}
        detail = record["s3"]
        assert detail["s3SchemaVersion"] == "1.0"
        assert detail["configurationId"] == "dicom-arrivals"
        assert detail["bucket"]["name"] == "scanner"
        assert detail["bucket"]["arn"] == "arn:aws:s3:::scanner"
        assert set(detail["bucket"]["ownerIdentity"]) == {"principalId"}
        head = s3.head_object(Bucket="scanner", Key=key)
        assert detail["object"]["size"] == head["ContentLength"]
        assert detail["object"]["eTag"] == head["ETag"].strip('"')
        assert "versionId" not in detail["object"]  # the bucket is not versioned
        assert re.fullmatch(r"[0-9A-F]+", detail["object"]["sequencer"])
        sequencers.append(int(detail["object"]["sequencer"], 16))
    assert sequencers == sorted(sequencers)


def test_versioned_bucket_records_carry_the_version(endpoint: LocalEndpoint) -> None:
    s3, sqs = endpoint.client("s3"), endpoint.client("sqs")
    url, arn = create_queue(sqs, "versioned")
    s3.create_bucket(Bucket="versioned")
    s3.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    notify_queue(s3, "versioned", arn, "", "all")
    receive_all(sqs, url)
    version = s3.put_object(Bucket="versioned", Key="a.dcm", Body=b"1")["VersionId"]
    [body] = receive_all(sqs, url, expected=1)
    assert body["Records"][0]["s3"]["object"]["versionId"] == version


def test_eventbridge_rule_delivers_matching_events_to_its_queue(endpoint: LocalEndpoint) -> None:
    events = endpoint.client("events")
    url = route_events(
        endpoint,
        "lab-results",
        {"source": ["lab.example"], "detail-type": ["Result Ready"], "detail": {"ward": [{"prefix": "icu"}]}},
        "lab-results",
    )
    entries = [
        {"Source": "lab.example", "DetailType": "Result Ready", "Detail": json.dumps({"ward": "icu-3"})},
        {"Source": "lab.example", "DetailType": "Result Ready", "Detail": json.dumps({"ward": "er"})},
        {"Source": "other.example", "DetailType": "Result Ready", "Detail": json.dumps({"ward": "icu-1"})},
    ]
    answer = events.put_events(Entries=entries)
    assert answer["FailedEntryCount"] == 0
    [event] = receive_all(sqs := endpoint.client("sqs"), url, expected=1)
    assert set(event) == ENVELOPE_MEMBERS
    assert event["id"] == answer["Entries"][0]["EventId"]
    assert (event["source"], event["detail-type"], event["detail"]) == (
        "lab.example",
        "Result Ready",
        {"ward": "icu-3"},
    )
    assert (event["account"], event["region"]) == ("123456789012", "us-east-1")
    assert (event["version"], event["resources"]) == ("0", [])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", event["time"])
    assert receive_all(sqs, url) == []


def test_requests_go_to_the_service_of_their_signature(endpoint: LocalEndpoint) -> None:
    sqs, s3 = endpoint.client("sqs"), endpoint.client("s3")
    url, _ = create_queue(sqs, "dispatch")
    s3.create_bucket(Bucket="dispatch")
    # A bucket and a queue of one name, both on "/": the SigV4 scope alone decides.
    assert sqs.list_queues()["QueueUrls"] == [url]
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["dispatch"]
    assert endpoint.client("events").list_event_buses()["EventBuses"][0]["Name"] == "default"
    # Unsigned requests keep their old route: S3 (here, the anonymous ListBuckets answer).
    with urllib.request.urlopen(endpoint.url + "/", timeout=10) as answer:
        assert b"ListAllMyBucketsResult" in answer.read()


def test_signatures_are_verified_for_sqs_and_eventbridge(tmp_path: Path) -> None:
    keys = {"AKIDLOCAL": "local-secret"}
    with LocalEndpoint(tmp_path / "state", verify_signatures=True, access_keys=keys) as endpoint:
        assert endpoint.client("sqs").list_queues().get("QueueUrls") is None
        assert endpoint.client("events").list_rules()["Rules"] == []
        for service in ("sqs", "events"):
            wrong = endpoint.client(service, retries={"max_attempts": 1})
            wrong._request_signer._credentials.secret_key = "wrong"  # type: ignore[attr-defined]
            call = wrong.list_queues if service == "sqs" else wrong.list_rules
            with pytest.raises(wrong.exceptions.ClientError) as raised:
                call()
            assert raised.value.response["Error"]["Code"] == "InvalidSignatureException"
            assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_aiobotocore_long_polls_the_queue(endpoint: LocalEndpoint) -> None:
    """Airflow's SQS trigger receives with aiobotocore: it must see the S3 notifications too."""
    s3, sqs = endpoint.client("s3"), endpoint.client("sqs")
    url, arn = create_queue(sqs, "async-arrivals")
    s3.create_bucket(Bucket="async-in")
    notify_queue(s3, "async-in", arn, "", "async")
    receive_all(sqs, url)

    async def receive() -> list[dict[str, Any]]:
        session = get_session()
        async with session.create_client(
            "sqs",
            endpoint_url=endpoint.url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            config=Config(retries={"max_attempts": 2}),
        ) as client:
            waiting = asyncio.create_task(
                client.receive_message(QueueUrl=url, WaitTimeSeconds=5, MaxNumberOfMessages=10)
            )
            await asyncio.sleep(0.5)
            await asyncio.to_thread(s3.put_object, Bucket="async-in", Key="study/1.dcm", Body=b"x")
            answer = await waiting
            messages: list[dict[str, Any]] = answer.get("Messages", [])
            for message in messages:
                await client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            return messages

    messages = asyncio.run(receive())
    assert [json.loads(m["Body"])["Records"][0]["s3"]["object"]["key"] for m in messages] == ["study/1.dcm"]


def test_restart_keeps_queues_rules_notifications_and_messages(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LocalEndpoint(state) as endpoint:
        s3, sqs, events = endpoint.client("s3"), endpoint.client("sqs"), endpoint.client("events")
        url, arn = create_queue(sqs, "kept", VisibilityTimeout="7")
        sqs.tag_queue(QueueUrl=url, Tags={"team": "imaging"})
        s3.create_bucket(Bucket="kept-in")
        notify_queue(s3, "kept-in", arn, "new/", "kept-notification")
        receive_all(sqs, url)
        events.create_event_bus(Name="imaging")
        events.put_rule(Name="kept-rule", EventPattern=json.dumps({"source": ["lab.example"]}))
        events.put_targets(Rule="kept-rule", Targets=[{"Id": "to-kept", "Arn": arn}])
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"note": "received, not deleted"}))
        [in_flight] = sqs.receive_message(QueueUrl=url)["Messages"]
        assert json.loads(in_flight["Body"]) == {"note": "received, not deleted"}
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"note": "waiting"}))
    with LocalEndpoint(state) as endpoint:
        s3, sqs, events = endpoint.client("s3"), endpoint.client("sqs"), endpoint.client("events")
        url = sqs.get_queue_url(QueueName="kept")["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attributes["VisibilityTimeout"] == "7"
        assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "imaging"}
        assert sorted(b["Name"] for b in events.list_event_buses()["EventBuses"]) == ["default", "imaging"]
        assert events.list_targets_by_rule(Rule="kept-rule")["Targets"] == [{"Id": "to-kept", "Arn": arn}]
        # Both messages are there (the unacknowledged one visible again: at-least-once, as SQS promises).
        notes = sorted(body["note"] for body in receive_all(sqs, url, expected=2))
        assert notes == ["received, not deleted", "waiting"]
        s3.put_object(Bucket="kept-in", Key="new/after-restart.dcm", Body=b"x")
        events.put_events(Entries=[{"Source": "lab.example", "DetailType": "t", "Detail": "{}"}])
        bodies = receive_all(sqs, url, expected=2)
        records = [b["Records"][0]["s3"] for b in bodies if "Records" in b]
        assert [(r["configurationId"], r["object"]["key"]) for r in records] == [
            ("kept-notification", "new/after-restart.dcm")
        ]
        assert [b["source"] for b in bodies if "source" in b] == ["lab.example"]
