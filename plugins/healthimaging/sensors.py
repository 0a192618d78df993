"""Sensor that waits for a HealthImaging DICOM import job and checks its output manifest."""

from __future__ import annotations

import random
from datetime import timedelta
from time import sleep
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseSensorOperator, PokeReturnValue, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowRescheduleException
from airflow.sdk.timezone import utcnow

from healthimaging.base import HealthImagingAwsMixin, aws_template_fields
from healthimaging.manifest import MANIFEST_NAME, join_s3
from healthimaging.validation import check_parameter, coerce_optional_count

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from airflow.sdk import Context

    from healthimaging.started_jobs import StartedBy


#: The longest wait between two looks at a starting task that has not begun its try (seconds).
MAX_RESCHEDULE_DELAY = 300.0
#: Lookups after which a deferrable sensor waits in the triggerer: the starting task runs, or an executor holds it.
#: Otherwise (scheduled, up for retry) it reschedules: a trigger waiting for a task that only this process could
#: run next would never end under ``dag.test()``, which runs triggers inline, one at a time.
WAIT_IN_TRIGGERER = frozenset({"waiting", "queued"})


class DICOMImportJobSensor(HealthImagingAwsMixin, BaseSensorOperator):
    """
    Wait for a DICOM import job to end; fail on FAILED, succeed on COMPLETED after reading its manifest.

    Throttling, 5xx answers and dropped connections are logged and waited out in every mode;
    ``timeout`` holds in every mode. The return value (XCom) is a dict with ``jobId``, ``jobStatus``,
    ``endedAt``, ``outputS3Uri``, the manifest counts and ``failedFiles`` (input file keys and exception
    types of the first failed files).

    Built on ``airflow.sdk.BaseSensorOperator`` with :class:`~healthimaging.base.HealthImagingAwsMixin` rather
    than the Amazon provider's internal ``AwsBaseSensor``, whose module imports boto3 and botocore: a DAG file
    using this sensor would pay for them at every parse. The interface (AWS arguments, ``hook``, templated AWS
    fields) is the same; boto3 is imported when the task runs.

    :param datastore_id: the data store id (templated)
    :param job_id: the import job id (templated); may be left out with ``started_by``
    :param started_by: the id of a task of the same run that starts the job and pushes an XCom ``jobs`` after
        every start: a list of job ids (None for one not started yet) whose entry at this sensor's map index is
        its job. The sensor begins while that task still runs (it waits in the triggerer for its entry; deferrable,
        it goes to the triggerer at once also when the job is already started, without ``first_poke_jitter``) and
        fails when that task ended without starting it. This is how the import pipeline's waits start as soon as their
        own job exists rather than after its last start (:mod:`healthimaging.started_jobs`)
    :param input_s3_uri: the job's input prefix, when known: for the map label (``{{ task.input_s3_uri }}``) and
        the log; not used to find the job (templated)
    :param deferrable: wait in the triggerer instead of a worker slot (default: ``[operators]
        default_deferrable``, as the Amazon provider's sensors)
    :param max_failed_files: fail a COMPLETED job with more failed files than this; None only warns
        (templated; a rendered string such as ``"3"`` or ``"None"`` is parsed)
    :param first_poke_jitter: wait up to this many seconds (random) before the first check, to spread
        many sensors started together
    :param poll_jitter: deferrable mode: polls in the triggerer come ``poke_interval`` apart on average, each
        moved by a random amount within this many seconds, so that many deferred sensors do not poll in bursts;
        None means a tenth of ``poke_interval``
    :param end_from_trigger: deferrable mode: when the job COMPLETED within ``max_failed_files``, end the task
        in the triggerer (it reads the manifest and pushes the same XCom) instead of resuming it on a worker,
        which saves a worker start and seconds of latency. None (default) does so unless listener plugins
        are installed (Airflow does not call listeners for tasks ended from the triggerer); True always
        (Airflow then refuses the DAG where listeners are installed); False never. Airflow 3.3.2 stores the
        XCom of a task ended in the triggerer JSON-encoded: the REST API shows the dict, but ``xcom_pull`` in a
        task returns its JSON text (``json.loads`` it, or pass False)
    :param aws_conn_id: the Airflow connection used for AWS credentials
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates
    :param botocore_config: botocore client configuration (dict)
    """

    template_fields: Sequence[str] = aws_template_fields(
        "datastore_id", "job_id", "max_failed_files", "input_s3_uri"
    )
    ui_color = "#66c3ff"
    #: Set by :meth:`execute` in deferrable mode; a poke() called on its own never defers.
    _defer_while_running = False

    def __init__(
        self,
        *,
        datastore_id: str,
        job_id: str | None = None,
        started_by: str | None = None,
        input_s3_uri: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_failed_files: int | None = None,
        first_poke_jitter: float = 0.0,
        poll_jitter: float | None = None,
        end_from_trigger: bool | None = None,
        poke_interval: float = 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        if job_id is None and not started_by:
            raise ValueError(
                "DICOMImportJobSensor needs job_id, or started_by naming the task that starts the job"
            )
        self.datastore_id = datastore_id
        self.job_id = job_id
        self.started_by = started_by
        self.input_s3_uri = input_s3_uri
        self.deferrable = deferrable
        self.max_failed_files = max_failed_files
        self.first_poke_jitter = first_poke_jitter
        self.poll_jitter = poll_jitter
        self.end_from_trigger = end_from_trigger
        # Re-reads of a lagging manifest inside one poke: (attempts, seconds between them).
        self.manifest_attempts, self.manifest_delay = 3, 2.0

    def execute(self, context: Context) -> Any:
        check_parameter("datastore_id", self.datastore_id)
        coerce_optional_count("max_failed_files", self.max_failed_files)
        if not self.job_id and self.started_by:
            self.job_id = self._started_job(context)
            if self.deferrable:
                check_parameter("job_id", self.job_id)
                # Straight to the triggerer: a job just started is running, and a first check here would cost
                # this worker a client and a manifest read (the pipeline's many waits start beside their jobs).
                self._defer()
        check_parameter("job_id", self.job_id)
        self._jitter_first_poke(context)
        # Deferrable too, the first check runs inside the base sensor's handling (soft_fail, never_fail,
        # silent_fail, timeout): from there, poke() defers while the job is still running.
        self._defer_while_running = self.deferrable
        return super().execute(context=context)

    def _started_job(self, context: Context) -> str:
        """The job ``started_by`` started for this map index; defers (or reschedules) while it is still to come."""
        decision, job_id = self._look_up_start(context)
        if decision == "found" and job_id:
            return job_id
        if decision in WAIT_IN_TRIGGERER and self.deferrable:
            self._defer(started_by=self._start_source(context).as_dict())
        self._not_started_yet(context, decision)

    def _start_source(self, context: Context, replaces: str | None = None) -> StartedBy:
        from healthimaging.started_jobs import StartedBy

        ti = context["ti"]
        if ti.map_index is None or ti.map_index < 0:
            raise ValueError(
                f"started_by needs a mapped sensor (its map index picks the job), not {ti.task_id}"
            )
        clear_number = int(getattr(context.get("dag_run"), "clear_number", 0) or 0)
        return StartedBy(ti.dag_id, ti.run_id, str(self.started_by), ti.map_index, clear_number, replaces)

    def _look_up_start(self, context: Context, replaces: str | None = None) -> tuple[str, str | None]:
        from healthimaging.started_jobs import find_started_job

        return find_started_job(self._start_source(context, replaces))

    def _not_started_yet(self, context: Context, decision: str) -> NoReturn:
        """Fail once the starting task ended without the job; else reschedule, backing off while it waits."""
        if decision == "not_started":
            raise AirflowFailException(
                f"{self.started_by} ended without starting the import job this task waits for"
                f"{f' ({self.input_s3_uri})' if self.input_s3_uri else ''}: its log and the import report say why"
            )
        # Backfills queue runs whose start task waits its turn for many minutes: ask less often the longer it takes.
        first = context["ti"].get_first_reschedule_date(context)
        waited = (utcnow() - first).total_seconds() if first else 0.0
        delay = min(MAX_RESCHEDULE_DELAY, max(1.0, self.poke_interval, waited / 4))
        self.log.info(
            "Waiting for %s to start the import job (%s): again in %.0f s", self.started_by, decision, delay
        )
        raise AirflowRescheduleException(utcnow() + timedelta(seconds=delay))

    def _follow_replacement(self, context: Context) -> bool:
        """After this task's job FAILED: follow the job ``started_by`` starts in its place, if it may.

        :return: True when ``job_id`` now names the new job; False when none will come (the FAILED job stands)
        :raises TaskDeferred: (deferrable) to wait for the new job in the triggerer
        :raises AirflowRescheduleException: while the starting task has not begun its next try
        """
        if not self.started_by:
            return False
        failed = str(self.job_id)
        decision, job_id = self._look_up_start(context, replaces=failed)
        if decision == "found" and job_id:
            self.log.info("Import job %s FAILED; %s started %s in its place", failed, self.started_by, job_id)
            self.job_id = job_id
            return True
        if decision == "not_started":
            return False
        self.log.info(
            "Import job %s FAILED; waiting for %s, which may start another", failed, self.started_by
        )
        if decision in WAIT_IN_TRIGGERER and self.deferrable:
            self._defer(started_by=self._start_source(context, replaces=failed).as_dict())
        self._not_started_yet(context, decision)

    def _defer(self, started_by: dict[str, Any] | None = None) -> NoReturn:
        from healthimaging.triggers import DICOMImportJobTrigger

        self.defer(
            trigger=DICOMImportJobTrigger(
                datastore_id=self.datastore_id,
                job_id=None if started_by else self.job_id,
                started_by=started_by,
                waiter_delay=max(1, int(self.poke_interval)),
                waiter_max_attempts=int(self.timeout // max(1, int(self.poke_interval))) + 2,
                poll_jitter=self.poll_jitter,
                end_from_trigger=self._ends_from_trigger(),
                max_failed_files=coerce_optional_count("max_failed_files", self.max_failed_files),
                manifest_attempts=self.manifest_attempts,
                manifest_delay=self.manifest_delay,
                do_xcom_push=self.do_xcom_push,
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
                verify=self.verify,
                botocore_config=self.botocore_config,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def _ends_from_trigger(self) -> bool:
        if self.end_from_trigger is not None:
            return bool(self.end_from_trigger)
        from airflow.sdk.listener import get_listener_manager

        return not get_listener_manager().has_listeners

    def _jitter_first_poke(self, context: Context) -> None:
        if self.first_poke_jitter <= 0:
            return
        if self.reschedule and context["ti"].get_first_reschedule_date(context) is not None:
            return
        sleep(random.uniform(0, self.first_poke_jitter))

    def poke(self, context: Context) -> bool | PokeReturnValue:
        from healthimaging.hooks import import_job_states
        from healthimaging.triggers import is_transient_error

        try:
            job = self.hook.get_import_job(self.datastore_id, str(self.job_id))
        except Exception as error:
            if not is_transient_error(error):
                raise
            self.log.warning("Transient error checking import job %s: %s", self.job_id, error)
            return self._not_done()
        status = job["jobStatus"]
        self.log.info("DICOM import job %s is %s", self.job_id, status)
        states = import_job_states()
        if status in states["failure"]:
            if self._follow_replacement(context):
                return self._not_done()
            # A FAILED job stays FAILED: retrying the sensor would only poll it again.
            raise AirflowFailException(self.hook.failed_job_message(job))
        if status not in states["success"]:
            return self._not_done()
        result = self.hook.completed_job_result(
            job, attempts=self.manifest_attempts, delay=self.manifest_delay
        )
        if result is None:
            self.log.info("Import job %s is %s but its manifest is not there yet", self.job_id, status)
            return self._not_done()
        return PokeReturnValue(
            is_done=True, xcom_value=check_completed_job(job, result, self.max_failed_files, self.log)
        )

    def _not_done(self) -> bool:
        if self._defer_while_running:
            self._defer()
        return False

    def execute_complete(self, context: Context, event: dict[str, Any] | str | None = None) -> dict[str, Any]:
        from airflow.providers.amazon.aws.utils import validate_execute_complete_event

        from healthimaging.hooks import import_job_states

        # A task-ending trigger event resumes the task only under ``dag.test()``, with its state as the payload.
        event = {"status": event} if isinstance(event, str) else validate_execute_complete_event(event)
        if event["status"] == "not_started":
            self._not_started_yet(context, event["status"])
        if not self.job_id and self.started_by:
            self.job_id = event.get("job_id") or self._started_job(context)
        check_parameter("job_id", self.job_id)
        job = self.hook.get_import_job(self.datastore_id, str(self.job_id))
        if event["status"] != "success":
            if job["jobStatus"] in import_job_states()["failure"]:
                if self._follow_replacement(context):
                    self._defer()
                raise AirflowFailException(self.hook.failed_job_message(job))
            raise AirflowException(
                f"Waiting for DICOM import job {self.job_id} failed: {event.get('message')}"
            )
        result = self.hook.completed_job_result(
            job, attempts=self.manifest_attempts * 3, delay=self.manifest_delay
        )
        return check_completed_job(job, result, self.max_failed_files, self.log)


def check_failed_files(result: Mapping[str, Any], max_failed_files: int | str | None) -> str | None:
    """
    Apply the failed-files policy to a COMPLETED job.

    :param result: the output of :meth:`HealthImagingHook.completed_job_result`
    :param max_failed_files: the most failed files tolerated, or None to only warn (a templated string is parsed)
    :return: a warning to log when files failed but the policy allows it, else None
    :raises AirflowFailException: when more files failed than ``max_failed_files`` (a retry cannot change a finished job)
    """
    limit = coerce_optional_count("max_failed_files", max_failed_files)
    failed = int(result["numberOfFilesWithCustomerError"]) + int(result["numberOfFilesWithServerError"])
    if not failed:
        return None
    keys = ", ".join(f["inputFile"] for f in result.get("failedFiles", []))
    text = f"DICOM import job {result['jobId']} COMPLETED with {failed} failed file(s) (first: {keys})"
    if limit is not None and failed > limit:
        raise AirflowFailException(f"{text}; more than max_failed_files={limit}")
    return text


def check_completed_job(
    job: Mapping[str, Any], result: dict[str, Any] | None, max_failed_files: int | str | None, log: Any
) -> dict[str, Any]:
    """
    The rule for a COMPLETED job, shared by the sensor and ``StartDICOMImportOperator(wait_for_completion=True)``.

    A manifest that never appeared fails (its failed files cannot be checked); otherwise
    :func:`check_failed_files` decides, and a tolerated number of failed files is logged as a warning.

    :param job: ``jobProperties`` of the job
    :param result: the output of :meth:`HealthImagingHook.completed_job_result`, None when the manifest is missing
    :param max_failed_files: the most failed files tolerated, or None to only warn (a templated string is parsed)
    :param log: the task's logger, for the warning
    :return: ``result``
    :raises AirflowException: when the manifest is missing or more files failed than ``max_failed_files``
    """
    if result is None:
        raise AirflowException(
            f"DICOM import job {job['jobId']} is {job['jobStatus']} but "
            f"{join_s3(str(job['outputS3Uri']), MANIFEST_NAME)} was not found, so its failed "
            "files cannot be checked against max_failed_files"
        )
    warning = check_failed_files(result, max_failed_files)
    if warning:
        log.warning("%s", warning)
    return result
