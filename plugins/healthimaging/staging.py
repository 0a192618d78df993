"""
Server-side copies of a plan's staged chunks into their staging prefixes, and the removal of those copies.

A staged chunk's job reads ``<chunk input prefix><original key>`` (see :meth:`healthimaging.planner.Chunk.staged_key`).
:func:`stage_chunks` copies with S3 CopyObject (multipart copy above 5 GiB) from a thread pool, each copy
conditional on the ETag of the listing (a file changed since the plan fails the staging rather than import other
bytes). Re-running it is safe: copies already in place are kept, and anything else under a chunk's prefix (a stray
from an earlier attempt) is deleted so the job imports exactly the chunk. :func:`remove_staged_copies` deletes
everything under the chunks' prefixes with DeleteObjects in batches of 1,000.

Throttling (503 SlowDown, 429), 5xx and connection errors are retried with capped exponential backoff and full
jitter, on top of botocore's own retries. Errors name chunk ids, prefixes and counts, never object keys.
This module imports neither boto3 nor botocore at import time: clients are passed in.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from healthimaging.planner import Chunk, Plan, S3Object, list_objects

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

T = TypeVar("T")
COPY_OBJECT_MAX_BYTES = 5 * 1024**3  # larger sources need a multipart copy
DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
    }
)


class StagingError(RuntimeError):
    """Staging (or removing) copies failed; the message names chunk ids and counts, not keys."""


@dataclass(frozen=True)
class StagingResult:
    """What :func:`stage_chunks` did.

    :param chunks: staged chunks handled
    :param copied: objects copied now
    :param already_staged: copies found in place (a re-run)
    :param strays_removed: other objects deleted from the chunks' prefixes
    :param bytes_copied: bytes copied now
    """

    chunks: int
    copied: int
    already_staged: int
    strays_removed: int
    bytes_copied: int

    def as_dict(self) -> dict[str, int]:
        """The counts by name (for XCom and logs)."""
        return asdict(self)


def stage_chunks(
    s3_client: Any,
    plan: Plan,
    *,
    chunk_ids: Iterable[str] | None = None,
    max_workers: int = 8,
    attempts: int = 6,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> StagingResult:
    """Copy the objects of the plan's staged chunks into their staging prefixes (idempotent).

    :param s3_client: a boto3 S3 client that can read the listed bucket and write the staging bucket; give it
        ``max_pool_connections`` >= ``max_workers``
    :param plan: the plan
    :param chunk_ids: only these chunks (default: every staged chunk)
    :param max_workers: concurrent copies
    :param attempts: tries per request on throttling, 5xx and connection errors
    :param backoff: first backoff in seconds (doubles per try, capped at 20 s, full jitter)
    :param sleep: the sleep function (tests pass a fake)
    :raises StagingError: a copy failed for good (the source changed or vanished since the listing, access denied)
    """
    chunks = _staged(plan, chunk_ids)
    copies: list[tuple[Chunk, S3Object]] = []
    already = strays = 0
    for chunk in chunks:
        existing = {o.key: o for o in list_objects(s3_client, chunk.input_s3_uri)}
        for original in chunk.objects:
            copy = existing.pop(chunk.staged_key(original.key), None)
            if copy is not None and _same_copy(original, copy):
                already += 1
            else:
                copies.append((chunk, original))
        if existing:
            log.warning("Removing %d stray object(s) under %s", len(existing), chunk.input_s3_uri)
            strays += _delete_keys(s3_client, chunk.bucket, sorted(existing), attempts, backoff, sleep)

    def copy_one(item: tuple[Chunk, S3Object]) -> str | None:
        chunk, original = item
        try:
            _with_retries(lambda: _copy(s3_client, plan.bucket, chunk, original), attempts, backoff, sleep)
        except Exception as error:
            return _error_code(error)
        return None

    log.info(
        "Staging %d object(s) of %d chunk(s) (%d already in place) with %d workers",
        len(copies),
        len(chunks),
        already,
        max_workers,
    )
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="healthimaging-stage") as pool:
        codes = list(pool.map(copy_one, copies))
    failures = Counter((chunk.id, code) for (chunk, _), code in zip(copies, codes, strict=True) if code)
    if failures:
        raise StagingError(_failure_text("Staging failed", failures))
    copied_bytes = sum(o.size for (_, o), code in zip(copies, codes, strict=True) if not code)
    result = StagingResult(len(chunks), len(copies), already, strays, copied_bytes)
    log.info("Staged: %s", result.as_dict())
    return result


def remove_staged_copies(
    s3_client: Any,
    plan: Plan,
    *,
    chunk_ids: Iterable[str] | None = None,
    attempts: int = 6,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Delete everything under the staged chunks' prefixes; return how many objects were deleted.

    :param s3_client: a boto3 S3 client that can write the staging bucket
    :param plan: the plan
    :param chunk_ids: only these chunks (default: every staged chunk)
    :param attempts: tries per request on throttling, 5xx and connection errors
    :param backoff: first backoff in seconds
    :param sleep: the sleep function (tests pass a fake)
    :raises StagingError: some objects could not be deleted
    """
    removed = 0
    for chunk in _staged(plan, chunk_ids):
        keys = [o.key for o in list_objects(s3_client, chunk.input_s3_uri)]
        removed += _delete_keys(s3_client, chunk.bucket, keys, attempts, backoff, sleep)
        log.info("Removed %d staged copies under %s", len(keys), chunk.input_s3_uri)
    return removed


def _staged(plan: Plan, chunk_ids: Iterable[str] | None) -> list[Chunk]:
    if chunk_ids is None:
        return plan.staged_chunks
    chunks = [plan.chunk(chunk_id) for chunk_id in chunk_ids]
    not_staged = [c.id for c in chunks if not c.staged]
    if not_staged:
        raise ValueError(f"Chunks {', '.join(not_staged)} are not staged chunks")
    return chunks


def _same_copy(original: S3Object, copy: S3Object) -> bool:
    """A copy in place: same size, and the same ETag unless either is a multipart ETag (those differ per copy)."""
    multipart = "-" in original.etag or "-" in copy.etag
    return copy.size == original.size and (multipart or copy.etag == original.etag)


def _copy(s3_client: Any, source_bucket: str, chunk: Chunk, original: S3Object) -> None:
    source = {"Bucket": source_bucket, "Key": original.key}
    bucket, key = chunk.bucket, chunk.staged_key(original.key)
    condition = {"CopySourceIfMatch": f'"{original.etag}"'} if original.etag else {}
    if original.size <= COPY_OBJECT_MAX_BYTES:
        s3_client.copy_object(CopySource=source, Bucket=bucket, Key=key, **condition)
    else:
        s3_client.copy(source, bucket, key, ExtraArgs=condition)


def _delete_keys(
    s3_client: Any,
    bucket: str,
    keys: Sequence[str],
    attempts: int,
    backoff: float,
    sleep: Callable[[float], None],
) -> int:
    """DeleteObjects in batches; per-key errors that are retryable are retried, others raise."""
    failures: Counter[tuple[str, str]] = Counter()
    for start in range(0, len(keys), DELETE_BATCH):
        pending = list(keys[start : start + DELETE_BATCH])
        for attempt in range(attempts):
            request = {"Objects": [{"Key": k} for k in pending], "Quiet": True}
            delete = partial(s3_client.delete_objects, Bucket=bucket, Delete=request)
            response = _with_retries(delete, attempts, backoff, sleep)
            errors = response.get("Errors") or []
            retry = [e["Key"] for e in errors if e.get("Code") in RETRYABLE_CODES]
            for error in errors:
                if error.get("Code") not in RETRYABLE_CODES:
                    failures[(bucket, str(error.get("Code")))] += 1
            if not retry:
                break
            pending = retry
            if attempt == attempts - 1:
                failures[(bucket, "retries exhausted")] += len(retry)
            else:
                sleep(_pause(attempt, backoff))
    if failures:
        raise StagingError(_failure_text("Removing staged copies failed", failures))
    return len(keys)


def _with_retries(call: Callable[[], T], attempts: int, backoff: float, sleep: Callable[[float], None]) -> T:
    """Call, retrying throttling, 5xx and connection errors up to ``attempts`` tries."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:
            if attempt == attempts - 1 or not _retryable(error):
                raise
            sleep(_pause(attempt, backoff))
    raise AssertionError("unreachable")  # pragma: no cover


def _pause(attempt: int, backoff: float) -> float:
    return random.uniform(0, min(20.0, backoff * 2**attempt))


def _retryable(error: BaseException) -> bool:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return _error_code(error) in RETRYABLE_CODES or status >= 500 or status == 429
    from botocore.exceptions import ConnectionError as BotocoreConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(error, BotocoreConnectionError | HTTPClientError)


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or "Unknown")
    return type(error).__name__


def _failure_text(what: str, failures: Counter[tuple[str, str]]) -> str:
    parts = [f"{where}: {count} x {code}" for (where, code), count in sorted(failures.items())]
    hint = ""
    if any(code in ("PreconditionFailed", "NoSuchKey", "412", "404") for _, code in failures):
        hint = " (objects changed or vanished since the listing: plan again)"
    return f"{what}{hint}: " + "; ".join(parts)
