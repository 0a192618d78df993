"""
Input checks for HealthImaging calls, run before any AWS call.

Patterns, lengths and enums come from :mod:`healthimaging.model_constraints`, generated from botocore's service
model of ``medical-imaging`` (the single source; a test keeps the two in step); botocore itself does not check
``pattern`` or ``max`` client-side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from healthimaging import model_constraints as model

# Which operator each search attribute takes, and how many values that operator needs.
_DATE_ATTRIBUTES = frozenset({"createdAt", "updatedAt", "DICOMStudyDateAndTime"})
_OPERATOR_VALUE_COUNT = {"EQUAL": 1, "BETWEEN": 2}


def member_constraints(parameter: str) -> dict[str, Any]:
    """
    Return the model's ``pattern``/``min``/``max`` for one operator parameter.

    :param parameter: the snake_case parameter name (e.g. ``datastore_id``)
    """
    return dict(model.MEMBERS[parameter])


def check_parameter(parameter: str, value: Any, *, required: bool = True) -> None:
    """
    Check one value against the service model; raise ``ValueError`` naming the parameter.

    :param parameter: the snake_case parameter name (e.g. ``datastore_id``)
    :param value: the value after templating
    :param required: whether None/empty is an error
    """
    if value is None or value == "":
        if required:
            raise ValueError(f"{parameter} is required")
        return
    if not isinstance(value, str):
        raise ValueError(f"{parameter} must be a string, got {type(value).__name__}")
    rules = member_constraints(parameter)
    if "min" in rules and len(value) < rules["min"]:
        raise ValueError(f"{parameter} must be at least {rules['min']} characters long")
    if "max" in rules and len(value) > rules["max"]:
        raise ValueError(f"{parameter} must be at most {rules['max']} characters long, got {len(value)}")
    pattern = rules.get("pattern")
    if pattern and not re.fullmatch(pattern, value):
        # Show the value only for non-identifying fields; datastore/job ids and URIs are not PHI.
        raise ValueError(f"{parameter} {value!r} does not match the pattern {pattern}")


def check_import_parameters(**parameters: Any) -> None:
    """
    Check StartDICOMImportJob parameters; ``job_name``, ``client_token`` and ``input_owner_account_id`` may be None.

    :param parameters: snake_case parameter name to value
    """
    optional = {"job_name", "client_token", "input_owner_account_id"}
    for parameter, value in parameters.items():
        check_parameter(parameter, value, required=parameter not in optional)
    if "input_s3_uri" in parameters and "output_s3_uri" in parameters:
        check_output_outside_input(parameters["input_s3_uri"], parameters["output_s3_uri"])


def split_s3_uri(uri: str) -> tuple[str, str]:
    """
    Split ``s3://bucket/key`` into bucket and key (key may be empty).

    :param uri: an S3 URI
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def check_output_outside_input(input_s3_uri: str, output_s3_uri: str, *, name: str = "output_s3_uri") -> None:
    """
    Refuse an output prefix equal to or inside the input prefix: the job would import its own outputs.

    The service lists the input as a plain key prefix and writes into ``<output>/<job folder>/``.

    :param input_s3_uri: the import input prefix
    :param output_s3_uri: the import output prefix (or another prefix written to, such as the staging prefix)
    :param name: what ``output_s3_uri`` is, for the message
    """
    in_bucket, in_key = split_s3_uri(input_s3_uri)
    out_bucket, out_key = split_s3_uri(output_s3_uri)
    out_folder = out_key.rstrip("/") + "/" if out_key else ""
    if in_bucket == out_bucket and (
        out_folder.startswith(in_key) or out_key.rstrip("/") == in_key.rstrip("/")
    ):
        raise ValueError(
            f"{name} {output_s3_uri!r} is equal to or inside input_s3_uri {input_s3_uri!r}: "
            "the job would import its own output files; use a prefix outside the input"
        )


def coerce_max_results(value: Any) -> int:
    """
    Return ``max_results`` as an int in the model's range (a templated string is accepted).

    :param value: the value after templating
    """
    rules = model.MAX_RESULTS
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_results must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"max_results must be an integer, got {value!r}")
    if not rules["min"] <= number <= rules["max"]:
        raise ValueError(f"max_results must be between {rules['min']} and {rules['max']}, got {number}")
    return number


def parse_search_criteria(value: Any) -> dict[str, Any]:
    """
    Accept search criteria as a dict or a JSON string (after templating) and check them.

    Error messages never quote filter values: they may identify a patient.

    :param value: the ``search_criteria`` argument
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("search_criteria is not valid JSON") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"search_criteria must be an object, got {type(value).__name__}")
    criteria = dict(value)
    check_search_criteria(criteria)
    return criteria


def check_search_criteria(criteria: Mapping[str, Any]) -> None:
    """
    Check SearchImageSets criteria: 1-2 filters, allowed attributes, EQUAL/BETWEEN value counts, sort enums.

    :param criteria: the ``searchCriteria`` request member
    """
    allowed_keys = set(model.SEARCH_CRITERIA_MEMBERS)
    unknown = set(criteria) - allowed_keys
    if unknown:
        raise ValueError(
            f"search_criteria has unknown keys {sorted(unknown)}; allowed: {sorted(allowed_keys)}"
        )
    filters = criteria.get("filters")
    if filters is not None:
        limits = model.SEARCH_FILTERS
        if not isinstance(filters, list) or not limits["min"] <= len(filters) <= limits["max"]:
            raise ValueError(
                f"search_criteria.filters must be a list of {limits['min']}-{limits['max']} filters"
            )
        for index, search_filter in enumerate(filters):
            _check_filter(index, search_filter)
    sort = criteria.get("sort")
    if sort is not None:
        if not isinstance(sort, Mapping) or set(sort) != set(model.SORT):
            raise ValueError(f"search_criteria.sort must have exactly the keys {sorted(model.SORT)}")
        for key, enum in model.SORT.items():
            if sort[key] not in enum:
                raise ValueError(f"search_criteria.sort.{key} must be one of {enum}")


def _check_filter(index: int, search_filter: Any) -> None:
    where = f"search_criteria.filters[{index}]"
    if not isinstance(search_filter, Mapping) or set(search_filter) != set(model.SEARCH_FILTER_MEMBERS):
        raise ValueError(f"{where} must have exactly the keys 'operator' and 'values'")
    operator = search_filter["operator"]
    if operator not in model.SEARCH_OPERATORS:
        raise ValueError(f"{where}.operator must be one of {model.SEARCH_OPERATORS}")
    values = search_filter["values"]
    if not isinstance(values, list) or len(values) != _OPERATOR_VALUE_COUNT[operator]:
        raise ValueError(f"{where}: {operator} takes exactly {_OPERATOR_VALUE_COUNT[operator]} value(s)")
    attributes = set(model.SEARCH_ATTRIBUTES)
    names = set()
    for value in values:
        if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in attributes:
            raise ValueError(
                f"{where}.values: each value must have exactly one key from {sorted(attributes)}"
            )
        names.add(next(iter(value)))
    if len(names) != 1:
        raise ValueError(f"{where}.values must all use the same attribute")
    attribute = names.pop()
    if operator == "BETWEEN" and attribute not in _DATE_ATTRIBUTES:
        raise ValueError(f"{where}: BETWEEN applies only to {sorted(_DATE_ATTRIBUTES)}, not {attribute}")


def coerce_bool(parameter: str, value: Any) -> bool:
    """
    Return a flag as a bool; a templated ``"True"``/``"false"`` string is parsed, never taken as truthy.

    :param parameter: the parameter name, for the error message
    :param value: the value after templating
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{parameter} must be a boolean, got {value!r}")


def coerce_optional_count(parameter: str, value: Any) -> int | None:
    """
    Return a non-negative int or None; a templated string (``"3"``, ``"None"``, ``""``) is parsed.

    :param parameter: the parameter name, for the error message
    :param value: the value after templating
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "null")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{parameter} must be a non-negative integer or None, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{parameter} must be a non-negative integer or None, got {value!r}") from None
    if number < 0 or (isinstance(value, float) and value != number):
        raise ValueError(f"{parameter} must be a non-negative integer or None, got {value!r}")
    return number
