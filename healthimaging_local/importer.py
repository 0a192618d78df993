"""DICOM import jobs: the Start/Get/List operations and their execution in worker threads.

Two limits, kept apart:

- The service quota, ``max_concurrent_imports`` (AWS: 100 per data store, 20 in ap-southeast-2): a
  StartDICOMImportJob for a *new* job is refused with ServiceQuotaExceededException (402) while the data store
  already has that many jobs SUBMITTED or IN_PROGRESS. Every admitted job is IN_PROGRESS at once, as on the service.
- The emulator's own resources, ``workers``: threads that list, parse and commit jobs. A job waiting out
  ``import_seconds`` holds no thread (a timer hands it back to a worker when it is due), so the number of workers
  changes how fast large jobs are parsed, never how many jobs run at once.

A job runs in two steps: when a worker takes it, it turns IN_PROGRESS and its input prefix is listed (the quotas on
files, bytes and folders are checked then); at ``IN_PROGRESS time + import_seconds`` a worker parses the listed
objects, groups them into image sets, writes the output files and commits COMPLETED (or FAILED) in one step.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from healthimaging_local import dicom, metadata
from healthimaging_local.events import EventPublisher, ImageSetChange
from healthimaging_local.model import (
    ConflictException,
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    sanitize_message,
)
from healthimaging_local.operations import page_after, require_datastore
from healthimaging_local.s3 import split_uri
from healthimaging_local.store import ACTIVE_JOB_STATUSES, ImageSetWrite, normalize_study_date_time

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

    from healthimaging_local.s3 import S3Object, S3Storage
    from healthimaging_local.store import Store

log = logging.getLogger(__name__)

SERVER_ERROR = "InternalServerException"
REQUEST_FIELDS = (
    "jobName",
    "dataAccessRoleArn",
    "inputS3Uri",
    "outputS3Uri",
    "inputOwnerAccountId",
    "importConfiguration",
)


class JobFailed(Exception):
    """A job-level failure: the job ends FAILED with this message."""


class JobInterrupted(Exception):
    """The endpoint is stopping: leave the job uncommitted so it runs again after a restart."""


@dataclass
class JobLimits:
    """Per-job quotas (AWS defaults)."""

    max_files: int = 5_000
    max_bytes: int = 10 * 1024**3
    max_folders: int = 10_000


@dataclass
class _Outcome:
    successes: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    writes: list[ImageSetWrite] = field(default_factory=list)
    scanned: int = 0


def job_folder(output_s3_uri: str, datastore_id: str, job_id: str) -> str:
    """The folder the service writes a job's output to (with trailing ``/``).

    :param output_s3_uri: the submitted output prefix.
    :param datastore_id: the data store.
    :param job_id: the job.
    """
    base = output_s3_uri if output_s3_uri.endswith("/") else output_s3_uri + "/"
    return f"{base}{datastore_id}-DicomImport-{job_id}/"


class Importer:
    """Runs import jobs and answers the import job operations.

    :param store: the persistence layer.
    :param s3: the embedded S3.
    :param import_seconds: the minimum time a job stays IN_PROGRESS.
    :param max_concurrent_imports: the service quota: SUBMITTED/IN_PROGRESS jobs allowed per data store.
    :param workers: threads that list, parse and commit jobs (not a limit on jobs in flight).
    :param events: where job and image set state changes are announced (default: the embedded EventBridge).
    :param fail_jobs: fault injection: the first this many jobs of each data store (in submission order) end
        FAILED with an ``INJECTED_FAILURE`` message, whatever their input.
    """

    def __init__(
        self,
        store: Store,
        s3: S3Storage,
        import_seconds: float = 0.0,
        max_concurrent_imports: int = 100,
        workers: int = 4,
        events: EventPublisher | None = None,
        fail_jobs: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if fail_jobs < 0:
            raise ValueError("fail_jobs must be >= 0")
        self.fail_jobs = fail_jobs
        self.store = store
        self.s3 = s3
        self.import_seconds = import_seconds
        self.max_concurrent_imports = max_concurrent_imports
        self.events = events or EventPublisher()
        self.limits = JobLimits()
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._datastore_locks: dict[str, threading.Lock] = {}
        self._due: list[tuple[float, int, tuple[str, Callable[[], None]]]] = []
        self._due_order = itertools.count()
        self._due_changed = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, name=f"healthimaging-import-{i}", daemon=True)
            for i in range(workers)
        ]
        self._timer = threading.Thread(
            target=self._hand_over_due, name="healthimaging-import-timer", daemon=True
        )

    def start(self) -> None:
        """Start the workers and resume every job a previous run left unfinished."""
        for row in self.store.query(
            "SELECT id FROM jobs WHERE status IN ('SUBMITTED','IN_PROGRESS') ORDER BY submitted_at"
        ):
            self._queue.put((row["id"], functools.partial(self._begin, row["id"])))
        for thread in self._threads:
            thread.start()
        self._timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; a job not yet committed stays resumable.

        :param timeout: seconds to wait for each worker.
        """
        self._stopping.set()
        with self._due_changed:
            self._due_changed.notify_all()
        for _ in self._threads:
            self._queue.put(None)
        for thread in [*self._threads, self._timer]:
            if thread.is_alive():
                thread.join(timeout)

    def _at(self, due: float, job_id: str, task: Callable[[], None]) -> None:
        """Hand a job's next step to a worker at monotonic time ``due``."""
        with self._due_changed:
            heapq.heappush(self._due, (due, next(self._due_order), (job_id, task)))
            self._due_changed.notify()

    def _hand_over_due(self) -> None:
        with self._due_changed:
            while not self._stopping.is_set():
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    self._queue.put(heapq.heappop(self._due)[2])
                timeout = self._due[0][0] - now if self._due else None
                self._due_changed.wait(timeout)

    # ------------------------------------------------------------------------------------ operations

    def start_job(self, params: dict[str, Any]) -> dict[str, Any]:
        """StartDICOMImportJob."""
        datastore_id = params["datastoreId"]
        request = json.dumps({k: params.get(k) for k in REQUEST_FIELDS}, sort_keys=True)
        with self.store.transaction() as db:
            existing = db.execute(
                "SELECT * FROM jobs WHERE datastore_id=? AND client_token=?",
                (datastore_id, params["clientToken"]),
            ).fetchone()
            if existing is not None:
                # A replay of a token returns its job whatever the quota: it starts nothing (AWS documents nothing
                # about replays; this follows the usual AWS idempotency convention). It did pass the rate limit.
                if existing["request"] != request:
                    raise ConflictException("clientToken was already used with different parameters")
                return self._start_output(existing)
            require_datastore(self.store, datastore_id, active=True)
            running = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE datastore_id=? AND status IN ('SUBMITTED','IN_PROGRESS')",
                (datastore_id,),
            ).fetchone()[0]
            if running >= self.max_concurrent_imports:
                raise ServiceQuotaExceededException(
                    f"Concurrent import jobs per data store quota ({self.max_concurrent_imports}) exceeded"
                )
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, datastore_id, client_token, request, name, status, role_arn, input_s3_uri,"
                " output_s3_uri, import_configuration, submitted_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    datastore_id,
                    params["clientToken"],
                    request,
                    params.get("jobName"),
                    "SUBMITTED",
                    params["dataAccessRoleArn"],
                    params["inputS3Uri"],
                    job_folder(params["outputS3Uri"], datastore_id, job_id),
                    json.dumps(params["importConfiguration"]) if params.get("importConfiguration") else None,
                    time.time(),
                ),
            )
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        self.events.job(row, row["submitted_at"])
        self._queue.put((job_id, functools.partial(self._begin, job_id)))
        return self._start_output(row)

    @staticmethod
    def _start_output(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "datastoreId": row["datastore_id"],
            "jobId": row["id"],
            "jobStatus": row["status"],
            "submittedAt": row["submitted_at"],
        }

    @staticmethod
    def _summary(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "jobId": row["id"],
            "jobName": row["name"],
            "jobStatus": row["status"],
            "datastoreId": row["datastore_id"],
            "dataAccessRoleArn": row["role_arn"],
            "endedAt": row["ended_at"] if row["status"] not in ACTIVE_JOB_STATUSES else None,
            "submittedAt": row["submitted_at"],
            "message": row["message"] if row["status"] == "FAILED" else None,
        }

    def get_job(self, params: dict[str, Any]) -> dict[str, Any]:
        """GetDICOMImportJob: 404 for an unknown job or one of another data store."""
        require_datastore(self.store, params["datastoreId"])
        row = self.store.query_one(
            "SELECT * FROM jobs WHERE id=? AND datastore_id=?", (params["jobId"], params["datastoreId"])
        )
        if row is None:
            raise ResourceNotFoundException(f"Import job {params['jobId']} does not exist")
        properties = self._summary(row)
        properties.update(
            inputS3Uri=row["input_s3_uri"],
            outputS3Uri=row["output_s3_uri"],
            importConfiguration=json.loads(row["import_configuration"])
            if row["import_configuration"]
            else None,
        )
        return {"jobProperties": properties}

    def list_jobs(self, params: dict[str, Any]) -> dict[str, Any]:
        """ListDICOMImportJobs, newest first, optional ``jobStatus`` filter."""
        require_datastore(self.store, params["datastoreId"])
        status = params.get("jobStatus")
        scope = json.dumps(["ListDICOMImportJobs", params["datastoreId"], status])
        after, limit = page_after(self.store, scope, params)
        sql, args = "SELECT * FROM jobs WHERE datastore_id=?", [params["datastoreId"]]
        if status:
            sql += " AND status=?"
            args.append(status)
        if after:
            sql += " AND (submitted_at, id) < (?, ?)"
            args.extend(after)
        rows = self.store.query(sql + " ORDER BY submitted_at DESC, id DESC LIMIT ?", [*args, limit + 1])
        output: dict[str, Any] = {"jobSummaries": [self._summary(r) for r in rows[:limit]]}
        if len(rows) > limit:
            last = rows[limit - 1]
            output["nextToken"] = self.store.encode_token(scope, [last["submitted_at"], last["id"]])
        return output

    # ------------------------------------------------------------------------------------ execution

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopping.is_set():
                return
            job_id, step = item
            try:
                step()
            except JobInterrupted:
                return
            except Exception:
                log.exception("Import job %s crashed; marking it FAILED", job_id)
                self._finish(job_id, "FAILED", "DICOM import job has failed. INTERNAL_ERROR", [])

    def _begin(self, job_id: str) -> None:
        """Turn a job IN_PROGRESS, list its input and schedule its commit ``import_seconds`` later."""
        with self.store.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] not in ACTIVE_JOB_STATUSES:
                return
            db.execute("UPDATE jobs SET status='IN_PROGRESS' WHERE id=?", (job_id,))
            job = dict(row) | {"status": "IN_PROGRESS"}
        started = time.monotonic()
        if row["status"] == "SUBMITTED":  # a job resumed after a restart was announced IN_PROGRESS already
            self.events.job(job)
        log.info("Import job %s started", job_id)
        try:
            inventory: tuple[str, list[S3Object]] | JobFailed = self._inventory(row)
        except JobFailed as failure:
            inventory = failure
        self._at(started + self.import_seconds, job_id, functools.partial(self._complete, job, inventory))

    def _complete(self, job: dict[str, Any], inventory: tuple[str, list[S3Object]] | JobFailed) -> None:
        """Import the listed objects and commit the job COMPLETED, or commit it FAILED."""
        try:
            if isinstance(inventory, JobFailed):
                raise inventory
            self._check_injected_failure(job)
            self._execute(job, *inventory)
        except JobFailed as failure:
            message = sanitize_message(f"DICOM import job has failed. {failure}")
            self._write_outputs(job, _Outcome(), required=False)
            self._finish(job["id"], "FAILED", message, [])

    def _check_injected_failure(self, job: dict[str, Any]) -> None:
        """Raise JobFailed when the job is among the first ``fail_jobs`` of its data store."""
        if not self.fail_jobs:
            return
        earlier = self.store.query_one(
            "SELECT COUNT(*) AS n FROM jobs WHERE datastore_id=? AND (submitted_at, id) < (?, ?)",
            (job["datastore_id"], job["submitted_at"], job["id"]),
        )
        ordinal = int(earlier["n"] if earlier is not None else 0) + 1
        if ordinal <= self.fail_jobs:
            raise JobFailed(
                f"INJECTED_FAILURE: job {ordinal} of this data store, and the endpoint runs with"
                f" --fail-jobs {self.fail_jobs} (fault injection, not a problem of the input)"
            )

    def _finish(self, job_id: str, status: str, message: str | None, writes: list[ImageSetWrite]) -> None:
        """Commit a job's terminal status with its image sets, then announce the image sets and the job."""
        now = time.time()
        with self.store.transaction() as db:
            self.store.write_image_sets(db, writes, now)
            changed = db.execute(
                "UPDATE jobs SET status=?, ended_at=?, message=? WHERE id=? AND status IN ('SUBMITTED','IN_PROGRESS')",
                (status, now, message, job_id),
            ).rowcount
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if not changed:
            return
        for w in writes:
            change = ImageSetChange(
                w.datastore_id,
                w.image_set_id,
                w.version,
                "ACTIVE",
                "CREATED" if w.version == 1 else "UPDATED",
                w.is_primary,
            )
            self.events.image_set(change, now)
        self.events.job(row, now)
        log.info("Import job %s %s", job_id, status)

    def _inventory(self, job: sqlite3.Row) -> tuple[str, list[S3Object]]:
        """The input bucket and the objects to import (raises JobFailed on a job-level quota or bucket problem)."""
        in_bucket, prefix = split_uri(job["input_s3_uri"])
        out_bucket, _ = split_uri(job["output_s3_uri"])
        if self.s3.bucket(in_bucket) is None:
            raise JobFailed(
                f"INPUT_BUCKET_NOT_ACCESSIBLE: the input bucket {in_bucket} does not exist or is not accessible"
            )
        if self.s3.bucket(out_bucket) is None:
            raise JobFailed(
                f"OUTPUT_BUCKET_NOT_ACCESSIBLE: the output bucket {out_bucket} does not exist or is not accessible"
            )
        objects = [o for o in self.s3.list_objects(in_bucket, prefix) if not o.key.endswith("/")]
        limits = self.limits
        if len(objects) > limits.max_files:
            raise JobFailed(
                f"FILE_COUNTS_LIMIT_EXCEEDED: the input prefix holds {len(objects)} files, more than the"
                f" limit of {limits.max_files} files per import job"
            )
        total = sum(o.size for o in objects)
        if total > limits.max_bytes:
            raise JobFailed(
                f"FILE_SIZE_LIMIT_EXCEEDED: the input prefix holds {total} bytes, more than the limit of"
                f" {limits.max_bytes} bytes per import job"
            )
        folders = {o.key[len(prefix) :].rpartition("/")[0] for o in objects} - {""}
        if len(folders) > limits.max_folders:
            raise JobFailed(
                f"FOLDER_COUNTS_LIMIT_EXCEEDED: the input prefix holds {len(folders)} folders, more than the"
                f" limit of {limits.max_folders} nested folders per import job"
            )
        return in_bucket, objects

    def _execute(self, job: dict[str, Any], bucket: str, objects: list[S3Object]) -> None:
        """Parse the job's objects, then group, write the outputs and commit under the data store's lock.

        Reading the current version of an image set and committing the next one happen under one lock, so
        concurrent jobs touching the same series get consecutive versions; parsing runs outside it.
        """
        outcome = _Outcome(scanned=len(objects))
        groups: dict[tuple[str, str], list[tuple[str, dicom.ParsedInstance]]] = defaultdict(list)
        for obj in objects:
            if self._stopping.is_set():
                raise JobInterrupted
            try:
                parsed = dicom.parse_p10(self.s3.get_object(bucket, obj.key))
            except dicom.DicomParseError as error:
                outcome.failures.append(
                    {
                        "inputFile": obj.key,
                        "exception": {"exceptionType": error.exception_type, "message": error.message},
                    }
                )
                continue
            except KeyError:
                outcome.failures.append(
                    {
                        "inputFile": obj.key,
                        "exception": {
                            "exceptionType": SERVER_ERROR,
                            "message": "The object could not be read",
                        },
                    }
                )
                continue
            groups[(parsed.study_uid, parsed.series_uid)].append((obj.key, parsed))
        with self._datastore_locks.setdefault(job["datastore_id"], threading.Lock()):  # atomic in CPython
            for (study_uid, series_uid), items in groups.items():
                self._group(job["datastore_id"], study_uid, series_uid, items, outcome)
            self._write_outputs(job, outcome, required=True)
            self._finish(job["id"], "COMPLETED", None, outcome.writes)

    def _group(
        self,
        datastore_id: str,
        study_uid: str,
        series_uid: str,
        items: list[tuple[str, dicom.ParsedInstance]],
        outcome: _Outcome,
    ) -> None:
        primary = self.store.query_one(
            "SELECT id, version FROM image_sets WHERE datastore_id=? AND study_uid=? AND series_uid=?"
            " AND is_primary=1 AND state='ACTIVE'",
            (datastore_id, study_uid, series_uid),
        )
        if primary is not None:
            image_set_id, version = primary["id"], primary["version"] + 1
            base = self.store.metadata_document(primary["id"], primary["version"])
            reference = base
        else:
            image_set_id, version, base = uuid.uuid4().hex, 1, None
            reference = metadata.build_metadata(datastore_id, image_set_id, [items[0][1]])
        assert reference is not None
        accepted = [(k, i) for k, i in items if not metadata.conflicts_with(reference, i)]
        rejected = [(k, i) for k, i in items if metadata.conflicts_with(reference, i)]
        if accepted:
            self._add(datastore_id, image_set_id, version, True, accepted, base, outcome)
        if rejected:
            self._add(datastore_id, uuid.uuid4().hex, 1, False, rejected, None, outcome)

    def _add(
        self,
        datastore_id: str,
        image_set_id: str,
        version: int,
        is_primary: bool,
        items: list[tuple[str, dicom.ParsedInstance]],
        base: dict[str, Any] | None,
        outcome: _Outcome,
    ) -> None:
        document = metadata.build_metadata(datastore_id, image_set_id, [i for _, i in items], base=base)
        tags = metadata.dicom_tags_summary(document)
        outcome.writes.append(
            ImageSetWrite(
                image_set_id=image_set_id,
                datastore_id=datastore_id,
                version=version,
                is_primary=is_primary,
                study_uid=items[0][1].study_uid,
                series_uid=items[0][1].series_uid,
                patient_id=tags.get("DICOMPatientId") or "",
                accession_number=tags.get("DICOMAccessionNumber") or "",
                study_id=tags.get("DICOMStudyId") or "",
                study_date_time=normalize_study_date_time(
                    tags.get("DICOMStudyDate"), tags.get("DICOMStudyTime")
                ),
                dicom_tags=tags,
                metadata=document,
            )
        )
        outcome.summaries.append(
            {
                "imageSetId": image_set_id,
                "imageSetVersion": version,
                "isPrimary": is_primary,
                "numberOfMatchedSOPInstances": len({i.sop_uid for _, i in items}),
            }
        )
        outcome.successes.extend(
            {"inputFile": key, "importResponse": {"imageSetId": image_set_id, "isPrimary": is_primary}}
            for key, _ in items
        )

    def _write_outputs(self, job: dict[str, Any], outcome: _Outcome, *, required: bool) -> None:
        """Write manifest, success and failure files into the job folder (skipped if the bucket is gone)."""
        folder = job["output_s3_uri"]
        bucket, prefix = split_uri(folder)
        if self.s3.bucket(bucket) is None:
            if required:
                raise JobFailed(f"OUTPUT_BUCKET_NOT_ACCESSIBLE: the output bucket {bucket} does not exist")
            return
        imported = len(outcome.successes)
        server_errors = sum(f["exception"]["exceptionType"] == SERVER_ERROR for f in outcome.failures)
        summary = {
            "jobId": job["id"],
            "datastoreId": job["datastore_id"],
            "inputS3Uri": job["input_s3_uri"],
            "outputS3Uri": folder,
            "successOutputS3Uri": f"{folder}SUCCESS/",
            "failureOutputS3Uri": f"{folder}FAILURE/",
            "warningsOutputS3Uri": f"{folder}WARNING/",
            "numberOfScannedFiles": outcome.scanned,
            "numberOfImportedFiles": imported,
            "numberOfFilesWithCustomerError": outcome.scanned - imported - server_errors,
            "numberOfFilesWithServerError": server_errors,
            "numberOfGeneratedImageSets": len(outcome.summaries),
            "imageSetsSummary": outcome.summaries,
        }

        def ndjson(lines: list[dict[str, Any]]) -> bytes:
            return "".join(json.dumps(line) + "\n" for line in lines).encode()

        self.s3.put_object(
            bucket, f"{prefix}SUCCESS/success.ndjson", ndjson(outcome.successes), "application/x-ndjson"
        )
        self.s3.put_object(
            bucket, f"{prefix}FAILURE/failure.ndjson", ndjson(outcome.failures), "application/x-ndjson"
        )
        self.s3.put_object(
            bucket,
            f"{prefix}job-output-manifest.json",
            json.dumps({"jobSummary": summary}).encode(),
            "application/json",
        )
