"""Every DAG in ``dags/`` parses cleanly, follows the house rules, stays light at parse time and refuses bad params."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from typing import Any

import pytest
from dag_test_helpers import DAGS, EXAMPLE_DAG_ID, IMPORT_DAG_ID, ROOT

from healthimaging import params as hi_params

DAG_FILES = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))
VALID_CONF: dict[str, Any] = {
    "datastore_id": "0123456789abcdef0123456789abcdef",
    "data_access_role_arn": "arn:aws:iam::123456789012:role/HealthImagingImport",
    "input_s3_uri": "s3://dicom-bucket/incoming/2025/01/31/",
    "input_s3_uris": ["s3://dicom-bucket/incoming/a/", "s3://dicom-bucket/incoming/b/"],
    "output_s3_uri": "s3://dicom-bucket/import-output/",
    "job_name": "nightly.2025-01-31",
    "client_token": "token-1.0_x",
    "search_criteria": {
        "filters": [
            {"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": "1.2.840.1"}]},
            {
                "operator": "BETWEEN",
                "values": [{"createdAt": "2025-01-01T00:00:00Z"}, {"createdAt": 1767225600}],
            },
        ],
        "sort": {"sortOrder": "DESC", "sortField": "createdAt"},
    },
    "max_results": 25,
    "include_phi": False,
    "max_failed_files": 0,
    "staging_s3_uri": "s3://dicom-bucket/staging/",
    "allow_empty": True,
    "phi_allow_tags": ["DICOMStudyDate", "DICOMSeriesModality"],
}

#: (param, value) pairs the trigger form must refuse.
BAD_PARAM_VALUES: list[tuple[str, Any]] = [
    ("datastore_id", "0123456789ABCDEF0123456789ABCDEF"),
    ("datastore_id", "0123456789abcdef"),
    ("datastore_id", 123),
    ("data_access_role_arn", "arn:aws:iam::1234:role/x"),
    ("data_access_role_arn", "arn:aws:s3:::bucket"),
    ("data_access_role_arn", "arn:aws:iam::123456789012:user/someone"),
    ("input_s3_uri", "https://bucket/prefix/"),
    ("input_s3_uri", "s3://UPPER/prefix/"),
    ("input_s3_uri", "s3://a/prefix/"),
    ("input_s3_uris", ["s3://dicom-bucket/ok/", "not-a-uri"]),
    ("input_s3_uris", "s3://dicom-bucket/ok/"),
    ("input_s3_uris", ["s3://dicom-bucket/ok/", "s3://dicom-bucket/ok/"]),
    ("output_s3_uri", "s3:/dicom-bucket/out/"),
    ("job_name", "bad name with spaces"),
    ("job_name", "x" * 65),
    ("client_token", "bad/token"),
    ("client_token", "t" * 65),
    ("max_results", 0),
    ("max_results", 51),
    ("max_results", "50"),
    ("include_phi", "yes"),
    ("max_failed_files", -1),
    ("staging_s3_uri", "file:///staging/"),
    ("allow_empty", "yes"),
    ("phi_allow_tags", ["PatientName"]),
    ("phi_allow_tags", "DICOMStudyDate"),
    ("phi_allow_tags", ["DICOMStudyDate", "DICOMStudyDate"]),
    ("search_criteria", []),
    ("search_criteria", {"filters": []}),
    ("search_criteria", {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientName": "x"}]}]}),
    ("search_criteria", {"filters": [{"operator": "LIKE", "values": [{"DICOMPatientId": "x"}]}]}),
    ("search_criteria", {"filters": [{"operator": "EQUAL", "values": [{"isPrimary": "yes"}]}]}),
    (
        "search_criteria",
        {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "x", "DICOMStudyId": "y"}]}]},
    ),
    (
        "search_criteria",
        {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "x"}]}] * 3},
    ),
    ("search_criteria", {"sort": {"sortOrder": "UP", "sortField": "createdAt"}}),
    ("search_criteria", {"sort": {"sortOrder": "ASC"}}),
    ("search_criteria", {"where": 1}),
    ("search_criteria", {"filters": [{"values": [{"DICOMPatientId": "x"}]}]}),
    ("search_criteria", {"filters": [{"operator": "EQUAL", "values": []}]}),
    ("search_criteria", {"filters": [{"operator": "BETWEEN", "values": [{"createdAt": 1}] * 3}]}),
    ("search_criteria", {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "p" * 513}]}]}),
    ("search_criteria", {"filters": [{"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": "1.2.x"}]}]}),
    ("search_criteria", {"filters": [{"operator": "EQUAL", "values": [{"createdAt": True}]}]}),
    (
        "search_criteria",
        {"filters": [{"operator": "EQUAL", "values": [{"DICOMStudyDateAndTime": {"DICOMStudyTime": "1"}}]}]},
    ),
]


def test_dag_files_found() -> None:
    assert {p.stem for p in DAG_FILES} >= {IMPORT_DAG_ID, EXAMPLE_DAG_ID}


def test_no_import_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_id_is_file_stem_and_documented(dagbag: Any, path: Any) -> None:
    dag = dagbag.dags.get(path.stem)
    assert dag is not None, f"{path.name} defines no DAG with dag_id {path.stem!r}"
    assert dag.fileloc == str(path)
    assert dag.tags, "every DAG needs tags"
    assert dag.doc_md, "doc_md: the module docstring or the .md file next to the DAG file"
    if path.with_suffix(".md").exists():
        assert dag.doc_md == path.with_suffix(".md").read_text()
    assert dag.doc_md.strip().startswith("#"), "doc_md is Markdown with a title"
    assert (dag.default_args or {}).get("owner")


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_every_task_retries_with_timeouts(dagbag: Any, path: Any) -> None:
    dag = dagbag.dags[path.stem]
    assert int((dag.default_args or {}).get("retries", 0)) >= 2
    for task in dag.tasks:
        assert task.retries >= 2, task.task_id
        assert task.retry_delay.total_seconds() > 0, task.task_id
        assert task.execution_timeout is not None, task.task_id


def test_import_dag_schedule_and_limits(dagbag: Any) -> None:
    from airflow.sdk import CronDataIntervalTimetable

    dag = dagbag.dags[IMPORT_DAG_ID]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.catchup is False
    assert dag.max_active_runs is not None
    assert dag.max_active_runs <= 16
    start = dag.get_task("start_imports")
    wait = dag.get_task("import_dicom.wait_for_import_job")
    # Jobs in flight are bounded across all DAGs by the start pace (healthimaging.pacing); the sensor's own cap
    # is the same setting, so the DAG never holds more sensors than the data store holds jobs.
    assert wait.max_active_tis_per_dag == 100
    assert dag.get_task("import_report").trigger_rule == "all_done"
    assert wait.deferrable is True
    assert 0 < wait.timeout <= 24 * 3600
    assert start.retry_exponential_backoff


def test_parse_is_light_and_offline() -> None:
    """Parsing imports no boto3/botocore/pydicom/endpoint code of its own, makes no AWS call, reads no Variable."""
    probe = f"""
import importlib.util, json, sys
import airflow.sdk, healthimaging.operators, healthimaging.sensors   # the operators may pull in boto3
import botocore.client
from airflow.sdk import Variable
calls = []
botocore.client.BaseClient._make_api_call = lambda self, op, params: calls.append(op)
Variable.get = classmethod(lambda cls, *a, **k: calls.append(("Variable.get", a)))
before = set(sys.modules)
for path in {[str(p) for p in DAG_FILES]!r}:
    spec = importlib.util.spec_from_file_location("probe_" + path.rsplit("/", 1)[-1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
new = sorted(set(sys.modules) - before)
print(json.dumps({{"new": new, "all": sorted(sys.modules), "calls": [str(c) for c in calls]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    heavy = ("boto3", "botocore", "aiobotocore", "pydicom", "healthimaging_local", "moto")
    assert [m for m in result["new"] if m.split(".")[0] in heavy] == []
    assert [m for m in result["all"] if m.split(".")[0] in ("pydicom", "healthimaging_local", "moto")] == []
    assert result["calls"] == []


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_no_heavy_module_level_imports_in_dag_files(path: Any) -> None:
    """Even when an operator already pulled boto3 in, a DAG file itself imports it only inside tasks."""
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    heavy = {"boto3", "botocore", "aiobotocore", "pydicom", "healthimaging_local", "moto"}
    assert [n for n in names if n.split(".")[0] in heavy] == []


class TestParams:
    """
    Params refuse a bad trigger before any task runs: the check ``create_dagrun`` (UI form, REST API, CLI) and
    ``airflow backfill create`` run on the serialized DAG, ``dag.params.deep_merge(conf).validate()``.
    """

    @pytest.fixture(scope="class")
    def serialized_dag(self, dagbag: Any) -> Any:
        from airflow.serialization.serialized_objects import DagSerialization

        return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dagbag.dags[IMPORT_DAG_ID]))

    def validate(self, serialized_dag: Any, conf: dict[str, Any]) -> dict[str, Any]:
        return dict(serialized_dag.params.deep_merge(conf).validate())

    def test_defaults_validate(self, serialized_dag: Any) -> None:
        resolved = self.validate(serialized_dag, {})
        assert resolved["max_results"] == 50
        assert resolved["include_phi"] is False
        assert resolved["search_criteria"] == {}
        assert resolved["datastore_id"] is None

    def test_valid_conf(self, serialized_dag: Any) -> None:
        assert self.validate(serialized_dag, VALID_CONF)["max_results"] == 25

    @pytest.mark.parametrize(("name", "value"), BAD_PARAM_VALUES)
    def test_bad_value_refused(self, serialized_dag: Any, name: str, value: Any) -> None:
        from airflow.sdk.exceptions import ParamValidationError

        with pytest.raises(ParamValidationError, match=name):
            self.validate(serialized_dag, {**VALID_CONF, name: value})

    def test_search_criteria_schema_matches_the_service_model(self) -> None:
        """
        The schema derived from the generated constraints follows botocore's model: members, required members,
        list lengths, string lengths and patterns, operators and sort enums.
        """
        import botocore.session

        model = botocore.session.get_session().get_service_model("medical-imaging")
        criteria = model.shape_for("SearchCriteria")
        schema = hi_params.PARAMS["search_criteria"].schema
        assert set(schema["properties"]) == set(criteria.members)
        filters_shape = criteria.members["filters"]
        filters = schema["properties"]["filters"]
        assert (filters["minItems"], filters["maxItems"]) == (
            filters_shape.metadata["min"],
            filters_shape.metadata["max"],
        )
        search_filter = filters["items"]
        filter_shape = filters_shape.member
        assert set(search_filter["properties"]) == set(filter_shape.members)
        assert set(search_filter["required"]) == set(filter_shape.required_members)
        assert search_filter["properties"]["operator"]["enum"] == model.shape_for("Operator").enum
        values_shape = filter_shape.members["values"]
        values = search_filter["properties"]["values"]
        assert (values["minItems"], values["maxItems"]) == (
            values_shape.metadata["min"],
            values_shape.metadata["max"],
        )
        value = values["items"]
        union = values_shape.member
        assert union.metadata.get("union") is True
        assert (value["minProperties"], value["maxProperties"]) == (1, 1)
        assert list(value["properties"]) == list(union.members)
        json_types = {"string": {"string"}, "timestamp": {"string", "number"}, "boolean": {"boolean"}}
        for name, member in union.members.items():
            attribute = value["properties"][name]
            if member.type_name == "structure":
                assert attribute["type"] == "object"
                assert set(attribute["required"]) == set(member.required_members), name
                assert attribute["additionalProperties"] is False, name
                pairs = [(attribute["properties"][k], v) for k, v in member.members.items()]
                assert set(attribute["properties"]) == set(member.members), name
            else:
                pairs = [(attribute, member)]
            for sub_schema, sub_shape in pairs:
                types = sub_schema["type"]
                assert (
                    set(types if isinstance(types, list) else [types]) == json_types[sub_shape.type_name]
                ), name
                assert sub_schema.get("maxLength") == sub_shape.metadata.get("max"), name
                assert ("pattern" in sub_schema) == ("pattern" in sub_shape.metadata), name
        sort_shape = criteria.members["sort"]
        sort = schema["properties"]["sort"]
        assert set(sort["required"]) == set(sort_shape.required_members)
        for key, member in sort_shape.members.items():
            assert sort["properties"][key]["enum"] == member.enum, key

    def test_every_param_explains_itself(self, dagbag: Any) -> None:
        from jsonschema import Draft7Validator
        from jsonschema.validators import validator_for

        params = dagbag.dags[IMPORT_DAG_ID].params
        for name in params:
            param = params.get_param(name)
            assert len(param.schema.get("description_md") or "") > 20, name
            assert "type" in param.schema, name
            # Airflow's check (jsonschema.validate) picks the validator from $schema: draft 7, not 2020-12.
            assert param.schema["$schema"] == hi_params.JSON_SCHEMA_DIALECT, name
            assert validator_for(param.schema) is Draft7Validator, name

    def test_serialized_params_keep_their_dialect(self, serialized_dag: Any) -> None:
        """The API server and the trigger form check the serialized schemas, which still name draft 7."""
        for name in hi_params.PARAMS:
            assert serialized_dag.params.get_param(name).schema["$schema"] == hi_params.JSON_SCHEMA_DIALECT

    @pytest.mark.parametrize(
        ("name", "value", "valid"),
        [(name, value, False) for name, value in BAD_PARAM_VALUES]
        + [(name, value, True) for name, value in VALID_CONF.items()],
    )
    def test_draft_2020_12_gives_the_same_verdict(self, name: str, value: Any, valid: bool) -> None:
        """
        Without ``$schema`` jsonschema would check the same schema as draft 2020-12 (as Airflow did before the
        dialect was named): both drafts accept and refuse the same values.
        """
        from jsonschema import Draft7Validator, Draft202012Validator, FormatChecker

        schema = hi_params.PARAMS[name].schema
        without_dialect = {k: v for k, v in schema.items() if k != "$schema"}
        Draft7Validator.check_schema(schema)
        Draft202012Validator.check_schema(without_dialect)
        draft_7 = Draft7Validator(schema, format_checker=FormatChecker()).is_valid(value)
        draft_2020_12 = Draft202012Validator(without_dialect, format_checker=FormatChecker()).is_valid(value)
        assert (draft_7, draft_2020_12) == (valid, valid)


def test_example_dag_schedules_on_the_import_dags_asset(dagbag: Any, import_dag_module: Any) -> None:
    """The downstream example listens to exactly the asset the import DAG updates."""
    from airflow.sdk import Asset

    import_dag = dagbag.dags[IMPORT_DAG_ID]
    outlets = [o for t in import_dag.tasks for o in t.outlets]
    assert outlets == [import_dag_module.IMAGE_SETS]
    assert outlets[0] == Asset(
        name=import_dag_module.IMAGE_SETS_ASSET_NAME, uri=outlets[0].uri, group="medical-imaging"
    )
    example = dagbag.dags[EXAMPLE_DAG_ID]
    condition = example.timetable.asset_condition
    # The Asset itself, not Asset.ref(name=...): Airflow 3.3 gives a name reference's runs no asset events.
    assert list(condition.objects) == [import_dag_module.IMAGE_SETS]
    assert type(condition.objects[0]) is Asset
