"""Corrections to moto 5.2 so that S3 event notifications and EventBridge deliveries look as AWS documents them.

moto's S3 backend already delivers ObjectCreated notifications (Put, Post, Copy, CompleteMultipartUpload) to moto's
SQS in-process, and moto's EventBridge delivers matching events to SQS targets. Three details differ from AWS:

1. The S3 event record lacks members the record format documents
   (https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html): ``userIdentity``,
   ``requestParameters``, ``responseElements``, ``s3.bucket.ownerIdentity``, ``s3.object.sequencer`` and, in a
   versioned bucket, ``s3.object.versionId``. moto also URL-encodes ``/`` in ``s3.object.key``, which S3 leaves as
   is (``images/red flower.jpg`` arrives as ``images/red+flower.jpg``).
2. A completed multipart upload is announced twice by moto: as ``ObjectCreated:Put`` and as
   ``ObjectCreated:CompleteMultipartUpload``. S3 sends only the latter.
3. EventBridge's envelope, as delivered to a target, has an ``account`` member
   (https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-events-structure.html); moto's default input template
   leaves it out.

:func:`install` applies the corrections once per process (the module attributes moto looks up at call time are
replaced; moto's own code is not copied).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from typing import Any
from urllib.parse import quote_plus

from healthimaging_local.model import ACCOUNT_ID

_installed = False
_install_lock = threading.Lock()
_sequence = itertools.count()
OWNER_ID = "A1HEALTHIMAGINGLOCAL"
REQUESTER_ID = f"AWS:{ACCOUNT_ID}"
SOURCE_IP = "127.0.0.1"


def notification_key(key: str) -> str:
    """An object key as S3 notifications carry it: form-URL-encoded, with ``/`` kept.

    :param key: the object key.
    """
    return quote_plus(key, safe="/")


def sequencer() -> str:
    """A hexadecimal ``sequencer``: larger for every later event of this process (S3 compares them per key)."""
    return f"{time.time_ns():016X}{next(_sequence) % 0x10000:04X}"


def s3_event(event_name: str, bucket: Any, key: Any, notification_id: str) -> dict[str, Any]:
    """The ``Records`` body S3 sends for one event (replaces moto's ``_get_s3_event``).

    :param event_name: moto's event name, e.g. ``s3:ObjectCreated:Put``.
    :param bucket: moto's bucket.
    :param key: moto's key (the object).
    :param notification_id: the notification configuration's id.
    """
    from moto.core.utils import iso_8601_datetime_with_milliseconds

    obj: dict[str, Any] = {
        "key": notification_key(key.name),
        "size": key.size,
        "eTag": key.etag.replace('"', ""),
        "sequencer": sequencer(),
    }
    if getattr(bucket, "is_versioned", False) and getattr(key, "version_id", None) not in (None, "null"):
        obj["versionId"] = key.version_id
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": bucket.region_name,
        "eventTime": iso_8601_datetime_with_milliseconds(),
        "eventName": event_name.removeprefix("s3:"),
        "userIdentity": {"principalId": REQUESTER_ID},
        "requestParameters": {"sourceIPAddress": SOURCE_IP},
        "responseElements": {
            "x-amz-request-id": secrets.token_hex(8).upper(),
            "x-amz-id-2": secrets.token_urlsafe(48),
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": notification_id,
            "bucket": {"name": bucket.name, "ownerIdentity": {"principalId": OWNER_ID}, "arn": bucket.arn},
            "object": obj,
        },
    }
    return {"Records": [record]}


def install() -> None:
    """Apply the corrections (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from moto.events.utils import EventTemplateParser
        from moto.s3 import notifications

        moto_send_event = notifications.send_event

        def send_event(account_id: str, event_name: Any, bucket: Any, key: Any) -> None:
            multipart_put = event_name == notifications.S3NotificationEvent.OBJECT_CREATED_PUT_EVENT and (
                getattr(key, "multipart", None) is not None
            )
            if not multipart_put:  # the CompleteMultipartUpload event that follows announces the object
                moto_send_event(account_id, event_name, bucket, key)

        notifications._get_s3_event = s3_event
        notifications.send_event = send_event  # type: ignore[assignment]
        template = EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE
        if '"account"' not in template:
            EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE = template.replace(
                '"version": "0",', '"version": "0", "account": "<account>",', 1
            )
        _installed = True
