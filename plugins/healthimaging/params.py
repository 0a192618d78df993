"""
The import DAG's Params (trigger form, ``--conf``, REST API) and their resolution into one import spec per prefix.

Every pattern, length and enum in the schemas comes from :mod:`healthimaging.model_constraints`, generated from
botocore's service model (a test keeps the two in step), so building the Params at parse time needs no botocore.
Descriptions are Markdown (``description_md``, which the trigger form renders); a param that may stay empty has a
type that includes ``"null"``, which is how Airflow 3.3's form decides a field is not required. The form itself
checks only that required fields are set and, through the input's ``maxLength``, how much can be typed; patterns
are checked by the API server when the run is created, and again here for values that come from Variables.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from airflow.sdk.definitions.param import Param
from airflow.sdk.exceptions import AirflowFailException

from healthimaging import model_constraints as model

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

#: Airflow Variables read at run time (also from the environment as ``AIRFLOW_VAR_<NAME upper-cased>``).
VAR_DATASTORE_ID = "healthimaging_datastore_id"
VAR_DATA_ACCESS_ROLE_ARN = "healthimaging_data_access_role_arn"
VAR_INPUT_S3_URI_TEMPLATE = "healthimaging_input_s3_uri_template"
VAR_OUTPUT_S3_URI = "healthimaging_output_s3_uri"
VAR_STAGING_S3_URI = "healthimaging_staging_s3_uri"

MAX_PREFIXES_PER_RUN = 1000

#: JSON Schema dialect of every Param's schema. Airflow checks a Param with ``jsonschema.validate``, which first
#: checks the schema itself against its dialect's meta-schema; without ``$schema`` that is draft 2020-12, whose
#: meta-schema spans eight vocabularies joined by ``$dynamicRef`` and takes two to three times as long to check as
#: draft 7's single document. Airflow runs that check for every Param when the file is parsed, about ten times
#: more while it serializes the DAG, and again on every trigger. The keywords used here mean the same in both
#: drafts; a test checks that draft 2020-12 accepts and refuses the same values.
JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"

#: Workflow input (Arazzo name) -> DAG param.
WORKFLOW_INPUT_PARAMS = {
    "datastoreId": "datastore_id",
    "jobName": "job_name",
    "dataAccessRoleArn": "data_access_role_arn",
    "clientToken": "client_token",
    "inputS3Uri": "input_s3_uri",
    "outputS3Uri": "output_s3_uri",
}

#: What a valid value looks like, in words (shown in the form and in refusals).
_S3_URI_RULE = "an S3 URI, `s3://<bucket>/<prefix>/` (bucket: 3-63 lower-case letters, digits, `.` or `-`)"
RULES = {
    "datastore_id": "32 lower-case letters or digits",
    "data_access_role_arn": "an IAM role ARN, `arn:aws:iam::<12-digit account>:role/<name>`",
    "input_s3_uri": _S3_URI_RULE,
    "input_s3_uris": _S3_URI_RULE,
    "output_s3_uri": _S3_URI_RULE,
    "staging_s3_uri": _S3_URI_RULE,
    "job_name": "1-64 of `A-Z a-z 0-9 . _ / # -`",
    "client_token": "1-64 of `A-Z a-z 0-9 . _ -`",
    "phi_allow_tags": "DICOM summary tag names, e.g. `DICOMStudyDate` (the form lists them)",
}
_FIXED_LENGTH = re.compile(r"\[[^\]]+\]\{(\d+)\}")
_JSON_TYPES = {"string": "string", "timestamp": ["string", "number"], "boolean": "boolean"}


def _anchored(pattern: str) -> str:
    """A model pattern (matched against the whole value by the service) for JSON Schema's ``re.search``."""
    return f"^{pattern}$" if "|" not in pattern else f"^(?:{pattern})$"


def member_schema(parameter: str) -> dict[str, Any]:
    """
    JSON schema keywords (``pattern``, ``minLength``, ``maxLength``) of one API parameter, from the model.

    A pattern of one fixed-length character class (``[0-9a-z]{32}``) also gives both lengths, so the form's input
    stops at the right length.

    :param parameter: the snake_case parameter name (a key of ``model_constraints.MEMBERS``).
    """
    limits = model.MEMBERS[parameter]
    schema: dict[str, Any] = {"pattern": _anchored(limits["pattern"])}
    fixed = _FIXED_LENGTH.fullmatch(limits["pattern"])
    if fixed:
        schema["minLength"] = schema["maxLength"] = int(fixed.group(1))
    if "min" in limits:
        schema["minLength"] = limits["min"]
    if "max" in limits:
        schema["maxLength"] = limits["max"]
    return schema


def _attribute_schema(limits: Mapping[str, Any]) -> dict[str, Any]:
    if limits["type"] == "structure":
        return {
            "type": "object",
            "properties": {name: _attribute_schema(member) for name, member in limits["members"].items()},
            "required": list(limits["required"]),
            "additionalProperties": False,
        }
    schema: dict[str, Any] = {"type": _JSON_TYPES[limits["type"]]}
    if "pattern" in limits:
        schema["pattern"] = _anchored(limits["pattern"])
    if limits.get("min"):
        schema["minLength"] = limits["min"]
    if "max" in limits:
        schema["maxLength"] = limits["max"]
    return schema


#: SearchByAttributeValue members as JSON schemas (a timestamp: ISO 8601 or epoch seconds, as boto3 takes it).
SEARCH_ATTRIBUTE_SCHEMAS = {
    name: _attribute_schema(limits) for name, limits in model.SEARCH_ATTRIBUTES.items()
}


def search_criteria_schema() -> dict[str, Any]:
    """
    SearchImageSets ``searchCriteria`` as a JSON schema, so the trigger form refuses malformed criteria.

    EQUAL/BETWEEN value counts and the attributes BETWEEN takes are checked in ``resolve_import_specs``
    (``healthimaging.validation.parse_search_criteria``).
    """
    value = {
        "type": "object",
        "properties": SEARCH_ATTRIBUTE_SCHEMAS,
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
    }
    search_filter = {
        "type": "object",
        "properties": {
            "operator": {"enum": list(model.SEARCH_OPERATORS)},
            "values": {
                "type": "array",
                "minItems": model.SEARCH_FILTER_VALUES["min"],
                "maxItems": model.SEARCH_FILTER_VALUES["max"],
                "items": value,
            },
        },
        "required": list(model.SEARCH_FILTER_REQUIRED),
        "additionalProperties": False,
    }
    properties = {
        "filters": {
            "type": "array",
            "minItems": model.SEARCH_FILTERS["min"],
            "maxItems": model.SEARCH_FILTERS["max"],
            "items": search_filter,
        },
        "sort": {
            "type": "object",
            "properties": {name: {"enum": list(enum)} for name, enum in model.SORT.items()},
            "required": list(model.SORT_REQUIRED),
            "additionalProperties": False,
        },
    }
    return {"properties": properties, "additionalProperties": False}


def _param(default: Any, title: str, description_md: str, **schema: Any) -> Param:
    """A Param in JSON Schema draft 7 whose Markdown description the trigger form renders."""
    keywords: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": title,
        "description_md": description_md,
    }
    return Param(default, description=None, **keywords, **schema)


def _from_variable(variable: str) -> str:
    return f"Empty: the Airflow Variable `{variable}` (or env `AIRFLOW_VAR_{variable.upper()}`)."


def build_params() -> dict[str, Param]:
    """The DAG's Params, freshly built (a Param keeps the last value it resolved)."""
    s3_uri = {"type": "string", **member_schema("input_s3_uri")}
    return {
        "datastore_id": _param(
            None,
            "Data store id (datastoreId)",
            f"ACTIVE HealthImaging data store to import into: {RULES['datastore_id']}. "
            + _from_variable(VAR_DATASTORE_ID),
            type=["null", "string"],
            **member_schema("datastore_id"),
        ),
        "data_access_role_arn": _param(
            None,
            "Data access role ARN (dataAccessRoleArn)",
            "IAM role that HealthImaging assumes to read the input and write the output prefix: "
            f"{RULES['data_access_role_arn']}. " + _from_variable(VAR_DATA_ACCESS_ROLE_ARN),
            type=["null", "string"],
            **member_schema("data_access_role_arn"),
        ),
        "input_s3_uri": _param(
            None,
            "Input S3 prefix (inputS3Uri)",
            f"S3 prefix holding the DICOM P10 files of one import: {RULES['input_s3_uri']}. Empty: a scheduled or "
            f"backfill run renders the Variable `{VAR_INPUT_S3_URI_TEMPLATE}` over its data interval; a manual "
            "run without a logical date must name a prefix here or in *More input S3 prefixes*.",
            type=["null", "string"],
            **member_schema("input_s3_uri"),
        ),
        "input_s3_uris": _param(
            [],
            "More input S3 prefixes (one import each)",
            "One S3 prefix per line; one import job per prefix (added to *Input S3 prefix* if both are set). "
            "Jobs run in parallel within the bounds explained in the DAG docs.",
            type=["null", "array"],
            items=s3_uri,
            uniqueItems=True,
            maxItems=MAX_PREFIXES_PER_RUN,
        ),
        "output_s3_uri": _param(
            None,
            "Output S3 prefix (outputS3Uri)",
            "S3 prefix where HealthImaging writes the job output manifest and failure/success logs; not inside "
            "an input prefix. " + _from_variable(VAR_OUTPUT_S3_URI),
            type=["null", "string"],
            **member_schema("output_s3_uri"),
        ),
        "staging_s3_uri": _param(
            None,
            "Staging S3 prefix (opt-in)",
            "S3 prefix where the import planner stages loose files by server-side copy, so that each job "
            "reads one prefix; not inside an input prefix. "
            + _from_variable(VAR_STAGING_S3_URI)
            + " Neither "
            "set: nothing is staged.",
            type=["null", "string"],
            **member_schema("input_s3_uri"),
        ),
        "job_name": _param(
            None,
            "Job name (jobName)",
            f"Optional name of the import job(s): {RULES['job_name']}.",
            type=["null", "string"],
            **member_schema("job_name"),
        ),
        "client_token": _param(
            None,
            "Client token (clientToken)",
            f"Optional idempotency token, for a single prefix only: {RULES['client_token']}. Empty: derived "
            "from the run, so retries and cleared tasks re-attach to the same job.",
            type=["null", "string"],
            **member_schema("client_token"),
        ),
        "allow_empty": _param(
            False,
            "Allow an empty input prefix",
            "Off: an input prefix with no objects fails its import, naming the prefix (a typo is not a green "
            "run). On: it succeeds with a warning and imports nothing.",
            type=["null", "boolean"],
        ),
        "search_criteria": _param(
            {},
            "Search criteria",
            "The workflow's SearchImageSets `searchCriteria`: 1-2 `filters` (`EQUAL` with one value, "
            "`BETWEEN` with two, on one attribute) and an optional `sort`. Empty `{}`: all image sets of each "
            "import (from its output manifest). Else: only those of the import's image sets that the search "
            "matches, in the search's order. Never logged.",
            type=["null", "object"],
            **search_criteria_schema(),
        ),
        "max_results": _param(
            model.MAX_RESULTS["max"],
            "Page size",
            f"SearchImageSets `maxResults` per page ({model.MAX_RESULTS['min']}-{model.MAX_RESULTS['max']}). "
            "All pages of this import's image sets are read.",
            type=["null", "integer"],
            minimum=model.MAX_RESULTS["min"],
            maximum=model.MAX_RESULTS["max"],
        ),
        "include_phi": _param(
            False,
            "Include PHI in XCom",
            "Keep patient and study DICOM attributes in the `imageSetsMetadataSummaries` XCom. Off: only what "
            "the confidentiality rule keeps (see the README), plus *PHI tags kept in XCom*.",
            type=["null", "boolean"],
        ),
        "phi_allow_tags": _param(
            [],
            "PHI tags kept in XCom",
            "DICOM summary tags kept in the `imageSetsMetadataSummaries` XCom even when *Include PHI in XCom* "
            "is off, e.g. `DICOMStudyDate`. Empty: none.",
            type=["null", "array"],
            items={"type": "string", "enum": list(model.DICOM_SUMMARY_TAGS)},
            examples=list(model.DICOM_SUMMARY_TAGS),
            uniqueItems=True,
        ),
        "max_failed_files": _param(
            None,
            "Max failed files",
            "Fail the import if more files than this failed (customer or server error). Empty: only a FAILED "
            "job fails the task.",
            type=["null", "integer"],
            minimum=0,
        ),
    }


#: The Params, for their schemas (the DAG file builds its own: a Param keeps the last value it resolved).
PARAMS = build_params()


def check(name: str, value: Any, source: str) -> Any:
    """
    Validate one resolved value against its param's JSON schema; refuse it in words (no retry can fix it).

    :param name: the DAG param whose schema applies.
    :param value: the value to check (never PHI: search criteria are checked by :func:`check_search_criteria`).
    :param source: where the value came from, for the error message.
    """
    from jsonschema import ValidationError, validate

    try:
        validate(value, PARAMS[name].schema)
    except ValidationError as err:
        rule = RULES.get(name) if err.validator in ("pattern", "minLength", "maxLength", "enum") else None
        why = f"must be {rule} (got {err.instance!r})" if rule else err.message
        raise AirflowFailException(f"{name} from {source} is invalid: {why}.") from None
    return value


def check_search_criteria(criteria: Any) -> None:
    """
    Refuse search criteria the API would refuse, before any import job starts (the message names no value).

    :param criteria: the run's ``search_criteria`` param.
    """
    from healthimaging.validation import parse_search_criteria

    try:
        parse_search_criteria(criteria)
    except ValueError as err:
        raise AirflowFailException(f"param search_criteria is invalid: {err}") from None


def check_prefixes_apart(input_s3_uri: str, **others: str | None) -> None:
    """
    Refuse an output or staging prefix equal to or inside an input prefix: the job would import its own files.

    :param input_s3_uri: one import's input prefix.
    :param others: param name -> prefix (None: not set).
    """
    from healthimaging.validation import check_output_outside_input

    for name, prefix in others.items():
        if not prefix:
            continue
        try:
            check_output_outside_input(input_s3_uri, prefix, name=name)
        except ValueError as err:
            raise AirflowFailException(str(err)) from None


def _setting(
    params: Mapping[str, Any], get_variable: Callable[[str], str | None], param: str, variable: str
) -> str | None:
    """A param if set, else its Variable (stripped), checked; None when neither is set."""
    if params.get(param):
        return str(check(param, params[param], f"param {param}"))
    value = (get_variable(variable) or "").strip()
    return str(check(param, value, f"Variable {variable}")) if value else None


def _required_setting(
    params: Mapping[str, Any], get_variable: Callable[[str], str | None], param: str, variable: str
) -> str:
    value = _setting(params, get_variable, param, variable)
    if value is None:
        raise AirflowFailException(
            f"{param} is not set: pass the param {param} or set the Airflow Variable {variable} "
            f"(or env AIRFLOW_VAR_{variable.upper()})."
        )
    return value


def _input_prefixes(
    params: Mapping[str, Any],
    get_variable: Callable[[str], str | None],
    render: Callable[[str], str] | None,
) -> list[str]:
    prefixes = [p for p in [params.get("input_s3_uri"), *(params.get("input_s3_uris") or [])] if p]
    prefixes = list(dict.fromkeys(prefixes))
    for prefix in prefixes:
        check("input_s3_uri", prefix, "params input_s3_uri/input_s3_uris")
    if prefixes:
        if len(prefixes) > MAX_PREFIXES_PER_RUN:
            raise AirflowFailException(
                f"{len(prefixes)} prefixes in one run; at most {MAX_PREFIXES_PER_RUN}."
            )
        return prefixes
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
    return [check("input_s3_uri", rendered, f"Variable {VAR_INPUT_S3_URI_TEMPLATE} rendered")]


def resolve_import_specs(
    params: Mapping[str, Any],
    get_variable: Callable[[str], str | None],
    render: Callable[[str], str] | None,
) -> list[dict[str, Any]]:
    """
    Turn one run's params, Variables and data interval into one import spec per S3 prefix.

    Every refusal is an ``AirflowFailException`` raised before any job starts: a retry cannot fix it.

    :param params: the run's params (trigger form / ``--conf`` merged over defaults).
    :param get_variable: returns an Airflow Variable's value or None.
    :param render: renders a Jinja template over the run's context; None when the run has no data interval.
    :return: keyword arguments for ``import_dicom``, one dict per prefix.
    """
    datastore_id = _required_setting(params, get_variable, "datastore_id", VAR_DATASTORE_ID)
    role_arn = _required_setting(params, get_variable, "data_access_role_arn", VAR_DATA_ACCESS_ROLE_ARN)
    output_s3_uri = _required_setting(params, get_variable, "output_s3_uri", VAR_OUTPUT_S3_URI)
    staging_s3_uri = _setting(params, get_variable, "staging_s3_uri", VAR_STAGING_S3_URI)
    prefixes = _input_prefixes(params, get_variable, render)
    for prefix in prefixes:
        check_prefixes_apart(prefix, output_s3_uri=output_s3_uri, staging_s3_uri=staging_s3_uri)

    client_token = params.get("client_token") or None
    if client_token and len(prefixes) > 1:
        raise AirflowFailException(
            "client_token names one import, but this run has "
            f"{len(prefixes)} prefixes: leave it empty and each import gets its own per-run token."
        )
    check_search_criteria(params.get("search_criteria"))
    max_results = params.get("max_results")
    max_results = check(
        "max_results", model.MAX_RESULTS["max"] if max_results is None else max_results, "param max_results"
    )
    max_failed_files = check("max_failed_files", params.get("max_failed_files"), "param max_failed_files")
    phi_allow_tags = check("phi_allow_tags", list(params.get("phi_allow_tags") or []), "param phi_allow_tags")
    return [
        {
            "datastore_id": datastore_id,
            "data_access_role_arn": role_arn,
            "input_s3_uri": prefix,
            "output_s3_uri": output_s3_uri,
            "staging_s3_uri": staging_s3_uri,
            "job_name": params.get("job_name") or None,
            "client_token": client_token,
            "allow_empty": bool(params.get("allow_empty")),
            "max_failed_files": max_failed_files,
            "max_results": max_results,
            "include_phi": bool(params.get("include_phi")),
            "phi_allow_tags": phi_allow_tags,
        }
        for prefix in prefixes
    ]


def resolve_run_imports(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    Resolve a running task's params, Variables and data interval (see :func:`resolve_import_specs`).

    :param context: the task's context.
    """
    from airflow.sdk import Variable

    task = context["task"]

    def render(template: str) -> str:
        return str(task.render_template(template, context))

    specs = resolve_import_specs(
        context["params"],
        lambda key: Variable.get(key, default=None),
        render if context.get("data_interval_start") is not None else None,
    )
    for spec in specs:
        task.log.info("Import planned: %s -> data store %s", spec["input_s3_uri"], spec["datastore_id"])
    return specs
