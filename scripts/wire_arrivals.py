#!/usr/bin/env python
"""
Wire a bucket's arrivals and HealthImaging's image set events to the two SQS queues the event-driven DAGs watch.

Creates (or updates; every step is idempotent):

1. the queue ``--arrivals-queue`` and, by default, S3 event notifications of ``s3:ObjectCreated:*`` under
   ``--prefix`` to it (PutBucketNotificationConfiguration, merged into the bucket's existing configuration);
   with ``--s3-via eventbridge`` instead the bucket's EventBridge delivery and a rule on ``aws.s3``
   "Object Created" for the bucket and prefix with the queue as target;
2. the queue ``--events-queue`` and an EventBridge rule on ``aws.medical-imaging`` "Image Set Created" and
   "Image Set Updated" (narrowed to ``--datastore-id`` when given) with the queue as target;
3. each queue's policy: ``sqs:SendMessage`` for ``s3.amazonaws.com`` from the bucket (``aws:SourceArn``,
   ``aws:SourceAccount``) and for ``events.amazonaws.com`` from the rules.

The same boto3 calls run against AWS (default credentials chain) and the local endpoint (``--endpoint-url``).
Prints a JSON document with the queue URLs and the environment settings the DAGs read.

Example (local): ``python scripts/wire_arrivals.py --endpoint-url http://127.0.0.1:4566 --bucket dicom
--prefix incoming/``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

NOTIFICATION_ID = "healthimaging-arrivals"
ARRIVALS_RULE = "healthimaging-s3-arrivals"
IMAGE_SET_RULE = "healthimaging-image-set-events"
IMAGE_SET_DETAIL_TYPES = ["Image Set Created", "Image Set Updated"]


def queue_policy(queue_arn: str, statements: list[dict[str, Any]]) -> str:
    """
    A queue policy allowing ``sqs:SendMessage`` to the given services from the given sources.

    :param queue_arn: the queue.
    :param statements: ``{"sid", "service", "source_arn", "account"}`` per sender.
    """
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": s["sid"],
                    "Effect": "Allow",
                    "Principal": {"Service": s["service"]},
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {
                        "ArnLike": {"aws:SourceArn": s["source_arn"]},
                        "StringEquals": {"aws:SourceAccount": s["account"]},
                    },
                }
                for s in statements
            ],
        }
    )


def ensure_queue(sqs: Any, name: str) -> tuple[str, str]:
    """
    Create the queue (or find it); return its URL and ARN.

    :param sqs: an SQS client.
    :param name: the queue name.
    """
    # 20 s long polls on the queue too; 14 days retention so arrivals outlive a long triggerer outage.
    url = sqs.create_queue(
        QueueName=name,
        Attributes={"ReceiveMessageWaitTimeSeconds": "20", "MessageRetentionPeriod": "1209600"},
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def notify_queue(s3: Any, bucket: str, prefix: str, queue_arn: str) -> None:
    """
    Send the bucket's ObjectCreated notifications under ``prefix`` to the queue, keeping other configurations.

    :param s3: an S3 client.
    :param bucket: the bucket.
    :param prefix: the key prefix ("" for the whole bucket).
    :param queue_arn: the queue.
    """
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    current.pop("ResponseMetadata", None)
    queues = [c for c in current.get("QueueConfigurations", []) if c.get("Id") != NOTIFICATION_ID]
    ours: dict[str, Any] = {"Id": NOTIFICATION_ID, "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}
    if prefix:
        ours["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    current["QueueConfigurations"] = [*queues, ours]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=current)


def _without_ours(configuration: dict[str, Any]) -> dict[str, Any]:
    """The bucket's notification configuration less its response metadata and this script's queue entry."""
    kept = {k: v for k, v in configuration.items() if k != "ResponseMetadata"}
    if "QueueConfigurations" in kept:
        kept["QueueConfigurations"] = [
            c for c in kept["QueueConfigurations"] if c.get("Id") != NOTIFICATION_ID
        ]
    return kept


def rule_to_queue(events: Any, name: str, pattern: dict[str, Any], queue_arn: str) -> str:
    """
    Create or update an EventBridge rule on the default bus with the queue as its only target; return its ARN.

    :param events: an EventBridge client.
    :param name: the rule name.
    :param pattern: the event pattern.
    :param queue_arn: the target queue.
    """
    arn = events.put_rule(Name=name, EventPattern=json.dumps(pattern), State="ENABLED")["RuleArn"]
    events.put_targets(Rule=name, Targets=[{"Id": "sqs", "Arn": queue_arn}])
    return str(arn)


def wire(
    session: Any,
    *,
    bucket: str,
    prefix: str,
    arrivals_queue: str,
    events_queue: str | None,
    s3_via: str,
    datastore_id: str | None,
    endpoint_url: str | None,
) -> dict[str, Any]:
    """
    Do the wiring described in the module docs; return the queue URLs and the DAGs' environment settings.

    :param session: a boto3 session.
    :param bucket: the bucket receiving DICOM files.
    :param prefix: the key prefix to watch ("" for all).
    :param arrivals_queue: the arrivals queue name.
    :param events_queue: the image set events queue name, or None to skip it.
    :param s3_via: ``notification`` (S3 event notifications) or ``eventbridge``.
    :param datastore_id: narrow the image set rule to this data store.
    :param endpoint_url: the endpoint (None: AWS).
    """
    sqs = session.client("sqs", endpoint_url=endpoint_url)
    s3 = session.client("s3", endpoint_url=endpoint_url)
    events = session.client("events", endpoint_url=endpoint_url)
    arrivals_url, arrivals_arn = ensure_queue(sqs, arrivals_queue)
    # arn:<partition>:sqs:<region>:<account>:<name>: no STS call needed.
    partition, account = arrivals_arn.split(":")[1], arrivals_arn.split(":")[4]
    if s3_via == "eventbridge":
        s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                **_without_ours(s3.get_bucket_notification_configuration(Bucket=bucket)),
                "EventBridgeConfiguration": {},
            },
        )
        detail: dict[str, Any] = {"bucket": {"name": [bucket]}}
        if prefix:
            detail["object"] = {"key": [{"prefix": prefix}]}
        rule_arn = rule_to_queue(
            events,
            ARRIVALS_RULE,
            {"source": ["aws.s3"], "detail-type": ["Object Created"], "detail": detail},
            arrivals_arn,
        )
        sender = {"sid": "EventBridgeArrivals", "service": "events.amazonaws.com", "source_arn": rule_arn}
    else:
        sender = {
            "sid": "S3Arrivals",
            "service": "s3.amazonaws.com",
            "source_arn": f"arn:{partition}:s3:::{bucket}",
        }
    sqs.set_queue_attributes(
        QueueUrl=arrivals_url,
        Attributes={"Policy": queue_policy(arrivals_arn, [{**sender, "account": account}])},
    )
    if s3_via != "eventbridge":
        # After the policy: S3 checks that it may send (and sends s3:TestEvent) when the configuration is saved.
        notify_queue(s3, bucket, prefix, arrivals_arn)
    result: dict[str, Any] = {
        "arrivals_queue_url": arrivals_url,
        "environment": {"HEALTHIMAGING_ARRIVALS_QUEUE_URL": arrivals_url},
    }
    if events_queue:
        events_url, events_arn = ensure_queue(sqs, events_queue)
        pattern: dict[str, Any] = {"source": ["aws.medical-imaging"], "detail-type": IMAGE_SET_DETAIL_TYPES}
        if datastore_id:
            pattern["detail"] = {"datastoreId": [datastore_id]}
        rule_arn = rule_to_queue(events, IMAGE_SET_RULE, pattern, events_arn)
        statement = {"sid": "ImageSetEvents", "service": "events.amazonaws.com", "source_arn": rule_arn}
        sqs.set_queue_attributes(
            QueueUrl=events_url,
            Attributes={"Policy": queue_policy(events_arn, [{**statement, "account": account}])},
        )
        result["image_set_events_queue_url"] = events_url
        result["environment"]["HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL"] = events_url
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docs)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bucket", required=True, help="bucket receiving the DICOM files")
    parser.add_argument("--prefix", default="", help="key prefix to watch, e.g. incoming/ (default: all)")
    parser.add_argument("--arrivals-queue", default="healthimaging-arrivals")
    parser.add_argument("--events-queue", default="healthimaging-image-set-events", help="'' to skip")
    parser.add_argument("--s3-via", choices=["notification", "eventbridge"], default="notification")
    parser.add_argument("--datastore-id", help="narrow the image set rule to one data store")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="default: AWS")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    parser.add_argument(
        "--create-bucket", action="store_true", help="create the bucket when it does not exist"
    )
    args = parser.parse_args(argv)

    import boto3

    session = boto3.session.Session(region_name=args.region)
    if args.create_bucket:
        s3 = session.client("s3", endpoint_url=args.endpoint_url)
        if args.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            extra = (
                {}
                if args.region == "us-east-1"
                else {"CreateBucketConfiguration": {"LocationConstraint": args.region}}
            )
            s3.create_bucket(Bucket=args.bucket, **extra)
    result = wire(
        session,
        bucket=args.bucket,
        prefix=args.prefix,
        arrivals_queue=args.arrivals_queue,
        events_queue=args.events_queue or None,
        s3_via=args.s3_via,
        datastore_id=args.datastore_id,
        endpoint_url=args.endpoint_url,
    )
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
