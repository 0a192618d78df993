"""
The import pipeline as Airflow tasks: plan each prefix, start and wait for each chunk's job, search, publish, report.

:func:`compose_imports` builds it from resolved import specs (one per S3 prefix), so every DAG that imports (the
nightly/backfill/manual DAG and the on-arrival DAG) runs the same tasks:

- ``plan_imports``: one listing per prefix, split into quota-sized chunks (:mod:`healthimaging.planner`), plans
  written to S3, loose files staged (:mod:`healthimaging.staging`). A prefix that cannot be planned (empty, or
  staging needed but not configured) fails the run before any job starts.
- ``start_imports``: one StartDICOMImportJob per chunk, at the service's pace, from one task (task scheduling
  would space serialised start tasks seconds apart), with a client token scoped to the chunk's content, so
  retries, clears, backfills and other runs of the same objects attach to one job.
- ``import_dicom``: mapped over the planned chunks, beside ``start_imports``: each waits (deferred) for the job
  ``start_imports`` starts for its chunk, from the moment it exists.
- ``search_image_sets``: once every wait is done, exactly the image sets of each COMPLETED job of the run, in one
  task (a task per chunk costs a worker more than the chunk's import takes on a small deployment).
- ``publish_image_sets``: one event on the asset ``healthimaging_image_sets`` naming every image set the run found.
- ``import_report``: after every chunk, accounts for every listed object (:mod:`healthimaging.report`), writes the
  report next to the plan, removes the staged copies of completed chunks, and fails the run when anything is
  unaccounted for or any import task failed.

Logs and XCom name prefixes, counts, bytes and ids only; object keys are only in the plan and report documents.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

# Imported from their module, not from ``airflow.sdk``: the dag-processor pre-imports the ``airflow.*`` modules a
# DAG file names before it forks a parser, so the decorators' import chain is paid once, not at every parse.
from airflow.sdk.definitions.decorators import task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from healthimaging import config
from healthimaging.assets import IMAGE_SETS
from healthimaging.fanout import JOB_CALLS_PER_SECOND, RateLimit, ordered_map
from healthimaging.operators import SearchImageSetsOperator, StartDICOMImportOperator
from healthimaging.sensors import DICOMImportJobSensor

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

GROUP_ID = "import_dicom"
START_TASK_ID = "start_imports"
WAIT_TASK_ID = f"{GROUP_ID}.wait_for_import_job"
SEARCH_TASK_ID = "search_image_sets"
#: XCom key of ``plan_imports``: the run's search settings, ``{datastore_id, max_results, include_phi,
#: phi_allow_tags}``.
SEARCH_KEY = "search"
#: Keys of a resolved import spec that the run's one search takes; every spec of a run has the same values.
SEARCH_SETTINGS = ("datastore_id", "max_results", "include_phi", "phi_allow_tags")
#: The search's jobs: every chunk's entry in ``start_imports``' XCom ``jobs`` (None where not started). Not the
#: waits' results: a task ended from the triggerer has its XCom stored JSON-encoded by Airflow 3.3.2, so that
#: the Task SDK's ``xcom_pull`` returns a string.
JOBS_OF_RUN = f"{{{{ (ti.xcom_pull(task_ids='{START_TASK_ID}', key='jobs') or []) | tojson }}}}"
IMPORT_TIMEOUT = timedelta(hours=12)
#: Clock difference tolerated between the service's submittedAt and the run's start when choosing what to announce.
ANNOUNCE_SKEW = timedelta(seconds=30)
#: Keys of a resolved import spec that each chunk's import takes as they are.
CHUNK_KEYS = (
    "datastore_id",
    "data_access_role_arn",
    "output_s3_uri",
    "max_failed_files",
    "max_results",
    "include_phi",
    "phi_allow_tags",
)
log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def run_documents_uri(output_s3_uri: str, dag_id: str, run_id: str) -> str:
    """Where a run's plans and reports live: ``<output>/import-runs/<dag_id>/<run_id>/``.

    :param output_s3_uri: the imports' output prefix
    :param dag_id: the DAG
    :param run_id: the run
    """
    return f"{output_s3_uri.rstrip('/')}/import-runs/{_UNSAFE.sub('-', dag_id)}/{_UNSAFE.sub('-', run_id)}/"


def chunk_specs(
    spec: Mapping[str, Any], plan_index: int, chunks: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The ``import_dicom`` arguments of each chunk of one planned prefix.

    :param spec: the prefix's resolved import spec
    :param plan_index: the plan's place in the run
    :param chunks: the plan's chunk summaries (:meth:`~healthimaging.planner.Chunk.summary`)
    """
    shared = {key: spec.get(key) for key in CHUNK_KEYS}
    return [
        {
            **shared,
            "input_s3_uri": chunk["input_s3_uri"],
            "content_digest": chunk["digest"],
            "job_name": spec.get("job_name"),
            "client_token": spec.get("client_token"),
            "plan_index": plan_index,
            "chunk_id": chunk["id"],
        }
        for chunk in chunks
    ]


@task(task_id="plan_imports", execution_timeout=timedelta(hours=1), retries=2)
def plan_imports(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plan every prefix of the run (all before any staging or job), write the plans, stage loose files.

    :param specs: the resolved import specs, one per prefix
    :return: one ``import_dicom`` argument dict per chunk; XCom ``plans`` holds each plan's document URI and
        summary (no object keys)
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.sdk import get_current_context

    from healthimaging.planner import ImportLimits, PlanError, PlanSettings, plan_prefix, write_plan
    from healthimaging.staging import stage_chunks

    context = get_current_context()
    ti = context["ti"]
    search = search_settings(specs)
    s3 = S3Hook(aws_conn_id=config.aws_conn_id()).get_conn()
    limits = ImportLimits(max_files_per_job=config.max_files_per_job())
    plans = []
    for spec in specs:
        settings = PlanSettings(
            limits=limits,
            staging_s3_uri=spec.get("staging_s3_uri") or None,
            allow_empty=bool(spec.get("allow_empty")),
        )
        try:
            plans.append(plan_prefix(s3, spec["input_s3_uri"], settings))
        except PlanError as error:
            raise AirflowFailException(f"No import started: {error}") from None
    chunks: list[dict[str, Any]] = []
    documents = []
    for n, (spec, plan) in enumerate(zip(specs, plans, strict=True)):
        if plan.empty:
            log.warning("%s holds no objects (allow_empty): nothing to import", plan.input_s3_uri)
        if spec.get("client_token") and len(plan.chunks) > 1:
            raise AirflowFailException(
                f"No import started: client_token names one job, but {plan.input_s3_uri} needs {len(plan.chunks)}"
                " jobs; leave client_token empty"
            )
        uri = write_plan(
            s3,
            plan,
            f"{run_documents_uri(spec['output_s3_uri'], ti.dag_id, context['run_id'])}plan-{n:04d}.json.gz",
        )
        if plan.staged_chunks:
            staged = stage_chunks(s3, plan)
            log.info("Staged %s for %s", staged.as_dict(), plan.input_s3_uri)
        totals = plan.totals()
        log.info(
            "Plan %d: %s -> %d chunk(s) (%d staged), %s; document %s",
            n,
            plan.input_s3_uri,
            len(plan.chunks),
            len(plan.staged_chunks),
            totals,
            uri,
        )
        documents.append({"plan_s3_uri": uri, **plan.summary()})
        chunks.extend(chunk_specs(spec, n, [c.summary() for c in plan.chunks]))
    ti.xcom_push(key="plans", value=documents)
    ti.xcom_push(key=SEARCH_KEY, value=search)
    return chunks


def search_settings(specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings of the run's one search (all its jobs' image sets at once), shared by every spec.

    :param specs: the resolved import specs
    :raises AirflowFailException: when specs differ in them (one run imports into one data store)
    """
    distinct = {repr([spec.get(key) for key in SEARCH_SETTINGS]) for spec in specs}
    if len(distinct) > 1:
        raise AirflowFailException(
            f"No import started: the prefixes of one run must share {', '.join(SEARCH_SETTINGS)}"
        )
    first = specs[0] if specs else {}
    return {key: first.get(key) for key in SEARCH_SETTINGS} | {
        "phi_allow_tags": first.get("phi_allow_tags") or []
    }


@task(
    task_id="start_imports",
    execution_timeout=timedelta(hours=12),
    retries=3,
    max_active_tis_per_dag=1,
    # before the chunks' waits, which become runnable with it and wait for the jobs it starts
    priority_weight=1000,
    weight_rule="absolute",
)
def start_imports(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start one import job per chunk, in plan order, at the service's pace (one task, so starts are not
    spaced by task scheduling); re-attach to jobs already started for a chunk.

    Each chunk's job is started by a :class:`~healthimaging.operators.StartDICOMImportOperator` with the chunk's
    content digest, so its client token is the chunk's: a retry, a clear, a backfill or another run of the same
    objects re-attaches, a FAILED job is followed by a new one. Each job is also kept in this task's
    ``task_state_store`` under its chunk. A chunk that cannot be started (a refusal a retry cannot fix) is left
    out, logged and reported as not reached; a transient error fails the try, and the retry picks up where it
    stopped.

    :param chunks: ``plan_imports``'s chunk list
    :return: one dict per started job (data store, job id, chunk id); XCom ``jobs``: the job id of every
        chunk (None where not started), pushed after every start; ``start_failures``: the chunks not started
    """
    from airflow.sdk import get_current_context

    from healthimaging.hooks import HealthImagingHook
    from healthimaging.pacing import StartPace, StartPacer
    from healthimaging.started_jobs import CLEAR_NUMBER_KEY

    context = get_current_context()
    # First, so that waits reading this task's XCom can tell this try's jobs from a cleared run's.
    context["ti"].xcom_push(
        key=CLEAR_NUMBER_KEY, value=int(getattr(context.get("dag_run"), "clear_number", 0) or 0)
    )
    pace = StartPace.from_config()
    hook = HealthImagingHook(aws_conn_id=config.aws_conn_id())  # one client for every chunk's operator
    pacers: dict[str, StartPacer] = {}
    started: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    job_ids: list[str | None] = [None] * len(chunks)
    for n, chunk in enumerate(chunks):
        # [START howto_operator_start_dicom_import]
        operator = StartDICOMImportOperator(
            task_id=f"start_import_job_{n}",
            datastore_id=chunk["datastore_id"],
            data_access_role_arn=chunk["data_access_role_arn"],
            input_s3_uri=chunk["input_s3_uri"],
            output_s3_uri=chunk["output_s3_uri"],
            content_digest=chunk["content_digest"],
            job_name=chunk.get("job_name"),
            client_token=chunk.get("client_token"),
            pace_starts=False,  # this task keeps the pace itself, below
            aws_conn_id=config.aws_conn_id(),
        )
        # [END howto_operator_start_dicom_import]
        operator.hook = hook
        pacer = pacers.get(chunk["datastore_id"])
        if pacer is None:
            pacer = pacers[chunk["datastore_id"]] = StartPacer(hook.conn, chunk["datastore_id"], pace)
        try:
            job_id, status = operator.start_job(
                context, state_key=f"job:{chunk['content_digest']}", before_start=pacer
            )
        except AirflowFailException as error:
            log.error("Chunk %s not started: %s", chunk["chunk_id"], error)
            failures.append(
                {"chunk_id": chunk["chunk_id"], "plan_index": chunk["plan_index"], "message": str(error)}
            )
            continue
        log.info(
            "Chunk %s %s -> import job %s (%s)", chunk["chunk_id"], chunk["input_s3_uri"], job_id, status
        )
        started.append(
            {"datastore_id": chunk["datastore_id"], "job_id": job_id, "chunk_id": chunk["chunk_id"]}
        )
        job_ids[n] = job_id
        # After every start, so that a try that fails later still tells the report which jobs exist.
        context["ti"].xcom_push(key="jobs", value=job_ids)
    context["ti"].xcom_push(key="start_failures", value=failures)
    context["ti"].xcom_push(key="jobs", value=job_ids)
    return started


@task(
    task_id="publish_image_sets",
    outlets=[IMAGE_SETS],
    trigger_rule="all_done",
    execution_timeout=timedelta(minutes=5),
)
def publish_image_sets(chunks: list[dict[str, Any]] | None = None) -> list[str]:
    """Emit one asset event naming the image sets of every import of the run that found some (ids only).

    Only jobs started since the run (re)started are announced: a job this run re-attached to was announced by the
    run that started it, and a cleared run announces only its new jobs. One event per run, not one per job: Airflow 3.3.2 keeps one queue entry per (asset, consumer) and hands an
    event registered while that entry is pending to the consumer's next run, which only the asset's next event
    starts (apache/airflow#54659); events of one task arrive together.

    :param chunks: ``plan_imports``'s chunk list (index = map index of ``import_dicom``)
    :return: the image-set ids announced
    """
    from datetime import datetime

    from airflow.sdk import get_current_context

    from healthimaging.hooks import HealthImagingHook

    context = get_current_context()
    ti = context["ti"]
    run_started = context["dag_run"].start_date
    hook = HealthImagingHook(aws_conn_id=config.aws_conn_id())
    job_ids = ti.xcom_pull(task_ids=START_TASK_ID, key="jobs") or []
    by_job = ti.xcom_pull(task_ids=SEARCH_TASK_ID, key="imageSetIdsByJob")
    if by_job is None and any(job_ids):
        raise AirflowSkipException(
            f"{SEARCH_TASK_ID} did not finish: no asset event (the import report says more)."
        )
    # Only imports whose wait succeeded: a COMPLETED job over max_failed_files failed its wait, and the run.
    waits = ti.get_task_states(dag_id=ti.dag_id, run_ids=[context["run_id"]], task_ids=[WAIT_TASK_ID])
    succeeded = {
        int(map_index)
        for per_run in waits.values()
        for key, state in per_run.items()
        for _, map_index in [_task_key(key)]
        if state == "success"
    }
    found = []
    for map_index, (chunk, job_id) in enumerate(zip(chunks or [], job_ids, strict=False)):
        ids = (by_job or {}).get(str(job_id)) if job_id and map_index in succeeded else None
        if ids:
            found.append(
                {"datastoreId": chunk["datastore_id"], "jobId": str(job_id), "imageSetIds": list(ids)}
            )

    known = ti.xcom_pull(task_ids=SEARCH_TASK_ID, key="importJobs") or {}
    limit = RateLimit(JOB_CALLS_PER_SECOND)
    if any(not (known.get(item["jobId"]) or {}).get("submittedAt") for item in found):
        hook.conn  # noqa: B018 - one client for every thread, made before they start

    def submitted_at(item: dict[str, Any]) -> Any:
        seen = (known.get(item["jobId"]) or {}).get("submittedAt")
        if seen:  # as the search read it
            return datetime.fromisoformat(seen)
        limit.acquire()
        return hook.get_import_job(item["datastoreId"], item["jobId"]).get("submittedAt")

    imports = []
    earlier = 0
    for item, submitted in zip(found, ordered_map(submitted_at, found), strict=True):
        if isinstance(submitted, datetime) and run_started and submitted < run_started - ANNOUNCE_SKEW:
            # re-attached to a job that another run (or this run before a clear) started and announced
            earlier += 1
            continue
        imports.append(item)
    if earlier:
        log.info("%d job(s) were started before this run (re)started: announced then, not again", earlier)
    if not imports:
        raise AirflowSkipException("No import of this run found image sets: no asset event.")
    all_ids = [i for item in imports for i in item["imageSetIds"]]
    extra: dict[str, Any] = {
        "datastoreId": imports[0]["datastoreId"],
        "jobIds": [item["jobId"] for item in imports],
        "imageSetIds": all_ids,
        "imports": imports,
    }
    context["outlet_events"][IMAGE_SETS].extra = extra
    log.info("Announced %d image set(s) of %d import(s)", len(all_ids), len(imports))
    return all_ids


@task_group(group_id=GROUP_ID)
def import_dicom(
    datastore_id: str,
    input_s3_uri: str,
    max_failed_files: int | None,
    max_results: int,
    include_phi: bool,
    phi_allow_tags: list[str],
    chunk_id: str,
    plan_index: int,
    content_digest: str,
    data_access_role_arn: str,
    output_s3_uri: str,
    job_name: str | None,
    client_token: str | None,
) -> None:
    """One planned chunk: wait for the job ``start_imports`` starts for it (deferred; from the moment it exists,
    not after the last start). Labelled in the UI by the chunk's prefix.

    Takes every key of a chunk (:func:`chunk_specs`), as ``expand_kwargs`` passes them all; the others are
    ``start_imports``' and the run's search's business.
    """
    # [START howto_sensor_dicom_import_job]
    DICOMImportJobSensor(
        task_id="wait_for_import_job",
        datastore_id=datastore_id,
        started_by=START_TASK_ID,  # its XCom "jobs" names this chunk's job once it is started
        input_s3_uri=input_s3_uri,
        deferrable=True,
        poke_interval=config.poll_interval(),
        timeout=IMPORT_TIMEOUT.total_seconds(),
        max_failed_files=max_failed_files,
        max_active_tis_per_dag=config.max_imports_in_flight(),
        pool=config.import_pool(),
        execution_timeout=timedelta(minutes=30),
        map_index_template="{{ task.input_s3_uri }}",
        aws_conn_id=config.aws_conn_id(),
    )
    # [END howto_sensor_dicom_import_job]


@task(task_id="import_report", trigger_rule="all_done", execution_timeout=timedelta(hours=1), retries=2)
def import_report(chunks: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Account for every listed object of every plan; fail when any is unaccounted for or any import task failed.

    :param chunks: ``plan_imports``'s chunk list (index = map index of ``import_dicom``)
    :return: each plan's report summary (counts and ids, no object keys)
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.sdk import get_current_context

    from healthimaging.hooks import HealthImagingHook
    from healthimaging.planner import read_plan
    from healthimaging.report import COMPLETED, ChunkJob, build_report, write_report
    from healthimaging.staging import remove_staged_copies

    context = get_current_context()
    ti = context["ti"]
    documents = ti.xcom_pull(task_ids="plan_imports", key="plans")
    if chunks is None or documents is None:
        raise AirflowFailException("plan_imports did not finish: no import was planned, nothing to report")
    s3 = S3Hook(aws_conn_id=config.aws_conn_id()).get_conn()
    hook = HealthImagingHook(aws_conn_id=config.aws_conn_id())
    job_ids = ti.xcom_pull(task_ids=START_TASK_ID, key="jobs") or [None] * len(chunks)
    not_started = {
        f["chunk_id"]: f["message"] for f in ti.xcom_pull(task_ids=START_TASK_ID, key="start_failures") or []
    }

    known = ti.xcom_pull(task_ids=SEARCH_TASK_ID, key="importJobs") or {}
    limit = RateLimit(JOB_CALLS_PER_SECOND)

    def completed(job_id: str) -> dict[str, Any] | None:
        """The job as the search read it, if COMPLETED then (a COMPLETED job stays so)."""
        seen = known.get(job_id) or {}
        return seen if seen.get("jobStatus") == "COMPLETED" else None

    def chunk_job(chunk_and_job: tuple[dict[str, Any], str | None]) -> ChunkJob:
        chunk, job_id = chunk_and_job
        if job_id:
            seen = completed(str(job_id))
            if seen is not None:
                return ChunkJob.from_job_properties(chunk["chunk_id"], {"jobId": str(job_id), **seen})
            limit.acquire()
            properties = hook.get_import_job(chunk["datastore_id"], str(job_id))
            return ChunkJob.from_job_properties(chunk["chunk_id"], properties)
        message = not_started.get(chunk["chunk_id"], "start_imports did not finish")
        return ChunkJob(chunk["chunk_id"], message=message[:500])

    if any(job_id and completed(str(job_id)) is None for job_id in job_ids):
        hook.conn  # noqa: B018 - one client for every thread, made before they start
    jobs: dict[int, list[ChunkJob]] = {}
    pairs = zip(chunks, job_ids, strict=True)
    for chunk, job in zip(chunks, ordered_map(chunk_job, pairs), strict=True):
        jobs.setdefault(chunk["plan_index"], []).append(job)

    summaries = []
    problems: list[str] = []
    for n, document in enumerate(documents):
        plan = read_plan(s3, document["plan_s3_uri"])
        report = build_report(s3, plan, jobs.get(n, []))
        write_report(s3, report, document["plan_s3_uri"].replace("/plan-", "/report-"))
        done = [c.id for c, outcome in zip(plan.chunks, report.outcomes, strict=True) if outcome == COMPLETED]
        if plan.staged_chunks and done:
            removed = remove_staged_copies(s3, plan, chunk_ids=[c for c in done if plan.chunk(c).staged])
            log.info("Removed %d staged copies of completed chunks", removed)
        summary = report.summary()
        summaries.append(summary)
        problems.extend(f"{plan.input_s3_uri}: {p}" for p in report.problems())
        failed = summary["totals"]["failed"]
        if failed:
            log.warning(
                "%d file(s) of %s failed to import (within max_failed_files)", failed, plan.input_s3_uri
            )
    states = ti.get_task_states(
        dag_id=ti.dag_id,
        run_ids=[context["run_id"]],
        task_ids=[START_TASK_ID, SEARCH_TASK_ID],
        task_group_id=GROUP_ID,
    )
    unfinished = sorted(
        f"{task_id}[{map_index}]: {state}"
        for per_run in states.values()
        for key, state in per_run.items()
        for task_id, map_index in [_task_key(key)]
        if state in ("failed", "upstream_failed")
    )
    if unfinished:
        problems.append(f"{len(unfinished)} import task(s) failed: {', '.join(unfinished[:20])}")
    ti.xcom_push(key="problems", value=problems)
    if problems:
        raise AirflowFailException("The import is incomplete:\n  " + "\n  ".join(problems))
    return summaries


def _task_key(key: str) -> tuple[str, str]:
    task_id, _, map_index = key.rpartition("_")
    return (task_id, map_index) if map_index.lstrip("-").isdigit() else (key, "-1")


def compose_imports(specs: Any) -> Any:
    """Add the import pipeline for resolved specs to the DAG being defined; return the report task.

    :param specs: a task's output (``XComArg``): a list of resolved import specs (``input_s3_uri``, ``output_s3_uri``,
        ``datastore_id``, ``data_access_role_arn``, ``staging_s3_uri``, ``allow_empty``, ``job_name``,
        ``client_token``, ``max_failed_files``, ``max_results``, ``include_phi``)
    """
    chunks: Any = plan_imports(specs)
    start = start_imports(chunks)
    imports = import_dicom.expand_kwargs(chunks)  # not after start: each wait begins when its own job exists
    search = search_image_sets()
    report = import_report(chunks)
    publish = publish_image_sets(chunks)
    [start, imports] >> search
    [start, imports, search] >> publish
    [start, imports, search] >> report
    return report


def search_setting(name: str, to_json: bool = False) -> str:
    """A template of one of the run's search settings (``plan_imports``' XCom ``search``)."""
    value = f"ti.xcom_pull(task_ids='plan_imports', key='{SEARCH_KEY}')['{name}']"
    return f"{{{{ {value} | tojson }}}}" if to_json else f"{{{{ {value} }}}}"


def search_image_sets() -> SearchImageSetsOperator:
    """The run's search: the image sets of every job of the run, in one task once all waits ended.

    One task rather than one per chunk: a task costs a worker seconds to start, and a run of many small chunks
    would spend more on starting searches than the service spends importing. It runs once ``start_imports`` and
    every wait are done and one of them succeeded, whatever became of the others (the image sets of the chunks
    that imported). It is skipped when a wait was skipped (a plan of no chunks maps no wait, which skips it).
    """
    # [START howto_operator_search_image_sets]
    search = SearchImageSetsOperator(
        task_id=SEARCH_TASK_ID,
        datastore_id=search_setting("datastore_id"),
        search_criteria="{{ params.search_criteria | tojson }}",
        max_results=search_setting("max_results"),
        all_pages=True,
        import_job_ids=JOBS_OF_RUN,  # each chunk's job, None where none was started
        include_phi=search_setting("include_phi"),
        phi_allow_tags=search_setting("phi_allow_tags", to_json=True),
        trigger_rule="all_done_min_one_success",
        execution_timeout=timedelta(hours=2),  # every job of the run, 20 a second
        retries=2,
        aws_conn_id=config.aws_conn_id(),
    )
    # [END howto_operator_search_image_sets]
    return search
