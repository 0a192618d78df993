"""The endpoint over real HTTP with stock boto3: every operation, wire conformance, errors and dispatch."""

from __future__ import annotations

import gzip
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from endpoint_helpers import (
    ROLE_ARN,
    WireRecorder,
    assert_wire_conforms,
    create_active_datastore,
    read_json,
    run_import,
    synthetic,
    upload,
    wait_for,
)

from healthimaging_local.server import LocalEndpoint

ALL_OPERATIONS = {
    "CreateDatastore",
    "GetDatastore",
    "ListDatastores",
    "DeleteDatastore",
    "StartDICOMImportJob",
    "GetDICOMImportJob",
    "ListDICOMImportJobs",
    "SearchImageSets",
    "GetImageSet",
    "ListImageSetVersions",
    "DeleteImageSet",
}


def raw(endpoint: LocalEndpoint, method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
    """Send an unsigned request; return (status, headers, body)."""
    request = urllib.request.Request(endpoint.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_every_operation_conforms_to_the_model(endpoint: LocalEndpoint) -> None:
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    recorder = WireRecorder(mi)
    created = mi.create_datastore(datastoreName="all-ops", tags={"team": "x"})
    assert created["datastoreStatus"] == "CREATING"
    datastore_id = created["datastoreId"]
    wait_for(
        lambda: (
            mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] == "ACTIVE"
        )
    )
    assert any(d["datastoreId"] == datastore_id for d in mi.list_datastores()["datastoreSummaries"])
    upload(s3, "input-bucket", "study/", synthetic(series=2, instances=2))
    upload(s3, "output-bucket", "", [])
    job = run_import(
        mi, datastore_id, "s3://input-bucket/study/", "s3://output-bucket/out/", jobName="all-ops"
    )
    assert job["jobStatus"] == "COMPLETED"
    assert "message" not in job
    assert "endedAt" in job
    summaries = mi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"]
    assert [s["jobId"] for s in summaries] == [job["jobId"]]
    assert "inputS3Uri" not in summaries[0]
    assert "outputS3Uri" not in summaries[0]
    found = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"]
    assert len(found) == 2
    image_set_id = found[0]["imageSetId"]
    image_set = mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
    assert image_set["versionId"] == "1"
    assert image_set["imageSetState"] == "ACTIVE"
    blob = mi.get_image_set_metadata(datastoreId=datastore_id, imageSetId=image_set_id, versionId="1")
    assert blob["contentType"] == "application/json"
    assert blob["contentEncoding"] == "gzip"
    document = json.loads(gzip.decompress(blob["imageSetMetadataBlob"].read()))
    assert document["ImageSetID"] == image_set_id
    assert document["DatastoreID"] == datastore_id
    assert len(next(iter(document["Study"]["Series"].values()))["Instances"]) == 2
    versions = mi.list_image_set_versions(datastoreId=datastore_id, imageSetId=image_set_id)
    assert versions["imageSetPropertiesList"][0]["ImageSetWorkflowStatus"] == "CREATED"
    for summary in found:
        deleted = mi.delete_image_set(datastoreId=datastore_id, imageSetId=summary["imageSetId"])
        assert (deleted["imageSetState"], deleted["imageSetWorkflowStatus"]) == ("LOCKED", "DELETING")
    wait_for(
        lambda: (
            mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)["imageSetState"] == "DELETED"
        )
    )
    assert "deletedAt" in mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
    assert mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"] == []
    wait_for(
        lambda: all(
            mi.get_image_set(datastoreId=datastore_id, imageSetId=s["imageSetId"])["imageSetState"]
            == "DELETED"
            for s in found
        )
    )
    assert mi.delete_datastore(datastoreId=datastore_id)["datastoreStatus"] == "DELETING"
    wait_for(
        lambda: (
            mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] == "DELETED"
        )
    )
    assert assert_wire_conforms(mi, recorder) == ALL_OPERATIONS


def test_metadata_is_raw_gzip_on_the_wire(endpoint: LocalEndpoint) -> None:
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    datastore_id = create_active_datastore(mi)
    upload(s3, "meta-in", "", synthetic(instances=1))
    upload(s3, "meta-out", "", [])
    run_import(mi, datastore_id, "s3://meta-in/", "s3://meta-out/")
    image_set_id = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"][0][
        "imageSetId"
    ]
    status, headers, body = raw(
        endpoint, "POST", f"/datastore/{datastore_id}/imageSet/{image_set_id}/getImageSetMetadata"
    )
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["x-amzn-RequestId"]
    assert json.loads(gzip.decompress(body))["SchemaVersion"]


def test_modelled_errors_raise_their_exception_classes(endpoint: LocalEndpoint) -> None:
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    missing = "0" * 32
    with pytest.raises(mi.exceptions.ValidationException, match="datastoreId.*\\[0-9a-z\\]\\{32\\}"):
        mi.get_datastore(datastoreId="NOT-VALID")
    with pytest.raises(mi.exceptions.ValidationException, match="maxResults"):
        mi.list_datastores(maxResults=51)
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_datastore(datastoreId=missing)
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.search_image_sets(datastoreId=missing)
    datastore_id = create_active_datastore(mi)
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_dicom_import_job(datastoreId=datastore_id, jobId="abc")
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_image_set(datastoreId=datastore_id, imageSetId=missing)
    with pytest.raises(mi.exceptions.ValidationException, match="roleArn|dataAccessRoleArn"):
        mi.start_dicom_import_job(
            datastoreId=datastore_id,
            dataAccessRoleArn="arn:aws:iam::1:role/too-short-account",
            inputS3Uri="s3://in-bucket/",
            outputS3Uri="s3://out-bucket/",
        )
    with pytest.raises(mi.exceptions.ValidationException, match="inputS3Uri"):
        mi.start_dicom_import_job(
            datastoreId=datastore_id,
            dataAccessRoleArn=ROLE_ARN,
            inputS3Uri="http://x",
            outputS3Uri="s3://ok-bucket/",
        )
    upload(s3, "conflict-in", "", synthetic(instances=1))
    upload(s3, "conflict-out", "", [])
    run_import(mi, datastore_id, "s3://conflict-in/", "s3://conflict-out/")
    with pytest.raises(mi.exceptions.ConflictException):
        mi.delete_datastore(datastoreId=datastore_id)
    image_set_id = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"][0][
        "imageSetId"
    ]
    mi.delete_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
    with pytest.raises(mi.exceptions.ConflictException):
        mi.delete_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
    with pytest.raises(mi.exceptions.ValidationException):
        mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id, versionId="x1")
    with pytest.raises(mi.exceptions.ResourceNotFoundException):
        mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id, versionId="7")


def test_internal_server_exception_is_encoded_as_modelled(endpoint: LocalEndpoint, monkeypatch: Any) -> None:
    # InternalServerException is modelled only; provoke it by breaking a handler.
    mi = endpoint.client("medical-imaging", retries={"max_attempts": 1})

    def broken(params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(endpoint.operations, "list_datastores", broken)
    app = endpoint._server.app.apps["medical-imaging"]  # type: ignore[attr-defined]
    monkeypatch.setitem(app.handlers, "ListDatastores", broken)
    with pytest.raises(mi.exceptions.InternalServerException):
        mi.list_datastores()


def test_throttling(tmp_path: Path) -> None:
    with LocalEndpoint(tmp_path / "state", throttle_rate=1.0, seed=1) as endpoint:
        mi = endpoint.client("medical-imaging", retries={"max_attempts": 2, "mode": "standard"})
        with pytest.raises(mi.exceptions.ThrottlingException) as raised:
            mi.list_datastores()
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert raised.value.response["ResponseMetadata"]["RetryAttempts"] == 2  # retried as a throttle


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        (
            "POST",
            "/datastore",
            b"{not json",
            {"Content-Type": "application/json"},
            400,
            "ValidationException",
        ),
        (
            "POST",
            "/datastore",
            b'{"clientToken":"a"}',
            {"Content-Type": "text/plain"},
            400,
            "ValidationException",
        ),
        (
            "POST",
            "/datastore",
            b'{"clientToken":"\xff"}',
            {"Content-Type": "application/json"},
            400,
            "ValidationException",
        ),
        ("POST", "/datastore", b"[1, 2]", {"Content-Type": "application/json"}, 400, "ValidationException"),
        (
            "POST",
            "/datastore",
            b"x" * (1024 * 1024 + 1),
            {"Content-Type": "application/json"},
            400,
            "ValidationException",
        ),
        (
            "POST",
            "/datastore",
            b'{"clientToken": 5}',
            {"Content-Type": "application/json"},
            400,
            "ValidationException",
        ),
        ("PATCH", "/datastore", None, {}, 404, "UnknownOperationException"),
        ("PUT", "/datastore/" + "a" * 32, b"", {}, 404, "UnknownOperationException"),
        ("GET", "/datastore/..%2F..%2Fetc", None, {}, 400, "ValidationException"),
        ("GET", "/datastore/%ff%fe", None, {}, 400, "ValidationException"),
        ("GET", "/datastore?maxResults=abc", None, {}, 400, "ValidationException"),
        ("GET", "/datastore?nextToken=forged", None, {}, 400, "ValidationException"),
        (
            "POST",
            "/datastore/" + "a" * 32 + "/imageSet/" + "b" * 32 + "/copyImageSet",
            b"{}",
            {},
            501,
            "NotImplementedException",
        ),
    ],
)
def test_bad_requests_get_well_formed_errors(
    endpoint: LocalEndpoint,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    got_status, got_headers, got_body = raw(endpoint, method, path, body, **headers)
    assert got_status == status
    assert got_headers["x-amzn-ErrorType"] == code
    assert got_headers["x-amzn-RequestId"]
    assert json.loads(got_body)["__type"] == code
    assert raw(endpoint, "GET", "/datastore")[0] == 200


def test_signed_unknown_route_is_unknown_operation(endpoint: LocalEndpoint) -> None:
    auth = "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/medical-imaging/aws4_request, SignedHeaders=host, Signature=0"
    status, headers, _ = raw(endpoint, "GET", "/nothing/here", Authorization=auth)
    assert status == 404
    assert headers["x-amzn-ErrorType"] == "UnknownOperationException"


def test_body_less_post_and_runtime_host(endpoint: LocalEndpoint) -> None:
    mi = endpoint.client("medical-imaging")
    datastore_id = create_active_datastore(mi)
    status, _, body = raw(
        endpoint, "POST", f"/datastore/{datastore_id}/searchImageSets", Host="runtime-localhost"
    )
    assert status == 200
    assert json.loads(body) == {"imageSetsMetadataSummaries": []}


def test_openapi_wrapped_search_body_is_accepted(endpoint: LocalEndpoint) -> None:
    mi = endpoint.client("medical-imaging")
    datastore_id = create_active_datastore(mi)
    wrapped = json.dumps(
        {"searchCriteria": {"sort": {"sortOrder": "ASC", "sortField": "createdAt"}}}
    ).encode()
    status, _, body = raw(
        endpoint,
        "POST",
        f"/datastore/{datastore_id}/searchImageSets",
        wrapped,
        **{"Content-Type": "application/json"},
    )
    assert status == 200
    assert json.loads(body)["sort"] == {"sortOrder": "ASC", "sortField": "createdAt"}


def test_s3_and_healthimaging_share_one_url(endpoint: LocalEndpoint) -> None:
    s3 = endpoint.client("s3")
    s3.create_bucket(Bucket="datastore")  # same first path segment as a HealthImaging route
    s3.put_object(Bucket="datastore", Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket="datastore", Key="a/b.txt")["Body"].read() == b"hello"
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "datastore", "Key": "a/b.txt"})
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"hello"
    assert endpoint.client("medical-imaging").list_datastores()["datastoreSummaries"] == []


def test_access_log_has_no_query_strings_or_bodies(
    endpoint: LocalEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    mi = endpoint.client("medical-imaging")
    datastore_id = create_active_datastore(mi)
    with caplog.at_level(logging.INFO, logger="healthimaging_local"):
        mi.search_image_sets(
            datastoreId=datastore_id,
            searchCriteria={
                "filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "SECRET-PATIENT"}]}]
            },
        )
        raw(endpoint, "GET", "/datastore?datastoreStatus=ACTIVE&maxResults=3")
    text = caplog.text
    assert "searchImageSets" in text
    assert "SECRET-PATIENT" not in text
    assert "maxResults" not in text


def test_job_output_locations(endpoint: LocalEndpoint) -> None:
    mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
    datastore_id = create_active_datastore(mi)
    upload(s3, "loc-in", "p/", synthetic(instances=1))
    upload(s3, "loc-out", "", [])
    job = run_import(mi, datastore_id, "s3://loc-in/p/", "s3://loc-out/no-slash")
    expected = f"s3://loc-out/no-slash/{datastore_id}-DicomImport-{job['jobId']}/"
    assert job["outputS3Uri"] == expected
    assert read_json(s3, expected + "job-output-manifest.json")["jobSummary"]["outputS3Uri"] == expected


def test_client_error_without_modelled_class_is_not_hidden(endpoint: LocalEndpoint) -> None:
    mi = endpoint.client("medical-imaging")
    with pytest.raises(ClientError) as raised:
        mi.get_image_frame(
            datastoreId="a" * 32, imageSetId="b" * 32, imageFrameInformation={"imageFrameId": "c" * 32}
        )
    assert raised.value.response["Error"]["Code"] == "NotImplementedException"


@pytest.mark.parametrize(
    "path",
    ["/listDICOMImportJobs/datastore/", "/getDICOMImportJob/datastore//job/x", "/startDICOMImportJob/"],
)
def test_unsigned_malformed_import_job_paths_get_healthimaging_errors(
    endpoint: LocalEndpoint, path: str
) -> None:
    """Found by the fuzzer: these paths cannot name an S3 bucket, so S3's NoSuchBucket would mislead."""
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(endpoint.url + path)
    assert answer.value.code == 404
    assert answer.value.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert answer.value.headers["x-amzn-RequestId"]
