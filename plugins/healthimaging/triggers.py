"""Trigger that waits in the triggerer for a HealthImaging DICOM import job to end."""

from __future__ import annotations

from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger

from healthimaging.hooks import IMPORT_JOB_WAITER, HealthImagingHook


class DICOMImportJobTrigger(AwsBaseWaiterTrigger):
    """
    Poll a DICOM import job until it is COMPLETED (success event) or FAILED (error event).

    Throttling, 5xx answers and dropped connections spend one attempt each instead of ending the wait.

    :param datastore_id: the data store id
    :param job_id: the import job id
    :param waiter_delay: seconds between polls
    :param waiter_max_attempts: the most polls before giving up
    :param poll_jitter: at most this many seconds of random delay added to every poll, so that many
        triggers spread their GetDICOMImportJob calls (25 per second by default); None means a tenth of
        ``waiter_delay``
    :param aws_conn_id: the Airflow connection used for AWS credentials
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates
    :param botocore_config: botocore client configuration (dict)
    """

    def __init__(
        self,
        *,
        datastore_id: str,
        job_id: str,
        waiter_delay: int = 30,
        waiter_max_attempts: int = 120,
        poll_jitter: float | None = None,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ) -> None:
        super().__init__(
            serialized_fields={"datastore_id": datastore_id, "job_id": job_id, "poll_jitter": poll_jitter},
            waiter_name=IMPORT_JOB_WAITER,
            waiter_args={"datastoreId": datastore_id, "jobId": job_id},
            failure_message=f"DICOM import job {job_id} failed",
            status_message=f"Status of DICOM import job {job_id} is",
            status_queries=["jobProperties.jobStatus", "jobProperties.message"],
            return_key="job_id",
            return_value=job_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )
        self.poll_jitter = waiter_delay / 10 if poll_jitter is None else max(0.0, float(poll_jitter))

    def hook(self) -> HealthImagingHook:
        hook = HealthImagingHook(
            aws_conn_id=self.aws_conn_id,
            region_name=self.region_name,
            verify=self.verify,
            config=self.botocore_config,
        )
        hook.poll_jitter = self.poll_jitter
        return hook
