"""Trigger that waits in the triggerer for a HealthImaging DICOM import job to end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent

from healthimaging.hooks import (
    IMPORT_JOB_WAITER,
    TRIGGERER_POLL_RATE,
    HealthImagingHook,
    check_failed_files,
    import_job_states,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class DICOMImportJobTrigger(AwsBaseWaiterTrigger):
    """
    Poll a DICOM import job until it is COMPLETED (success event) or FAILED (error event).

    Throttling, 5xx answers and dropped connections spend one attempt each instead of ending the wait.

    With ``end_from_trigger``, a COMPLETED job whose manifest is readable and within ``max_failed_files``
    ends the task here: the summary the sensor would return is pushed as its ``return_value`` XCom and no
    worker is needed to resume it. Anything else (FAILED, too many failed files, a manifest not there yet, an
    error reading it) resumes the task on a worker as without it, where the sensor raises or retries.

    :param datastore_id: the data store id
    :param job_id: the import job id
    :param waiter_delay: seconds between polls
    :param waiter_max_attempts: the most polls before giving up
    :param poll_jitter: polls come ``waiter_delay`` seconds apart on average, each moved by a random amount
        within this many seconds, so that many triggers spread their GetDICOMImportJob calls (25 per second by
        default); None means a tenth of ``waiter_delay``
    :param end_from_trigger: end the task from the triggerer when the job COMPLETED within the policy
    :param max_failed_files: with ``end_from_trigger``: more failed files than this resume the task on a worker
        (which fails it); None tolerates any number
    :param manifest_attempts: with ``end_from_trigger``: reads of a lagging manifest before leaving it to the worker
    :param manifest_delay: seconds between those reads
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
        end_from_trigger: bool = False,
        max_failed_files: int | None = None,
        manifest_attempts: int = 3,
        manifest_delay: float = 2.0,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ) -> None:
        super().__init__(
            serialized_fields={
                "datastore_id": datastore_id,
                "job_id": job_id,
                "poll_jitter": poll_jitter,
                "end_from_trigger": end_from_trigger,
                "max_failed_files": max_failed_files,
                "manifest_attempts": manifest_attempts,
                "manifest_delay": manifest_delay,
            },
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
        self.datastore_id = datastore_id
        self.job_id = job_id
        self.poll_jitter = waiter_delay / 10 if poll_jitter is None else max(0.0, float(poll_jitter))
        self.end_from_trigger = end_from_trigger
        self.max_failed_files = max_failed_files
        self.manifest_attempts = manifest_attempts
        self.manifest_delay = manifest_delay

    def hook(self) -> HealthImagingHook:
        hook = HealthImagingHook(
            aws_conn_id=self.aws_conn_id,
            region_name=self.region_name,
            verify=self.verify,
            config=self.botocore_config,
        )
        hook.poll_jitter = self.poll_jitter
        return hook

    async def run(self) -> AsyncIterator[TriggerEvent]:
        event = await self._wait()
        if self.end_from_trigger and event.payload.get("status") == "success":
            yield await self._task_end_event() or event
        else:
            yield event

    async def _wait(self) -> TriggerEvent:
        """
        Poll through the waiter as ``AwsBaseWaiterTrigger.run`` does, ``waiter_delay`` apart on average.

        Every poll is delayed by a random ``0..poll_jitter`` seconds (in the hook's waiter), so the sleep between
        polls is shortened by half of that.
        """
        from airflow.providers.amazon.aws.utils.waiter_with_logging import async_wait
        from airflow.providers.common.compat.sdk import AirflowException

        hook = self.hook()
        async with await hook.get_async_conn() as client:
            waiter = hook.get_waiter(
                self.waiter_name,
                deferrable=True,
                client=client,
                config_overrides=self.waiter_config_overrides,
            )
            try:
                await async_wait(
                    waiter,
                    max(0.0, self.waiter_delay - self.poll_jitter / 2),  # type: ignore[arg-type]  # to asyncio.sleep
                    self.attempts,
                    self.waiter_args,
                    self.failure_message,
                    self.status_message,
                    self.status_queries,
                )
            except AirflowException as error:
                return self._event_from_exception(error)
        return TriggerEvent({"status": "success", self.return_key: self.return_value})

    async def _task_end_event(self) -> TaskSuccessEvent | None:
        """The event that ends the task with the job's summary, or None to resume the task on a worker."""
        hook = self.hook()
        try:
            await TRIGGERER_POLL_RATE.acquire()
            async with await hook.get_async_conn() as client:
                response = await client.get_dicom_import_job(datastoreId=self.datastore_id, jobId=self.job_id)
            job = response["jobProperties"]
            if job["jobStatus"] not in import_job_states()["success"]:
                return None
            result = await hook.async_completed_job_result(
                job, attempts=self.manifest_attempts, delay=self.manifest_delay
            )
            if result is None:
                self.log.info("Import job %s COMPLETED; its manifest is not there yet", self.job_id)
                return None
            warning = check_failed_files(result, self.max_failed_files)
        except Exception as error:
            self.log.info(
                "Import job %s COMPLETED; resuming the task on a worker to check it (%s)",
                self.job_id,
                type(error).__name__,
            )
            return None
        if warning:
            self.log.warning("%s", warning)
        self.log.info(
            "DICOM import job %s COMPLETED: %d files imported, %d image sets; ending the task from the triggerer",
            self.job_id,
            result["numberOfImportedFiles"],
            result["numberOfGeneratedImageSets"],
        )
        return TaskSuccessEvent(xcoms={"return_value": result})
