"""Operators that start HealthImaging DICOM import jobs and search image sets."""

from __future__ import annotations

import hashlib
import random
import re
from datetime import UTC, datetime, timedelta
from time import sleep
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowException

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
    split_s3_uri,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import Context

# Per-job quotas of StartDICOMImportJob (AWS general reference, HealthImaging quotas).
MAX_FILES_PER_JOB = 5_000
MAX_BYTES_PER_JOB = 10 * 1024**3
MAX_FOLDERS_PER_JOB = 10_000
START_RETRY_CODES = frozenset({"ServiceQuotaExceededException", "ThrottlingException"})
PHI_TAGS = ("DICOMPatientName", "DICOMPatientId", "DICOMPatientBirthDate", "DICOMAccessionNumber")
PHI_MASK = "***"


def default_client_token(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """
    Idempotency token for one task instance (not one try), so a retried or cleared task re-attaches.

    :return: 64 lowercase hex characters (sha256), which fit the model's ``[A-Za-z0-9._-]{1,64}``
    """
    key = "\x1f".join((dag_id, run_id, task_id, str(-1 if map_index is None else map_index)))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def default_job_name(dag_id: str, run_id: str, map_index: int | None = None) -> str:
    """
    Readable job name from dag and run, sanitized to the model's jobName pattern and length.

    :return: ``<dag_id>.<run_id>[.<map_index>]``, shortened with a hash suffix when too long
    """
    name = f"{dag_id}.{run_id}" + ("" if map_index is None or map_index < 0 else f".{map_index}")
    name = re.sub(r"[^A-Za-z0-9._/#-]", "-", name)
    limit = int(member_constraints("job_name")["max"])
    if len(name) > limit:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        name = f"{name[: limit - 9]}-{digest}"
    return name


def _map_index(context: Context) -> int | None:
    map_index = getattr(context["ti"], "map_index", None)
    return map_index if isinstance(map_index, int) else None


class StartDICOMImportOperator(HealthImagingAwsMixin, BaseOperator):
    """
    Start a DICOM import job from S3 into a HealthImaging data store; return its job id.

    The default ``client_token`` is derived from (dag_id, run_id, task_id, map_index), so a retried or
    cleared task gets the job it already started instead of importing twice. Inputs are checked against
    the API's patterns before any AWS call. Pushes XCom keys ``jobId``, ``jobStatus``, ``submittedAt``
    and ``datastoreId``; ``return_value`` is the job id.

    Built on ``airflow.sdk.BaseOperator`` with :class:`~healthimaging.base.HealthImagingAwsMixin` rather than
    the Amazon provider's internal ``AwsBaseOperator``, whose module imports boto3 and botocore: a DAG file
    using this operator would pay for them at every parse. The interface (AWS arguments, ``hook``,
    templated AWS fields) is the same; boto3 is imported when the task runs.

    :param datastore_id: the data store id (templated)
    :param data_access_role_arn: IAM role the service assumes to read input and write output (templated)
    :param input_s3_uri: S3 prefix of the DICOM P10 files (templated)
    :param output_s3_uri: S3 prefix for the job's output folder; must lie outside the input (templated)
    :param job_name: job name; defaults to ``<dag_id>.<run_id>`` sanitized (templated)
    :param client_token: idempotency token; defaults to a hash of the task instance (templated)
    :param input_owner_account_id: account id owning the input bucket, when not the caller's
    :param wait_for_completion: wait for the job to end in the worker
    :param waiter_delay: seconds between polls
    :param waiter_max_attempts: the most polls
    :param deferrable: wait in the triggerer (needs aiobotocore)
    :param max_failed_files: when waiting, fail a COMPLETED job with more failed files; None only warns
        (templated; a rendered string such as ``"3"`` or ``"None"`` is parsed)
    :param check_input_quota: count objects and bytes under the input prefix first and refuse a prefix
        above the per-job quotas (5,000 files, 10 GB)
    :param start_retries: retries of StartDICOMImportJob on throttling or ServiceQuotaExceeded
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
        input_owner_account_id: str | None = None,
        wait_for_completion: bool = False,
        waiter_delay: int = 30,
        waiter_max_attempts: int = 120,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_failed_files: int | None = None,
        check_input_quota: bool = False,
        start_retries: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.datastore_id = datastore_id
        self.data_access_role_arn = data_access_role_arn
        self.input_s3_uri = input_s3_uri
        self.output_s3_uri = output_s3_uri
        self.job_name = job_name
        self.client_token = client_token
        self.input_owner_account_id = input_owner_account_id
        self.wait_for_completion = wait_for_completion
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts
        self.deferrable = deferrable
        self.max_failed_files = max_failed_files
        self.check_input_quota = check_input_quota
        self.start_retries = start_retries

    def execute(self, context: Context) -> str:
        from healthimaging.manifest import to_iso

        ti = context["ti"]
        map_index = _map_index(context)
        client_token = self.client_token or default_client_token(
            ti.dag_id, context["run_id"], ti.task_id, map_index
        )
        job_name = self.job_name or default_job_name(ti.dag_id, context["run_id"], map_index)
        check_import_parameters(
            datastore_id=self.datastore_id,
            data_access_role_arn=self.data_access_role_arn,
            input_s3_uri=self.input_s3_uri,
            output_s3_uri=self.output_s3_uri,
            job_name=job_name,
            client_token=client_token,
            input_owner_account_id=self.input_owner_account_id,
        )
        coerce_optional_count("max_failed_files", self.max_failed_files)
        if self.check_input_quota:
            self._check_input_quota()

        request: dict[str, Any] = {
            "jobName": job_name,
            "dataAccessRoleArn": self.data_access_role_arn,
            "clientToken": client_token,
            "datastoreId": self.datastore_id,
            "inputS3Uri": self.input_s3_uri,
            "outputS3Uri": self.output_s3_uri,
        }
        if self.input_owner_account_id:
            request["inputOwnerAccountId"] = self.input_owner_account_id
        response = self._start_with_retries(request)
        job_id = response["jobId"]
        self.log.info("DICOM import job %s is %s (job name %s)", job_id, response["jobStatus"], job_name)

        ti.xcom_push(key="jobId", value=job_id)
        ti.xcom_push(key="jobStatus", value=response["jobStatus"])
        ti.xcom_push(key="submittedAt", value=to_iso(response.get("submittedAt")))
        ti.xcom_push(key="datastoreId", value=self.datastore_id)
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
                raise AirflowException(
                    f"StartDICOMImportJob into data store {self.datastore_id} failed: {code}: {message}"
                ) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_input_quota(self) -> None:
        bucket, prefix = split_s3_uri(self.input_s3_uri)
        files = size = 0
        folders: set[str] = set()
        children: dict[str, list[int]] = {}
        paginator = self.hook.s3_hook.get_conn().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                files += 1
                size += int(item.get("Size", 0))
                relative = item["Key"][len(prefix) :]
                folders.add(relative.rpartition("/")[0])
                child = relative.split("/", 1)[0] + ("/" if "/" in relative else "")
                counts = children.setdefault(child, [0, 0])
                counts[0] += 1
                counts[1] += int(item.get("Size", 0))
        self.log.info("Input %s holds %d objects, %d bytes", self.input_s3_uri, files, size)
        if files <= MAX_FILES_PER_JOB and size <= MAX_BYTES_PER_JOB and len(folders) <= MAX_FOLDERS_PER_JOB:
            return
        biggest = sorted(children.items(), key=lambda kv: kv[1][0], reverse=True)[:20]
        listing = "\n".join(
            f"  s3://{bucket}/{prefix}{name}: {n} files, {b} bytes" for name, (n, b) in biggest
        )
        raise AirflowException(
            f"input_s3_uri {self.input_s3_uri} holds {files} files, {size} bytes in {len(folders)} folders; "
            f"one import job takes at most {MAX_FILES_PER_JOB} files, {MAX_BYTES_PER_JOB} bytes and "
            f"{MAX_FOLDERS_PER_JOB} folders. Split it into several jobs (e.g. one per sub-prefix, with "
            f"StartDICOMImportOperator.partial(...).expand(input_s3_uri=[...])). Largest sub-prefixes:\n{listing}"
        )

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


class SearchImageSetsOperator(HealthImagingAwsMixin, BaseOperator):
    """
    Search the image sets of a data store, or list exactly the image sets one import job created or updated.

    Returns (and pushes as XCom keys) ``imageSetIds``, ``firstImageSetId``, ``imageSetsMetadataSummaries``
    and ``nextToken``. Patient identifiers in ``DICOMTags`` are masked unless ``include_phi`` is True;
    search criteria are never logged.

    Built on ``airflow.sdk.BaseOperator`` with :class:`~healthimaging.base.HealthImagingAwsMixin` rather than
    the Amazon provider's internal ``AwsBaseOperator`` (whose module imports boto3 and botocore at DAG parse
    time), with the same interface.

    :param datastore_id: the data store id (templated)
    :param search_criteria: SearchImageSets ``searchCriteria``, a dict or a JSON string (templated)
    :param max_results: page size, 1-50 (templated)
    :param import_job_id: return the image sets of this import job (from its output manifest) instead of
        searching the whole data store; with ``search_criteria``, only those the search matches, in the
        search's order (templated)
    :param all_pages: follow ``nextToken`` to the last page (default: first page only)
    :param include_phi: keep patient name, id, birth date and accession number in XCom (templated; a
        rendered ``"True"``/``"False"`` is parsed strictly)
    :param aws_conn_id: the Airflow connection used for AWS credentials
    :param region_name: AWS region name; if None, the connection's or boto3's default
    :param verify: whether to verify SSL certificates
    :param botocore_config: botocore client configuration (dict)
    """

    template_fields: Sequence[str] = aws_template_fields(
        "datastore_id", "search_criteria", "max_results", "import_job_id", "include_phi"
    )
    template_fields_renderers = {"search_criteria": "json"}
    operator_extra_links = (HealthImagingDatastoreLink(),)
    ui_color = "#66c3ff"

    def __init__(
        self,
        *,
        datastore_id: str,
        search_criteria: dict[str, Any] | str | None = None,
        max_results: int | str = 50,
        import_job_id: str | None = None,
        all_pages: bool = False,
        include_phi: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.datastore_id = datastore_id
        self.search_criteria = {} if search_criteria is None else search_criteria
        self.max_results = max_results
        self.import_job_id = import_job_id
        self.all_pages = all_pages
        self.include_phi = include_phi

    def execute(self, context: Context) -> dict[str, Any]:
        check_parameter("datastore_id", self.datastore_id)
        check_parameter("job_id", self.import_job_id or None, required=False)
        max_results = coerce_max_results(self.max_results)
        criteria = parse_search_criteria(self.search_criteria)
        include_phi = coerce_bool("include_phi", self.include_phi)
        all_pages = coerce_bool("all_pages", self.all_pages)

        if self.import_job_id:
            summaries, next_token = self._import_job_image_sets(self.import_job_id, max_results), None
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
        summaries = [_for_xcom(summary, include_phi) for summary in summaries]
        ids = [summary["imageSetId"] for summary in summaries]
        result = {
            "imageSetIds": ids,
            "firstImageSetId": ids[0] if ids else None,
            "imageSetsMetadataSummaries": summaries,
            "nextToken": next_token,
        }
        self.log.info("Found %d image set(s) in data store %s", len(ids), self.datastore_id)
        for key, value in result.items():
            context["ti"].xcom_push(key=key, value=value)
        return result

    def _search(
        self, criteria: dict[str, Any], max_results: int, all_pages: bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        if not all_pages:
            response = self.hook.conn.search_image_sets(
                datastoreId=self.datastore_id, searchCriteria=criteria, maxResults=max_results
            )
            return list(response.get("imageSetsMetadataSummaries", [])), response.get("nextToken")
        return self._search_all(criteria, max_results), None

    def _matching(
        self, summaries: list[dict[str, Any]], criteria: dict[str, Any], max_results: int
    ) -> list[dict[str, Any]]:
        """The image sets among ``summaries`` that a search with ``criteria`` finds, in the search's order."""
        wanted = {summary["imageSetId"] for summary in summaries}
        matching: dict[str, dict[str, Any]] = {}
        for summary in self._search_all(criteria, max_results):
            if summary["imageSetId"] in wanted:
                matching.setdefault(summary["imageSetId"], summary)
        self.log.info(
            "search_criteria matched %d of the import job's %d image set(s)", len(matching), len(wanted)
        )
        return list(matching.values())

    def _search_all(self, criteria: dict[str, Any], max_results: int) -> list[dict[str, Any]]:
        paginator = self.hook.conn.get_paginator("search_image_sets")
        summaries: list[dict[str, Any]] = []
        for page in paginator.paginate(
            datastoreId=self.datastore_id,
            searchCriteria=criteria,
            PaginationConfig={"PageSize": max_results},
        ):
            summaries.extend(page.get("imageSetsMetadataSummaries", []))
        return summaries

    def _import_job_image_sets(self, job_id: str, max_results: int) -> list[dict[str, Any]]:
        """
        Summaries of exactly the image sets in the job's output manifest.

        One paginated search by ``updatedAt`` between the job's submission and end finds them in bulk;
        image sets updated again since then are found by widening the window to now; any still
        missing (e.g. deleted since) fall back to GetImageSet, which carries no DICOM tags.
        """
        from healthimaging.hooks import import_job_states

        job = self.hook.get_import_job(self.datastore_id, job_id)
        if job["jobStatus"] not in import_job_states()["success"]:
            raise AirflowException(f"DICOM import job {job_id} is {job['jobStatus']}, not COMPLETED")
        manifest = self.hook.get_job_output_manifest(str(job["outputS3Uri"]))
        if manifest is None:
            raise AirflowException(f"Output manifest of DICOM import job {job_id} was not found")
        wanted = list(dict.fromkeys(s["imageSetId"] for s in manifest.get("imageSetsSummary", [])))
        found: dict[str, dict[str, Any]] = {}
        submitted_at = job.get("submittedAt")
        if wanted and submitted_at is not None:
            lower = submitted_at - timedelta(seconds=1)
            uppers = [job["endedAt"] + timedelta(seconds=1)] if job.get("endedAt") else []
            uppers.append(datetime.now(UTC) + timedelta(minutes=1))
            for upper in uppers:
                criteria = {
                    "filters": [
                        {"operator": "BETWEEN", "values": [{"updatedAt": lower}, {"updatedAt": upper}]}
                    ]
                }
                for summary in self._search_all(criteria, max_results):
                    if summary["imageSetId"] in wanted:
                        found.setdefault(summary["imageSetId"], summary)
                if len(found) == len(wanted):
                    break
        for image_set_id in wanted:
            if image_set_id not in found:
                found[image_set_id] = self._summary_from_image_set(image_set_id)
        return [found[image_set_id] for image_set_id in wanted]

    def _summary_from_image_set(self, image_set_id: str) -> dict[str, Any]:
        image_set = self.hook.conn.get_image_set(datastoreId=self.datastore_id, imageSetId=image_set_id)
        summary = {
            "imageSetId": image_set_id,
            "version": int(image_set["versionId"]),
            "createdAt": image_set.get("createdAt"),
            "updatedAt": image_set.get("updatedAt"),
            "isPrimary": image_set.get("isPrimary"),
        }
        return {key: value for key, value in summary.items() if value is not None}


def _for_xcom(summary: dict[str, Any], include_phi: bool) -> dict[str, Any]:
    """ISO datetimes; patient identifiers in ``DICOMTags`` masked unless ``include_phi``."""
    from healthimaging.manifest import to_iso

    summary = to_iso(summary)
    tags = summary.get("DICOMTags")
    if not include_phi and isinstance(tags, dict):
        summary["DICOMTags"] = {
            key: (PHI_MASK if key in PHI_TAGS and value not in (None, "") else value)
            for key, value in tags.items()
        }
    return summary
