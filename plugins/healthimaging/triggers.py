"""
Trigger that waits in the triggerer for a HealthImaging DICOM import job to end, and the waiting it uses.

The waiters here make a poll survive throttling, 5xx answers and dropped connections (each spends one attempt
instead of ending the wait), the async one also spreads polls (jitter) and keeps a triggerer under its
GetDICOMImportJob budget (:func:`triggerer_poll_rate`). ``StartDICOMImportOperator`` waits with the sync one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from functools import cache
from typing import TYPE_CHECKING, Any, cast

from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.providers.amazon.aws.utils.waiter_with_logging import RETRIABLE_ERROR_CODES
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent
from botocore.exceptions import ClientError, HTTPClientError, WaiterError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from healthimaging import config
from healthimaging.fanout import RateLimit
from healthimaging.hooks import IMPORT_JOB_WAITER, HealthImagingHook, import_job_states

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from botocore.waiter import Waiter

log = logging.getLogger(__name__)

#: Seconds a reading of the starting task's ``jobs`` XCom is shared by the waits of one triggerer.
START_READING_MAX_AGE = 2.0
#: Failed readings in a row after which the trigger gives up (and the task fails or retries).
START_READING_MAX_ERRORS = 20
TRANSIENT_ERROR_CODES = frozenset(RETRIABLE_ERROR_CODES) | {
    "ThrottlingException",
    "InternalServerException",
    "ServiceUnavailableException",
}


def is_transient_error(error: BaseException) -> bool:
    """
    Tell whether an error is worth waiting out: throttling, 5xx answers and dropped connections.

    :param error: the exception raised by a boto3/aiobotocore call
    """
    if isinstance(error, ClientError):
        return is_transient_response(error.response)
    if isinstance(error, (BotocoreConnectionError, HTTPClientError, asyncio.TimeoutError, TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp ships with aiobotocore
        return False
    return isinstance(error, aiohttp.ClientError)


def is_transient_response(response: Mapping[str, Any]) -> bool:
    """
    Tell whether a botocore error response is throttling or a server-side failure.

    :param response: the ``ClientError.response`` / waiter ``last_response`` dictionary
    """
    error = response.get("Error") or {}
    code = str(error.get("Code", ""))
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code in TRANSIENT_ERROR_CODES or status == 429 or status >= 500 or code.startswith("5")


def _transient_waiter_error(name: str, error: BaseException | Mapping[str, Any]) -> WaiterError:
    # A reason without "An error occurred" makes waiter_with_logging log it and spend one attempt,
    # instead of failing (non-retriable code) or looping without limit (RETRIABLE_ERROR_CODES).
    if isinstance(error, BaseException):
        return WaiterError(name=name, reason=f"transient error {type(error).__name__}", last_response={})
    code = (error.get("Error") or {}).get("Code")
    return WaiterError(name=name, reason=f"transient service error {code}", last_response=dict(error))


class TransientTolerantWaiter:
    """
    Waiter wrapper that turns transient failures into an ordinary (attempt-consuming) poll.

    :param waiter: a waiter of :meth:`HealthImagingHook.get_waiter`
    """

    def __init__(self, waiter: Waiter) -> None:
        self._waiter = waiter
        self.name = waiter.name

    def __getattr__(self, item: str) -> Any:
        return getattr(self._waiter, item)

    def _raise_transient(self, error: Exception) -> None:
        """Raise an attempt-consuming WaiterError in place of ``error`` if it is transient; else return."""
        if isinstance(error, WaiterError):
            if "An error occurred" in str(error) and is_transient_response(error.last_response):
                raise _transient_waiter_error(self.name, error.last_response) from error
        elif is_transient_error(error):
            log.warning("Transient error while polling import job: %s", type(error).__name__)
            raise _transient_waiter_error(self.name, error) from error

    def wait(self, **kwargs: Any) -> None:
        try:
            self._waiter.wait(**kwargs)
        except Exception as error:
            self._raise_transient(error)
            raise


class PollRateLimiter:
    """Spaces the calls of one process to at most ``rate`` per second (all triggers of a triggerer share it).

    Jitter spreads polls on average, but random phases still make one-second peaks well above the mean; this
    bounds them. The async face of :class:`healthimaging.fanout.RateLimit`.

    :param rate: calls per second; 0 or less turns the limit off.
    """

    def __init__(self, rate: float) -> None:
        self._limit = RateLimit(rate)

    @property
    def rate(self) -> float:
        return self._limit.rate

    async def acquire(self) -> None:
        """Wait for this call's slot."""
        delay = self._limit.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


@cache
def triggerer_poll_rate() -> PollRateLimiter:
    """The limiter of this triggerer process, at ``[healthimaging] triggerer_max_polls_per_second`` (first use)."""
    return PollRateLimiter(config.triggerer_max_polls_per_second())


class AsyncTransientTolerantWaiter(TransientTolerantWaiter):
    """Async :class:`TransientTolerantWaiter`; also delays every poll by a random ``0..jitter`` seconds.

    ``async_wait`` sleeps exactly ``waiter_delay`` between polls, so triggers that once poll together (deferred
    together, or woken together after a stalled event loop) keep polling together and burst against
    GetDICOMImportJob's rate limit. A fresh random delay per poll keeps spreading them out, and
    :func:`triggerer_poll_rate` caps what is left of the peaks.

    :param waiter: a deferrable waiter of :meth:`HealthImagingHook.get_waiter`
    :param jitter: the most seconds of random delay before each poll
    """

    def __init__(self, waiter: Waiter, jitter: float = 0.0) -> None:
        super().__init__(waiter)
        self._jitter = jitter

    async def wait(self, **kwargs: Any) -> None:  # type: ignore[override]
        if self._jitter > 0:
            await asyncio.sleep(random.uniform(0, self._jitter))
        await triggerer_poll_rate().acquire()
        try:
            await self._waiter.wait(**kwargs)
        except Exception as error:
            self._raise_transient(error)
            raise


class DICOMImportJobTrigger(AwsBaseWaiterTrigger):
    """
    Poll a DICOM import job until it is COMPLETED (success event) or FAILED (error event).

    Throttling, 5xx answers and dropped connections spend one attempt each instead of ending the wait.

    With ``end_from_trigger``, a COMPLETED job whose manifest is readable and within ``max_failed_files``
    ends the task here: the summary the sensor would return is pushed as its ``return_value`` XCom (unless
    ``do_xcom_push`` is False) and no worker is needed to resume it. Anything else (FAILED, too many failed
    files, a manifest not there yet, an error reading it) resumes the task on a worker as without it, where the
    sensor raises or retries.

    With ``started_by`` instead of ``job_id``, the trigger first waits for the job to exist: it reads the
    starting task's ``jobs`` XCom (:mod:`healthimaging.started_jobs`) every ``waiter_delay`` seconds until that
    task has started it, then polls the job. A ``not_started`` event (the starting task ended without starting
    it) resumes the task on a worker.

    :param datastore_id: the data store id
    :param job_id: the import job id, or None with ``started_by``
    :param started_by: :meth:`healthimaging.started_jobs.StartedBy.as_dict` of the task that starts the job
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
    :param do_xcom_push: with ``end_from_trigger``: push the summary as the task's ``return_value``
    :param aws_conn_id: the Airflow connection used for AWS credentials
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates
    :param botocore_config: botocore client configuration (dict)
    """

    aws_hook_class = HealthImagingHook

    def __init__(
        self,
        *,
        datastore_id: str,
        job_id: str | None = None,
        started_by: dict[str, Any] | None = None,
        waiter_delay: int = 30,
        waiter_max_attempts: int = 120,
        poll_jitter: float | None = None,
        end_from_trigger: bool = False,
        max_failed_files: int | None = None,
        manifest_attempts: int = 3,
        manifest_delay: float = 2.0,
        do_xcom_push: bool = True,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ) -> None:
        super().__init__(
            serialized_fields={
                "datastore_id": datastore_id,
                "job_id": job_id,
                "started_by": started_by,
                "poll_jitter": poll_jitter,
                "end_from_trigger": end_from_trigger,
                "max_failed_files": max_failed_files,
                "manifest_attempts": manifest_attempts,
                "manifest_delay": manifest_delay,
                "do_xcom_push": do_xcom_push,
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
        if not job_id and not started_by:
            raise ValueError("DICOMImportJobTrigger needs job_id or started_by")
        self.datastore_id = datastore_id
        self.job_id = job_id
        self.started_by = started_by
        self.poll_jitter = waiter_delay / 10 if poll_jitter is None else max(0.0, float(poll_jitter))
        self.end_from_trigger = end_from_trigger
        self.max_failed_files = max_failed_files
        self.manifest_attempts = manifest_attempts
        self.manifest_delay = manifest_delay
        self.do_xcom_push = do_xcom_push

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # AwsBaseWaiterTrigger.run() with what it has no seam for: its waiter wrapped (jitter per poll, hence
        # the sleep shortened by half the jitter) and, with end_from_trigger, the task ended on the same client.
        from airflow.providers.amazon.aws.utils.waiter_with_logging import async_wait
        from airflow.providers.common.compat.sdk import AirflowException

        if not self.job_id:
            waited = await self._wait_for_started_job()
            if waited is not None:
                yield waited
                return
        hook = cast("HealthImagingHook", self.hook())
        async with await hook.get_async_conn() as client:
            waiter = hook.get_waiter(
                self.waiter_name,
                deferrable=True,
                client=client,
                config_overrides=self.waiter_config_overrides,
            )
            try:
                await async_wait(
                    AsyncTransientTolerantWaiter(waiter, self.poll_jitter),  # type: ignore[arg-type]
                    max(0.0, self.waiter_delay - self.poll_jitter / 2),  # type: ignore[arg-type]  # to asyncio.sleep
                    self.attempts,
                    self.waiter_args,
                    self.failure_message,
                    self.status_message,
                    self.status_queries,
                )
            except AirflowException as error:
                event = self._event_from_exception(error)
            else:
                ended = await self._task_end_event(hook, client) if self.end_from_trigger else None
                event = ended or TriggerEvent({"status": "success", self.return_key: self.return_value})
        yield event

    async def _wait_for_started_job(self) -> TriggerEvent | None:
        """Wait until the starting task names this job; None once it did (``job_id`` set), else the event to yield.

        Waits while the starting task runs, is queued or waits for its next try; ends with a ``not_started``
        event once it ended without the job.
        """
        from healthimaging.started_jobs import StartedBy, find_started_job

        source = StartedBy(**(self.started_by or {}))
        errors = 0
        while True:
            try:
                decision, job_id = find_started_job(source, max_age=START_READING_MAX_AGE)
                errors = 0
            except Exception as error:  # the API server restarting, for one; a lasting fault ends the wait
                errors += 1
                if errors >= START_READING_MAX_ERRORS:
                    raise
                self.log.warning("Could not read %s's jobs yet: %s", source.task_id, type(error).__name__)
                decision, job_id = "waiting", None
            if decision == "found" and job_id:
                self._use_job(job_id)
                self.log.info("%s started DICOM import job %s: polling it", source.task_id, job_id)
                return None
            if decision == "not_started":
                return TriggerEvent(
                    {"status": decision, "message": f"{source.task_id} ended without the job"}
                )
            await asyncio.sleep(random.uniform(0.5, 1.0) * self.waiter_delay + self.poll_jitter)

    def _use_job(self, job_id: str) -> None:
        self.job_id = job_id
        self.waiter_args = {"datastoreId": self.datastore_id, "jobId": job_id}
        self.failure_message = f"DICOM import job {job_id} failed"
        self.status_message = f"Status of DICOM import job {job_id} is"
        self.return_value = job_id

    async def _task_end_event(self, hook: HealthImagingHook, client: Any) -> TaskSuccessEvent | None:
        """The event that ends the task with the job's summary, or None to resume the task on a worker."""
        from healthimaging.sensors import check_failed_files

        try:
            await triggerer_poll_rate().acquire()
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
        return TaskSuccessEvent(xcoms={"return_value": result} if self.do_xcom_push else None)
