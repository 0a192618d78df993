from __future__ import annotations

import inspect
from pathlib import Path
from unittest import mock

import pytest
from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from botocore.exceptions import ClientError

from healthimaging.hooks import IMPORT_JOB_WAITER, HealthImagingHook


def test_hook_is_thin() -> None:
    """Like the provider's test_hooks_signature.py: no constructor parameters beyond *args/**kwargs."""
    params = inspect.signature(HealthImagingHook.__init__).parameters
    assert [p.kind for p in params.values()] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ]
    assert issubclass(HealthImagingHook, AwsBaseHook)
    assert HealthImagingHook(aws_conn_id=None).client_type == "medical-imaging"


def test_hook_keeps_no_state_of_its_own() -> None:
    """Issue 14: no settings passed through hook attributes; the hook holds what AwsBaseHook holds."""
    own = {
        name
        for name, value in vars(HealthImagingHook).items()
        if not callable(value) and not name.startswith("__")
    }
    assert own <= {"waiter_path", "s3_hook"}  # cached properties
    base = AwsBaseHook(aws_conn_id=None, client_type="medical-imaging")
    assert set(vars(HealthImagingHook(aws_conn_id=None))) == set(vars(base))


def test_waiter_path_is_the_package_json() -> None:
    hook = HealthImagingHook(aws_conn_id=None)
    import healthimaging

    assert Path(hook.waiter_path) == Path(healthimaging.__file__).parent / "waiters" / "medical-imaging.json"


def test_custom_waiter_listed(stubber) -> None:
    assert IMPORT_JOB_WAITER in HealthImagingHook(aws_conn_id=None).list_waiters()


def test_get_import_job(stubber, kit) -> None:
    stubber.add_response(
        "get_dicom_import_job",
        {"jobProperties": kit.job_properties("IN_PROGRESS")},
        {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID},
    )
    job = HealthImagingHook().get_import_job(kit.DATASTORE_ID, kit.JOB_ID)
    assert job["jobStatus"] == "IN_PROGRESS"


def test_manifest_read_retries_no_such_key(kit) -> None:
    hook = HealthImagingHook(aws_conn_id=None)
    s3_client = mock.MagicMock()
    missing = ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")
    body = mock.MagicMock()
    body.read.return_value = kit.manifest().encode()
    s3_client.get_object.side_effect = [missing, missing, {"Body": body}]
    with mock.patch.object(type(hook.s3_hook), "get_conn", return_value=s3_client):
        summary = hook.get_job_output_manifest(kit.JOB_FOLDER, attempts=3, delay=0)
    assert summary["numberOfImportedFiles"] == 3
    assert s3_client.get_object.call_count == 3
    key = kit.JOB_FOLDER.removeprefix("s3://output-bucket/") + "job-output-manifest.json"
    s3_client.get_object.assert_called_with(Bucket="output-bucket", Key=key)


def test_manifest_missing_after_all_attempts(s3, kit) -> None:
    assert HealthImagingHook().get_job_output_manifest(kit.JOB_FOLDER, attempts=2, delay=0) is None


def test_other_s3_errors_are_raised(s3) -> None:
    with pytest.raises(ClientError, match="NoSuchBucket"):
        HealthImagingHook().read_s3_text("s3://no-such-bucket/x.json")


def test_completed_job_result_reads_manifest_and_failures(s3, kit) -> None:
    kit.put_job_outputs(
        s3,
        kit.manifest(scanned=4, imported=2, customer_errors=2),
        kit.failure_ndjson("dicom/a.txt", "dicom/b.bin"),
    )
    result = HealthImagingHook().completed_job_result(kit.job_properties("COMPLETED"), attempts=1, delay=0)
    assert result == {
        "jobId": kit.JOB_ID,
        "jobStatus": "COMPLETED",
        "endedAt": kit.ENDED_AT.isoformat(),
        "outputS3Uri": kit.JOB_FOLDER,
        "numberOfScannedFiles": 4,
        "numberOfImportedFiles": 2,
        "numberOfFilesWithCustomerError": 2,
        "numberOfFilesWithServerError": 0,
        "numberOfGeneratedImageSets": 0,
        "failedFiles": [
            {"inputFile": "dicom/a.txt", "exceptionType": "ValidationException"},
            {"inputFile": "dicom/b.bin", "exceptionType": "ValidationException"},
        ],
    }


def test_failed_job_message_has_job_message_and_first_five_reasons(s3, kit) -> None:
    kit.put_job_outputs(s3, kit.manifest(), kit.failure_ndjson(*[f"dicom/{i}.dcm" for i in range(7)]))
    text = HealthImagingHook().failed_job_message(kit.job_properties("FAILED"))
    assert "FILE_COUNTS_LIMIT_EXCEEDED" in text
    assert "dicom/4.dcm" in text
    assert "dicom/5.dcm" not in text


def test_failed_job_message_without_outputs(s3, kit) -> None:
    text = HealthImagingHook().failed_job_message(kit.job_properties("FAILED"))
    assert text.endswith("FILE_COUNTS_LIMIT_EXCEEDED")
