"""
# Index new HealthImaging image sets from the service's own events (example)

Scheduled on the asset `healthimaging_image_set_events`, whose `AssetWatcher` runs the messaging provider's
`MessageQueueTrigger` (scheme `sqs`) on a queue fed by an EventBridge rule:
`{"source": ["aws.medical-imaging"], "detail-type": ["Image Set Created", "Image Set Updated"]}` with the queue as
its target (`scripts/wire_arrivals.py` creates both; see docs/import-on-arrival.md).

Per run, for every image set version announced (each once): `GetImageSetMetadata` (a gzip JSON document), then

- with the Variable `healthimaging_index_s3_uri` set, the document is written to
  `<index>/<datastoreId>/<imageSetId>/<version>.json`: one JSON document per image set version, the shape of
  AWS's *metadata-index* sample (which loads the same document into a database or a data lake);
- the task returns (XCom) ids and counts only: data store, image set, version, event, study/series/instance counts
  and modalities; never patient or study attributes.

The queue URL is a parse-time setting: environment `HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL` (unset: no watcher).
The AWS connection is `HEALTHIMAGING_AWS_CONN_ID` (default `aws_default`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import Asset, AssetWatcher, dag, task

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

QUEUE_URL = os.environ.get("HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL", "").strip()
AWS_CONN_ID = os.environ.get("HEALTHIMAGING_AWS_CONN_ID", "aws_default")
WAIT_SECONDS = int(os.environ.get("HEALTHIMAGING_ARRIVALS_WAIT_SECONDS", "20"))
POLL_DELAY = int(os.environ.get("HEALTHIMAGING_ARRIVALS_POLL_DELAY", "10"))
VAR_INDEX_S3_URI = "healthimaging_index_s3_uri"

IMAGE_SET_EVENTS = Asset(
    name="healthimaging_image_set_events",
    uri="x-medical-imaging://image-set-events",
    group="medical-imaging",
    watchers=[
        AssetWatcher(
            name="image_set_created_or_updated",
            trigger=MessageQueueTrigger(
                scheme="sqs",
                sqs_queue=QUEUE_URL,
                aws_conn_id=AWS_CONN_ID,
                max_messages=10,
                num_batches=1,
                wait_time_seconds=WAIT_SECONDS,
                waiter_delay=POLL_DELAY,
            ),
        )
    ]
    if QUEUE_URL
    else [],
)


def metadata_summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """
    Counts and modalities of an ImageSetMetadata document (no patient or study attributes).

    :param document: the decoded GetImageSetMetadata document.
    """
    series = (document.get("Study") or {}).get("Series") or {}
    modalities = sorted({str(s.get("DICOM", {}).get("Modality")) for s in series.values() if s.get("DICOM")})
    return {
        "seriesCount": len(series),
        "instanceCount": sum(len(s.get("Instances") or {}) for s in series.values()),
        "modalities": [m for m in modalities if m != "None"],
    }


@dag(
    dag_id="healthimaging_index_image_sets_example",
    description="Example: index image sets from HealthImaging's EventBridge events (GetImageSetMetadata)",
    doc_md=__doc__,
    schedule=[IMAGE_SET_EVENTS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["healthimaging", "medical-imaging", "example", "event-driven"],
    default_args={
        "owner": "data-engineering",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(minutes=15),
    },
)
def healthimaging_index_image_sets_example() -> None:
    @task
    def index_image_sets(
        triggering_asset_events: Mapping[Any, Iterable[Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Fetch each announced image set's metadata, write it to the index prefix, return ids and counts."""
        import gzip
        import json

        from airflow.sdk import Variable

        from healthimaging.arrivals import image_set_events, iter_messages
        from healthimaging.hooks import HealthImagingHook
        from healthimaging.validation import split_s3_uri

        events = [event for per_asset in (triggering_asset_events or {}).values() for event in per_asset]
        announced = image_set_events(iter_messages(events))
        index_uri = (Variable.get(VAR_INDEX_S3_URI, default=None) or "").strip()
        hook = HealthImagingHook(aws_conn_id=AWS_CONN_ID)
        records = []
        for item in announced:
            request: dict[str, Any] = {"datastoreId": item.datastore_id, "imageSetId": item.image_set_id}
            if item.version is not None:
                request["versionId"] = item.version
            response = hook.conn.get_image_set_metadata(**request)
            blob = response["imageSetMetadataBlob"].read()
            if response.get("contentEncoding") == "gzip":
                blob = gzip.decompress(blob)
            document = json.loads(blob)
            record = {
                "datastoreId": item.datastore_id,
                "imageSetId": item.image_set_id,
                "imageSetVersion": item.version,
                "event": item.detail_type,
                **metadata_summary(document),
            }
            if index_uri:
                bucket, key_prefix = split_s3_uri(index_uri.rstrip("/") + "/")
                key = f"{key_prefix}{item.datastore_id}/{item.image_set_id}/{item.version or 'latest'}.json"
                hook.s3_hook.load_bytes(json.dumps(document).encode(), key, bucket_name=bucket, replace=True)
                record["indexS3Uri"] = f"s3://{bucket}/{key}"
            records.append(record)
        return records

    index_image_sets()


healthimaging_index_image_sets_example()
