"""Hook for AWS HealthImaging (boto3 client ``medical-imaging``)."""

from __future__ import annotations

import asyncio
import json
import time
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from botocore.exceptions import ClientError

from healthimaging import manifest

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

WAITERS_PATH = Path(__file__).parent / "waiters" / "medical-imaging.json"
IMPORT_JOB_WAITER = "dicom_import_job_complete"


@cache
def import_job_states() -> dict[str, frozenset[str]]:
    """
    Job states of the ``dicom_import_job_complete`` waiter grouped by acceptor state.

    The waiter JSON is the only place the state machine is written down; this reads it back.

    :return: ``{"retry": {...}, "success": {...}, "failure": {...}}`` (path acceptors only)
    """
    model = json.loads(WAITERS_PATH.read_text())
    states: dict[str, set[str]] = {"retry": set(), "success": set(), "failure": set()}
    for acceptor in model["waiters"][IMPORT_JOB_WAITER]["acceptors"]:
        if acceptor["matcher"] == "path":
            states[acceptor["state"]].add(acceptor["expected"])
    return {key: frozenset(value) for key, value in states.items()}


class HealthImagingHook(AwsBaseHook):
    """
    Interact with AWS HealthImaging.

    Provide thin wrapper around :external+boto3:py:class:`boto3.client("medical-imaging")
    <MedicalImaging.Client>`.

    Additional arguments (such as ``aws_conn_id``) may be specified and
    are passed down to the underlying AwsBaseHook.

    .. seealso::
        - :class:`airflow.providers.amazon.aws.hooks.base_aws.AwsBaseHook`
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_type"] = "medical-imaging"
        super().__init__(*args, **kwargs)

    @cached_property
    def waiter_path(self) -> os.PathLike[str] | None:
        return WAITERS_PATH

    @cached_property
    def s3_hook(self) -> S3Hook:
        """S3 hook on the same connection (looked up once), region, verify and botocore config."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(
            aws_conn_id=self.aws_conn_id,
            region_name=self._region_name,
            verify=self._verify,
            config=self._config,
        )
        # Share the resolved connection: one lookup (and one "credentials retrieved" log) for both clients.
        hook.conn_config = self.conn_config
        return hook

    def get_import_job(self, datastore_id: str, job_id: str) -> dict[str, Any]:
        """
        Return ``jobProperties`` of one DICOM import job.

        :param datastore_id: the data store id
        :param job_id: the import job id
        """
        return self.conn.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]

    def read_s3_text(self, s3_uri: str) -> str | None:
        """
        Read an S3 object as text.

        :param s3_uri: ``s3://bucket/key``
        :return: the text, or None when there is no such object
        """
        bucket, key = self.s3_hook.parse_s3_url(s3_uri)
        try:
            return self.s3_hook.get_conn().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
        except ClientError as error:
            if _is_missing_object(error):
                return None
            raise

    async def async_read_s3_text(self, s3_client: Any, s3_uri: str) -> str | None:
        """
        Read an S3 object as text with an aiobotocore S3 client (for the triggerer).

        :param s3_client: an open aiobotocore S3 client
        :param s3_uri: ``s3://bucket/key``
        :return: the text, or None when there is no such object
        """
        bucket, key = self.s3_hook.parse_s3_url(s3_uri)
        try:
            response = await s3_client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return (await body.read()).decode("utf-8")
        except ClientError as error:
            if _is_missing_object(error):
                return None
            raise

    def get_job_output_manifest(
        self, output_s3_uri: str, *, attempts: int = 4, delay: float = 2.0
    ) -> dict[str, Any] | None:
        """
        Return the ``jobSummary`` of ``job-output-manifest.json`` in a job's output folder.

        :param output_s3_uri: ``jobProperties.outputS3Uri`` (the job folder)
        :param attempts: how many reads before giving up (the manifest may lag)
        :param delay: seconds between reads
        :return: the job summary, or None if the manifest never appeared
        """
        return manifest.drive(
            manifest.job_summary(output_s3_uri, attempts, delay), self.read_s3_text, time.sleep
        )

    def completed_job_result(
        self, job: Mapping[str, Any], *, attempts: int = 4, delay: float = 2.0
    ) -> dict[str, Any] | None:
        """
        Summarise a COMPLETED job for XCom (:func:`healthimaging.manifest.build_result`).

        :param job: ``jobProperties`` of the job
        :param attempts: how many manifest reads before giving up (the manifest may lag)
        :param delay: seconds between manifest reads
        :return: the summary, or None while the manifest is not there yet
        """
        steps = manifest.completed_job_result(job, attempts, delay)
        return manifest.drive(steps, self.read_s3_text, time.sleep)

    async def async_completed_job_result(
        self, job: Mapping[str, Any], *, attempts: int = 4, delay: float = 2.0
    ) -> dict[str, Any] | None:
        """
        Async :meth:`completed_job_result`, reading the output folder with aiobotocore (for the triggerer).

        :param job: ``jobProperties`` of the job
        :param attempts: how many manifest reads before giving up (the manifest may lag)
        :param delay: seconds between manifest reads
        :return: the summary, or None while the manifest is not there yet
        """
        steps = manifest.completed_job_result(job, attempts, delay)
        async with await self.s3_hook.get_async_conn() as s3_client:
            return await manifest.async_drive(
                steps, lambda uri: self.async_read_s3_text(s3_client, uri), asyncio.sleep
            )

    def failed_job_message(self, job: Mapping[str, Any]) -> str:
        """
        Build the error text for a FAILED job: its message and the first reasons from failure.ndjson.

        :param job: ``jobProperties`` of the job
        """
        try:
            steps = manifest.failed_files(str(job.get("outputS3Uri") or ""))
            failed = manifest.drive(steps, self.read_s3_text, time.sleep)
        except Exception as error:  # the reasons are a courtesy: never hide the job's own message
            self.log.warning("Could not read failure.ndjson: %s", type(error).__name__)
            failed = []
        return manifest.failed_job_message(job, failed)


def _is_missing_object(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")
