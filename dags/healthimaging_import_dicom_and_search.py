"""
# Import DICOM from S3 into AWS HealthImaging, then find the image sets it became

Mirrors the Arazzo workflow `import-dicom-and-search` (Amazon HealthImaging *Import DICOM and Search*)
step for step, once per S3 prefix:

| Workflow step | Operation | Task (inside the mapped group `import_dicom`) |
|---|---|---|
| `startImportJob` | `StartDICOMImportJob` | `start_import_job` (`StartDICOMImportOperator`, `wait_for_completion=False`) |
| `pollImportJob` | `GetDICOMImportJob` until `COMPLETED`/`FAILED` | `wait_for_import_job` (`DICOMImportJobSensor`, deferrable: polls in the triggerer) |
| `searchImageSets` | `SearchImageSets` | `search_image_sets` (`SearchImageSetsOperator` with `import_job_id`) |

Beyond the workflow: the search is narrowed to **exactly this import's image sets** (`import_job_id` mode, read
from the job's output manifest) instead of the first page of the whole data store, and `publish_image_sets` emits
an event on the asset `healthimaging_image_sets` (extra: `datastoreId`, `jobId`, `imageSetIds`; ids only, no PHI)
so inference, QA or de-identification DAGs can be scheduled on new image sets
(see `healthimaging_new_image_sets_example`).

## Workflow outputs in XCom (per map index of `import_dicom`)

| Workflow output | Task | XCom key |
|---|---|---|
| `jobId` | `import_dicom.start_import_job` | `jobId` (also `return_value`) |
| `jobStatus` | `import_dicom.wait_for_import_job` | `return_value` → `jobStatus` (final: `COMPLETED`) |
| `firstImageSetId` | `import_dicom.search_image_sets` | `firstImageSetId` |
| `imageSetsMetadataSummaries` | `import_dicom.search_image_sets` | `imageSetsMetadataSummaries` |
| (ours) ids of exactly this import | `import_dicom.search_image_sets` | `imageSetIds` |

## Where the inputs come from

`resolve_imports` turns the run's params, Airflow Variables and data interval into one import spec per prefix.
Each value is checked against the same pattern as the API, wherever it came from.

| Workflow input | Param | Else Airflow Variable (or env `AIRFLOW_VAR_<NAME>`) |
|---|---|---|
| `datastoreId` | `datastore_id` | `healthimaging_datastore_id` |
| `dataAccessRoleArn` | `data_access_role_arn` | `healthimaging_data_access_role_arn` |
| `inputS3Uri` | `input_s3_uri` and/or `input_s3_uris` | `healthimaging_input_s3_uri_template`, rendered over the run's data interval |
| `outputS3Uri` | `output_s3_uri` | `healthimaging_output_s3_uri` |
| `jobName` | `job_name` | none (optional) |
| `clientToken` | `client_token` (single prefix only) | none: a hash of dag_id/run_id/task_id/map_index, so a retry or a cleared task re-attaches to the same job |

- **Nightly** (`0 2 * * *` UTC, data interval = the previous day): no input needed. The prefix is the Variable
  `healthimaging_input_s3_uri_template` rendered with Jinja over the run's context, for example
  `s3://my-dicom-bucket/incoming/{{ data_interval_start.strftime('%Y/%m/%d') }}/`.
- **Backfill**: `airflow backfill create --dag-id healthimaging_import_dicom_and_search --from-date 2025-01-01
  --to-date 2025-03-31` creates one run per day, each importing its own day's prefix exactly once.
- **Manual**: name the prefix(es) in `input_s3_uri` / `input_s3_uris` (one import per prefix). A manual run without a
  logical date has no data interval, so without a prefix param it is refused.

## Bound on concurrency (quota: 100 concurrent imports per data store; StartDICOMImportJob: 1 per second, burst 2)

- `start_import_job` has `max_active_tis_per_dag=1`: one StartDICOMImportJob call at a time across all runs
  (nightly, backfill, manual); each task instance takes longer than a second to start, and botocore's retries plus
  the operator's own backoff absorb ThrottlingException and ServiceQuotaExceededException.
- `start_import_job` and `wait_for_import_job` share the pool named by the environment variable
  `HEALTHIMAGING_IMPORT_POOL` (read when the file is parsed; default `default_pool`). Create it with deferred tasks
  counted, so that every job in flight holds one slot from its start until its sensor ends:
  `airflow pools set healthimaging_imports 90 "HealthImaging imports in flight" --include-deferred`. The sensor
  outranks the start (`priority_weight` 10 vs 1, `weight_rule="absolute"`), so a freed slot goes to the job that
  is already running, not to a new one.
- `wait_for_import_job` also has `max_active_tis_per_dag=90` (deferred instances count in Airflow 3.3).
- `max_active_runs` (environment `HEALTHIMAGING_MAX_ACTIVE_RUNS`, default 8) bounds parallel nightly/backfill runs.
- The sensor polls GetDICOMImportJob every `HEALTHIMAGING_POKE_INTERVAL` seconds (environment, read at parse time;
  default 30; the account limit is 25 requests/s).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param

# Imported from their module, not from ``airflow.sdk``: the dag-processor pre-imports the ``airflow.*`` modules a
# DAG file names before it forks a parser, so the decorators' import chain is paid once, not at every parse.
from airflow.sdk.definitions.decorators import task
from airflow.sdk.exceptions import AirflowFailException

from healthimaging.assets import IMAGE_SETS, IMAGE_SETS_ASSET_NAME  # noqa: F401 (the asset this DAG updates)
from healthimaging.import_tasks import compose_imports

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DAG_ID = "healthimaging_import_dicom_and_search"


#: Airflow Variables read at run time (also from the environment as ``AIRFLOW_VAR_<NAME upper-cased>``).
VAR_DATASTORE_ID = "healthimaging_datastore_id"
VAR_DATA_ACCESS_ROLE_ARN = "healthimaging_data_access_role_arn"
VAR_INPUT_S3_URI_TEMPLATE = "healthimaging_input_s3_uri_template"
VAR_OUTPUT_S3_URI = "healthimaging_output_s3_uri"

#: Pool for jobs in flight; a parse-time setting, so it comes from the environment, not from a Variable.
IMPORT_POOL = os.environ.get("HEALTHIMAGING_IMPORT_POOL", "default_pool")
MAX_IMPORTS_IN_FLIGHT = 90
#: Seconds between GetDICOMImportJob polls (parse time; lower it for the local endpoint).
POKE_INTERVAL = float(os.environ.get("HEALTHIMAGING_POKE_INTERVAL", "30"))
# Parallel runs (nightly, backfill, manual); environment, read at parse time like the pool.
MAX_ACTIVE_RUNS = int(os.environ.get("HEALTHIMAGING_MAX_ACTIVE_RUNS", "8"))
MAX_PREFIXES_PER_RUN = 1000
IMPORT_TIMEOUT = timedelta(hours=12)

#: JSON Schema dialect of every Param's schema. Airflow checks a Param with ``jsonschema.validate``, which first
#: checks the schema itself against its dialect's meta-schema; without ``$schema`` that is draft 2020-12, whose
#: meta-schema spans eight vocabularies joined by ``$dynamicRef`` and takes two to three times as long to check as
#: draft 7's single document. Airflow runs that check for every Param when the file is parsed, about ten times
#: more while it serializes the DAG, and again on every trigger. The keywords used here mean the same in both
#: drafts; a test checks that draft 2020-12 accepts and refuses the same values.
JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"
_DIALECT: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT}

_DATASTORE_ID_SCHEMA: dict[str, Any] = {"pattern": "^[0-9a-z]{32}$", "minLength": 32, "maxLength": 32}
_ROLE_ARN_SCHEMA: dict[str, Any] = {
    "pattern": "^arn:aws(-[^:]+)?:iam::[0-9]{12}:role/.+$",
    "minLength": 20,
    "maxLength": 2048,
}
_S3_URI_SCHEMA: dict[str, Any] = {
    "pattern": "^s3://[a-z0-9][\\.\\-a-z0-9]{1,61}[a-z0-9](/.*)?$",
    "minLength": 1,
    "maxLength": 1024,
}
_JOB_NAME_SCHEMA: dict[str, Any] = {"pattern": "^[A-Za-z0-9._/#-]+$", "minLength": 1, "maxLength": 64}
_CLIENT_TOKEN_SCHEMA: dict[str, Any] = {"pattern": "^[A-Za-z0-9._-]+$", "minLength": 1, "maxLength": 64}
#: SearchImageSets ``searchCriteria`` as JSON schema, so the trigger form refuses malformed criteria. A literal
#: (a Param cannot read the botocore model without importing botocore at parse time); a test checks it against the
#: model (members, required members, list and string lengths, patterns, enums). EQUAL/BETWEEN value counts and the
#: attributes BETWEEN takes are checked in ``resolve_imports`` (``healthimaging.validation.parse_search_criteria``).
_DICOM_STRING: dict[str, Any] = {"type": "string", "maxLength": 512}
_DICOM_UID: dict[str, Any] = {"type": "string", "maxLength": 512, "pattern": "^[0-9.]*$"}
_TIMESTAMP: dict[str, Any] = {"type": ["string", "number"]}  # ISO 8601 or epoch seconds, as boto3 takes it
SEARCH_ATTRIBUTE_SCHEMAS: dict[str, dict[str, Any]] = {
    "DICOMPatientId": _DICOM_STRING,
    "DICOMAccessionNumber": _DICOM_STRING,
    "DICOMStudyId": _DICOM_STRING,
    "DICOMStudyInstanceUID": _DICOM_UID,
    "DICOMSeriesInstanceUID": _DICOM_UID,
    "createdAt": _TIMESTAMP,
    "updatedAt": _TIMESTAMP,
    "DICOMStudyDateAndTime": {
        "type": "object",
        "properties": {
            "DICOMStudyDate": {"type": "string", "maxLength": 36},
            "DICOMStudyTime": {"type": "string", "maxLength": 56},
        },
        "required": ["DICOMStudyDate"],
        "additionalProperties": False,
    },
    "isPrimary": {"type": "boolean"},
}
_SEARCH_CRITERIA_SCHEMA: dict[str, Any] = {
    "properties": {
        "filters": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "operator": {"enum": ["EQUAL", "BETWEEN"]},
                    "values": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 2,
                        "items": {
                            "type": "object",
                            "properties": SEARCH_ATTRIBUTE_SCHEMAS,
                            "minProperties": 1,
                            "maxProperties": 1,
                            "additionalProperties": False,
                        },
                    },
                },
                "required": ["operator", "values"],
                "additionalProperties": False,
            },
        },
        "sort": {
            "type": "object",
            "properties": {
                "sortOrder": {"enum": ["ASC", "DESC"]},
                "sortField": {"enum": ["updatedAt", "createdAt", "DICOMStudyDateAndTime"]},
            },
            "required": ["sortOrder", "sortField"],
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
_CONFIGURABLE = "Empty: taken from the Airflow Variable `{}` (or env `AIRFLOW_VAR_{}`)."


def _configurable(variable: str) -> str:
    return _CONFIGURABLE.format(variable, variable.upper())


#: Workflow input (Arazzo name) -> DAG param.
WORKFLOW_INPUT_PARAMS = {
    "datastoreId": "datastore_id",
    "jobName": "job_name",
    "dataAccessRoleArn": "data_access_role_arn",
    "clientToken": "client_token",
    "inputS3Uri": "input_s3_uri",
    "outputS3Uri": "output_s3_uri",
}

PARAMS: dict[str, Param] = {
    "datastore_id": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Data store id (datastoreId)",
        description="ID of the ACTIVE HealthImaging data store to import into (32 lower-case letters/digits). "
        + _configurable(VAR_DATASTORE_ID),
        **_DATASTORE_ID_SCHEMA,
    ),
    "data_access_role_arn": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Data access role ARN (dataAccessRoleArn)",
        description="IAM role that HealthImaging assumes to read the input and write the output prefix. "
        + _configurable(VAR_DATA_ACCESS_ROLE_ARN),
        **_ROLE_ARN_SCHEMA,
    ),
    "input_s3_uri": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Input S3 prefix (inputS3Uri)",
        description="S3 prefix holding the DICOM P10 files of one import, e.g. `s3://bucket/incoming/2025/01/31/`. "
        f"Empty: a scheduled or backfill run renders the Variable `{VAR_INPUT_S3_URI_TEMPLATE}` over its "
        "data interval; a manual run without a logical date must name a prefix here or in `input_s3_uris`.",
        **_S3_URI_SCHEMA,
    ),
    "input_s3_uris": Param(
        [],
        **_DIALECT,
        type="array",
        title="More input S3 prefixes (one import each)",
        description="Manual multi-prefix run: one import job per prefix (added to `input_s3_uri` if both are set). "
        "Jobs run in parallel within the bounds explained in the DAG docs.",
        items={"type": "string", **_S3_URI_SCHEMA},
        uniqueItems=True,
        maxItems=MAX_PREFIXES_PER_RUN,
    ),
    "output_s3_uri": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Output S3 prefix (outputS3Uri)",
        description="S3 prefix where HealthImaging writes the job output manifest and failure/success logs. "
        + _configurable(VAR_OUTPUT_S3_URI),
        **_S3_URI_SCHEMA,
    ),
    "staging_s3_uri": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Staging S3 prefix (for loose files no input prefix can reach)",
        description="S3 prefix, outside the input prefixes, where loose files that no chunk prefix of their own "
        "reaches (more loose files in one folder than one job takes, or loose files beside the sub-folders of a "
        "folder too big for one job) are copied and imported from; the copies are removed after the run. Empty: "
        "such a prefix fails the run before any job starts.",
        **_S3_URI_SCHEMA,
    ),
    "job_name": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Job name (jobName)",
        description="Optional name of the import job(s), 1-64 of `A-Z a-z 0-9 . _ / # -`.",
        **_JOB_NAME_SCHEMA,
    ),
    "client_token": Param(
        None,
        **_DIALECT,
        type=["null", "string"],
        title="Client token (clientToken)",
        description="Optional idempotency token, 1-64 of `A-Z a-z 0-9 . _ -`, for a single prefix only. Empty: a "
        "hash of dag_id/run_id/task_id/map_index, so retries and cleared tasks re-attach to the same job.",
        **_CLIENT_TOKEN_SCHEMA,
    ),
    "search_criteria": Param(
        {},
        **_DIALECT,
        type="object",
        title="Search criteria",
        description="The workflow's SearchImageSets `searchCriteria`: 1-2 `filters` (`EQUAL` with one value, "
        "`BETWEEN` with two, on one attribute) and an optional `sort`. Empty {}: all image sets of each import "
        "(from its output manifest). Else: only those of the import's image sets that the search matches, in "
        "the search's order. Never logged.",
        **_SEARCH_CRITERIA_SCHEMA,
    ),
    "max_results": Param(
        50,
        **_DIALECT,
        type="integer",
        minimum=1,
        maximum=50,
        title="Page size",
        description="SearchImageSets `maxResults` per page (1-50). All pages of this import's image sets are read.",
    ),
    "include_phi": Param(
        False,
        **_DIALECT,
        type="boolean",
        title="Include PHI in XCom",
        description="Keep patient/study DICOM attributes in the `imageSetsMetadataSummaries` XCom. Off: ids, "
        "modality, UIDs and dates only.",
    ),
    "max_failed_files": Param(
        None,
        **_DIALECT,
        type=["null", "integer"],
        minimum=0,
        title="Max failed files",
        description="Fail the import if more files than this failed (customer or server error). Empty: only a "
        "FAILED job fails the task.",
    ),
}


def _check(name: str, value: Any, source: str) -> Any:
    """
    Validate one resolved value against its param's JSON schema (the API's patterns).

    :param name: the DAG param whose schema applies.
    :param value: the value to check.
    :param source: where the value came from, for the error message.
    """
    from jsonschema import ValidationError, validate

    try:
        validate(value, PARAMS[name].schema)
    except ValidationError as err:
        raise AirflowFailException(f"{name} from {source} is invalid: {err.message}") from None
    return value


def _check_search_criteria(criteria: Any) -> None:
    """
    Refuse search criteria the API would refuse, before any import job starts (the message names no value).

    :param criteria: the run's ``search_criteria`` param.
    """
    from healthimaging.validation import parse_search_criteria

    try:
        parse_search_criteria(criteria)
    except ValueError as err:
        raise AirflowFailException(f"param search_criteria is invalid: {err}") from None


def resolve_import_specs(
    params: Mapping[str, Any],
    get_variable: Callable[[str], str | None],
    render: Callable[[str], str] | None,
) -> list[dict[str, Any]]:
    """
    Turn one run's params, Variables and data interval into one import spec per S3 prefix.

    :param params: the run's params (trigger form / ``--conf`` merged over defaults).
    :param get_variable: returns an Airflow Variable's value or None.
    :param render: renders a Jinja template over the run's context; None when the run has no data interval.
    :return: keyword arguments for ``import_dicom``, one dict per prefix.
    """

    def setting(param: str, variable: str) -> str:
        if params.get(param):
            return str(_check(param, params[param], f"param {param}"))
        value = get_variable(variable)
        if not value:
            raise AirflowFailException(
                f"{param} is not set: pass the param {param} or set the Airflow Variable {variable} "
                f"(or env AIRFLOW_VAR_{variable.upper()})."
            )
        return str(_check(param, value.strip(), f"Variable {variable}"))

    datastore_id = setting("datastore_id", VAR_DATASTORE_ID)
    role_arn = setting("data_access_role_arn", VAR_DATA_ACCESS_ROLE_ARN)
    output_s3_uri = setting("output_s3_uri", VAR_OUTPUT_S3_URI)

    prefixes = [p for p in [params.get("input_s3_uri"), *(params.get("input_s3_uris") or [])] if p]
    prefixes = list(dict.fromkeys(prefixes))
    for prefix in prefixes:
        _check("input_s3_uri", prefix, "params input_s3_uri/input_s3_uris")
    if not prefixes:
        if render is None:
            raise AirflowFailException(
                "This run has no data interval (a manual run without a logical date): name the S3 prefix(es) "
                "in the params input_s3_uri or input_s3_uris, or trigger it with a logical date."
            )
        template = get_variable(VAR_INPUT_S3_URI_TEMPLATE)
        if not template:
            raise AirflowFailException(
                f"No input prefix: set the Airflow Variable {VAR_INPUT_S3_URI_TEMPLATE} (or env "
                f"AIRFLOW_VAR_{VAR_INPUT_S3_URI_TEMPLATE.upper()}), e.g. "
                "s3://my-dicom-bucket/incoming/{{ data_interval_start.strftime('%Y/%m/%d') }}/"
            )
        rendered = render(template).strip()
        prefixes = [_check("input_s3_uri", rendered, f"Variable {VAR_INPUT_S3_URI_TEMPLATE} rendered")]
    if len(prefixes) > MAX_PREFIXES_PER_RUN:
        raise AirflowFailException(f"{len(prefixes)} prefixes in one run; at most {MAX_PREFIXES_PER_RUN}.")

    client_token = params.get("client_token")
    if client_token and len(prefixes) > 1:
        raise AirflowFailException(
            "client_token names one import, but this run has "
            f"{len(prefixes)} prefixes: leave it empty and each import gets its own per-run token."
        )
    job_name = params.get("job_name") or None
    _check_search_criteria(params.get("search_criteria"))
    max_results = params.get("max_results", 50)
    _check("max_results", max_results, "param max_results")
    max_failed_files = params.get("max_failed_files")
    _check("max_failed_files", max_failed_files, "param max_failed_files")
    return [
        {
            "datastore_id": datastore_id,
            "data_access_role_arn": role_arn,
            "input_s3_uri": prefix,
            "output_s3_uri": output_s3_uri,
            "job_name": job_name,
            "client_token": client_token or None,
            "staging_s3_uri": params.get("staging_s3_uri") or None,
            "max_failed_files": max_failed_files,
            "max_results": max_results,
            "include_phi": bool(params.get("include_phi", False)),
        }
        for prefix in prefixes
    ]


@task(task_id="resolve_imports", execution_timeout=timedelta(minutes=5))
def resolve_imports() -> list[dict[str, Any]]:
    """Resolve the run's inputs (params > Variables > data interval) into one import spec per prefix."""
    from airflow.sdk import Variable, get_current_context

    context = get_current_context()
    has_interval = context.get("data_interval_start") is not None
    task_ = context["task"]

    def render(template: str) -> str:
        return str(task_.render_template(template, context))

    specs = resolve_import_specs(
        context["params"],
        lambda key: Variable.get(key, default=None),
        render if has_interval else None,
    )
    for spec in specs:
        task_.log.info("Import planned: %s -> data store %s", spec["input_s3_uri"], spec["datastore_id"])
    return specs


with DAG(
    dag_id=DAG_ID,
    description="Import DICOM from S3 into AWS HealthImaging and find the image sets it became",
    doc_md=__doc__,
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=MAX_ACTIVE_RUNS,
    dagrun_timeout=timedelta(hours=24),
    params=PARAMS,
    tags=["healthimaging", "dicom", "medical-imaging", "import"],
    default_args={
        "owner": "data-engineering",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": timedelta(minutes=30),
    },
) as dag:
    compose_imports(resolve_imports())
