"""
The bad-input catalogue: one table of malformed inputs, each with the exact error it must give.

Three doors: the DAG's params (validated through ``dag.params`` of the DAG parsed by a DagBag), the operators'
arguments (executed against the real local endpoint, so a check that came too late would start a job) and raw
HTTP requests to the endpoint. After the whole table the endpoint still serves and no import job was started.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dags"))
if "airflow" not in sys.modules:  # as tests/dags/conftest.py: a throwaway home before Airflow is imported
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-catalogue-")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from dag_test_helpers import DAGS, IMPORT_DAG_ID

from healthimaging_local.server import LocalEndpoint

DATASTORE = "0123456789abcdef0123456789abcdef"
ROLE_ARN = "arn:aws:iam::123456789012:role/ImportRole"
IN, OUT = "s3://catalogue-in/dicom/", "s3://catalogue-out/results/"
FILTER_ATTR_ERROR = "each value must have exactly one key from"
MI_AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/medical-imaging/aws4_request, "
    "SignedHeaders=host, Signature=0"
)


@dataclass(frozen=True)
class Case:
    """One bad input: where it enters, what it is, and the error it must give."""

    door: str  # "param", "start", "search" or "http"
    value: Any
    error: str  # exception class name, or the x-amzn-ErrorType for "http"
    fragment: str
    status: int = 400


def param(conf: dict[str, Any], fragment: str) -> Case:
    return Case("param", conf, "ParamValidationError", fragment)


def start(overrides: dict[str, Any], fragment: str, error: str = "AirflowFailException") -> Case:
    return Case("start", overrides, error, fragment)


def search(overrides: dict[str, Any], fragment: str) -> Case:
    return Case("search", overrides, "ValueError", fragment)


def http_(
    method: str, path: str, body: bytes | None, fragment: str, code: str, status: int = 400, **h: str
) -> Case:
    return Case("http", (method, path, body, h), code, fragment, status)


JSON = {"Content-Type": "application/json"}
START_BODY = {
    "dataAccessRoleArn": ROLE_ARN,
    "clientToken": "catalogue",
    "inputS3Uri": IN,
    "outputS3Uri": OUT,
}
CATALOGUE: dict[str, Case] = {
    # ---------------------------------------------------------------- DAG params (trigger form / --conf)
    "param-datastore-id-not-an-id": param({"datastore_id": "NOT-AN-ID"}, "param datastore_id"),
    "param-datastore-id-31-chars": param({"datastore_id": "a" * 31}, "param datastore_id"),
    "param-datastore-id-upper-case": param({"datastore_id": "A" * 32}, "does not match '^[0-9a-z]{32}$'"),
    "param-role-arn-short-account": param(
        {"data_access_role_arn": "arn:aws:iam::1:role/x"}, "data_access_role_arn"
    ),
    "param-role-arn-not-a-role": param(
        {"data_access_role_arn": "arn:aws:s3:::my-bucket/and-more"}, "param data_access_role_arn"
    ),
    "param-input-uri-http": param({"input_s3_uri": "http://bucket/dicom/"}, "param input_s3_uri"),
    "param-input-uri-upper-bucket": param({"input_s3_uri": "s3://UPPER/dicom/"}, "param input_s3_uri"),
    "param-input-uris-one-bad": param(
        {"input_s3_uris": ["s3://ok-bucket/a/", "ftp://x/"]}, "param input_s3_uris"
    ),
    "param-input-uris-duplicates": param(
        {"input_s3_uris": ["s3://ok-bucket/a/", "s3://ok-bucket/a/"]}, "has non-unique elements"
    ),
    "param-output-uri-local-path": param({"output_s3_uri": "/tmp/out"}, "param output_s3_uri"),
    "param-max-results-0": param({"max_results": 0}, "0 is less than the minimum of 1"),
    "param-max-results-51": param({"max_results": 51}, "51 is greater than the maximum of 50"),
    "param-max-results-string": param({"max_results": "ten"}, "'ten' is not of type 'null', 'integer'"),
    "param-include-phi-string": param({"include_phi": "yes"}, "'yes' is not of type 'null', 'boolean'"),
    "param-job-name-space": param({"job_name": "my job"}, "param job_name"),
    "param-client-token-65": param({"client_token": "t" * 65}, "param client_token"),
    "param-search-criteria-string": param(
        {"search_criteria": "DICOMPatientId=1"}, "is not of type 'null', 'object'"
    ),
    "param-max-failed-files-negative": param({"max_failed_files": -1}, "-1 is less than the minimum of 0"),
    "param-staging-uri-local-path": param({"staging_s3_uri": "/tmp/staging"}, "param staging_s3_uri"),
    "param-allow-empty-string": param({"allow_empty": "yes"}, "'yes' is not of type 'null', 'boolean'"),
    "param-phi-allow-tags-unknown": param({"phi_allow_tags": ["PatientName"]}, "'PatientName' is not one of"),
    # ---------------------------------------------------------------- StartDICOMImportOperator arguments
    "start-datastore-id": start({"datastore_id": "NOT-AN-ID"}, "datastore_id 'NOT-AN-ID' does not match"),
    "start-datastore-id-empty": start({"datastore_id": ""}, "datastore_id is required"),
    "start-role-arn": start({"data_access_role_arn": "arn:aws:iam::1:role/x"}, "data_access_role_arn"),
    "start-input-uri": start(
        {"input_s3_uri": "https://bucket/dicom/"}, "input_s3_uri 'https://bucket/dicom/'"
    ),
    "start-output-uri": start({"output_s3_uri": "s3:/missing-slash"}, "output_s3_uri 's3:/missing-slash'"),
    "start-job-name": start({"job_name": "name with spaces"}, "job_name 'name with spaces' does not match"),
    "start-job-name-65": start({"job_name": "j" * 65}, "job_name must be at most 64 characters long"),
    "start-client-token": start({"client_token": "tok!"}, "client_token 'tok!' does not match"),
    "start-owner-account": start({"input_owner_account_id": "12"}, "input_owner_account_id"),
    "start-output-inside-input": start({"output_s3_uri": IN + "out/"}, "is equal to or inside input_s3_uri"),
    "start-output-equals-input": start({"output_s3_uri": IN}, "the job would import its own"),
    "start-output-input-no-slash": start(
        {"input_s3_uri": "s3://catalogue-in/dicom", "output_s3_uri": "s3://catalogue-in/dicom/out/"},
        "is equal to or inside input_s3_uri",
    ),
    # ---------------------------------------------------------------- SearchImageSetsOperator arguments
    "search-criteria-not-json": search({"search_criteria": "{not json"}, "search_criteria is not valid JSON"),
    "search-criteria-list": search({"search_criteria": [1]}, "search_criteria must be an object, got list"),
    "search-criteria-unknown-key": search(
        {"search_criteria": {"where": 1}}, "search_criteria has unknown keys"
    ),
    "search-unknown-filter-attribute": search(
        {"search_criteria": {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientHeight": "1"}]}]}},
        FILTER_ATTR_ERROR,
    ),
    "search-three-filters": search(
        {"search_criteria": {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "1"}]}] * 3}},
        "filters must be a list of 1-2 filters",
    ),
    "search-between-on-patient-id": search(
        {
            "search_criteria": {
                "filters": [
                    {"operator": "BETWEEN", "values": [{"DICOMPatientId": "1"}, {"DICOMPatientId": "2"}]}
                ]
            }
        },
        "BETWEEN applies only to",
    ),
    "search-unknown-operator": search(
        {"search_criteria": {"filters": [{"operator": "LIKE", "values": [{"DICOMPatientId": "1"}]}]}},
        ".operator must be one of",
    ),
    "search-bad-sort": search(
        {"search_criteria": {"sort": {"sortOrder": "UP", "sortField": "updatedAt"}}},
        "sort.sortOrder must be one of",
    ),
    "search-max-results-0": search({"max_results": 0}, "max_results must be between 1 and 50, got 0"),
    "search-max-results-51": search({"max_results": 51}, "max_results must be between 1 and 50, got 51"),
    "search-max-results-text": search({"max_results": "abc"}, "max_results must be an integer"),
    "search-datastore-id": search({"datastore_id": "x"}, "datastore_id 'x' does not match"),
    "search-job-id": search({"import_job_id": "../../etc"}, "job_id '../../etc' does not match"),
    "search-phi-allow-unknown-tag": search(
        {"phi_allow_tags": ["PatientName"]}, "phi_allow_tags names unknown DICOMTags member(s) PatientName"
    ),
    "search-phi-allow-not-a-list": search({"phi_allow_tags": 5}, "phi_allow_tags must be a list"),
    "search-lookups-negative": search({"max_image_set_lookups": -1}, "max_image_set_lookups"),
    # ---------------------------------------------------------------- raw HTTP to the endpoint
    "http-invalid-json": http_(
        "POST", "/datastore", b"{not json", "Could not parse", "ValidationException", **JSON
    ),
    "http-json-array": http_(
        "POST", "/datastore", b"[1]", "must be a JSON object", "ValidationException", **JSON
    ),
    "http-wrong-content-type": http_(
        "POST",
        "/datastore",
        b'{"clientToken":"a"}',
        "Unsupported Content-Type",
        "ValidationException",
        **{"Content-Type": "text/plain"},
    ),
    "http-oversized-body": http_(
        "POST", "/datastore", b" " * (1024 * 1024 + 1), "exceeds the limit", "ValidationException", **JSON
    ),
    "http-invalid-utf8": http_(
        "POST", "/datastore", b'{"clientToken":"\xff"}', "not valid UTF-8", "ValidationException", **JSON
    ),
    "http-wrong-type": http_(
        "POST", "/datastore", b'{"clientToken": 5}', "Member must be a string", "ValidationException", **JSON
    ),
    "http-unknown-route": http_(
        "GET",
        "/nothing/here",
        None,
        "No operation matches",
        "UnknownOperationException",
        404,
        Authorization=MI_AUTH,
    ),
    "http-unknown-method": http_(
        "PATCH", "/datastore", None, "No operation matches", "UnknownOperationException", 404
    ),
    "http-dot-dot-segment": http_(
        "GET",
        "/datastore/../datastore",
        None,
        "No operation matches",
        "UnknownOperationException",
        404,
        Authorization=MI_AUTH,
    ),
    "http-encoded-dot-dot": http_("GET", "/datastore/%2e%2e", None, "datastoreId", "ValidationException"),
    "http-encoded-traversal": http_(
        "GET", "/datastore/..%2F..%2Fetc", None, "datastoreId", "ValidationException"
    ),
    "http-double-slash": http_(
        "GET",
        f"/datastore//{DATASTORE}",
        None,
        "No operation matches",
        "UnknownOperationException",
        404,
        Authorization=MI_AUTH,
    ),
    "http-nul-byte": http_("GET", "/datastore/%00", None, "datastoreId", "ValidationException"),
    "http-invalid-utf8-path": http_(
        "GET", "/datastore/%ff%fe", None, "not valid UTF-8", "ValidationException"
    ),
    "http-forged-next-token": http_(
        "GET", "/datastore?nextToken=forged", None, "nextToken", "ValidationException"
    ),
    "http-max-results-51": http_(
        "GET", "/datastore?maxResults=51", None, "maxResults", "ValidationException"
    ),
    "http-start-job-bad-uri": http_(
        "POST",
        f"/startDICOMImportJob/datastore/{DATASTORE}",
        json.dumps({**START_BODY, "inputS3Uri": "s3://../etc/"}).encode(),
        "inputS3Uri",
        "ValidationException",
        **JSON,
    ),
    "http-start-job-missing-role": http_(
        "POST",
        f"/startDICOMImportJob/datastore/{DATASTORE}",
        json.dumps({k: v for k, v in START_BODY.items() if k != "dataAccessRoleArn"}).encode(),
        "dataAccessRoleArn' failed to satisfy constraint: Member must not be null",
        "ValidationException",
        **JSON,
    ),
}


# ------------------------------------------------------------------------------------------- fixtures


@dataclass
class Live:
    endpoint: LocalEndpoint
    datastore_id: str

    def jobs(self) -> list[dict[str, Any]]:
        mi = self.endpoint.client("medical-imaging")
        return list(mi.list_dicom_import_jobs(datastoreId=self.datastore_id)["jobSummaries"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """An endpoint with an ACTIVE data store and the input/output buckets; Airflow's aws_default points at it."""
    import time

    with LocalEndpoint(tmp_path_factory.mktemp("catalogue") / "state") as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        datastore_id = mi.create_datastore(datastoreName="catalogue")["datastoreId"]
        while (
            mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] != "ACTIVE"
        ):
            time.sleep(0.05)
        s3.create_bucket(Bucket="catalogue-in")
        s3.create_bucket(Bucket="catalogue-out")
        s3.put_object(Bucket="catalogue-in", Key="dicom/a.dcm", Body=b"not really dicom")
        connection = json.dumps(endpoint.settings()["airflow_connection"])
        with mock.patch.dict(os.environ, {"AIRFLOW_CONN_AWS_DEFAULT": connection}):
            yield Live(endpoint, datastore_id)


@pytest.fixture(scope="module")
def import_dag() -> Any:
    """The import DAG as a DagBag parses it."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[IMPORT_DAG_ID]


def _context(task_id: str) -> dict[str, Any]:
    ti = mock.MagicMock(dag_id="catalogue", task_id=task_id, map_index=-1, run_id="manual__catalogue")
    return {"ti": ti, "task_instance": ti, "run_id": "manual__catalogue"}


def validate_params(dag: Any, conf: dict[str, Any]) -> None:
    """Validate a run's conf as the trigger form does: merged into a copy of ``dag.params``."""
    params = copy.deepcopy(dag.params)
    params.update(conf)
    params.validate()


def _raise_for(case: Case, live: Live, import_dag: Any) -> None:
    """Feed one bad input through its door (raises the error it gives)."""
    from healthimaging.operators import SearchImageSetsOperator, StartDICOMImportOperator

    if case.door == "param":
        validate_params(import_dag, case.value)
    elif case.door == "start":
        arguments = {
            "datastore_id": live.datastore_id,
            "data_access_role_arn": ROLE_ARN,
            "input_s3_uri": IN,
            "output_s3_uri": OUT,
            **case.value,
        }
        StartDICOMImportOperator(task_id="start", **arguments).execute(_context("start"))  # type: ignore[arg-type]
    else:
        arguments = {"datastore_id": live.datastore_id, **case.value}
        SearchImageSetsOperator(task_id="search", **arguments).execute(_context("search"))  # type: ignore[arg-type]


def send(endpoint: LocalEndpoint, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Any:
    """One raw HTTP request with the path exactly as given; return (status, headers, body)."""
    connection = http.client.HTTPConnection(urlsplit(endpoint.url).netloc, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", list(CATALOGUE.values()), ids=list(CATALOGUE))
def test_bad_input_gives_its_exact_error(case: Case, live: Live, import_dag: Any) -> None:
    if case.door == "http":
        method, path, body, headers = case.value
        status, reply_headers, reply = send(
            live.endpoint, method, path.replace(DATASTORE, live.datastore_id), body, headers
        )
        assert status == case.status, reply[:300]
        assert reply_headers["x-amzn-ErrorType"] == case.error
        assert case.fragment in json.loads(reply)["message"]
    else:
        with pytest.raises(Exception) as raised:
            _raise_for(case, live, import_dag)
        assert type(raised.value).__name__ == case.error, raised.value
        assert case.fragment in str(raised.value)
    assert live.jobs() == []


@pytest.mark.parametrize(
    "criteria",
    [
        pytest.param({"filters": "DICOMPatientId"}, id="filters-not-a-list"),
        pytest.param(
            {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientHeight": "1"}]}]},
            id="unknown-attribute",
        ),
    ],
)
def test_malformed_search_criteria_param_is_refused_at_trigger(
    criteria: dict[str, Any], import_dag: Any
) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="search_criteria"):
        validate_params(import_dag, {"search_criteria": criteria})


def test_catalogue_is_large_and_the_endpoint_still_serves(live: Live) -> None:
    """Runs after the table (file order): no job was started and the endpoint answers a good request."""
    assert len(CATALOGUE) >= 30
    assert {case.door for case in CATALOGUE.values()} == {"param", "start", "search", "http"}
    assert live.jobs() == []
    assert live.endpoint.client("medical-imaging").list_datastores()["datastoreSummaries"]
    assert live.endpoint.client("s3").list_objects_v2(Bucket="catalogue-in")["KeyCount"] == 1
