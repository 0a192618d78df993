"""Hook for AWS HealthImaging (boto3 client ``medical-imaging``) and small helpers around import jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.utils.waiter_with_logging import RETRIABLE_ERROR_CODES
from botocore.exceptions import ClientError, HTTPClientError, WaiterError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from healthimaging.validation import coerce_optional_count

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.waiter import Waiter

log = logging.getLogger(__name__)

WAITERS_PATH = Path(__file__).parent / "waiters" / "medical-imaging.json"
IMPORT_JOB_WAITER = "dicom_import_job_complete"
MANIFEST_NAME = "job-output-manifest.json"
FAILURE_NDJSON = "FAILURE/failure.ndjson"
MANIFEST_COUNT_KEYS = (
    "numberOfScannedFiles",
    "numberOfImportedFiles",
    "numberOfFilesWithCustomerError",
    "numberOfFilesWithServerError",
    "numberOfGeneratedImageSets",
)
TRANSIENT_ERROR_CODES = frozenset(RETRIABLE_ERROR_CODES) | {
    "ThrottlingException",
    "InternalServerException",
    "ServiceUnavailableException",
}


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


class _TransientTolerantWaiter:
    """Waiter wrapper that turns transient failures into an ordinary (attempt-consuming) poll."""

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
    bounds them. Only used from the triggerer's event loop, so no lock is needed: nothing awaits between
    reading and moving the next free slot.

    :param rate: calls per second; 0 or less turns the limit off.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def acquire(self) -> None:
        """Wait for this call's slot."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)


#: GetDICOMImportJob calls per second of one triggerer process (the service allows 25 per second per account).
TRIGGERER_POLL_RATE = PollRateLimiter(
    float(os.environ.get("HEALTHIMAGING_TRIGGERER_MAX_POLLS_PER_SECOND", "20"))
)


class _AsyncTransientTolerantWaiter(_TransientTolerantWaiter):
    """Async variant; also delays every poll by a random ``0..jitter`` seconds.

    ``async_wait`` sleeps exactly ``waiter_delay`` between polls, so triggers that once poll together (deferred
    together, or woken together after a stalled event loop) keep polling together and burst against
    GetDICOMImportJob's rate limit. A fresh random delay per poll keeps spreading them out, and
    :data:`TRIGGERER_POLL_RATE` caps what is left of the peaks.
    """

    def __init__(self, waiter: Waiter, jitter: float = 0.0) -> None:
        super().__init__(waiter)
        self._jitter = jitter

    async def wait(self, **kwargs: Any) -> None:  # type: ignore[override]
        if self._jitter > 0:
            await asyncio.sleep(random.uniform(0, self._jitter))
        await TRIGGERER_POLL_RATE.acquire()
        try:
            await self._waiter.wait(**kwargs)
        except Exception as error:
            self._raise_transient(error)
            raise


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

    #: Seconds (at most) of random delay added to every poll of the async import-job waiter; set by the trigger.
    poll_jitter: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_type"] = "medical-imaging"
        super().__init__(*args, **kwargs)

    @cached_property
    def waiter_path(self) -> os.PathLike[str] | None:
        return WAITERS_PATH

    def get_waiter(
        self,
        waiter_name: str,
        parameters: dict[str, str] | None = None,
        config_overrides: dict[str, Any] | None = None,
        deferrable: bool = False,
        client: Any = None,
    ) -> Waiter:
        """
        Get a waiter by name; this package's waiters also wait out throttling, 5xx and dropped connections.

        Transient failures spend one attempt of the waiter budget instead of failing the wait.
        """
        waiter = super().get_waiter(
            waiter_name,
            parameters=parameters,
            config_overrides=config_overrides,
            deferrable=deferrable,
            client=client,
        )
        if waiter_name not in self._list_custom_waiters():
            return waiter
        if deferrable:
            return _AsyncTransientTolerantWaiter(waiter, self.poll_jitter)  # type: ignore[return-value]
        return _TransientTolerantWaiter(waiter)  # type: ignore[return-value]

    @cached_property
    def s3_hook(self) -> S3Hook:
        """S3 hook built from the same connection, region, verify and botocore config."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(
            aws_conn_id=self.aws_conn_id,
            region_name=self._region_name,
            verify=self._verify,
            config=self._config,
        )

    def get_import_job(self, datastore_id: str, job_id: str) -> dict[str, Any]:
        """
        Return ``jobProperties`` of one DICOM import job.

        :param datastore_id: the data store id
        :param job_id: the import job id
        """
        return self.conn.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]

    def read_s3_text(self, s3_uri: str, *, attempts: int = 4, delay: float = 2.0) -> str | None:
        """
        Read an S3 object as text, retrying ``NoSuchKey`` because import outputs may lag the job status.

        :param s3_uri: ``s3://bucket/key``
        :param attempts: how many reads before giving up
        :param delay: seconds between reads
        :return: the text, or None when the object is still missing after every attempt
        """
        bucket, key = self.s3_hook.parse_s3_url(s3_uri)
        for attempt in range(1, attempts + 1):
            try:
                body = self.s3_hook.get_conn().get_object(Bucket=bucket, Key=key)["Body"]
                return body.read().decode("utf-8")
            except ClientError as error:
                if not _is_missing_object(error):
                    raise
                if attempt < attempts:
                    log.info("%s not found yet (attempt %d/%d)", s3_uri, attempt, attempts)
                    time.sleep(delay)
        return None

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
        text = self.read_s3_text(_join_s3(output_s3_uri, MANIFEST_NAME), attempts=attempts, delay=delay)
        return None if text is None else json.loads(text)["jobSummary"]

    def get_failed_files(self, output_s3_uri: str, *, limit: int = 5) -> list[dict[str, str]]:
        """
        Return the first entries of ``FAILURE/failure.ndjson``: input file key, exception type and message.

        :param output_s3_uri: ``jobProperties.outputS3Uri`` (the job folder)
        :param limit: the maximum number of entries
        """
        return parse_failed_files(
            self.read_s3_text(_join_s3(output_s3_uri, FAILURE_NDJSON), attempts=1), limit
        )

    def completed_job_result(
        self, job: Mapping[str, Any], *, attempts: int = 4, delay: float = 2.0
    ) -> dict[str, Any] | None:
        """
        Summarise a COMPLETED job for XCom: status, end time, output folder, manifest counts, failed files.

        :param job: ``jobProperties`` of the job
        :param attempts: how many manifest reads before giving up (the manifest may lag)
        :param delay: seconds between manifest reads
        :return: the summary, or None while the manifest is not there yet
        """
        output_s3_uri = str(job["outputS3Uri"])
        manifest = self.get_job_output_manifest(output_s3_uri, attempts=attempts, delay=delay)
        if manifest is None:
            return None
        failed_files: list[dict[str, str]] = []
        if _has_failed_files(manifest):
            failed_files = self.get_failed_files(output_s3_uri)
        return build_job_result(job, manifest, failed_files)

    async def async_read_s3_text(
        self, s3_client: Any, s3_uri: str, *, attempts: int = 4, delay: float = 2.0
    ) -> str | None:
        """
        Async :meth:`read_s3_text` with an aiobotocore S3 client (for the triggerer).

        :param s3_client: an open aiobotocore S3 client
        :param s3_uri: ``s3://bucket/key``
        :param attempts: how many reads before giving up
        :param delay: seconds between reads
        :return: the text, or None when the object is still missing after every attempt
        """
        bucket, key = self.s3_hook.parse_s3_url(s3_uri)
        for attempt in range(1, attempts + 1):
            try:
                response = await s3_client.get_object(Bucket=bucket, Key=key)
                async with response["Body"] as body:
                    return (await body.read()).decode("utf-8")
            except ClientError as error:
                if not _is_missing_object(error):
                    raise
                if attempt < attempts:
                    await asyncio.sleep(delay)
        return None

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
        output_s3_uri = str(job["outputS3Uri"])
        async with await self.s3_hook.get_async_conn() as s3_client:
            text = await self.async_read_s3_text(
                s3_client, _join_s3(output_s3_uri, MANIFEST_NAME), attempts=attempts, delay=delay
            )
            if text is None:
                return None
            manifest = json.loads(text)["jobSummary"]
            failed_files: list[dict[str, str]] = []
            if _has_failed_files(manifest):
                failures = await self.async_read_s3_text(
                    s3_client, _join_s3(output_s3_uri, FAILURE_NDJSON), attempts=1
                )
                failed_files = parse_failed_files(failures)
        return build_job_result(job, manifest, failed_files)

    def failed_job_message(self, job: Mapping[str, Any]) -> str:
        """
        Build the error text for a FAILED job: its message and the first reasons from failure.ndjson.

        :param job: ``jobProperties`` of the job
        """
        text = f"DICOM import job {job.get('jobId')} FAILED: {job.get('message') or 'no message'}"
        try:
            failed_files = self.get_failed_files(str(job.get("outputS3Uri") or ""))
        except Exception as error:  # the reasons are a courtesy: never hide the job's own message
            log.warning("Could not read failure.ndjson: %s", type(error).__name__)
            failed_files = []
        if failed_files:
            reasons = "; ".join(
                f"{f['inputFile']}: {f['exceptionType']} {f['message']}".strip() for f in failed_files
            )
            text += f". First failed files: {reasons}"
        return text


def parse_failed_files(text: str | None, limit: int = 5) -> list[dict[str, str]]:
    """
    Read the first entries of a ``FAILURE/failure.ndjson``: input file key, exception type and message.

    :param text: the file's text, or None when it is missing
    :param limit: the maximum number of entries
    """
    failed: list[dict[str, str]] = []
    for line in (text or "").splitlines():
        if len(failed) >= limit:
            break
        if not line.strip():
            continue
        entry = json.loads(line)
        exception = entry.get("exception") or {}
        failed.append(
            {
                "inputFile": str(entry.get("inputFile", "")),
                "exceptionType": str(exception.get("exceptionType", "")),
                "message": str(exception.get("message", ""))[:300],
            }
        )
    return failed


def build_job_result(
    job: Mapping[str, Any], manifest: Mapping[str, Any], failed_files: list[dict[str, str]]
) -> dict[str, Any]:
    """
    The XCom summary of a COMPLETED job: status, end time, output folder, manifest counts, failed files.

    :param job: ``jobProperties`` of the job
    :param manifest: ``jobSummary`` of its ``job-output-manifest.json``
    :param failed_files: the first entries of its ``failure.ndjson`` (their messages are left out)
    """
    result: dict[str, Any] = {
        "jobId": job["jobId"],
        "jobStatus": job["jobStatus"],
        "endedAt": to_iso(job.get("endedAt")),
        "outputS3Uri": str(job["outputS3Uri"]),
    }
    result.update({key: int(manifest.get(key) or 0) for key in MANIFEST_COUNT_KEYS})
    result["failedFiles"] = [
        {"inputFile": f["inputFile"], "exceptionType": f["exceptionType"]} for f in failed_files
    ]
    return result


def _is_missing_object(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


def _has_failed_files(manifest: Mapping[str, Any]) -> bool:
    return bool(
        manifest.get("numberOfFilesWithCustomerError") or manifest.get("numberOfFilesWithServerError")
    )


def check_failed_files(result: Mapping[str, Any], max_failed_files: int | str | None) -> str | None:
    """
    Apply the failed-files policy to a COMPLETED job.

    :param result: the output of :meth:`HealthImagingHook.completed_job_result`
    :param max_failed_files: the most failed files tolerated, or None to only warn (a templated string is parsed)
    :return: a warning to log when files failed but the policy allows it, else None
    :raises AirflowException: when more files failed than ``max_failed_files``
    """
    from airflow.providers.common.compat.sdk import AirflowException

    limit = coerce_optional_count("max_failed_files", max_failed_files)
    failed = int(result["numberOfFilesWithCustomerError"]) + int(result["numberOfFilesWithServerError"])
    if not failed:
        return None
    keys = ", ".join(f["inputFile"] for f in result.get("failedFiles", []))
    text = f"DICOM import job {result['jobId']} COMPLETED with {failed} failed file(s) (first: {keys})"
    if limit is not None and failed > limit:
        raise AirflowException(f"{text}; more than max_failed_files={limit}")
    return text


def to_iso(value: Any) -> Any:
    """
    Convert datetimes (also nested in dicts and lists) to ISO 8601 strings for XCom.

    :param value: any JSON-like value
    """
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {key: to_iso(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_iso(item) for item in value]
    return value


def _join_s3(folder_uri: str, name: str) -> str:
    return folder_uri.rstrip("/") + "/" + name
