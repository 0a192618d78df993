"""
One import report per run: what happened to every object of a plan, from the jobs' own output manifests.

For each job started for a chunk, the job folder's ``job-output-manifest.json``, ``SUCCESS/success.ndjson``,
``FAILURE/failure.ndjson`` and (newer service versions) ``WARNING/warning.ndjson`` are read, the ndjson files line
by line. Staged copies are mapped back to their original keys. Every object of the plan is then marked:

- ``imported``: listed in success.ndjson (or warning.ndjson) of a job of its chunk;
- ``failed``: listed in failure.ndjson, with the service's exception type and message;
- ``refused``: refused by the plan (a file over the per-file limit), never sent to a job;
- ``not_reached``: its chunk's job did not start (``not_started``), ended FAILED (``job_failed``), or had not
  ended when the report was built (``job_not_finished``). A FAILED job is a job-level failure (for example a
  quota), so its objects are not reached, except those its outputs, when it wrote any, list as imported or failed;
- ``unaccounted``: its chunk's job COMPLETED, yet neither success nor failure lists it (or its outputs could
  not be read). This should never happen; the run fails on it.

Objects listed more than once across the outputs (imported twice, or imported and failed) are *duplicates*, and
objects the outputs list that the plan does not hold (for example files that arrived after the listing) are
*unexpected*; both are reported on their own. :meth:`ImportReport.document` holds object keys and goes to S3
(:func:`write_report`); :meth:`ImportReport.summary` (XCom) and :meth:`ImportReport.text` (the task log) hold
prefixes, counts and ids only.

This module imports neither boto3 nor botocore: clients are passed in.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from healthimaging.fanout import DEFAULT_WORKERS, ordered_map
from healthimaging.planner import Plan, write_json_document
from healthimaging.validation import split_s3_uri

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

log = logging.getLogger(__name__)

REPORT_FORMAT = "healthimaging-import-report/1"
MANIFEST_NAME = "job-output-manifest.json"
SUCCESS_NDJSON = "SUCCESS/success.ndjson"
FAILURE_NDJSON = "FAILURE/failure.ndjson"
WARNING_NDJSON = "WARNING/warning.ndjson"
MANIFEST_COUNTS = (
    "numberOfScannedFiles",
    "numberOfImportedFiles",
    "numberOfFilesWithCustomerError",
    "numberOfFilesWithServerError",
    "numberOfGeneratedImageSets",
)
IMPORTED, FAILED, REFUSED, NOT_REACHED, UNACCOUNTED = (
    "imported",
    "failed",
    "refused",
    "not_reached",
    "unaccounted",
)
COMPLETED, NOT_STARTED, JOB_FAILED, NOT_FINISHED = (
    "completed",
    "not_started",
    "job_failed",
    "job_not_finished",
)
MAX_MESSAGE = 500


@dataclass(frozen=True)
class ChunkJob:
    """What the run knows of one job started (or not) for a chunk.

    :param chunk_id: the plan's chunk id
    :param job_id: the job, or None when StartDICOMImportJob never succeeded
    :param job_status: its last seen status (``COMPLETED``, ``FAILED``, ``SUBMITTED``, ``IN_PROGRESS``)
    :param output_s3_uri: the job folder (``jobProperties.outputS3Uri``)
    :param message: the FAILED job's message, or why the start failed
    """

    chunk_id: str
    job_id: str | None = None
    job_status: str | None = None
    output_s3_uri: str | None = None
    message: str | None = None

    @classmethod
    def from_job_properties(cls, chunk_id: str, properties: Mapping[str, Any]) -> ChunkJob:
        """From GetDICOMImportJob's ``jobProperties``.

        :param chunk_id: the chunk the job imports
        :param properties: ``jobProperties``
        """
        return cls(
            chunk_id,
            properties.get("jobId"),
            properties.get("jobStatus"),
            properties.get("outputS3Uri"),
            properties.get("message"),
        )

    def as_dict(self) -> dict[str, Any]:
        """For XCom (ids, status and the job folder only)."""
        return asdict(self)


@dataclass
class _JobRecord:
    job: ChunkJob
    counts: dict[str, int] = field(default_factory=dict)
    image_sets: list[dict[str, Any]] = field(default_factory=list)
    success_lines: int = 0
    failure_lines: int = 0
    warning_lines: int = 0
    imported: int = 0  # distinct keys imported (success lines plus warning-only lines), planned or not
    unexpected: int = 0
    problems: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return {
            **self.job.as_dict(),
            "manifest": self.counts or None,
            "success_lines": self.success_lines,
            "failure_lines": self.failure_lines,
            "warning_lines": self.warning_lines,
            "unexpected": self.unexpected,
            "image_sets": self.image_sets,
            "problems": self.problems,
        }


class ReportBuilder:
    """Account for a plan's objects from job outputs fed one job at a time (no S3 here: see :func:`build_report`).

    :param plan: the plan the jobs imported
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._chunks = {chunk.id: n for n, chunk in enumerate(plan.chunks)}
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        chunk_of = array("I")
        for n, chunk in enumerate(plan.chunks):
            for o in chunk.objects:
                self._index[o.key] = len(self._keys)
                self._keys.append(o.key)
                chunk_of.append(n)
        self._chunk_of = chunk_of
        self._imports = array("I", bytes(4 * len(self._keys)))
        self._failures = array("I", bytes(4 * len(self._keys)))
        self._image_set: list[str | None] = [None] * len(self._keys)
        self._reason: dict[int, tuple[str, str]] = {}
        self._interned: dict[str, str] = {}
        self._jobs: list[list[_JobRecord]] = [[] for _ in plan.chunks]
        self._unexpected: list[dict[str, Any]] = []

    def add_job(
        self,
        job: ChunkJob,
        manifest: Mapping[str, Any] | None = None,
        success: Iterable[Mapping[str, Any]] = (),
        failure: Iterable[Mapping[str, Any]] = (),
        warning: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Account for one job of a chunk (call in the order the jobs were started; the last one is the chunk's).

        :param job: the job
        :param manifest: the ``jobSummary`` of its manifest, or None if it could not be read
        :param success: the parsed lines of its success.ndjson
        :param failure: the parsed lines of its failure.ndjson
        :param warning: the parsed lines of its warning.ndjson
        """
        if job.chunk_id not in self._chunks:
            raise ValueError(f"Job {job.job_id} names chunk {job.chunk_id!r}, which the plan does not hold")
        n = self._chunks[job.chunk_id]
        chunk = self.plan.chunks[n]
        record = _JobRecord(job)
        self._jobs[n].append(record)
        if manifest is not None:
            record.counts = {name: int(manifest.get(name) or 0) for name in MANIFEST_COUNTS}
            record.image_sets = [
                {name: s.get(name) for name in ("imageSetId", "imageSetVersion", "isPrimary")}
                for s in manifest.get("imageSetsSummary") or ()
            ]
        listed: set[str] = set()  # this job's success keys: a file also in warning.ndjson is one import
        for name, lines in (("success", success), ("warning", warning)):
            for line in lines:
                key = chunk.original_key(str(line.get("inputFile", "")))
                if name == "success":
                    record.success_lines += 1
                else:
                    record.warning_lines += 1
                    if key in listed:
                        continue
                listed.add(key)
                index = self._line(record, key, IMPORTED)
                if index is not None:
                    self._imported(index, line)
        record.imported = len(listed)
        for line in failure:
            record.failure_lines += 1
            index = self._line(record, chunk.original_key(str(line.get("inputFile", ""))), FAILED)
            if index is not None:
                self._failures[index] += 1
                exception = line.get("exception") or {}
                self._reason[index] = (
                    str(exception.get("exceptionType", "")),
                    str(exception.get("message", ""))[:MAX_MESSAGE],
                )
        self._check_counts(record, chunk.files)

    def _line(self, record: _JobRecord, key: str, outcome: str) -> int | None:
        index = self._index.get(key)
        if index is None:
            record.unexpected += 1
            self._unexpected.append(
                {"key": key, "chunk": record.job.chunk_id, "job_id": record.job.job_id, "outcome": outcome}
            )
        return index

    def _imported(self, index: int, line: Mapping[str, Any]) -> None:
        self._imports[index] += 1
        image_set = (line.get("importResponse") or {}).get("imageSetId")
        if image_set:
            self._image_set[index] = self._interned.setdefault(str(image_set), str(image_set))

    @staticmethod
    def _check_counts(record: _JobRecord, planned: int) -> None:
        status, counts = record.job.job_status, record.counts
        if status == "COMPLETED" and not counts:
            record.problems.append("the job COMPLETED but its manifest could not be read")
        if not counts:
            return
        imported = counts["numberOfImportedFiles"]
        failed = counts["numberOfFilesWithCustomerError"] + counts["numberOfFilesWithServerError"]
        # Whether files imported with warnings are also in success.ndjson is not documented: accept both.
        if imported not in (
            record.success_lines,
            record.success_lines + record.warning_lines,
            record.imported,
        ):
            record.problems.append(
                f"the manifest counts {imported} imported file(s), success.ndjson lists {record.success_lines}"
            )
        if record.failure_lines != failed:
            record.problems.append(
                f"the manifest counts {failed} failed file(s), failure.ndjson lists {record.failure_lines}"
            )
        if status == "COMPLETED" and counts["numberOfScannedFiles"] != planned:
            record.problems.append(
                f"the job scanned {counts['numberOfScannedFiles']} file(s), the plan holds {planned}"
            )

    def build(self) -> ImportReport:
        """The report over everything added so far."""
        outcomes = [_outcome(records[-1].job if records else None) for records in self._jobs]
        status = [""] * len(self._keys)
        for index, chunk_n in enumerate(self._chunk_of):
            if self._imports[index]:
                status[index] = IMPORTED
            elif self._failures[index]:
                status[index] = FAILED
            elif outcomes[chunk_n] == COMPLETED:
                status[index] = UNACCOUNTED
            else:
                status[index] = NOT_REACHED
        duplicates = [i for i in range(len(self._keys)) if self._imports[i] + self._failures[i] > 1]
        return ImportReport(self, outcomes, status, duplicates)


class ImportReport:
    """The accounting of one run; build it with :func:`build_report` or :class:`ReportBuilder`."""

    def __init__(
        self, builder: ReportBuilder, outcomes: list[str], status: list[str], duplicates: list[int]
    ) -> None:
        self._b = builder
        self.plan = builder.plan
        self.outcomes = outcomes
        self.status = status
        self.duplicates = duplicates
        self.report_s3_uri: str | None = None

    def counts(self) -> Counter[str]:
        """Objects per status (planned objects and refused ones)."""
        counts = Counter(self.status)
        counts[REFUSED] = len(self.plan.refused)
        return counts

    def totals(self) -> dict[str, int]:
        """Counts over the whole run."""
        counts = self.counts()
        chunks = Counter(self.outcomes)
        image_sets = {s["imageSetId"] for records in self._b._jobs for r in records for s in r.image_sets}
        image_sets |= {i for i in self._b._image_set if i}
        return {
            "objects": len(self.status) + len(self.plan.refused),
            "planned": len(self.status),
            **{name: counts[name] for name in (IMPORTED, FAILED, REFUSED, NOT_REACHED, UNACCOUNTED)},
            "duplicates": len(self.duplicates),
            "unexpected": len(self._b._unexpected),
            "image_sets": len(image_sets),
            "chunks": len(self.outcomes),
            **{f"chunks_{name}": chunks[name] for name in (COMPLETED, JOB_FAILED, NOT_STARTED, NOT_FINISHED)},
        }

    def problems(self) -> list[str]:
        """What makes this run incomplete or suspicious (counts and chunk ids only); empty when all is well."""
        totals = self.totals()
        problems = []
        if totals[UNACCOUNTED]:
            problems.append(
                f"{totals[UNACCOUNTED]} object(s) unaccounted for: a COMPLETED job lists them nowhere"
            )
        if totals["duplicates"]:
            problems.append(
                f"{totals['duplicates']} object(s) listed more than once across the jobs' outputs"
            )
        if totals[NOT_REACHED]:
            chunk_ids = [
                c.id
                for c, outcome in zip(self.plan.chunks, self.outcomes, strict=True)
                if outcome != COMPLETED
            ]
            problems.append(
                f"{totals[NOT_REACHED]} object(s) not reached: chunk(s) {', '.join(chunk_ids)} did not complete"
            )
        if totals["unexpected"]:
            problems.append(f"{totals['unexpected']} object(s) in the jobs' outputs are not in the plan")
        for chunk, records in zip(self.plan.chunks, self._b._jobs, strict=True):
            problems.extend(f"chunk {chunk.id} job {r.job.job_id}: {p}" for r in records for p in r.problems)
        return problems

    def _chunk_rows(self) -> Iterator[dict[str, Any]]:
        per_chunk: list[Counter[str]] = [Counter() for _ in self.plan.chunks]
        for chunk_n, status in zip(self._b._chunk_of, self.status, strict=True):
            per_chunk[chunk_n][status] += 1
        for n, chunk in enumerate(self.plan.chunks):
            records = self._b._jobs[n]
            last = records[-1] if records else None
            yield {
                "id": chunk.id,
                "input_s3_uri": chunk.input_s3_uri,
                "label": chunk.label,
                "staged": chunk.staged,
                "files": chunk.files,
                "bytes": chunk.bytes,
                "outcome": self.outcomes[n],
                "job_id": last.job.job_id if last else None,
                "job_status": last.job.job_status if last else None,
                "scanned": (last.counts.get("numberOfScannedFiles") if last and last.counts else None),
                **{name: per_chunk[n][name] for name in (IMPORTED, FAILED, NOT_REACHED, UNACCOUNTED)},
                "image_sets": len({s["imageSetId"] for s in last.image_sets}) if last else 0,
                "jobs": records,
            }

    def summary(self) -> dict[str, Any]:
        """Counts and ids for XCom: no keys, no patient data."""
        chunks = [
            {k: v for k, v in row.items() if k not in ("jobs", "input_s3_uri", "bytes", "staged")}
            for row in self._chunk_rows()
        ]
        return {
            "report_s3_uri": self.report_s3_uri,
            "input_s3_uri": self.plan.input_s3_uri,
            "listing_digest": self.plan.listing_digest,
            "totals": self.totals(),
            "problems": self.problems(),
            "chunks": chunks,
        }

    def text(self) -> str:
        """A short summary for the task log (prefixes, counts, ids)."""
        t = self.totals()
        lines = [
            f"Import report for {self.plan.input_s3_uri}: {t['objects']:,} object(s), {t['chunks']} chunk(s)"
            f" ({t['chunks_completed']} completed, {t['chunks_job_failed']} FAILED,"
            f" {t['chunks_not_started']} not started, {t['chunks_job_not_finished']} not finished)",
            f"  imported {t[IMPORTED]:,}, failed {t[FAILED]:,}, refused {t[REFUSED]:,}, not reached"
            f" {t[NOT_REACHED]:,}, unaccounted {t[UNACCOUNTED]:,}, duplicates {t['duplicates']:,}, not in the"
            f" plan {t['unexpected']:,}; {t['image_sets']:,} image set(s)",
        ]
        for row in self._chunk_rows():
            lines.append(
                f"  chunk {row['id']} {row['label']}: job {row['job_id'] or '-'} {row['job_status'] or row['outcome']},"
                f" {row['files']:,} file(s): {row[IMPORTED]:,} imported, {row[FAILED]:,} failed,"
                f" {row[NOT_REACHED]:,} not reached, {row[UNACCOUNTED]:,} unaccounted, {row['image_sets']} image set(s)"
            )
        lines.extend(f"  problem: {p}" for p in self.problems())
        if self.report_s3_uri:
            lines.append(f"  full report (object keys): {self.report_s3_uri}")
        return "\n".join(lines)

    def document(self) -> dict[str, Any]:
        """The full report, with every object's key and status (``objects`` is a generator: stream it)."""
        chunks = [{**row, "jobs": [r.document() for r in row["jobs"]]} for row in self._chunk_rows()]
        return {
            "format": REPORT_FORMAT,
            "input_s3_uri": self.plan.input_s3_uri,
            "listing_digest": self.plan.listing_digest,
            "totals": self.totals(),
            "problems": self.problems(),
            "chunks": chunks,
            "objects": self._object_rows(),
            "duplicates": [
                {
                    "key": self._b._keys[i],
                    "chunk": self.plan.chunks[self._b._chunk_of[i]].id,
                    "imports": self._b._imports[i],
                    "failures": self._b._failures[i],
                }
                for i in self.duplicates
            ],
            "unexpected": self._b._unexpected,
        }

    def _object_rows(self) -> Iterator[dict[str, Any]]:
        b = self._b
        for index, key in enumerate(b._keys):
            chunk_n = b._chunk_of[index]
            row: dict[str, Any] = {
                "key": key,
                "chunk": self.plan.chunks[chunk_n].id,
                "status": self.status[index],
            }
            if b._image_set[index]:
                row["image_set_id"] = b._image_set[index]
            if index in b._reason:
                row["exception_type"], row["message"] = b._reason[index]
            if row["status"] == NOT_REACHED:
                row["reason"] = self.outcomes[chunk_n]
            yield row
        for r in self.plan.refused:
            yield {"key": r.key, "chunk": None, "status": REFUSED, "reason": r.reason, "size": r.size}


def _outcome(job: ChunkJob | None) -> str:
    if job is None or not job.job_id:
        return NOT_STARTED
    if job.job_status == "COMPLETED":
        return COMPLETED
    if job.job_status == "FAILED":
        return JOB_FAILED
    return NOT_FINISHED


# ------------------------------------------------------------------------------------------- S3


def build_report(
    s3_client: Any,
    plan: Plan,
    jobs: Iterable[ChunkJob],
    *,
    manifest_attempts: int = 4,
    manifest_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    workers: int = DEFAULT_WORKERS,
) -> ImportReport:
    """Read every job's outputs from S3 and account for the plan's objects.

    :param s3_client: a boto3 S3 client that can read the output prefix
    :param plan: the run's plan
    :param jobs: one entry per job started (or per chunk whose start failed), in start order; chunks with no
        entry count as not started
    :param manifest_attempts: reads of a COMPLETED job's manifest before giving up (it may lag the status)
    :param manifest_delay: seconds between those reads
    :param sleep: the sleep function (tests pass a fake)
    :param workers: jobs whose outputs are read at once (:func:`~healthimaging.fanout.ordered_map`)
    """

    def outputs(job: ChunkJob) -> tuple[ChunkJob, dict[str, Any] | None, list[bytes]]:
        folder = job.output_s3_uri if job.job_status in ("COMPLETED", "FAILED") else None
        if not folder:
            return job, None, []
        attempts = manifest_attempts if job.job_status == "COMPLETED" else 1
        manifest = read_manifest(s3_client, folder, attempts=attempts, delay=manifest_delay, sleep=sleep)
        names = (SUCCESS_NDJSON, FAILURE_NDJSON, WARNING_NDJSON)
        # bytes, parsed by the consumer: far smaller than the dicts of a 5,000-line file
        return job, manifest, [read_object(s3_client, _join(folder, name)) for name in names]

    builder = ReportBuilder(plan)
    # A few jobs' outputs read at once (a run of many small chunks is otherwise 4 reads per job in a row).
    for job, manifest, lines in ordered_map(outputs, jobs, workers=workers):
        if lines:
            builder.add_job(job, manifest, *(ndjson_lines(body) for body in lines))
        else:
            builder.add_job(job)
    report = builder.build()
    log.info("%s", report.text())
    return report


def write_report(s3_client: Any, report: ImportReport, s3_uri: str) -> str:
    """Write :meth:`ImportReport.document` to S3 (gzip when ``s3_uri`` ends in ``.gz``) and remember where.

    :param s3_client: a boto3 S3 client
    :param report: the report
    :param s3_uri: where, e.g. ``<output prefix>/reports/<run>/import-report.json.gz``
    """
    report.report_s3_uri = write_json_document(s3_client, s3_uri, report.document())
    return s3_uri


def read_manifest(
    s3_client: Any,
    job_folder: str,
    *,
    attempts: int = 4,
    delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """The ``jobSummary`` of a job folder's manifest, or None when it is still missing after ``attempts`` reads.

    :param s3_client: a boto3 S3 client
    :param job_folder: ``jobProperties.outputS3Uri``
    :param attempts: reads before giving up
    :param delay: seconds between reads
    :param sleep: the sleep function
    """
    bucket, key = split_s3_uri(_join(job_folder, MANIFEST_NAME))
    for attempt in range(attempts):
        try:
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:
            if not _missing(error):
                raise
            if attempt < attempts - 1:
                sleep(delay)
            continue
        summary: dict[str, Any] = json.loads(body)["jobSummary"]
        return summary
    return None


def read_object(s3_client: Any, s3_uri: str) -> bytes:
    """An object's content; empty when it does not exist.

    :param s3_client: a boto3 S3 client
    :param s3_uri: the object
    """
    bucket, key = split_s3_uri(s3_uri)
    try:
        return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as error:
        if not _missing(error):
            raise
        return b""


def ndjson_lines(lines: Iterable[bytes] | bytes) -> Iterator[dict[str, Any]]:
    """The lines of ndjson content as dicts, blank lines skipped.

    :param lines: the content, or its lines
    """
    for line in lines.splitlines() if isinstance(lines, bytes) else lines:
        if line.strip():
            yield json.loads(line)


def _missing(error: BaseException) -> bool:
    response = getattr(error, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name
