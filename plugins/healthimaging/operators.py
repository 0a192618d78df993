"""Operators that start HealthImaging DICOM import jobs and search image sets."""

from __future__ import annotations

import hashlib
import json
import random
import re
from datetime import UTC, datetime, timedelta
from time import sleep
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from healthimaging.base import HealthImagingAwsMixin, aws_template_fields
from healthimaging.links import HealthImagingDatastoreLink, HealthImagingImportJobLink
from healthimaging.validation import (
    check_import_parameters,
    check_parameter,
    coerce_bool,
    coerce_max_results,
    coerce_optional_count,
    member_constraints,
    parse_search_criteria,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from airflow.sdk import Context

START_RETRY_CODES = frozenset({"ServiceQuotaExceededException", "ThrottlingException"})
#: Errors a retry cannot fix: the task fails at once instead of retrying for minutes.
START_FATAL_CODES = frozenset(
    {"ValidationException", "ResourceNotFoundException", "ConflictException", "AccessDeniedException"}
)
#: Version of the client-token derivation; changing how tokens are derived must change it.
TOKEN_SCHEME = "healthimaging-token/2"
#: The most FAILED jobs one input walks past (each FAILED job moves the input to the next token).
MAX_TOKEN_CHAIN = 20
#: task_state_store key of the job a task instance started (survives retries and clears of the same run).
STATE_KEY = "healthimaging_import_job"
#: Clock difference tolerated between this machine and the service when telling a replayed token's job apart.
REPLAY_SKEW = timedelta(seconds=30)
#: Job name of a content-scoped import: this and the first 16 hex of the content digest.
CONTENT_JOB_PREFIX = "dicom-import"


def request_digest(request: Mapping[str, Any]) -> str:
    """sha256 of a StartDICOMImportJob request without its client token (canonical JSON).

    :param request: the request's members
    """
    canonical = {k: v for k, v in request.items() if k != "clientToken" and v is not None}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def task_instance_scope(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """The scope of a token that belongs to one task instance (not one try).

    :return: ``ti:`` and the task instance's ids
    """
    return "ti:" + "\x1f".join((dag_id, run_id, task_id, str(-1 if map_index is None else map_index)))


def default_client_token(request: Mapping[str, Any], scope: str) -> str:
    """Idempotency token of one request in one scope: the same request in the same scope gets the same job.

    The scope is either a task instance (:func:`task_instance_scope`), so that a retried or cleared task
    re-attaches, or the content of the input (``content:<digest>``), so that every run that imports the same
    objects into the same data store attaches to one job. Any change to the request gives another token, so
    changed parameters start a new job instead of a ConflictException.

    :param request: the request's members (``clientToken`` ignored)
    :param scope: what the token is unique to
    :return: 64 lowercase hex characters (sha256), which fit the model's ``[A-Za-z0-9._-]{1,64}``
    """
    key = "\x1f".join((TOKEN_SCHEME, scope, request_digest(request)))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def next_client_token(token: str, failed_job_id: str) -> str:
    """The token to use after the job started with ``token`` FAILED (deterministic, so retries agree).

    :param token: the token of the FAILED job
    :param failed_job_id: that job's id
    """
    return hashlib.sha256(f"{TOKEN_SCHEME}\x1fnext\x1f{token}\x1f{failed_job_id}".encode()).hexdigest()


def sanitize_job_name(name: str) -> str:
    """Fit a name to the model's jobName pattern and length (a hash suffix keeps shortened names apart).

    :param name: the wanted name
    """
    name = re.sub(r"[^A-Za-z0-9._/#-]", "-", name)
    limit = int(member_constraints("job_name")["max"])
    if len(name) > limit:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        name = f"{name[: limit - 9]}-{digest}"
    return name


def default_job_name(dag_id: str, run_id: str, map_index: int | None = None) -> str:
    """
    Readable job name from dag and run, sanitized to the model's jobName pattern and length.

    :return: ``<dag_id>.<run_id>[.<map_index>]``, shortened with a hash suffix when too long
    """
    return sanitize_job_name(
        f"{dag_id}.{run_id}" + ("" if map_index is None or map_index < 0 else f".{map_index}")
    )


def _replayed(response: Mapping[str, Any], called: datetime) -> bool:
    """Whether a StartDICOMImportJob answer names a job submitted before the call (a replayed token).

    :param response: the answer
    :param called: when the call was made (this machine's clock; ``REPLAY_SKEW`` absorbs the difference)
    """
    submitted = response.get("submittedAt")
    if isinstance(submitted, (int, float)):
        submitted = datetime.fromtimestamp(submitted, UTC)
    return isinstance(submitted, datetime) and submitted < called - REPLAY_SKEW


def _map_index(context: Context) -> int | None:
    map_index = getattr(context["ti"], "map_index", None)
    return map_index if isinstance(map_index, int) else None


class StartDICOMImportOperator(HealthImagingAwsMixin, BaseOperator):
    """
    Start a DICOM import job from S3 into a HealthImaging data store; return its job id.

    Exactly once, with Airflow's own recovery verbs: the default ``client_token`` is a hash of the request and of
    its scope, the task instance or (with ``content_digest``) the content of the input. A retried or cleared task,
    or a backfill that reprocesses the run, re-attaches to the job that is SUBMITTED, IN_PROGRESS or COMPLETED.
    After the job FAILED, the next start uses the next token of a chain (:func:`next_client_token`) and starts a
    new job. Changed parameters give another token, so they start a new job. The job started is also kept in
    Airflow's ``task_state_store``, so a retry re-attaches without calling StartDICOMImportJob again.

    Starts are paced across all runs (``[healthimaging] start_rate`` and ``max_imports_in_flight``, see
    :mod:`healthimaging.pacing`): while the data store is full or the last start is too recent, the task defers.

    Inputs are checked against the API's patterns before any AWS call; errors a retry cannot fix fail the task
    at once. ``return_value`` is the job id; XCom key ``jobStatus`` holds its status when the task started it or
    re-attached to it.

    :param datastore_id: the data store id (templated)
    :param data_access_role_arn: IAM role the service assumes to read input and write output (templated)
    :param input_s3_uri: S3 prefix of the DICOM P10 files (templated)
    :param output_s3_uri: S3 prefix for the job's output folder; must lie outside the input (templated)
    :param job_name: job name; defaults to ``<dag_id>.<run_id>[.<map_index>]``, or ``dicom-import.<digest>`` with
        ``content_digest``, shared by every DAG that imports the same objects (templated)
    :param client_token: idempotency token, used as given (no chain after a FAILED job); default derived as
        above (templated)
    :param content_digest: digest of the input's objects (keys, ETags, sizes; the planner's chunk digest): scope
        the token to the content instead of the task instance, so that any run importing the same objects
        attaches to one job (templated)
    :param input_owner_account_id: account id owning the input bucket, when not the caller's
    :param wait_for_completion: wait for the job to end in the worker
    :param waiter_delay: seconds between polls
    :param waiter_max_attempts: the most polls
    :param deferrable: wait in the triggerer (needs aiobotocore)
    :param max_failed_files: when waiting, fail a COMPLETED job with more failed files; None only warns
        (templated; a rendered string such as ``"3"`` or ``"None"`` is parsed)
    :param start_retries: retries of StartDICOMImportJob on throttling or ServiceQuotaExceeded
    :param pace_starts: keep the ``[healthimaging]`` start pace: defer while the data store is full or the last start
        is too recent (the deferral needs a triggerer; without one, pass False and rely on the start retries)
    :param confirm_status: when StartDICOMImportJob answers with a job submitted before the call (a replayed token),
        read its status with GetDICOMImportJob: the answer may be its first response, so a FAILED job would look
        SUBMITTED and be re-attached for ever
    :param aws_conn_id: the Airflow connection used for AWS credentials
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates
    :param botocore_config: botocore client configuration (dict)
    """

    template_fields: Sequence[str] = aws_template_fields(
        "datastore_id",
        "data_access_role_arn",
        "input_s3_uri",
        "output_s3_uri",
        "job_name",
        "client_token",
        "content_digest",
        "max_failed_files",
    )
    operator_extra_links = (HealthImagingDatastoreLink(), HealthImagingImportJobLink())
    ui_color = "#66c3ff"
    # Backoff of StartDICOMImportJob retries: full jitter over base * 2**attempt, capped (seconds).
    start_backoff_base: float = 2.0
    start_backoff_cap: float = 120.0

    def __init__(
        self,
        *,
        datastore_id: str,
        data_access_role_arn: str,
        input_s3_uri: str,
        output_s3_uri: str,
        job_name: str | None = None,
        client_token: str | None = None,
        content_digest: str | None = None,
        input_owner_account_id: str | None = None,
        wait_for_completion: bool = False,
        waiter_delay: int = 30,
        waiter_max_attempts: int = 120,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_failed_files: int | None = None,
        start_retries: int = 8,
        pace_starts: bool = True,
        confirm_status: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.datastore_id = datastore_id
        self.data_access_role_arn = data_access_role_arn
        self.input_s3_uri = input_s3_uri
        self.output_s3_uri = output_s3_uri
        self.job_name = job_name
        self.client_token = client_token
        self.content_digest = content_digest
        self.input_owner_account_id = input_owner_account_id
        self.wait_for_completion = wait_for_completion
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts
        self.deferrable = deferrable
        self.max_failed_files = max_failed_files
        self.start_retries = start_retries
        self.pace_starts = pace_starts
        self.confirm_status = confirm_status

    def _request(self, context: Context) -> dict[str, Any]:
        """The request without its client token, checked against the model before any AWS call."""
        ti = context["ti"]
        if self.content_digest and not re.fullmatch(r"[0-9a-f]{16,64}", str(self.content_digest)):
            raise AirflowFailException("content_digest must be 16 to 64 lowercase hex characters")
        if self.job_name:
            job_name = self.job_name
        elif self.content_digest:
            # Not the DAG's name: every DAG importing the same objects (nightly, on arrival) shares the job.
            job_name = f"{CONTENT_JOB_PREFIX}.{str(self.content_digest)[:16]}"
        else:
            job_name = default_job_name(ti.dag_id, context["run_id"], _map_index(context))
        request: dict[str, Any] = {
            "jobName": job_name,
            "dataAccessRoleArn": self.data_access_role_arn,
            "datastoreId": self.datastore_id,
            "inputS3Uri": self.input_s3_uri,
            "outputS3Uri": self.output_s3_uri,
        }
        if self.input_owner_account_id:
            request["inputOwnerAccountId"] = self.input_owner_account_id
        try:
            check_import_parameters(
                datastore_id=self.datastore_id,
                data_access_role_arn=self.data_access_role_arn,
                input_s3_uri=self.input_s3_uri,
                output_s3_uri=self.output_s3_uri,
                job_name=job_name,
                client_token=self.client_token or "0" * 64,
                input_owner_account_id=self.input_owner_account_id,
            )
            coerce_optional_count("max_failed_files", self.max_failed_files)
        except ValueError as error:
            raise AirflowFailException(str(error)) from None
        return request

    def _token(self, context: Context, request: Mapping[str, Any]) -> str:
        if self.client_token:
            return str(self.client_token)
        if self.content_digest:
            return default_client_token(request, f"content:{self.content_digest}")
        ti = context["ti"]
        scope = task_instance_scope(ti.dag_id, context["run_id"], ti.task_id, _map_index(context))
        return default_client_token(request, scope)

    def execute(self, context: Context) -> str:
        job_id, status = self.start_job(context, before_start=self._keep_pace if self.pace_starts else None)
        return self._started(context, job_id, status)

    def start_job(
        self,
        context: Context,
        *,
        state_key: str = STATE_KEY,
        before_start: Callable[[], None] | None = None,
    ) -> tuple[str, str]:
        """Start this operator's job, or re-attach to it; no waiting, no XCom.

        :param context: the running task's context (its ``task_state_store`` keeps the job across tries)
        :param state_key: the ``task_state_store`` key of this job (one per job when a task starts several)
        :param before_start: called before each StartDICOMImportJob call (to keep a pace)
        :return: the job id and its status
        """
        from healthimaging.hooks import import_job_states

        request = self._request(context)
        digest = request_digest(request)
        token = self._token(context, request)
        failure = import_job_states()["failure"]
        store = context.get("task_state_store")
        stored = store.get(state_key) if store is not None else None
        if isinstance(stored, dict) and stored.get("request") == digest and stored.get("jobId"):
            stored_job, stored_token = str(stored["jobId"]), str(stored["clientToken"])
            job = self.hook.get_import_job(self.datastore_id, stored_job)
            if job["jobStatus"] not in failure:
                self.log.info("Re-attaching to DICOM import job %s (%s)", stored_job, job["jobStatus"])
                return stored_job, str(job["jobStatus"])
            token = self._after_failed(stored_token, stored_job)

        for _ in range(MAX_TOKEN_CHAIN):
            if before_start is not None:
                before_start()
            called = datetime.now(UTC)
            response = self._start_with_retries({**request, "clientToken": token})
            status = str(response["jobStatus"])
            if self.confirm_status and status not in failure and _replayed(response, called):
                # A replayed token may answer with the job's first response (AWS documents neither): ask the job.
                # A job this call created is left to the sensor, even if it failed at once: no silent restart.
                status = str(self.hook.get_import_job(self.datastore_id, response["jobId"])["jobStatus"])
            if status not in failure:
                break
            token = self._after_failed(token, response["jobId"])
        else:
            raise AirflowFailException(
                f"{MAX_TOKEN_CHAIN} import jobs of {self.input_s3_uri} FAILED; fix the cause, then pass a new "
                "client_token"
            )
        job_id = str(response["jobId"])
        if store is not None:
            store.set(state_key, {"jobId": job_id, "clientToken": token, "request": digest})
        self.log.info(
            "DICOM import job %s is %s (job name %s)", job_id, response["jobStatus"], request["jobName"]
        )
        return job_id, status

    def _after_failed(self, token: str, job_id: str) -> str:
        if self.client_token:
            raise AirflowFailException(
                f"DICOM import job {job_id} of client_token {token} FAILED: pass a new client_token to import again"
            )
        self.log.warning("DICOM import job %s of this input FAILED earlier: starting a new job", job_id)
        return next_client_token(token, job_id)

    def _keep_pace(self) -> None:
        from healthimaging.pacing import StartPace, seconds_until_start

        wait = seconds_until_start(self.hook.conn, self.datastore_id, StartPace.from_config())
        if wait > 0:
            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

            self.log.info(
                "Data store %s is at its start pace: waiting %.0f s (deferred)", self.datastore_id, wait
            )
            self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=wait)), method_name="resume_start")

    def resume_start(self, context: Context, event: Any = None) -> str:
        """Ask the pace again after waiting for it (the deferral's ``method_name``)."""
        return self.execute(context)

    def _started(self, context: Context, job_id: str, status: str) -> str:
        context["ti"].xcom_push(key="jobStatus", value=status)
        link_args: dict[str, Any] = {
            "context": context,
            "operator": self,
            "region_name": self.hook.conn_region_name,
            "aws_partition": self.hook.conn_partition,
            "datastore_id": self.datastore_id,
        }
        HealthImagingDatastoreLink.persist(**link_args)
        HealthImagingImportJobLink.persist(**link_args, job_id=job_id)

        if self.deferrable:
            from healthimaging.triggers import DICOMImportJobTrigger

            self.defer(
                trigger=DICOMImportJobTrigger(
                    datastore_id=self.datastore_id,
                    job_id=job_id,
                    waiter_delay=self.waiter_delay,
                    waiter_max_attempts=self.waiter_max_attempts,
                    aws_conn_id=self.aws_conn_id,
                    region_name=self.region_name,
                    verify=self.verify,
                    botocore_config=self.botocore_config,
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=self.waiter_delay * self.waiter_max_attempts),
            )
        elif self.wait_for_completion:
            self._wait(job_id)
            self._check_completed(job_id)
        return job_id

    def _start_with_retries(self, request: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        for attempt in range(self.start_retries + 1):
            try:
                return self.hook.conn.start_dicom_import_job(**request)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                message = error.response.get("Error", {}).get("Message", "")
                if code in START_RETRY_CODES and attempt < self.start_retries:
                    pause = random.uniform(
                        0, min(self.start_backoff_cap, self.start_backoff_base * 2**attempt)
                    )
                    self.log.warning(
                        "StartDICOMImportJob got %s (attempt %d/%d); retrying in %.1f s",
                        code,
                        attempt + 1,
                        self.start_retries + 1,
                        pause,
                    )
                    sleep(pause)
                    continue
                failure = f"StartDICOMImportJob into data store {self.datastore_id} failed: {code}: {message}"
                if code in START_FATAL_CODES:
                    raise AirflowFailException(failure) from error
                raise AirflowException(failure) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, job_id: str) -> None:
        from airflow.providers.amazon.aws.exceptions import WaiterTerminalFailure
        from airflow.providers.amazon.aws.utils.waiter_with_logging import wait

        from healthimaging.hooks import IMPORT_JOB_WAITER
        from healthimaging.triggers import TransientTolerantWaiter

        try:
            wait(
                waiter=TransientTolerantWaiter(self.hook.get_waiter(IMPORT_JOB_WAITER)),  # type: ignore[arg-type]
                waiter_delay=self.waiter_delay,
                waiter_max_attempts=self.waiter_max_attempts,
                args={"datastoreId": self.datastore_id, "jobId": job_id},
                failure_message=f"DICOM import job {job_id} failed",
                status_message=f"Status of DICOM import job {job_id} is",
                status_args=["jobProperties.jobStatus", "jobProperties.message"],
            )
        except WaiterTerminalFailure:
            job = self.hook.get_import_job(self.datastore_id, job_id)
            raise AirflowException(self.hook.failed_job_message(job)) from None

    def _check_completed(self, job_id: str) -> None:
        from healthimaging.hooks import import_job_states
        from healthimaging.sensors import check_completed_job

        job = self.hook.get_import_job(self.datastore_id, job_id)
        if job["jobStatus"] in import_job_states()["failure"]:
            raise AirflowException(self.hook.failed_job_message(job))
        check_completed_job(job, self.hook.completed_job_result(job), self.max_failed_files, self.log)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> str:
        from airflow.providers.amazon.aws.utils import validate_execute_complete_event

        from healthimaging.hooks import import_job_states

        event = validate_execute_complete_event(event)
        job_id = event.get("job_id") or context["ti"].xcom_pull(task_ids=self.task_id, key="jobId")
        if event["status"] != "success":
            job = self.hook.get_import_job(self.datastore_id, job_id)
            if job["jobStatus"] in import_job_states()["failure"]:
                raise AirflowException(self.hook.failed_job_message(job))
            raise AirflowException(f"Waiting for DICOM import job {job_id} failed: {event.get('message')}")
        self._check_completed(job_id)
        return job_id


#: Members of ``jobProperties`` in ``importJobs`` (no names, no messages: only what a downstream task needs).
JOB_MEMBERS = ("jobStatus", "submittedAt", "endedAt", "outputS3Uri")


class ImportJobNotCompleted(AirflowException):
    """The import job whose image sets were asked for has not COMPLETED."""


def coerce_job_ids(value: list[str | None] | str | None) -> list[str] | None:
    """``import_job_ids`` as a list of checked job ids, None entries dropped; None when not given.

    :param value: a list, or a rendered JSON list (``"None"`` and ``""`` mean not given)
    :raises AirflowFailException: for anything else, or an entry that is not a job id
    """
    import json

    if isinstance(value, str):
        if value.strip() in ("", "None", "null"):
            return None
        try:
            value = json.loads(value)
        except ValueError:
            raise AirflowFailException(
                "import_job_ids must be a list of job ids (or a JSON list), got text that is not JSON"
            ) from None
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise AirflowFailException(f"import_job_ids must be a list of job ids, got {type(value).__name__}")
    job_ids = [str(job_id) for job_id in value if job_id]
    for job_id in job_ids:
        check_parameter("job_id", job_id)
    return list(dict.fromkeys(job_ids))


class SearchImageSetsOperator(HealthImagingAwsMixin, BaseOperator):
    """
    Search the image sets of a data store, or list exactly the image sets one import job created or updated.

    Pushes XCom keys ``imageSetIds``, ``firstImageSetId``, ``imageSetsMetadataSummaries`` and ``nextToken``, each
    once; ``return_value`` is not pushed (it would store the summaries a second time). Unless ``include_phi``, the
    summaries' ``DICOMTags`` follow DICOM PS3.15 Annex E's Basic Application Level Confidentiality Profile
    (:mod:`healthimaging.phi`, ``docs/phi.md``). Search criteria are never logged, and their values are redacted
    from the rendered field Airflow stores and shows.

    Built on ``airflow.sdk.BaseOperator`` with :class:`~healthimaging.base.HealthImagingAwsMixin` rather than
    the Amazon provider's internal ``AwsBaseOperator`` (whose module imports boto3 and botocore at DAG parse
    time), with the same interface.

    :param datastore_id: the data store id (templated)
    :param search_criteria: SearchImageSets ``searchCriteria``, a dict or a JSON string (templated; its values are
        redacted in the rendered field and masked in logs)
    :param max_results: page size, 1-50 (templated)
    :param import_job_id: return the image sets of this import job (from its output manifest) instead of
        searching the whole data store; with ``search_criteria``, only those the search matches, in the
        search's order (templated)
    :param import_job_ids: the same for many jobs in one task (a run's chunks): a list of job ids, None entries
        skipped (templated; a rendered JSON list is parsed). The jobs are read a few at a time; one not COMPLETED
        is left out with a warning (its wait failed, and the import report says why). Also pushes
        ``imageSetIdsByJob`` (job id -> image-set ids) and ``importJobs`` (job id -> status, ``submittedAt``,
        ``endedAt``, ``outputS3Uri`` as read); the other keys hold the image sets of every job, each once
    :param all_pages: follow ``nextToken`` to the last page (default: first page only)
    :param include_phi: keep every DICOM tag unchanged in XCom (templated; a rendered ``"True"``/``"False"`` is
        parsed strictly)
    :param phi_allow_tags: ``DICOMTags`` members kept unchanged although ``include_phi`` is False, e.g.
        ``["DICOMStudyInstanceUID", "DICOMSeriesInstanceUID"]`` (templated: a list, a JSON list or names
        separated by commas)
    :param max_image_set_lookups: in ``import_job_id`` mode, the most image sets of the manifest that the job's
        window search may miss (updated again since the job, for example) and that are read one by one with
        GetImageSet and GetImageSetMetadata; more fails the task (templated)
    :param aws_conn_id: the Airflow connection used for AWS credentials
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates
    :param botocore_config: botocore client configuration (dict)
    """

    template_fields: Sequence[str] = aws_template_fields(
        "datastore_id",
        "search_criteria",
        "max_results",
        "import_job_id",
        "import_job_ids",
        "include_phi",
        "phi_allow_tags",
        "max_image_set_lookups",
    )
    template_fields_renderers = {"search_criteria": "json"}
    operator_extra_links = (HealthImagingDatastoreLink(),)
    ui_color = "#66c3ff"
    #: Seconds added on both sides of the job's submittedAt..endedAt window (clock skew between API and store).
    job_window_skew: float = 5.0

    def __init__(
        self,
        *,
        datastore_id: str,
        search_criteria: dict[str, Any] | str | None = None,
        max_results: int | str = 50,
        import_job_id: str | None = None,
        import_job_ids: list[str | None] | str | None = None,
        all_pages: bool = False,
        include_phi: bool | str = False,
        phi_allow_tags: list[str] | str | None = None,
        max_image_set_lookups: int | str = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.datastore_id = datastore_id
        self.search_criteria = {} if search_criteria is None else search_criteria
        self.max_results = max_results
        if import_job_id is not None and import_job_ids is not None:
            raise ValueError("SearchImageSetsOperator takes import_job_id or import_job_ids, not both")
        #: Given import_job_ids, a rendered None means no jobs, never a search of the whole data store.
        self._many_jobs = import_job_ids is not None
        self.import_job_id = import_job_id
        self.import_job_ids = import_job_ids
        self.all_pages = all_pages
        self.include_phi = include_phi
        self.phi_allow_tags = phi_allow_tags
        self.max_image_set_lookups = max_image_set_lookups

    def _do_render_template_fields(
        self,
        parent: Any,
        template_fields: Iterable[str],
        context: Context,
        jinja_env: Any,
        seen_oids: set[int],
    ) -> None:
        """Render as usual; then hold ``search_criteria`` so that Airflow stores and shows it redacted."""
        from healthimaging.phi import RenderedSearchCriteria, mask_search_criteria

        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
        if parent is self and not isinstance(self.search_criteria, RenderedSearchCriteria):
            mask_search_criteria(self.search_criteria)
            self.search_criteria = RenderedSearchCriteria(self.search_criteria)

    def execute(self, context: Context) -> None:
        from healthimaging.phi import (
            mask_search_criteria,
            new_uid_key,
            parse_allow_tags,
            unwrap_search_criteria,
        )

        check_parameter("datastore_id", self.datastore_id)
        check_parameter("job_id", self.import_job_id or None, required=False)
        max_results = coerce_max_results(self.max_results)
        given = unwrap_search_criteria(self.search_criteria)
        mask_search_criteria(given)
        criteria = parse_search_criteria(given)
        include_phi = coerce_bool("include_phi", self.include_phi)
        all_pages = coerce_bool("all_pages", self.all_pages)
        allow_tags = parse_allow_tags(self.phi_allow_tags)
        max_lookups = coerce_optional_count("max_image_set_lookups", self.max_image_set_lookups)

        job_ids = (coerce_job_ids(self.import_job_ids) or []) if self._many_jobs else None
        by_job: dict[str, list[dict[str, Any]]] | None = None
        jobs: dict[str, dict[str, Any]] = {}
        next_token = None
        if job_ids is not None:
            by_job, jobs = self._import_jobs_image_sets(job_ids, criteria, max_results, max_lookups)
            summaries = list({s["imageSetId"]: s for found in by_job.values() for s in found}.values())
        elif self.import_job_id:
            summaries = self._import_job_image_sets(self.import_job_id, max_results, max_lookups)
            if criteria:
                summaries = self._matching(summaries, criteria, max_results)
        else:
            summaries, next_token = self._search(criteria, max_results, all_pages)
        HealthImagingDatastoreLink.persist(
            context=context,
            operator=self,
            region_name=self.hook.conn_region_name,
            aws_partition=self.hook.conn_partition,
            datastore_id=self.datastore_id,
        )
        uid_key = new_uid_key()
        summaries = [_for_xcom(summary, include_phi, allow_tags, uid_key) for summary in summaries]
        ids = [summary["imageSetId"] for summary in summaries]
        result = {
            "imageSetIds": ids,
            "firstImageSetId": ids[0] if ids else None,
            "imageSetsMetadataSummaries": summaries,
            "nextToken": next_token,
        }
        if by_job is not None:
            result["imageSetIdsByJob"] = {
                job: [s["imageSetId"] for s in found] for job, found in by_job.items()
            }
            result["importJobs"] = jobs
        self.log.info("Found %d image set(s) in data store %s", len(ids), self.datastore_id)
        for key, value in result.items():
            context["ti"].xcom_push(key=key, value=value)
        failed = [job for job, properties in jobs.items() if properties.get("error")]
        if failed:  # after the push: the other jobs' image sets stay announced
            raise AirflowException(
                f"The image sets of {len(failed)} of {len(jobs)} import job(s) could not be found: "
                f"{', '.join(failed[:20])} (importJobs in XCom says why); the others are in XCom"
            )

    def _import_jobs_image_sets(
        self, job_ids: list[str], criteria: dict[str, Any], max_results: int, max_lookups: int | None
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
        """The image sets of each COMPLETED job of ``job_ids`` (jobs read a few at a time, under GetDICOMImportJob's
        rate); with ``criteria``, only those one search matches. Jobs not COMPLETED are left out with a warning.

        :return: the image sets by job, and every job's status, times and folder as read (for ``importJobs``)
        """
        from healthimaging.fanout import JOB_CALLS_PER_SECOND, RateLimit, ordered_map
        from healthimaging.manifest import to_iso

        limit = RateLimit(JOB_CALLS_PER_SECOND)

        def read(job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]] | None, str | None]:
            limit.acquire()
            job = self.hook.get_import_job(self.datastore_id, job_id)
            try:
                return job, self._completed_job_image_sets(job, max_results, max_lookups), None
            except ImportJobNotCompleted:
                return job, None, None
            # this job only (its manifest, its lookups): the others still count
            except AirflowException as error:
                return job, None, str(error)[:500]

        self.hook.conn.meta  # noqa: B018 - one client of each kind for every thread, made before they start
        self.hook.s3_hook.get_conn()
        by_job: dict[str, list[dict[str, Any]]] = {}
        jobs: dict[str, dict[str, Any]] = {}
        not_completed = []
        for job_id, (job, found, error) in zip(job_ids, ordered_map(read, job_ids), strict=True):
            jobs[job_id] = to_iso({key: job.get(key) for key in JOB_MEMBERS})
            if error:
                jobs[job_id]["error"] = error
                self.log.warning("Image sets of import job %s not found: %s", job_id, error)
            elif found is None:
                not_completed.append(job_id)
            else:
                by_job[job_id] = found
        if not_completed:
            self.log.warning(
                "%d of %d import job(s) are not COMPLETED, so they have no image sets here: %s",
                len(not_completed),
                len(job_ids),
                ", ".join(not_completed[:20]),
            )
        if criteria and by_job:
            matching = {
                s["imageSetId"]
                for s in self._matching(
                    [s for found in by_job.values() for s in found], criteria, max_results
                )
            }
            by_job = {job: [s for s in found if s["imageSetId"] in matching] for job, found in by_job.items()}
        return by_job, jobs

    def _search(
        self, criteria: dict[str, Any], max_results: int, all_pages: bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        if not all_pages:
            response = self.hook.conn.search_image_sets(
                datastoreId=self.datastore_id, searchCriteria=criteria, maxResults=max_results
            )
            return list(response.get("imageSetsMetadataSummaries", [])), response.get("nextToken")
        return list(self._search_pages(criteria, max_results)), None

    def _matching(
        self, summaries: list[dict[str, Any]], criteria: dict[str, Any], max_results: int
    ) -> list[dict[str, Any]]:
        """The image sets among ``summaries`` that a search with ``criteria`` finds, in the search's order."""
        wanted = {summary["imageSetId"] for summary in summaries}
        matching: dict[str, dict[str, Any]] = {}
        for summary in self._search_pages(criteria, max_results):
            if summary["imageSetId"] in wanted:
                matching.setdefault(summary["imageSetId"], summary)
                if len(matching) == len(wanted):
                    break
        self.log.info(
            "search_criteria matched %d of the import job's %d image set(s)", len(matching), len(wanted)
        )
        return list(matching.values())

    def _search_pages(self, criteria: dict[str, Any], max_results: int) -> Iterator[dict[str, Any]]:
        """Summaries of every page of a search, read one page at a time (a caller may stop early)."""
        paginator = self.hook.conn.get_paginator("search_image_sets")
        for page in paginator.paginate(
            datastoreId=self.datastore_id,
            searchCriteria=criteria,
            PaginationConfig={"PageSize": max_results},
        ):
            yield from page.get("imageSetsMetadataSummaries", [])

    def _import_job_image_sets(
        self, job_id: str, max_results: int, max_lookups: int | None
    ) -> list[dict[str, Any]]:
        """
        Summaries of exactly the image sets in the job's output manifest, in the manifest's order.

        One paginated search by ``updatedAt`` over the job's own window (``submittedAt`` to ``endedAt``, widened
        by :attr:`job_window_skew`) finds them in bulk and stops once it has them all. Image sets it misses
        (updated again since the job, or deleted) are read one by one, at most ``max_lookups`` of them.
        """
        return self._completed_job_image_sets(
            self.hook.get_import_job(self.datastore_id, job_id), max_results, max_lookups
        )

    def _completed_job_image_sets(
        self, job: Mapping[str, Any], max_results: int, max_lookups: int | None
    ) -> list[dict[str, Any]]:
        """:meth:`_import_job_image_sets` of a job already read (``jobProperties``)."""
        from healthimaging.hooks import import_job_states

        job_id = str(job["jobId"])
        if job["jobStatus"] not in import_job_states()["success"]:
            raise ImportJobNotCompleted(f"DICOM import job {job_id} is {job['jobStatus']}, not COMPLETED")
        manifest = self.hook.get_job_output_manifest(str(job["outputS3Uri"]))
        if manifest is None:
            raise AirflowException(f"Output manifest of DICOM import job {job_id} was not found")
        wanted = list(dict.fromkeys(s["imageSetId"] for s in manifest.get("imageSetsSummary", [])))
        found: dict[str, dict[str, Any]] = {}
        if wanted and job.get("submittedAt") is not None and job.get("endedAt") is not None:
            skew = timedelta(seconds=self.job_window_skew)
            window = [{"updatedAt": job["submittedAt"] - skew}, {"updatedAt": job["endedAt"] + skew}]
            criteria = {"filters": [{"operator": "BETWEEN", "values": window}]}
            remaining = set(wanted)
            for summary in self._search_pages(criteria, max_results):
                if summary["imageSetId"] in remaining:
                    found[summary["imageSetId"]] = summary
                    remaining.discard(summary["imageSetId"])
                    if not remaining:
                        break
        missing = [image_set_id for image_set_id in wanted if image_set_id not in found]
        if missing:
            if max_lookups is not None and len(missing) > max_lookups:
                raise AirflowException(
                    f"{len(missing)} image set(s) of import job {job_id} are not in the search over the job's "
                    f"window; reading them one by one would take more than max_image_set_lookups="
                    f"{max_lookups} GetImageSet calls"
                )
            self.log.info(
                "%d image set(s) of import job %s changed since the job: reading them one by one",
                len(missing),
                job_id,
            )
            for image_set_id in missing:
                looked_up = self._summary_from_image_set(image_set_id)
                if looked_up is not None:
                    found[image_set_id] = looked_up
        return [found[image_set_id] for image_set_id in wanted if image_set_id in found]

    def _summary_from_image_set(self, image_set_id: str) -> dict[str, Any] | None:
        """
        A search summary's members for one image set, from GetImageSet and GetImageSetMetadata.

        :return: None (and a warning) when the image set no longer exists
        """
        import gzip
        import json

        from botocore.exceptions import ClientError

        from healthimaging.phi import SERVICE_MEMBERS, summary_tags_from_metadata

        try:
            image_set = self.hook.conn.get_image_set(datastoreId=self.datastore_id, imageSetId=image_set_id)
            metadata = self.hook.conn.get_image_set_metadata(
                datastoreId=self.datastore_id, imageSetId=image_set_id
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            self.log.warning("Image set %s of the import no longer exists: left out", image_set_id)
            return None
        if image_set.get("imageSetState") == "DELETED":
            self.log.warning("Image set %s of the import was deleted: left out", image_set_id)
            return None
        blob = metadata["imageSetMetadataBlob"].read()
        if metadata.get("contentEncoding") == "gzip":
            blob = gzip.decompress(blob)
        summary = {key: value for key, value in image_set.items() if key in SERVICE_MEMBERS}
        summary["version"] = int(image_set["versionId"])
        summary["DICOMTags"] = summary_tags_from_metadata(json.loads(blob))
        return {key: value for key, value in summary.items() if value is not None}


def _for_xcom(
    summary: dict[str, Any], include_phi: bool, allow_tags: frozenset[str], uid_key: bytes
) -> dict[str, Any]:
    """ISO datetimes; unless ``include_phi``, the Basic Profile of :mod:`healthimaging.phi` applied."""
    from healthimaging.manifest import to_iso
    from healthimaging.phi import deidentify_summary

    summary = to_iso(summary)
    if include_phi:
        return summary
    return deidentify_summary(summary, allow_tags=allow_tags, uid_key=uid_key)
