"""HealthImaging's EventBridge events, received from an SQS queue that a rule on the default bus feeds.

The expected detail members are written out here from AWS's developer guide ("Using Amazon EventBridge with
HealthImaging"), independently of the emulator's code.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
from endpoint_helpers import (
    ROLE_ARN,
    create_active_datastore,
    read_json,
    receive_all,
    route_events,
    run_import,
    synthetic,
    upload,
    wait_for,
)

from healthimaging_local.server import LocalEndpoint
from healthimaging_local.throttling import RateLimit

ENVELOPE = {"version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"}
JOB_DETAIL = {"imagingVersion", "datastoreId", "jobId", "jobName", "jobStatus", "inputS3Uri", "outputS3Uri"}
IMAGE_SET_DETAIL = {
    "imagingVersion",
    "datastoreId",
    "imagesetId",
    "imageSetVersion",
    "imageSetState",
    "imageSetWorkflowStatus",
    "isPrimary",
}
DATASTORE_DETAIL = {"imagingVersion", "datastoreId", "datastoreName", "datastoreStatus"}
ALL_HEALTHIMAGING = {"source": ["aws.medical-imaging"]}


@pytest.fixture
def watched(tmp_path: Path) -> Any:
    """An endpoint (jobs IN_PROGRESS for 1 s, no rate limits) whose HealthImaging events all go to one queue."""
    with LocalEndpoint(tmp_path / "state", import_seconds=1.0, rate_limits={}) as endpoint:
        url = route_events(endpoint, "healthimaging", ALL_HEALTHIMAGING, "healthimaging-events")
        yield endpoint, endpoint.client("sqs"), url


def _check_envelope(event: dict[str, Any]) -> None:
    assert set(event) == ENVELOPE
    assert event["source"] == "aws.medical-imaging"
    assert (event["version"], event["account"], event["region"]) == ("0", "123456789012", "us-east-1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", event["time"])
    assert event["detail"]["imagingVersion"] == "1.0"


def test_an_import_announces_each_state_after_it_happened(watched: Any) -> None:
    endpoint, sqs, url = watched
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    datastore_id = create_active_datastore(mi, "events")
    creating, created = receive_all(sqs, url, expected=2)
    assert [creating["detail-type"], created["detail-type"]] == ["Data Store Creating", "Data Store Created"]
    for event, status in ((creating, "CREATING"), (created, "ACTIVE")):
        _check_envelope(event)
        assert set(event["detail"]) == DATASTORE_DETAIL
        assert event["detail"] == {
            "imagingVersion": "1.0",
            "datastoreId": datastore_id,
            "datastoreName": "events",
            "datastoreStatus": status,
        }
        assert event["resources"] == [
            f"arn:aws:medical-imaging:us-east-1:123456789012:datastore/{datastore_id}"
        ]

    upload(s3, "events-in", "study/", synthetic(series=2, instances=2))
    upload(s3, "events-out", "", [])
    seen: list[
        tuple[str, str, bool]
    ] = []  # (detail type, status the API answered on receipt, manifest there)
    events: list[dict[str, Any]] = []

    def consume() -> None:
        for event in receive_all(sqs, url, expected=5, timeout=30):
            job_id = event["detail"].get("jobId")
            status = manifest = None
            if job_id:
                job = mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]
                status = job["jobStatus"]
                bucket, _, key = job["outputS3Uri"][len("s3://") :].partition("/")
                listed = s3.list_objects_v2(Bucket=bucket, Prefix=key + "job-output-manifest.json")
                manifest = listed.get("KeyCount", 0) == 1
            seen.append((event["detail-type"], status or "", bool(manifest)))
            events.append(event)

    consumer = threading.Thread(target=consume)
    consumer.start()
    job = run_import(
        mi, datastore_id, "s3://events-in/study/", "s3://events-out/out/", jobName="arrival-study-1"
    )
    consumer.join(30)
    assert job["jobStatus"] == "COMPLETED"
    assert [s[0] for s in seen] == [
        "Import Job Submitted",
        "Import Job In Progress",
        "Image Set Created",
        "Image Set Created",
        "Import Job Completed",
    ]
    # On receipt of each job event the API already answers that state (or a later one), never an earlier one.
    assert seen[1][1] in ("IN_PROGRESS", "COMPLETED")
    assert seen[4][1:] == ("COMPLETED", True)  # and the output manifest is written by then
    for event in events:
        _check_envelope(event)
    for event, status in zip(
        [events[0], events[1], events[4]], ["SUBMITTED", "IN_PROGRESS", "COMPLETED"], strict=True
    ):
        assert set(event["detail"]) == JOB_DETAIL
        assert event["detail"] == {
            "imagingVersion": "1.0",
            "datastoreId": datastore_id,
            "jobId": job["jobId"],
            "jobName": "arrival-study-1",
            "jobStatus": status,
            "inputS3Uri": "s3://events-in/study/",
            "outputS3Uri": job["outputS3Uri"],  # the job folder, as GetDICOMImportJob answers it
        }
    summary = read_json(s3, job["outputS3Uri"] + "job-output-manifest.json")["jobSummary"]
    created_sets = {e["detail"]["imagesetId"]: e for e in events[2:4]}
    assert set(created_sets) == {s["imageSetId"] for s in summary["imageSetsSummary"]}
    for image_set_id, event in created_sets.items():
        assert set(event["detail"]) == IMAGE_SET_DETAIL
        assert event["detail"] | {"imagesetId": image_set_id} == {
            "imagingVersion": "1.0",
            "datastoreId": datastore_id,
            "imagesetId": image_set_id,
            "imageSetVersion": 1,
            "imageSetState": "ACTIVE",
            "imageSetWorkflowStatus": "CREATED",
            "isPrimary": True,
        }
        assert event["resources"] == [
            f"arn:aws:medical-imaging:us-east-1:123456789012:datastore/{datastore_id}/imageset/{image_set_id}"
        ]

    # Importing the same series again updates the image sets: version 2, "Image Set Updated".
    again = run_import(mi, datastore_id, "s3://events-in/study/", "s3://events-out/out/")
    updates = receive_all(sqs, url, expected=5)
    assert [e["detail-type"] for e in updates] == [
        "Import Job Submitted",
        "Import Job In Progress",
        "Image Set Updated",
        "Image Set Updated",
        "Import Job Completed",
    ]
    assert {e["detail"]["imagesetId"] for e in updates[2:4]} == set(created_sets)
    assert {
        (e["detail"]["imageSetVersion"], e["detail"]["imageSetWorkflowStatus"]) for e in updates[2:4]
    } == {(2, "UPDATED")}
    assert updates[4]["detail"]["jobId"] == again["jobId"]


def test_refused_starts_announce_nothing_and_a_failed_job_announces_failed(tmp_path: Path) -> None:
    with LocalEndpoint(
        tmp_path / "state", max_concurrent_imports=1, import_seconds=0.5, rate_limits={}
    ) as endpoint:
        mi, s3, sqs = endpoint.client("medical-imaging"), endpoint.client("s3"), endpoint.client("sqs")
        datastore_id = create_active_datastore(mi)
        creating = endpoint.client("medical-imaging").create_datastore(datastoreName="not-yet")["datastoreId"]
        with endpoint.store.transaction() as db:  # keep it CREATING
            db.execute("UPDATE datastores SET settle_at=NULL WHERE id=?", (creating,))
        url = route_events(
            endpoint,
            "jobs",
            {"source": ["aws.medical-imaging"], "detail-type": [{"prefix": "Import Job"}]},
            "jobs",
        )
        upload(s3, "refused-in", "", synthetic(instances=1))
        kwargs = {
            "dataAccessRoleArn": ROLE_ARN,
            "inputS3Uri": "s3://refused-in/",
            "outputS3Uri": "s3://refused-in/out/",
        }
        first = mi.start_dicom_import_job(datastoreId=datastore_id, clientToken="first", **kwargs)
        [submitted] = receive_all(sqs, url, expected=1)
        assert submitted["detail"]["jobId"] == first["jobId"]
        refusals = {
            "402 ServiceQuotaExceededException": lambda: mi.start_dicom_import_job(
                datastoreId=datastore_id, clientToken="second", **kwargs
            ),
            "409 ConflictException (token reused)": lambda: mi.start_dicom_import_job(
                datastoreId=datastore_id, clientToken="first", jobName="other", **kwargs
            ),
            "409 ConflictException (not ACTIVE)": lambda: mi.start_dicom_import_job(
                datastoreId=creating, **kwargs
            ),
            "404 ResourceNotFoundException": lambda: mi.start_dicom_import_job(
                datastoreId="0" * 32, **kwargs
            ),
            "400 ValidationException": lambda: mi.start_dicom_import_job(
                datastoreId=datastore_id, dataAccessRoleArn=ROLE_ARN, inputS3Uri="s3://x", outputS3Uri="nope"
            ),
        }
        for what, call in refusals.items():
            with pytest.raises(mi.exceptions.ClientError) as raised:
                call()
            assert what.startswith(str(raised.value.response["ResponseMetadata"]["HTTPStatusCode"])), what
        # A replay answers 200 with its job and announces nothing either: it changes nothing.
        assert (
            mi.start_dicom_import_job(datastoreId=datastore_id, clientToken="first", **kwargs)["jobId"]
            == first["jobId"]
        )
        wait_for(
            lambda: (
                mi.get_dicom_import_job(datastoreId=datastore_id, jobId=first["jobId"])["jobProperties"][
                    "jobStatus"
                ]
                == "COMPLETED"
            )
        )
        assert [e["detail-type"] for e in receive_all(sqs, url, expected=2)] == [
            "Import Job In Progress",
            "Import Job Completed",
        ]
        assert receive_all(sqs, url) == []  # nothing for the five refusals and the replay

        failed = run_import(mi, datastore_id, "s3://no-such-bucket/", "s3://refused-in/out/")
        assert failed["jobStatus"] == "FAILED"
        announced = receive_all(sqs, url, expected=3)
        assert [e["detail-type"] for e in announced] == [
            "Import Job Submitted",
            "Import Job In Progress",
            "Import Job Failed",
        ]
        assert announced[2]["detail"]["jobStatus"] == "FAILED"
        assert receive_all(sqs, url) == []  # no image set events, no Completed


def test_a_throttled_start_announces_nothing(tmp_path: Path) -> None:
    limits = {"StartDICOMImportJob": RateLimit(0.01, 1)}  # one start, then none for 100 s
    with LocalEndpoint(tmp_path / "state", rate_limits=limits) as endpoint:
        mi = endpoint.client("medical-imaging", retries={"max_attempts": 1, "mode": "standard"})
        datastore_id = create_active_datastore(mi)
        url = route_events(endpoint, "jobs", ALL_HEALTHIMAGING, "throttled-jobs")
        kwargs = {
            "dataAccessRoleArn": ROLE_ARN,
            "inputS3Uri": "s3://none-in/",
            "outputS3Uri": "s3://none-out/",
        }
        started = mi.start_dicom_import_job(datastoreId=datastore_id, **kwargs)
        with pytest.raises(mi.exceptions.ThrottlingException):
            mi.start_dicom_import_job(datastoreId=datastore_id, **kwargs)
        announced = receive_all(endpoint.client("sqs"), url, expected=3)
        assert [e["detail-type"] for e in announced] == [
            "Import Job Submitted",
            "Import Job In Progress",
            "Import Job Failed",  # the input bucket does not exist
        ]
        assert {e["detail"]["jobId"] for e in announced} == {started["jobId"]}
        assert receive_all(endpoint.client("sqs"), url) == []
        assert len(mi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"]) == 1


def test_deletes_announce_deleting_then_deleted(watched: Any) -> None:
    endpoint, sqs, url = watched
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    datastore_id = create_active_datastore(mi, "to-delete")
    upload(s3, "delete-in", "", synthetic(instances=1))
    job = run_import(mi, datastore_id, "s3://delete-in/", "s3://delete-in/out/")
    [image_set] = read_json(s3, job["outputS3Uri"] + "job-output-manifest.json")["jobSummary"][
        "imageSetsSummary"
    ]
    receive_all(sqs, url, expected=6)  # data store, job and image set events so far
    mi.delete_image_set(datastoreId=datastore_id, imageSetId=image_set["imageSetId"])
    deleting, deleted = receive_all(sqs, url, expected=2)  # the second comes with no further request
    assert [deleting["detail-type"], deleted["detail-type"]] == ["Image Set Deleting", "Image Set Deleted"]
    assert (deleting["detail"]["imageSetState"], deleting["detail"]["imageSetWorkflowStatus"]) == (
        "LOCKED",
        "DELETING",
    )
    assert (deleted["detail"]["imageSetState"], deleted["detail"]["imageSetWorkflowStatus"]) == (
        "DELETED",
        "DELETED",
    )
    assert {deleting["detail"]["imagesetId"], deleted["detail"]["imagesetId"]} == {image_set["imageSetId"]}
    assert (
        mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set["imageSetId"])["imageSetState"]
        == "DELETED"
    )
    mi.delete_datastore(datastoreId=datastore_id)
    store_deleting, store_deleted = receive_all(sqs, url, expected=2)
    assert [store_deleting["detail-type"], store_deleted["detail-type"]] == [
        "Data Store Deleting",
        "Data Store Deleted",
    ]
    assert store_deleted["detail"]["datastoreStatus"] == "DELETED"
