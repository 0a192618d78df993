"""
Turn arrival messages into study folders to import.

An arrival is one S3 object that was created, announced by a message on an SQS queue. The messages reach a DAG
run through its triggering asset events: the messaging provider's ``MessageQueueTrigger`` (SQS) yields
``{"status": "success", "message_batch": [<SQS message>, ...]}``, which Airflow stores as the asset event's
``extra["payload"]``. Each message body is one of:

- an S3 event notification, ``{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3":
  {"bucket": {"name": ...}, "object": {"key": <URL-encoded>, "size": ..., "eTag": ...}}}]}``
  (https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html);
- S3's ``s3:TestEvent``, sent when a notification configuration is saved (no object: ignored);
- an EventBridge event with ``source`` ``aws.s3`` and detail-type ``Object Created``
  (https://docs.aws.amazon.com/AmazonS3/latest/userguide/ev-events.html), whose key is not URL-encoded;
- either of the above wrapped in an SNS notification (``{"Type": "Notification", "Message": "<json>"}``).

Anything else (ObjectRemoved records, other events, bodies that are not JSON) is counted and skipped.

Keys are grouped into study folders by :class:`StudyGrouping`: the first ``depth`` folder levels below a base
prefix, or the start of the key that a regular expression matches. Keys under excluded prefixes (the import's
output and staging prefixes, whose manifests notify like any other object) are skipped.

Study folder names can be patient ids: logs and :meth:`ArrivalSummary.as_dict` carry counts and bucket names
only. The folder prefixes themselves are in the returned :class:`StudyFolder` values (XCom), as the import specs
of the scheduled DAG carry their prefixes.

This module imports neither boto3 nor Airflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

log = logging.getLogger(__name__)

S3_TEST_EVENT = "s3:TestEvent"
EVENTBRIDGE_OBJECT_CREATED = "Object Created"
_BUCKET = re.compile(r"^[a-z0-9][.\-a-z0-9]{1,61}[a-z0-9]$")


class Arrival(NamedTuple):
    """One created object, as announced."""

    bucket: str
    key: str
    size: int | None
    etag: str | None


@dataclass
class ArrivalSummary:
    """What the messages held, in counts (no keys: they can name patients)."""

    messages: int = 0
    records: int = 0
    test_events: int = 0
    ignored: int = 0
    unreadable: int = 0
    excluded: int = 0
    ungrouped: int = 0
    buckets: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        """The summary as a JSON-able dict (counts and bucket names only)."""
        return {
            "messages": self.messages,
            "records": self.records,
            "testEvents": self.test_events,
            "ignored": self.ignored,
            "unreadable": self.unreadable,
            "excluded": self.excluded,
            "ungrouped": self.ungrouped,
            "buckets": sorted(self.buckets),
        }


@dataclass(frozen=True)
class StudyGrouping:
    """
    How object keys map to study folders.

    :param depth: folder levels below ``base_prefix`` that make a study folder, e.g. 2 for
        ``<base>/<patient>/<study>/...``. A key with fewer folder levels than that belongs to no study.
    :param base_prefix: only keys under this prefix are grouped (``""``: the whole bucket).
    :param pattern: instead of ``depth``, a regular expression matched at the start of the key; the matched text
        (which must end with ``/``) is the study folder.
    :param exclude_prefixes: keys under these prefixes are skipped (``s3://bucket/prefix`` or a bare key prefix
        applying to every bucket), e.g. the import's output and staging prefixes.
    """

    depth: int | None = None
    base_prefix: str = ""
    pattern: str | None = None
    exclude_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.depth is None) == (self.pattern is None):
            raise ValueError("StudyGrouping takes exactly one of depth and pattern.")
        if self.depth is not None and (isinstance(self.depth, bool) or self.depth < 1):
            raise ValueError(f"depth must be a whole number of at least 1, got {self.depth!r}.")
        if self.base_prefix and not self.base_prefix.endswith("/"):
            raise ValueError("base_prefix must be empty or end with '/'.")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern is not a regular expression: {err}") from None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StudyGrouping:
        """
        Build a grouping from a JSON-like mapping (an Airflow Variable), refusing unknown members.

        :param config: members ``depth`` or ``pattern``, and optional ``base_prefix``, ``exclude_prefixes``.
        """
        known = {"depth", "pattern", "base_prefix", "exclude_prefixes"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown study grouping settings {unknown}; known: {sorted(known)}.")
        depth = config.get("depth")
        if depth is not None and not isinstance(depth, int):
            raise ValueError(f"depth must be a whole number, got {type(depth).__name__}.")
        excludes = config.get("exclude_prefixes") or ()
        if isinstance(excludes, str) or not all(isinstance(p, str) for p in excludes):
            raise ValueError("exclude_prefixes must be a list of prefixes.")
        return cls(
            depth=depth,
            base_prefix=str(config.get("base_prefix") or ""),
            pattern=config.get("pattern"),
            exclude_prefixes=tuple(excludes),
        )

    def folder_of(self, key: str) -> str | None:
        """
        The study folder (key prefix ending with ``/``) holding ``key``, or None.

        :param key: an object key (decoded); a folder marker (a key ending with ``/``) belongs to no study.
        """
        if not key.startswith(self.base_prefix) or key.endswith("/"):
            return None
        if self.pattern is not None:
            match = re.match(self.pattern, key)
            if not match or not match.group(0).endswith("/") or match.end() >= len(key):
                return None
            return match.group(0)
        parts = key[len(self.base_prefix) :].split("/")
        assert self.depth is not None
        if len(parts) <= self.depth or not all(parts[: self.depth]):
            return None
        return self.base_prefix + "/".join(parts[: self.depth]) + "/"

    def is_excluded(self, bucket: str, key: str) -> bool:
        """
        Whether ``key`` lies under one of the excluded prefixes.

        :param bucket: the object's bucket.
        :param key: the object's key.
        """
        for prefix in self.exclude_prefixes:
            if prefix.startswith("s3://"):
                ex_bucket, _, ex_key = prefix[5:].partition("/")
                if ex_bucket == bucket and key.startswith(ex_key):
                    return True
            elif key.startswith(prefix):
                return True
        return False


class StudyFolder(NamedTuple):
    """One study folder that received objects."""

    bucket: str
    prefix: str
    arrivals: int

    @property
    def s3_uri(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def folder_id(self) -> str:
        """A short stable label that names no folder (for task labels and logs)."""
        return "study-" + hashlib.sha256(self.s3_uri.encode()).hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        """The folder as XCom (``bucket_name`` and ``prefix`` as ``S3KeysUnchangedSensor`` takes them)."""
        return {
            "bucket_name": self.bucket,
            "prefix": self.prefix,
            "s3_uri": self.s3_uri,
            "folder_id": self.folder_id,
            "arrivals": self.arrivals,
        }


def iter_messages(asset_events: Iterable[Any]) -> Iterator[Mapping[str, Any]]:
    """
    Yield the SQS messages that a run's triggering asset events carry.

    :param asset_events: asset events (objects with ``extra``, or mappings with ``"extra"``); events that do not
        come from a message queue trigger carry no messages.
    """
    for event in asset_events:
        extra = event.get("extra") if isinstance(event, Mapping) else getattr(event, "extra", None)
        payload = (extra or {}).get("payload") if isinstance(extra, Mapping) else None
        if not isinstance(payload, Mapping):
            continue
        for message in payload.get("message_batch") or ():
            if isinstance(message, Mapping):
                yield message


def parse_body(body: Any, summary: ArrivalSummary) -> list[Arrival]:
    """
    The created objects that one message body announces (see the module docs for the shapes read).

    :param body: the message ``Body`` (a JSON string, or already decoded).
    :param summary: counts of what was read, updated in place.
    """
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError:
            summary.unreadable += 1
            return []
    if not isinstance(body, Mapping):
        summary.unreadable += 1
        return []
    if body.get("Type") == "Notification" and isinstance(body.get("Message"), str):
        return parse_body(body["Message"], summary)
    if body.get("Event") == S3_TEST_EVENT:
        summary.test_events += 1
        return []
    if isinstance(body.get("Records"), list):
        return [a for record in body["Records"] if (a := _from_record(record, summary)) is not None]
    if body.get("source") == "aws.s3" and "detail" in body:
        arrival = _from_eventbridge(body, summary)
        return [] if arrival is None else [arrival]
    summary.ignored += 1
    return []


def _from_record(record: Any, summary: ArrivalSummary) -> Arrival | None:
    summary.records += 1
    try:
        if record.get("eventSource") != "aws:s3" or not str(record.get("eventName", "")).startswith(
            "ObjectCreated:"
        ):
            summary.ignored += 1
            return None
        s3 = record["s3"]
        obj = s3["object"]
        return _arrival(
            s3["bucket"]["name"], unquote_plus(obj["key"]), obj.get("size"), obj.get("eTag"), summary
        )
    except (AttributeError, KeyError, TypeError):
        summary.unreadable += 1
        return None


def _from_eventbridge(event: Mapping[str, Any], summary: ArrivalSummary) -> Arrival | None:
    summary.records += 1
    if event.get("detail-type") != EVENTBRIDGE_OBJECT_CREATED:
        summary.ignored += 1
        return None
    try:
        detail = event["detail"]
        obj = detail["object"]
        return _arrival(detail["bucket"]["name"], obj["key"], obj.get("size"), obj.get("etag"), summary)
    except (AttributeError, KeyError, TypeError):
        summary.unreadable += 1
        return None


def _arrival(bucket: Any, key: Any, size: Any, etag: Any, summary: ArrivalSummary) -> Arrival | None:
    if not isinstance(bucket, str) or not _BUCKET.match(bucket) or not isinstance(key, str) or not key:
        summary.unreadable += 1
        return None
    summary.buckets.add(bucket)
    return Arrival(
        bucket, key, size if isinstance(size, int) else None, etag if isinstance(etag, str) else None
    )


def group_arrivals(
    messages: Iterable[Mapping[str, Any]], grouping: StudyGrouping
) -> tuple[list[StudyFolder], ArrivalSummary]:
    """
    Group the objects that messages announce into study folders.

    :param messages: SQS messages (mappings with ``Body``), e.g. from :func:`iter_messages`.
    :param grouping: how keys map to study folders.
    :return: the folders, sorted by bucket and prefix, each once, and the counts of what was read.
    """
    summary = ArrivalSummary()
    counts: dict[tuple[str, str], int] = {}
    for message in messages:
        summary.messages += 1
        for arrival in parse_body(message.get("Body"), summary):
            if grouping.is_excluded(arrival.bucket, arrival.key):
                summary.excluded += 1
                continue
            folder = grouping.folder_of(arrival.key)
            if folder is None:
                summary.ungrouped += 1
                continue
            counts[(arrival.bucket, folder)] = counts.get((arrival.bucket, folder), 0) + 1
    folders = [StudyFolder(bucket, prefix, n) for (bucket, prefix), n in sorted(counts.items())]
    log.info(
        "Arrivals: %d message(s), %d record(s), %d study folder(s) in bucket(s) %s; skipped %d test event(s), "
        "%d other event(s), %d unreadable, %d excluded, %d outside any study folder",
        summary.messages,
        summary.records,
        len(folders),
        ", ".join(sorted(summary.buckets)) or "-",
        summary.test_events,
        summary.ignored,
        summary.unreadable,
        summary.excluded,
        summary.ungrouped,
    )
    return folders, summary


#: Airflow Variables the arrival DAG reads at run time (the first four are the scheduled import DAG's).
VAR_DATASTORE_ID = "healthimaging_datastore_id"
VAR_DATA_ACCESS_ROLE_ARN = "healthimaging_data_access_role_arn"
VAR_OUTPUT_S3_URI = "healthimaging_output_s3_uri"
VAR_STAGING_S3_URI = "healthimaging_staging_s3_uri"
VAR_GROUPING = "healthimaging_arrivals_grouping"
VAR_SETTLE_SECONDS = "healthimaging_arrivals_settle_seconds"
DEFAULT_GROUPING: dict[str, Any] = {"depth": 2}
DEFAULT_SETTLE_SECONDS = 120.0


@dataclass(frozen=True)
class ArrivalSettings:
    """
    What the arrival DAG imports into, and how it groups and settles arrivals.

    :param datastore_id: the data store to import into.
    :param data_access_role_arn: the role HealthImaging assumes.
    :param output_s3_uri: where jobs write their output (excluded from grouping).
    :param staging_s3_uri: where the planner stages files no prefix reaches (excluded from grouping), or None.
    :param grouping: how keys map to study folders.
    :param settle_seconds: how long a folder must be quiet before it is imported.
    """

    datastore_id: str
    data_access_role_arn: str
    output_s3_uri: str
    staging_s3_uri: str | None
    grouping: StudyGrouping
    settle_seconds: float

    @classmethod
    def from_variables(cls, get_variable: Any) -> ArrivalSettings:
        """
        Read and check the settings; ``ValueError`` names the Variable at fault.

        :param get_variable: returns an Airflow Variable's value (a string) or None.
        """

        def required(name: str) -> str:
            value = (get_variable(name) or "").strip()
            if not value:
                raise ValueError(f"Airflow Variable {name} (or env AIRFLOW_VAR_{name.upper()}) is not set.")
            return value

        grouping_text = get_variable(VAR_GROUPING)
        try:
            grouping_config = json.loads(grouping_text) if grouping_text else DEFAULT_GROUPING
            if not isinstance(grouping_config, Mapping):
                raise ValueError("expected a JSON object")
        except ValueError as err:
            raise ValueError(f"Airflow Variable {VAR_GROUPING} is not a JSON object: {err}") from None
        settle_text = get_variable(VAR_SETTLE_SECONDS)
        try:
            settle_seconds = float(settle_text) if settle_text else DEFAULT_SETTLE_SECONDS
        except ValueError:
            raise ValueError(f"Airflow Variable {VAR_SETTLE_SECONDS} is not a number of seconds.") from None
        if not 0 <= settle_seconds <= 24 * 3600:
            raise ValueError(f"Airflow Variable {VAR_SETTLE_SECONDS} must be 0 to 86400 seconds.")
        output_s3_uri = required(VAR_OUTPUT_S3_URI)
        staging_s3_uri = (get_variable(VAR_STAGING_S3_URI) or "").strip() or None
        for name, uri in ((VAR_OUTPUT_S3_URI, output_s3_uri), (VAR_STAGING_S3_URI, staging_s3_uri)):
            if uri is not None and not uri.startswith("s3://"):
                raise ValueError(f"Airflow Variable {name} must be an s3:// URI.")
        try:
            grouping = StudyGrouping.from_config(grouping_config)
        except ValueError as err:
            raise ValueError(f"Airflow Variable {VAR_GROUPING}: {err}") from None
        excludes = tuple(u for u in (output_s3_uri, staging_s3_uri) if u)
        grouping = StudyGrouping(
            depth=grouping.depth,
            base_prefix=grouping.base_prefix,
            pattern=grouping.pattern,
            exclude_prefixes=grouping.exclude_prefixes + excludes,
        )
        return cls(
            datastore_id=required(VAR_DATASTORE_ID),
            data_access_role_arn=required(VAR_DATA_ACCESS_ROLE_ARN),
            output_s3_uri=output_s3_uri,
            staging_s3_uri=staging_s3_uri,
            grouping=grouping,
            settle_seconds=settle_seconds,
        )

    def import_spec(self, bucket_name: str, prefix: str) -> dict[str, Any]:
        """
        The import spec of one settled study folder (the keys ``compose_imports`` takes).

        :param bucket_name: the folder's bucket.
        :param prefix: the folder's key prefix.
        """
        return {
            "input_s3_uri": f"s3://{bucket_name}/{prefix}",
            "output_s3_uri": self.output_s3_uri,
            "datastore_id": self.datastore_id,
            "data_access_role_arn": self.data_access_role_arn,
            "staging_s3_uri": self.staging_s3_uri,
            "allow_empty": False,
            "job_name": None,
            "client_token": None,
            "max_failed_files": None,
            "max_results": 50,
            "include_phi": False,
            "phi_allow_tags": [],
        }


IMAGE_SET_DETAIL_TYPES = ("Image Set Created", "Image Set Updated")


class ImageSetEvent(NamedTuple):
    """One HealthImaging image set event (ids only)."""

    datastore_id: str
    image_set_id: str
    version: str | None
    detail_type: str


def image_set_events(
    messages: Iterable[Mapping[str, Any]], detail_types: Iterable[str] = IMAGE_SET_DETAIL_TYPES
) -> list[ImageSetEvent]:
    """
    The image set events that EventBridge delivered to a queue, each (data store, image set, version) once.

    The id is read from ``imagesetId`` (AWS's developer guide) or ``imageSetId`` (AWS's CDK schema and samples).

    :param messages: SQS messages whose bodies are EventBridge events (``source`` ``aws.medical-imaging``).
    :param detail_types: the detail-types to keep.
    """
    wanted = set(detail_types)
    seen: dict[tuple[str, str, str | None], ImageSetEvent] = {}
    skipped = 0
    for message in messages:
        try:
            body = json.loads(message.get("Body") or "")
        except ValueError:
            skipped += 1
            continue
        detail = body.get("detail") if isinstance(body, Mapping) else None
        if (
            not isinstance(detail, Mapping)
            or body.get("source") != "aws.medical-imaging"
            or body.get("detail-type") not in wanted
        ):
            skipped += 1
            continue
        image_set_id = detail.get("imagesetId") or detail.get("imageSetId")
        datastore_id = detail.get("datastoreId")
        if not isinstance(image_set_id, str) or not isinstance(datastore_id, str):
            skipped += 1
            continue
        version = detail.get("imageSetVersion")
        version = None if version is None else str(version)
        key = (datastore_id, image_set_id, version)
        seen.setdefault(key, ImageSetEvent(datastore_id, image_set_id, version, str(body["detail-type"])))
    log.info("Image set events: %d kept, %d other message(s) skipped", len(seen), skipped)
    return sorted(seen.values())
