"""The embedded moto S3 backend: direct object access for the importer and persistence under ``<state-dir>/s3``.

What persists: every bucket, its objects (content, metadata, ETag) and its notification configuration (queue,
topic, Lambda and EventBridge destinations). Other bucket settings (versioning, policies, lifecycle, tags) and
object versions other than the current one are not kept across a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

from moto.s3.exceptions import MissingBucket
from moto.s3.models import s3_backends

from healthimaging_local.model import ACCOUNT_ID, REGION

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from moto.s3.models import FakeBucket, S3Backend


@dataclass(frozen=True)
class S3Object:
    """One object listed under a prefix."""

    key: str
    size: int


def encode_s3_error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """An S3 error response (XML ``<Error>``), as S3 sends it.

    :param status: HTTP status.
    :param code: the S3 error code (e.g. ``SignatureDoesNotMatch``).
    :param message: the human readable message.
    :return: HTTP status, headers and body.
    """
    request_id = str(uuid.uuid4())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    headers = [
        ("Content-Type", "application/xml"),
        ("x-amz-request-id", request_id),
        ("Content-Length", str(len(body))),
    ]
    return status, headers, body


def backend() -> S3Backend:
    """moto's in-process S3 backend that the endpoint serves."""
    return s3_backends[ACCOUNT_ID]["aws"]


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and prefix.

    :param uri: an S3 URI (already validated by the model pattern).
    """
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix


class S3Storage:
    """Object access plus write-through persistence of moto's S3 state.

    :param root: the folder under which buckets are persisted.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # ---------------------------------------------------------------------------------- object access

    def bucket(self, name: str) -> FakeBucket | None:
        """The bucket named ``name`` or ``None``.

        :param name: bucket name.
        """
        try:
            return backend().get_bucket(name)
        except MissingBucket:
            return None

    def list_objects(self, bucket: str, prefix: str) -> Iterator[S3Object]:
        """Every current object under a prefix, recursively, sorted by key.

        :param bucket: bucket name (must exist).
        :param prefix: key prefix.
        """
        fake = backend().get_bucket(bucket)
        for key in sorted(k for k in list(fake.keys.keys()) if k.startswith(prefix)):
            obj = fake.keys.get(key)
            if obj is not None and hasattr(obj, "size"):
                yield S3Object(key, obj.size)

    def get_object(self, bucket: str, key: str) -> bytes:
        """The bytes of one object.

        :param bucket: bucket name.
        :param key: object key.
        """
        obj = backend().get_bucket(bucket).keys.get(key)
        if obj is None:
            raise KeyError(key)
        return bytes(obj.value)

    def put_object(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        """Write an object and persist it; the bucket's event notifications fire, as for any client's PUT.

        :param bucket: bucket name.
        :param key: object key.
        :param data: the content.
        :param content_type: its Content-Type.
        """
        obj = backend().put_object(bucket, key, data)
        obj.set_metadata({"Content-Type": content_type})
        self.sync_key(bucket, key)

    # ---------------------------------------------------------------------------------- persistence

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / hashlib.sha1(bucket.encode()).hexdigest()

    def _object_paths(self, bucket: str, key: str) -> tuple[Path, Path]:
        stem = self._bucket_dir(bucket) / "objects" / hashlib.sha256(key.encode()).hexdigest()
        return stem.with_suffix(".json"), stem.with_suffix(".bin")

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def sync_key(self, bucket: str, key: str) -> None:
        """Persist the current state of one object (written, or removed if it no longer exists).

        :param bucket: bucket name.
        :param key: object key.
        """
        with self._lock:
            fake = self.bucket(bucket)
            if fake is None:
                self.sync_bucket(bucket)
                return
            self._ensure_bucket_dir(fake)
            meta_path, data_path = self._object_paths(bucket, key)
            obj = fake.keys.get(key)
            if obj is None or not hasattr(obj, "value"):
                meta_path.unlink(missing_ok=True)
                data_path.unlink(missing_ok=True)
                return
            self._atomic_write(data_path, bytes(obj.value))
            meta = {"key": key, "metadata": dict(obj.metadata), "etag": obj.etag}
            self._atomic_write(meta_path, json.dumps(meta).encode())

    def _ensure_bucket_dir(self, fake: FakeBucket, refresh: bool = False) -> None:
        folder = self._bucket_dir(fake.name)
        if refresh or not (folder / "bucket.json").exists():
            (folder / "objects").mkdir(parents=True, exist_ok=True)
            config = {"name": fake.name, "notification": notification_document(fake)}
            self._atomic_write(folder / "bucket.json", json.dumps(config).encode())

    def sync_bucket(self, bucket: str) -> None:
        """Persist a whole bucket: its existence and every object (changed objects only).

        :param bucket: bucket name.
        """
        with self._lock:
            folder = self._bucket_dir(bucket)
            fake = self.bucket(bucket)
            if fake is None:
                if folder.exists():
                    for path in (folder / "objects").glob("*"):
                        path.unlink()
                    (folder / "objects").rmdir()
                    (folder / "bucket.json").unlink(missing_ok=True)
                    folder.rmdir()
                return
            self._ensure_bucket_dir(fake, refresh=True)
            wanted: set[str] = set()
            for key in list(fake.keys.keys()):
                meta_path, data_path = self._object_paths(bucket, key)
                wanted.update({meta_path.name, data_path.name})
                obj = fake.keys.get(key)
                if obj is None or not hasattr(obj, "etag"):
                    continue
                if meta_path.exists() and json.loads(meta_path.read_bytes()).get("etag") == obj.etag:
                    continue
                self.sync_key(bucket, key)
            for path in (folder / "objects").glob("*"):
                if path.name not in wanted:
                    path.unlink()

    def sync_request(self, method: str, host: str, path: str) -> None:
        """Persist what a successful mutating S3 request may have changed.

        :param method: HTTP method of the request.
        :param host: its Host header (for virtual-hosted-style addressing).
        :param path: its raw path.
        """
        if method not in ("PUT", "POST", "DELETE"):
            return
        label = host.split(":", 1)[0].split(".", 1)[0]
        parts = unquote(path).lstrip("/")
        if label and self.bucket(label) is not None and "." in host.split(":", 1)[0]:
            bucket, key = label, parts
        else:
            bucket, _, key = parts.partition("/")
        if not bucket:
            return
        if key:
            self.sync_key(bucket, key)
        else:
            self.sync_bucket(bucket)

    def load(self) -> None:
        """Replace moto's S3 state with what is persisted under the root folder."""
        with self._lock:
            s3 = backend()
            s3.reset()
            for marker in self.root.glob("*/bucket.json"):
                config = json.loads(marker.read_bytes())
                name = config["name"]
                fake = s3.create_bucket(name, REGION)
                restore_notification(fake, config.get("notification"))
                for meta_path in (marker.parent / "objects").glob("*.json"):
                    meta: dict[str, Any] = json.loads(meta_path.read_bytes())
                    data = meta_path.with_suffix(".bin").read_bytes()
                    obj = s3.put_object(name, meta["key"], data, disable_notification=True)
                    obj.set_metadata(dict(meta["metadata"]))


_NOTIFICATION_KINDS = (  # moto's attribute, the configuration's element, the destination's element
    ("queue", "QueueConfiguration", "Queue"),
    ("topic", "TopicConfiguration", "Topic"),
    ("cloud_function", "CloudFunctionConfiguration", "CloudFunction"),
)


def notification_document(fake: FakeBucket) -> dict[str, Any] | None:
    """A bucket's notification configuration in the form moto parses from PutBucketNotificationConfiguration.

    :param fake: moto's bucket.
    """
    config = fake.notification_configuration
    if config is None:
        return None
    document: dict[str, Any] = {
        element: [
            {"Id": n.id, destination: n.arn, "Event": list(n.events), "Filter": n.filters or None}
            for n in getattr(config, attribute)
        ]
        for attribute, element, destination in _NOTIFICATION_KINDS
    }
    if config.event_bridge is not None:
        document["EventBridgeConfiguration"] = config.event_bridge
    return document


def restore_notification(fake: FakeBucket, document: dict[str, Any] | None) -> None:
    """Give a restored bucket its notification configuration back, without the test event a new one sends.

    :param fake: moto's bucket.
    :param document: what :func:`notification_document` saved.
    """
    if not document:
        return
    from moto.s3.models import NotificationConfiguration

    fake.notification_configuration = NotificationConfiguration(
        topic=document.get("TopicConfiguration"),
        queue=document.get("QueueConfiguration"),
        cloud_function=document.get("CloudFunctionConfiguration"),
        event_bridge=document.get("EventBridgeConfiguration"),
    )
