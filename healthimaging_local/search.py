"""SearchImageSets semantics: filters, sort and keyset pagination over the image_sets table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from healthimaging_local.model import max_results_default, validation_error
from healthimaging_local.store import normalize_study_date_time

if TYPE_CHECKING:
    from healthimaging_local.store import Store

EQUAL_COLUMNS = {
    "DICOMPatientId": "patient_id",
    "DICOMAccessionNumber": "accession_number",
    "DICOMStudyId": "study_id",
    "DICOMStudyInstanceUID": "study_uid",
    "DICOMSeriesInstanceUID": "series_uid",
    "isPrimary": "is_primary",
}
BETWEEN_COLUMNS = {
    "createdAt": "created_at",
    "updatedAt": "updated_at",
    "DICOMStudyDateAndTime": "study_date_time",
}
SORT_COLUMNS = BETWEEN_COLUMNS


def _bound(attribute: str, value: dict[str, Any]) -> Any:
    inner = value[attribute]
    if attribute == "DICOMStudyDateAndTime":
        return normalize_study_date_time(inner["DICOMStudyDate"], inner.get("DICOMStudyTime"))
    if attribute == "isPrimary":
        return int(inner)
    return inner


def _where(filters: list[dict[str, Any]]) -> tuple[list[str], list[Any]]:
    """SQL conditions for the validated filters (raises ValidationException on semantic errors)."""
    clauses: list[str] = []
    params: list[Any] = []
    for index, item in enumerate(filters, start=1):
        where = f"searchCriteria.filters.{index}.member"
        values = item["values"]
        attributes = {next(iter(v)) for v in values}
        if len(attributes) != 1:
            raise validation_error(f"{where}.values", "All values of one filter must use the same attribute")
        attribute = attributes.pop()
        bounds = [_bound(attribute, v) for v in values]
        if item["operator"] == "EQUAL":
            if attribute not in EQUAL_COLUMNS:
                raise validation_error(
                    f"{where}.operator", f"EQUAL is not supported for {attribute}; use BETWEEN"
                )
            if len(values) != 1:
                raise validation_error(f"{where}.values", "Operator EQUAL takes exactly 1 value")
            clauses.append(f"{EQUAL_COLUMNS[attribute]} = ?")
            params.append(bounds[0])
        else:
            if attribute not in BETWEEN_COLUMNS:
                raise validation_error(
                    f"{where}.operator", f"BETWEEN is not supported for {attribute}; use EQUAL"
                )
            if len(values) != 2:
                raise validation_error(
                    f"{where}.values", "Operator BETWEEN takes exactly 2 values (lower, upper)"
                )
            if bounds[0] > bounds[1]:
                raise validation_error(
                    f"{where}.values", "The lower bound must not be greater than the upper bound"
                )
            if attribute == "DICOMStudyDateAndTime":
                clauses.append("study_date_time != ''")
            clauses.append(f"{BETWEEN_COLUMNS[attribute]} BETWEEN ? AND ?")
            params.extend(bounds)
    return clauses, params


def _selective_equal(filters: list[dict[str, Any]]) -> bool:
    """True when an EQUAL filter is on an indexed, selective column (every EQUAL attribute but isPrimary)."""
    return any(
        item["operator"] == "EQUAL" and next(iter(item["values"][0])) != "isPrimary" for item in filters
    )


def summary(row: Any) -> dict[str, Any]:
    """The ImageSetsMetadataSummary of an image_sets row.

    :param row: a row of the image_sets table.
    """
    return {
        "imageSetId": row["id"],
        "version": row["version"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "lastAccessedAt": row["updated_at"],
        "storageTier": "FREQUENT_ACCESS",
        "DICOMTags": json.loads(row["dicom_tags"]),
        "isPrimary": bool(row["is_primary"]),
    }


def search_image_sets(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    """Answer SearchImageSets for validated input (data store existence is checked by the caller).

    :param store: the persistence layer.
    :param params: the operation input (botocore member names).
    :return: the operation output.
    """
    criteria = params.get("searchCriteria") or {}
    filters = criteria.get("filters") or []
    sort = criteria.get("sort")
    clauses, values = _where(filters)
    column = SORT_COLUMNS[sort["sortField"]] if sort else "updated_at"
    # An EQUAL filter on a selective column matches few rows: stop SQLite from walking a sort-order index
    # over the whole data store instead of the column's own index (unary + disqualifies an index).
    plus = "+" if _selective_equal(filters) else ""
    descending = (sort["sortOrder"] == "DESC") if sort else True
    limit = params.get("maxResults") or max_results_default()
    scope = json.dumps(["SearchImageSets", params["datastoreId"], criteria], sort_keys=True, default=str)
    if params.get("nextToken"):
        last_value, last_id = store.decode_token(params["nextToken"], scope)
        compare = "<" if descending else ">"
        clauses.append(f"({plus}{column}, {plus}id) {compare} (?, ?)")
        values.extend([last_value, last_id])
    order = "DESC" if descending else "ASC"
    sql = (
        "SELECT * FROM image_sets WHERE datastore_id = ? AND state = 'ACTIVE'"
        + "".join(f" AND {c}" for c in clauses)
        + f" ORDER BY {plus}{column} {order}, {plus}id {order} LIMIT ?"
    )
    rows = store.query(sql, [params["datastoreId"], *values, limit + 1])
    page = rows[:limit]
    output: dict[str, Any] = {"imageSetsMetadataSummaries": [summary(r) for r in page], "sort": sort}
    if len(rows) > limit:
        last = page[-1]
        output["nextToken"] = store.encode_token(scope, [last[column], last["id"]])
    return output
