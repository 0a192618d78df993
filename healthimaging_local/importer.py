"""DICOM import jobs: the Start/Get/List operations and their execution in worker threads."""

from __future__ import annotations

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
    :param max_concurrent_imports: SUBMITTED/IN_PROGRESS jobs allowed per data store.
    :param workers: worker threads: jobs that can be IN_PROGRESS at once (a job waiting out
        ``import_seconds`` holds one, as a real job holds the service's capacity).
    """

    def __init__(
        self,
        store: Store,
        s3: S3Storage,
        import_seconds: float = 0.0,
        max_concurrent_imports: int = 100,
        workers: int = 32,
    ) -> None:
        self.store = store
        self.s3 = s3
        self.import_seconds = import_seconds
        self.max_concurrent_imports = max_concurrent_imports
        self.limits = JobLimits()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._datastore_locks: dict[str, threading.Lock] = {}
        self._threads = [
            threading.Thread(target=self._work, name=f"healthimaging-import-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        """Start the workers and resume every job a previous run left unfinished."""
        for row in self.store.query(
            "SELECT id FROM jobs WHERE status IN ('SUBMITTED','IN_PROGRESS') ORDER BY submitted_at"
        ):
            self._queue.put(row["id"])
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; a job not yet committed stays resumable.

        :param timeout: seconds to wait for each worker.
        """
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

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
        self._queue.put(job_id)
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
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            try:
                self._run(job_id)
            except JobInterrupted:
                return
            except Exception:
                log.exception("Import job %s crashed; marking it FAILED", job_id)
                self._finish(job_id, "FAILED", "DICOM import job has failed. INTERNAL_ERROR", [])

    def _run(self, job_id: str) -> None:
        with self.store.transaction() as db:
            job = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job is None or job["status"] not in ACTIVE_JOB_STATUSES:
                return
            db.execute("UPDATE jobs SET status='IN_PROGRESS' WHERE id=?", (job_id,))
        started = time.monotonic()
        log.info("Import job %s started", job_id)
        try:
            self._execute(job, started)
        except JobFailed as failure:
            message = sanitize_message(f"DICOM import job has failed. {failure}")
            self._write_outputs(job, _Outcome(), required=False)
            self._wait_until(started)
            self._finish(job_id, "FAILED", message, [])

    def _wait_until(self, started: float) -> None:
        remaining = started + self.import_seconds - time.monotonic()
        if (remaining > 0 and self._stopping.wait(remaining)) or self._stopping.is_set():
            raise JobInterrupted

    def _finish(self, job_id: str, status: str, message: str | None, writes: list[ImageSetWrite]) -> None:
        now = time.time()
        with self.store.transaction() as db:
            self.store.write_image_sets(db, writes, now)
            db.execute(
                "UPDATE jobs SET status=?, ended_at=?, message=? WHERE id=? AND status IN ('SUBMITTED','IN_PROGRESS')",
                (status, now, message, job_id),
            )
        log.info("Import job %s %s", job_id, status)

    def _inventory(self, job: sqlite3.Row) -> tuple[str, list[S3Object]]:
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

    def _execute(self, job: sqlite3.Row, started: float) -> None:
        """Parse the job's objects, then group, write the outputs and commit under the data store's lock.

        Reading the current version of an image set and committing the next one happen under one lock, so
        concurrent jobs touching the same series get consecutive versions; parsing and the least
        IN_PROGRESS time run outside it, so jobs of one data store still overlap.
        """
        bucket, objects = self._inventory(job)
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
        self._wait_until(started)
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

    def _write_outputs(self, job: sqlite3.Row, outcome: _Outcome, *, required: bool) -> None:
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
