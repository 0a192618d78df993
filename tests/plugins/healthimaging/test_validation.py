from __future__ import annotations

import botocore.session
import pytest

from healthimaging.validation import (
    check_import_parameters,
    check_output_outside_input,
    check_parameter,
    coerce_bool,
    coerce_max_results,
    coerce_optional_count,
    member_constraints,
    parse_search_criteria,
)


def test_constraints_come_from_the_service_model() -> None:
    model = botocore.session.get_session().get_service_model("medical-imaging")
    members = model.operation_model("StartDICOMImportJob").input_shape.members
    assert member_constraints("datastore_id") == {"pattern": "[0-9a-z]{32}"}
    assert member_constraints("data_access_role_arn") == {
        "pattern": members["dataAccessRoleArn"].metadata["pattern"],
        "min": 20,
        "max": 2048,
    }
    assert member_constraints("input_s3_uri")["max"] == 1024
    assert member_constraints("job_name") == {"pattern": "[A-Za-z0-9._/#-]+", "min": 1, "max": 64}
    assert member_constraints("client_token") == {"pattern": "[A-Za-z0-9._-]+", "min": 1, "max": 64}
    assert member_constraints("job_id") == {"pattern": "[0-9a-z]+", "min": 1, "max": 32}


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("datastore_id", "0123456789abcdef0123456789abcdef"),
        ("data_access_role_arn", "arn:aws:iam::123456789012:role/ImportRole"),
        ("data_access_role_arn", "arn:aws-us-gov:iam::123456789012:role/path/Role"),
        ("input_s3_uri", "s3://my-bucket/dicom/"),
        ("input_s3_uri", "s3://my.bucket-1"),
        ("job_name", "dag.run_1/#-x"),
        ("client_token", "a" * 64),
        ("job_id", "abc123"),
        ("input_owner_account_id", "123456789012"),
    ],
)
def test_valid(parameter: str, value: str) -> None:
    check_parameter(parameter, value)


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("datastore_id", "0123456789ABCDEF0123456789abcdef"),
        ("datastore_id", "0123456789abcdef"),
        ("datastore_id", "0123456789abcdef0123456789abcdef0"),
        ("data_access_role_arn", "arn:aws:iam::12345678901:role/x"),
        ("data_access_role_arn", "arn:aws:iam::123456789012:user/x"),
        ("data_access_role_arn", "arn:aws:iam::123456789012:role/" + "x" * 2048),
        ("input_s3_uri", "s3://a/x"),
        ("input_s3_uri", "s3://Bucket/x"),
        ("input_s3_uri", "https://bucket/x"),
        ("input_s3_uri", "s3://bucket/" + "k" * 1020),
        ("job_name", "has space"),
        ("job_name", "x" * 65),
        ("client_token", "a/b"),
        ("client_token", "a" * 65),
        ("job_id", "ABC"),
        ("job_id", "a" * 33),
        ("input_owner_account_id", "12345"),
    ],
)
def test_invalid_names_the_parameter(parameter: str, value: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        check_parameter(parameter, value)


def test_required_and_optional() -> None:
    with pytest.raises(ValueError, match="datastore_id is required"):
        check_parameter("datastore_id", None)
    check_parameter("job_name", None, required=False)
    with pytest.raises(ValueError, match="must be a string"):
        check_parameter("job_name", 5)


@pytest.mark.parametrize(
    ("input_uri", "output_uri", "refused"),
    [
        ("s3://b/in/", "s3://b/out/", False),
        ("s3://b/in/", "s3://other/in/", False),
        ("s3://b/in/", "s3://b/in/", True),
        ("s3://b/in/", "s3://b/in", True),
        ("s3://b/in/", "s3://b/in/out/", True),
        ("s3://b/in", "s3://b/in-out/", True),
        ("s3://b", "s3://b/out/", True),
        ("s3://b/", "s3://b/out/", True),
        ("s3://b", "s3://bb/out/", False),
        ("s3://b/in/sub/", "s3://b/in/", False),
    ],
)
def test_output_outside_input(input_uri: str, output_uri: str, refused: bool) -> None:
    if refused:
        with pytest.raises(ValueError, match="output_s3_uri"):
            check_output_outside_input(input_uri, output_uri)
    else:
        check_output_outside_input(input_uri, output_uri)


def test_check_import_parameters_checks_every_field() -> None:
    with pytest.raises(ValueError, match="client_token"):
        check_import_parameters(datastore_id="0" * 32, client_token="bad token", job_name=None)


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("50", 50), (" 7 ", 7), (20.0, 20)])
def test_max_results_coerced(value, expected: int) -> None:
    assert coerce_max_results(value) == expected


@pytest.mark.parametrize("value", [0, 51, "x", None, 2.5, "-1"])
def test_max_results_rejected(value) -> None:
    with pytest.raises(ValueError, match="max_results"):
        coerce_max_results(value)


EQUAL_PATIENT = {"operator": "EQUAL", "values": [{"DICOMPatientId": "SECRET-PID"}]}
BETWEEN_UPDATED = {"operator": "BETWEEN", "values": [{"updatedAt": 1}, {"updatedAt": 2}]}


@pytest.mark.parametrize(
    "criteria",
    [
        {},
        {"filters": [EQUAL_PATIENT]},
        {"filters": [EQUAL_PATIENT, BETWEEN_UPDATED]},
        {"filters": [BETWEEN_UPDATED], "sort": {"sortOrder": "ASC", "sortField": "updatedAt"}},
        {"filters": [{"operator": "EQUAL", "values": [{"isPrimary": True}]}]},
        '{"filters": [{"operator": "EQUAL", "values": [{"DICOMSeriesInstanceUID": "1.2.3"}]}]}',
        "",
        None,
    ],
)
def test_search_criteria_valid(criteria) -> None:
    parsed = parse_search_criteria(criteria)
    assert isinstance(parsed, dict)


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ({"filters": []}, "1-2 filters"),
        ({"filters": [EQUAL_PATIENT] * 3}, "1-2 filters"),
        (
            {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientName": "SECRET-PID"}]}]},
            "exactly one key",
        ),
        ({"filters": [{"operator": "LIKE", "values": [{"DICOMPatientId": "SECRET-PID"}]}]}, "operator"),
        (
            {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "SECRET-PID"}] * 2}]},
            "exactly 1 value",
        ),
        ({"filters": [{"operator": "BETWEEN", "values": [{"updatedAt": 1}]}]}, "exactly 2 value"),
        (
            {"filters": [{"operator": "BETWEEN", "values": [{"DICOMPatientId": "SECRET-PID"}] * 2}]},
            "BETWEEN applies only",
        ),
        (
            {"filters": [{"operator": "BETWEEN", "values": [{"createdAt": 1}, {"updatedAt": 2}]}]},
            "same attribute",
        ),
        ({"filters": [{"operator": "EQUAL"}]}, "exactly the keys"),
        ({"filter": [EQUAL_PATIENT]}, "unknown keys"),
        ({"filters": [EQUAL_PATIENT], "sort": {"sortOrder": "UP", "sortField": "updatedAt"}}, "sortOrder"),
        ("[1, 2]", "must be an object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_search_criteria_invalid_without_leaking_values(criteria, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_search_criteria(criteria)
    assert "SECRET-PID" not in str(error.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("True", True), ("false", False), ("0", False), ("", False)],
)
def test_coerce_bool(value, expected: bool) -> None:
    assert coerce_bool("include_phi", value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, None])
def test_coerce_bool_rejects(value) -> None:
    with pytest.raises(ValueError, match="include_phi"):
        coerce_bool("include_phi", value)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("None", None), ("", None), (0, 0), ("3", 3), (5.0, 5)]
)
def test_coerce_optional_count(value, expected) -> None:
    assert coerce_optional_count("max_failed_files", value) == expected


@pytest.mark.parametrize("value", [-1, "x", True, 1.5, "-2"])
def test_coerce_optional_count_rejects(value) -> None:
    with pytest.raises(ValueError, match="max_failed_files"):
        coerce_optional_count("max_failed_files", value)
