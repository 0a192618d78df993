"""
What an import job leaves in its output folder, read as text: the manifest, the failed files, the XCom summary.

Pure functions, no I/O. The reads are written once, as generators that yield :class:`Read` and :class:`Sleep`
steps; :func:`drive` (sync) and :func:`async_drive` (async) carry them out with a fetch of the caller's, so the
worker and the triggerer differ only in how they fetch bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

log = logging.getLogger(__name__)

MANIFEST_NAME = "job-output-manifest.json"
FAILURE_NDJSON = "FAILURE/failure.ndjson"
MANIFEST_COUNT_KEYS = (
    "numberOfScannedFiles",
    "numberOfImportedFiles",
    "numberOfFilesWithCustomerError",
    "numberOfFilesWithServerError",
    "numberOfGeneratedImageSets",
)
#: Failed files named in a summary or an error message.
FAILED_FILES_SHOWN = 5

T = TypeVar("T")


@dataclass(frozen=True)
class Read:
    """Step: read ``uri`` as text; the driver sends back the text, or None when the object does not exist."""

    uri: str


@dataclass(frozen=True)
class Sleep:
    """Step: wait ``seconds``; the driver sends back None."""

    seconds: float


Steps = Generator["Read | Sleep", "str | None", T]


@dataclass(frozen=True)
class _Done:
    value: Any


def _send(steps: Steps[T], answer: str | None) -> Read | Sleep | _Done:
    try:
        return steps.send(answer)
    except StopIteration as done:
        return _Done(done.value)


def drive(steps: Steps[T], read: Callable[[str], str | None], sleep: Callable[[float], Any]) -> T:
    """
    Carry out ``steps`` synchronously.

    :param steps: a generator of this module
    :param read: text of an S3 URI, None when the object is missing
    :param sleep: ``time.sleep``
    """
    step = _send(steps, None)
    while not isinstance(step, _Done):
        step = _send(steps, read(step.uri) if isinstance(step, Read) else sleep(step.seconds))
    return step.value


async def async_drive(
    steps: Steps[T], read: Callable[[str], Awaitable[str | None]], sleep: Callable[[float], Awaitable[Any]]
) -> T:
    """
    Carry out ``steps`` in an event loop (the triggerer).

    :param steps: a generator of this module
    :param read: coroutine function: text of an S3 URI, None when the object is missing
    :param sleep: ``asyncio.sleep``
    """
    step = _send(steps, None)
    while not isinstance(step, _Done):
        step = _send(steps, await (read(step.uri) if isinstance(step, Read) else sleep(step.seconds)))
    return step.value


def read_lagging(uri: str, attempts: int, delay: float) -> Steps[str | None]:
    """
    Read an object that import outputs may not have written yet: up to ``attempts`` reads, ``delay`` apart.

    :param uri: ``s3://bucket/key``
    :param attempts: how many reads before giving up
    :param delay: seconds between reads
    :return: the text, or None when the object is still missing after every attempt
    """
    for attempt in range(1, attempts + 1):
        text = yield Read(uri)
        if text is not None:
            return text
        if attempt < attempts:
            log.info("%s not found yet (attempt %d/%d)", uri, attempt, attempts)
            yield Sleep(delay)
    return None


def job_summary(output_s3_uri: str, attempts: int, delay: float) -> Steps[dict[str, Any] | None]:
    """
    Read the ``jobSummary`` of ``job-output-manifest.json`` in a job's output folder.

    :param output_s3_uri: ``jobProperties.outputS3Uri`` (the job folder)
    :param attempts: how many reads before giving up (the manifest may lag)
    :param delay: seconds between reads
    :return: the job summary, or None if the manifest never appeared
    """
    text = yield from read_lagging(join_s3(output_s3_uri, MANIFEST_NAME), attempts, delay)
    return None if text is None else parse_summary(text)


def failed_files(output_s3_uri: str) -> Steps[list[dict[str, str]]]:
    """
    Read the first entries of a job's ``FAILURE/failure.ndjson`` (none when it is missing).

    :param output_s3_uri: ``jobProperties.outputS3Uri`` (the job folder)
    """
    return parse_failed_files((yield Read(join_s3(output_s3_uri, FAILURE_NDJSON))))


def completed_job_result(job: Mapping[str, Any], attempts: int, delay: float) -> Steps[dict[str, Any] | None]:
    """
    Read a COMPLETED job's outputs into its XCom summary (see :func:`build_result`).

    :param job: ``jobProperties`` of the job
    :param attempts: how many manifest reads before giving up (the manifest may lag)
    :param delay: seconds between manifest reads
    :return: the summary, or None while the manifest is not there yet
    """
    output_s3_uri = str(job["outputS3Uri"])
    summary = yield from job_summary(output_s3_uri, attempts, delay)
    if summary is None:
        return None
    failed = (yield from failed_files(output_s3_uri)) if has_failed_files(summary) else []
    return build_result(job, summary, failed)


def parse_summary(text: str) -> dict[str, Any]:
    """
    The ``jobSummary`` of a ``job-output-manifest.json``.

    :param text: the file's text
    """
    return json.loads(text)["jobSummary"]


def has_failed_files(summary: Mapping[str, Any]) -> bool:
    """
    Tell whether a job summary counts failed files (customer or server errors).

    :param summary: ``jobSummary`` of a manifest
    """
    return bool(summary.get("numberOfFilesWithCustomerError") or summary.get("numberOfFilesWithServerError"))


def parse_failed_files(text: str | None, limit: int = FAILED_FILES_SHOWN) -> list[dict[str, str]]:
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


def build_result(
    job: Mapping[str, Any], summary: Mapping[str, Any], failed: list[dict[str, str]]
) -> dict[str, Any]:
    """
    The XCom summary of a COMPLETED job: status, end time, output folder, manifest counts, failed files.

    :param job: ``jobProperties`` of the job
    :param summary: ``jobSummary`` of its ``job-output-manifest.json``
    :param failed: the first entries of its ``failure.ndjson`` (their messages are left out)
    """
    result: dict[str, Any] = {
        "jobId": job["jobId"],
        "jobStatus": job["jobStatus"],
        "endedAt": to_iso(job.get("endedAt")),
        "outputS3Uri": str(job["outputS3Uri"]),
    }
    result.update({key: int(summary.get(key) or 0) for key in MANIFEST_COUNT_KEYS})
    result["failedFiles"] = [
        {"inputFile": f["inputFile"], "exceptionType": f["exceptionType"]} for f in failed
    ]
    return result


def failed_job_message(job: Mapping[str, Any], failed: list[dict[str, str]]) -> str:
    """
    The error text for a FAILED job: its message and the reasons of the first failed files.

    :param job: ``jobProperties`` of the job
    :param failed: the first entries of its ``failure.ndjson``
    """
    text = f"DICOM import job {job.get('jobId')} FAILED: {job.get('message') or 'no message'}"
    if failed:
        reasons = "; ".join(f"{f['inputFile']}: {f['exceptionType']} {f['message']}".strip() for f in failed)
        text += f". First failed files: {reasons}"
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


def join_s3(folder_uri: str, name: str) -> str:
    """
    The URI of ``name`` in an S3 folder.

    :param folder_uri: ``s3://bucket/prefix[/]``
    :param name: a key relative to the folder
    """
    return folder_uri.rstrip("/") + "/" + name
