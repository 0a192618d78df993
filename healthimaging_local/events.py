"""HealthImaging's EventBridge events, put on the default bus of the embedded (moto) EventBridge.

What AWS documents, in "Using Amazon EventBridge with HealthImaging"
(https://docs.aws.amazon.com/healthimaging/latest/devguide/event-notifications.html):

- ``source`` is ``aws.medical-imaging``; the events are state changes, delivered durably.
- Detail types, by the state they announce: data stores "Data Store Creating" (CREATING), "Data Store Creation
  Failed" (CREATE_FAILED), "Data Store Created" (ACTIVE), "Data Store Deleting" (DELETING), "Data Store Deleted"
  (DELETED); import jobs "Import Job Submitted" (SUBMITTED), "Import Job In Progress" (IN_PROGRESS), "Import Job
  Completed" (COMPLETED), "Import Job Failed" (FAILED); image sets "Image Set Created" (CREATED), "Image Set Updated"
  (UPDATED), "Image Set Deleting" (DELETING), "Image Set Deleted" (DELETED), and copy/update-in-progress types this
  emulator never reaches (it has no CopyImageSet or UpdateImageSetMetadata).
- ``detail`` members: every event has ``imagingVersion`` and ``datastoreId``; data store events add
  ``datastoreName`` and ``datastoreStatus``; import job events add ``jobId``, ``jobName``, ``jobStatus``,
  ``inputS3Uri`` and ``outputS3Uri``; image set events add ``imagesetId``, ``imageSetVersion``, ``imageSetState``,
  ``imageSetWorkflowStatus`` and ``isPrimary``. The member lists of the data store and import job events agree with
  the event patterns the AWS CDK generates from the EventBridge schema registry
  (``aws_cdk.mixins_preview.aws_healthimaging.events``).

Where the sources disagree: the developer guide spells the image set id ``imagesetId``, while the CDK's generated
patterns and AWS's own metadata-index sample (``aws-samples/aws-healthimaging-samples``,
``metadata-index/backend/lambda/AHItoRDBMS/index.py`` reads ``detail["imageSetId"]``) spell it ``imageSetId``. This
emulator sends the guide's spelling only; a consumer meant for real AWS should accept both. ``imageSetVersion`` is
sent as a number, like ``imageSetsSummary[].imageSetVersion`` in the job's output manifest (not documented).

An event is published after the change it announces is committed, never before: "Import Job Completed" once the
output manifest is written and GetDICOMImportJob answers COMPLETED, after the "Image Set Created/Updated" events of
that job. A request refused with a 4xx changes nothing and publishes nothing. The envelope is EventBridge's
(``version``, ``id``, ``detail-type``, ``source``, ``account``, ``time``, ``region``, ``resources``, ``detail``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from healthimaging_local.model import ACCOUNT_ID, REGION, datastore_arn, image_set_arn

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

SOURCE = "aws.medical-imaging"
IMAGING_VERSION = "1.0"
DATASTORE_DETAIL_TYPES = {
    "CREATING": "Data Store Creating",
    "CREATE_FAILED": "Data Store Creation Failed",
    "ACTIVE": "Data Store Created",
    "DELETING": "Data Store Deleting",
    "DELETED": "Data Store Deleted",
}
JOB_DETAIL_TYPES = {
    "SUBMITTED": "Import Job Submitted",
    "IN_PROGRESS": "Import Job In Progress",
    "COMPLETED": "Import Job Completed",
    "FAILED": "Import Job Failed",
}
IMAGE_SET_DETAIL_TYPES = {
    "CREATED": "Image Set Created",
    "UPDATED": "Image Set Updated",
    "DELETING": "Image Set Deleting",
    "DELETED": "Image Set Deleted",
}


@dataclass(frozen=True)
class ImageSetChange:
    """One image set state change to announce.

    :param datastore_id: its data store.
    :param image_set_id: the image set.
    :param version: its version after the change.
    :param state: ``ACTIVE``, ``LOCKED`` or ``DELETED``.
    :param workflow_status: ``CREATED``, ``UPDATED``, ``DELETING`` or ``DELETED``.
    :param is_primary: whether it is the primary image set of its series.
    """

    datastore_id: str
    image_set_id: str
    version: int
    state: str
    workflow_status: str
    is_primary: bool


class EventPublisher:
    """Puts HealthImaging events on moto's default event bus (its rules and their targets do the rest)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def publish(self, detail_type: str, detail: Mapping[str, Any], resources: list[str], when: float) -> None:
        """Put one event on the default bus; a delivery failure is logged, never raised to the caller.

        :param detail_type: e.g. ``Import Job Completed``.
        :param detail: the ``detail`` object.
        :param resources: ARNs the event is about.
        :param when: epoch seconds of the state change (the envelope's ``time``).
        """
        from moto.events.models import events_backends

        entry = {
            "Source": SOURCE,
            "DetailType": detail_type,
            "Detail": json.dumps({"imagingVersion": IMAGING_VERSION, **detail}),
            "Resources": resources,
            "Time": when,
        }
        try:
            with (
                self._lock
            ):  # one event at a time, so a rule's queue receives them in the order of the changes
                events_backends[ACCOUNT_ID][REGION].put_events([entry])
        except Exception:
            log.exception("Could not deliver the HealthImaging event %r", detail_type)

    def datastore(self, datastore_id: str, name: str, status: str, when: float | None = None) -> None:
        """Announce a data store's new status.

        :param datastore_id: the data store.
        :param name: its name.
        :param status: its new ``datastoreStatus``.
        :param when: epoch seconds of the change (default: now).
        """
        detail = {"datastoreId": datastore_id, "datastoreName": name, "datastoreStatus": status}
        self.publish(DATASTORE_DETAIL_TYPES[status], detail, [datastore_arn(datastore_id)], _now(when))

    def job(self, job: Mapping[str, Any], when: float | None = None) -> None:
        """Announce an import job's current status.

        :param job: the job's row (``id``, ``datastore_id``, ``name``, ``status``, ``input_s3_uri``,
            ``output_s3_uri``).
        :param when: epoch seconds of the change (default: now).
        """
        detail = {
            "datastoreId": job["datastore_id"],
            "jobId": job["id"],
            "jobName": job["name"],
            "jobStatus": job["status"],
            "inputS3Uri": job["input_s3_uri"],
            "outputS3Uri": job["output_s3_uri"],
        }
        self.publish(
            JOB_DETAIL_TYPES[job["status"]],
            {k: v for k, v in detail.items() if v is not None},
            [datastore_arn(job["datastore_id"])],
            _now(when),
        )

    def image_set(self, change: ImageSetChange, when: float | None = None) -> None:
        """Announce an image set's new workflow status.

        :param change: what changed.
        :param when: epoch seconds of the change (default: now).
        """
        detail = {
            "datastoreId": change.datastore_id,
            "imagesetId": change.image_set_id,
            "imageSetVersion": change.version,
            "imageSetState": change.state,
            "imageSetWorkflowStatus": change.workflow_status,
            "isPrimary": change.is_primary,
        }
        self.publish(
            IMAGE_SET_DETAIL_TYPES[change.workflow_status],
            detail,
            [image_set_arn(change.datastore_id, change.image_set_id)],
            _now(when),
        )


def _now(when: float | None) -> float:
    return time.time() if when is None else when
