"""
``healthimaging.params``: the import DAG's Params, derived from the generated model constraints, and the resolution
of a run's params, Variables and data interval into import specs (every refusal before any job starts).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from healthimaging import model_constraints
from healthimaging.params import (
    JSON_SCHEMA_DIALECT,
    PARAMS,
    VAR_STAGING_S3_URI,
    build_params,
    member_schema,
    resolve_import_specs,
)

ROOT = Path(__file__).resolve().parents[3]
DATASTORE = "0123456789abcdef0123456789abcdef"
ROLE_ARN = "arn:aws:iam::123456789012:role/HealthImagingImport"
OUTPUT = "s3://dicom-bucket/import-output/"
TEMPLATE = "s3://dicom-bucket/incoming/{{ data_interval_start.strftime('%Y/%m/%d') }}/"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "generate_model_constraints", ROOT / "scripts/generate_model_constraints.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestModelConstraints:
    def test_generated_module_agrees_with_botocore(self) -> None:
        """Fails when botocore's medical-imaging model changes: run scripts/generate_model_constraints.py."""
        expected = _generator().extract()
        actual = {name: getattr(model_constraints, name) for name in expected}
        assert actual == expected
        public = {n for n in vars(model_constraints) if n.isupper()}
        assert public == set(expected)

    def test_generated_module_is_what_the_script_writes(self) -> None:
        check = subprocess.run(
            [sys.executable, str(ROOT / "scripts/generate_model_constraints.py"), "--check"], cwd=ROOT
        )
        assert check.returncode == 0, "plugins/healthimaging/model_constraints.py was edited by hand"

    def test_a_disagreeing_model_is_noticed(self) -> None:
        """The comparison can fail: a model whose data store id pattern differs extracts differently."""
        import botocore.session

        model = botocore.session.get_session().get_service_model("medical-imaging")
        shape = model.operation_model("StartDICOMImportJob").input_shape.members["datastoreId"]
        original = shape.metadata["pattern"]
        shape.metadata["pattern"] = "[0-9a-f]{32}"
        try:
            assert _generator().extract(model)["MEMBERS"] != model_constraints.MEMBERS
        finally:
            shape.metadata["pattern"] = original

    def test_module_imports_nothing(self) -> None:
        code = "import sys, healthimaging.params; print(sorted(m for m in sys.modules if m.startswith(('botocore', 'boto3'))))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin"},
        )
        assert out.stdout.strip() == "[]"


class TestParamSchemas:
    """Each Param's pattern and lengths are the generated module's, so the form and the API agree."""

    @pytest.mark.parametrize(
        ("param", "member"),
        [
            ("datastore_id", "datastore_id"),
            ("data_access_role_arn", "data_access_role_arn"),
            ("input_s3_uri", "input_s3_uri"),
            ("output_s3_uri", "output_s3_uri"),
            ("staging_s3_uri", "input_s3_uri"),
            ("job_name", "job_name"),
            ("client_token", "client_token"),
        ],
    )
    def test_string_params_use_the_model(self, param: str, member: str) -> None:
        schema = PARAMS[param].schema
        limits = model_constraints.MEMBERS[member]
        assert schema["pattern"] == f"^{limits['pattern']}$"
        assert schema["maxLength"] == limits.get("max", schema["maxLength"])
        assert {k: schema[k] for k in ("pattern", "minLength", "maxLength")} == member_schema(member)

    def test_fixed_length_ids_stop_the_form_at_their_length(self) -> None:
        assert (PARAMS["datastore_id"].schema["minLength"], PARAMS["datastore_id"].schema["maxLength"]) == (
            32,
            32,
        )

    def test_prefix_list_items_and_page_size_use_the_model(self) -> None:
        items = PARAMS["input_s3_uris"].schema["items"]
        assert items["pattern"] == f"^{model_constraints.MEMBERS['input_s3_uri']['pattern']}$"
        schema = PARAMS["max_results"].schema
        assert (schema["minimum"], schema["maximum"]) == (
            model_constraints.MAX_RESULTS["min"],
            model_constraints.MAX_RESULTS["max"],
        )
        assert PARAMS["phi_allow_tags"].schema["items"]["enum"] == model_constraints.DICOM_SUMMARY_TAGS

    def test_a_changed_constraint_changes_the_schema(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The schemas are built from the module, not restated: a different limit gives a different schema."""
        monkeypatch.setitem(model_constraints.MEMBERS, "job_name", {"pattern": "[a-z]+", "min": 1, "max": 8})
        schema = build_params()["job_name"].schema
        assert (schema["pattern"], schema["maxLength"]) == ("^[a-z]+$", 8)

    def test_form_conventions(self) -> None:
        """Markdown in ``description_md`` (rendered by the form); only params a run needs are required."""
        for name, param in PARAMS.items():
            assert param.description is None, name
            assert len(param.schema["description_md"]) > 20, name
            assert param.schema["title"], name
            assert param.schema["$schema"] == JSON_SCHEMA_DIALECT, name
            # Airflow 3.3's form marks a field required when its type does not include "null".
            assert "null" in param.schema["type"], name

    def test_new_params_default_off(self) -> None:
        assert PARAMS["staging_s3_uri"].value is None
        assert PARAMS["allow_empty"].value is False
        assert PARAMS["phi_allow_tags"].value == []
        assert PARAMS["phi_allow_tags"].resolve(["DICOMStudyDate"]) == ["DICOMStudyDate"]
        from airflow.sdk.exceptions import ParamValidationError

        with pytest.raises(ParamValidationError):
            build_params()["phi_allow_tags"].resolve(["PatientName"])


class TestResolveInputs:
    """The pure resolution behind ``resolve_imports`` (the real-Airflow paths are tested in tests/dags)."""

    @staticmethod
    def variables(**overrides: str | None) -> Any:
        values = {
            "healthimaging_datastore_id": DATASTORE,
            "healthimaging_data_access_role_arn": ROLE_ARN,
            "healthimaging_output_s3_uri": OUTPUT,
            "healthimaging_input_s3_uri_template": TEMPLATE,
            **overrides,
        }
        return values.get

    def test_scheduled_run_renders_the_template(self) -> None:
        specs = resolve_import_specs({}, self.variables(), lambda t: t.replace(TEMPLATE, "s3://bkt/x/"))
        assert [s["input_s3_uri"] for s in specs] == ["s3://bkt/x/"]
        assert specs[0]["datastore_id"] == DATASTORE
        assert specs[0]["data_access_role_arn"] == ROLE_ARN
        assert specs[0]["output_s3_uri"] == OUTPUT
        assert specs[0]["client_token"] is None

    def test_params_win_and_prefixes_are_deduplicated(self) -> None:
        params = {
            "datastore_id": "f" * 32,
            "input_s3_uri": "s3://dicom-bucket/a/",
            "input_s3_uris": ["s3://dicom-bucket/a/", "s3://dicom-bucket/b/"],
            "max_results": 10,
            "max_failed_files": 2,
            "include_phi": True,
        }
        specs = resolve_import_specs(params, self.variables(), None)
        assert [s["input_s3_uri"] for s in specs] == ["s3://dicom-bucket/a/", "s3://dicom-bucket/b/"]
        assert {s["datastore_id"] for s in specs} == {"f" * 32}
        assert {(s["max_results"], s["max_failed_files"], s["include_phi"]) for s in specs} == {(10, 2, True)}

    @pytest.mark.parametrize(
        "nested",
        [
            ["s3://bkt/day/", "s3://bkt/day/P1/"],
            ["s3://bkt/day/P1", "s3://bkt/day/P10/"],
            ["s3://bkt/x/", "s3://bkt/x/"],
        ],
    )
    def test_nested_input_prefixes_are_refused(self, nested: list[str]) -> None:
        """Overlapping prefixes would import their common files twice (review finding); duplicates fold into one."""
        from airflow.sdk.exceptions import AirflowFailException

        params = {"input_s3_uris": nested}
        if nested[0] == nested[1]:
            assert len(resolve_import_specs(params, self.variables(), None)) == 1
            return
        with pytest.raises(AirflowFailException, match="imported twice"):
            resolve_import_specs(params, self.variables(), None)
        apart = {"input_s3_uris": ["s3://bkt/day/P1/", "s3://bkt/day/P10/"]}
        assert len(resolve_import_specs(apart, self.variables(), None)) == 2

    def test_max_failed_files_defaults_to_the_setting(self, monkeypatch: pytest.MonkeyPatch) -> None:
        params = {"input_s3_uri": "s3://bkt/day/"}
        assert resolve_import_specs(params, self.variables(), None)[0]["max_failed_files"] is None
        monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_FAILED_FILES", "3")
        assert resolve_import_specs(params, self.variables(), None)[0]["max_failed_files"] == 3
        assert (
            resolve_import_specs({**params, "max_failed_files": 0}, self.variables(), None)[0][
                "max_failed_files"
            ]
            == 0
        )

    def test_manual_run_without_interval_needs_a_prefix(self) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        with pytest.raises(AirflowFailException, match="no data interval.*input_s3_uri"):
            resolve_import_specs({}, self.variables(), None)

    @pytest.mark.parametrize(
        ("variable", "value", "match"),
        [
            ("healthimaging_datastore_id", None, "datastore_id is not set.*healthimaging_datastore_id"),
            ("healthimaging_datastore_id", "NOT-AN-ID", "datastore_id from Variable"),
            (
                "healthimaging_data_access_role_arn",
                "arn:aws:iam::1:role/x",
                "data_access_role_arn from Variable",
            ),
            ("healthimaging_output_s3_uri", "/tmp/out", "output_s3_uri from Variable"),
            ("healthimaging_input_s3_uri_template", None, "healthimaging_input_s3_uri_template"),
            ("healthimaging_input_s3_uri_template", "file:///x", "input_s3_uri from Variable"),
        ],
    )
    def test_bad_configuration_is_refused(self, variable: str, value: Any, match: str) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        with pytest.raises(AirflowFailException, match=match):
            resolve_import_specs({}, self.variables(**{variable: value}), lambda t: t)

    @pytest.mark.parametrize(
        ("criteria", "match"),
        [
            (
                {
                    "filters": [
                        {
                            "operator": "BETWEEN",
                            "values": [{"DICOMPatientId": "P1"}, {"DICOMPatientId": "P2"}],
                        }
                    ]
                },
                "BETWEEN applies only to",
            ),
            (
                {"filters": [{"operator": "EQUAL", "values": [{"createdAt": 1}, {"createdAt": 2}]}]},
                "EQUAL takes",
            ),
            ("{not json", "not valid JSON"),
        ],
    )
    def test_search_criteria_checked_before_any_import(self, criteria: Any, match: str) -> None:
        """Criteria the schema lets through but the API refuses fail resolve_imports, naming no value."""
        from airflow.sdk.exceptions import AirflowFailException

        params = {"input_s3_uri": "s3://dicom-bucket/a/", "search_criteria": criteria}
        with pytest.raises(
            AirflowFailException, match=f"param search_criteria is invalid.*{match}"
        ) as raised:
            resolve_import_specs(params, self.variables(), None)
        assert "P1" not in str(raised.value)
        good = {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "P1"}]}]}
        specs = resolve_import_specs({**params, "search_criteria": good}, self.variables(), None)
        assert len(specs) == 1

    def test_one_client_token_cannot_name_several_imports(self) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        params = {"client_token": "tok", "input_s3_uris": ["s3://dicom-bucket/a/", "s3://dicom-bucket/b/"]}
        with pytest.raises(AirflowFailException, match="client_token"):
            resolve_import_specs(params, self.variables(), None)
        single = resolve_import_specs(
            {**params, "input_s3_uris": ["s3://dicom-bucket/a/"]}, self.variables(), None
        )
        assert single[0]["client_token"] == "tok"

    def test_new_params_reach_every_spec(self) -> None:
        params = {
            "input_s3_uris": ["s3://dicom-bucket/a/", "s3://dicom-bucket/b/"],
            "allow_empty": True,
            "phi_allow_tags": ["DICOMStudyDate"],
        }
        specs = resolve_import_specs(params, self.variables(), None)
        assert {(s["staging_s3_uri"], s["allow_empty"], tuple(s["phi_allow_tags"])) for s in specs} == {
            (None, True, ("DICOMStudyDate",))
        }
        staged = resolve_import_specs(
            params, self.variables(**{VAR_STAGING_S3_URI: " s3://dicom-bucket/staging/ "}), None
        )
        assert {s["staging_s3_uri"] for s in staged} == {"s3://dicom-bucket/staging/"}
        chosen = resolve_import_specs(
            {**params, "staging_s3_uri": "s3://other-bucket/staging/"},
            self.variables(**{VAR_STAGING_S3_URI: "s3://dicom-bucket/staging/"}),
            None,
        )
        assert {s["staging_s3_uri"] for s in chosen} == {"s3://other-bucket/staging/"}

    def test_defaults_when_the_form_sends_null(self) -> None:
        """Optional params may arrive as null from the trigger form; they mean their defaults."""
        params = {
            "input_s3_uri": "s3://dicom-bucket/a/",
            "input_s3_uris": None,
            "max_results": None,
            "include_phi": None,
            "allow_empty": None,
            "phi_allow_tags": None,
            "search_criteria": None,
        }
        (spec,) = resolve_import_specs(params, self.variables(), None)
        assert (spec["max_results"], spec["include_phi"], spec["allow_empty"], spec["phi_allow_tags"]) == (
            50,
            False,
            False,
            [],
        )

    @pytest.mark.parametrize(
        ("params", "variables", "named"),
        [
            (
                {"input_s3_uri": "s3://dicom-bucket/"},
                {},
                ("output_s3_uri", "s3://dicom-bucket/import-output/"),
            ),
            (
                {"input_s3_uris": ["s3://dicom-bucket/in/", "s3://dicom-bucket/import-output"]},
                {},
                ("output_s3_uri", "s3://dicom-bucket/import-output"),
            ),
            (
                {"input_s3_uri": "s3://dicom-bucket/in/", "staging_s3_uri": "s3://dicom-bucket/in/staging/"},
                {},
                ("staging_s3_uri", "s3://dicom-bucket/in/"),
            ),
            (
                {"input_s3_uri": "s3://dicom-bucket/in/"},
                {VAR_STAGING_S3_URI: "s3://dicom-bucket/in/"},
                ("staging_s3_uri", "s3://dicom-bucket/in/"),
            ),
        ],
    )
    def test_a_prefix_inside_an_input_prefix_is_refused_naming_both(
        self, params: dict[str, Any], variables: dict[str, str], named: tuple[str, str]
    ) -> None:
        with pytest.raises(AirflowFailException) as raised:
            resolve_import_specs(params, self.variables(**variables), None)
        message = str(raised.value)
        assert all(part in message for part in named), message
        assert "input_s3_uri" in message

    def test_prefixes_side_by_side_are_accepted(self) -> None:
        params = {"input_s3_uri": "s3://dicom-bucket/in/", "staging_s3_uri": "s3://dicom-bucket/staging/"}
        assert len(resolve_import_specs(params, self.variables(), None)) == 1

    @pytest.mark.parametrize(
        ("params", "match"),
        [
            (
                {"datastore_id": "NOT-A-DATASTORE"},
                "datastore_id from param datastore_id is invalid: must be 32",
            ),
            (
                {"staging_s3_uri": "/tmp/staging"},
                "staging_s3_uri from param staging_s3_uri is invalid: must be an S3",
            ),
            ({"phi_allow_tags": ["PatientName"]}, "phi_allow_tags"),
            ({"max_results": 0}, "max_results"),
        ],
    )
    def test_refusals_are_short_and_in_words(self, params: dict[str, Any], match: str) -> None:
        with pytest.raises(AirflowFailException, match=match) as raised:
            resolve_import_specs({"input_s3_uri": "s3://dicom-bucket/in/", **params}, self.variables(), None)
        assert "Failed validating" not in str(raised.value)
        assert len(str(raised.value)) < 300
