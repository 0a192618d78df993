"""SearchImageSets: the nine filter attributes, sort, pagination and token checks (over HTTP)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from endpoint_helpers import WireRecorder, assert_wire_conforms, create_active_datastore

from healthimaging_local.server import LocalEndpoint
from healthimaging_local.store import ImageSetWrite, normalize_study_date_time


def seed(endpoint: LocalEndpoint, datastore_id: str, count: int, start: float = 1_600_000_000.0) -> list[str]:
    """Write ``count`` image sets straight into the store; set i has study date 2020-01-01 + i days etc."""
    writes = []
    for i in range(count):
        date = time.strftime("%Y%m%d", time.gmtime(start + i * 86400))
        tags: dict[str, Any] = {
            "DICOMPatientId": f"P{i % 7}",
            "DICOMAccessionNumber": f"A{i}",
            "DICOMStudyId": f"S{i % 3}",
            "DICOMStudyInstanceUID": f"1.2.{i}",
            "DICOMSeriesInstanceUID": f"1.3.{i}",
            "DICOMStudyDate": date,
            "DICOMStudyTime": "101500",
            "DICOMPatientName": None,
        }
        writes.append(
            (
                start + i,
                ImageSetWrite(
                    image_set_id=uuid.uuid4().hex,
                    datastore_id=datastore_id,
                    version=1,
                    is_primary=i % 5 != 0,
                    study_uid=tags["DICOMStudyInstanceUID"],
                    series_uid=tags["DICOMSeriesInstanceUID"],
                    patient_id=tags["DICOMPatientId"],
                    accession_number=tags["DICOMAccessionNumber"],
                    study_id=tags["DICOMStudyId"],
                    study_date_time=normalize_study_date_time(date, "101500"),
                    dicom_tags=tags,
                    metadata={"SchemaVersion": "1.1"},
                ),
            )
        )
    with endpoint.store.transaction() as db:
        for now, write in writes:
            endpoint.store.write_image_sets(db, [write], now)
    return [w.image_set_id for _, w in writes]


def search(mi: Any, datastore_id: str, *filters: dict[str, Any], **criteria: Any) -> list[dict[str, Any]]:
    paginator = mi.get_paginator("search_image_sets")
    body: dict[str, Any] = dict(criteria)
    if filters:
        body["filters"] = list(filters)
    pages = paginator.paginate(
        datastoreId=datastore_id, searchCriteria=body, PaginationConfig={"PageSize": 50}
    )
    return [s for page in pages for s in page["imageSetsMetadataSummaries"]]


def equal(attribute: str, value: Any) -> dict[str, Any]:
    return {"operator": "EQUAL", "values": [{attribute: value}]}


def between(attribute: str, low: Any, high: Any) -> dict[str, Any]:
    return {"operator": "BETWEEN", "values": [{attribute: low}, {attribute: high}]}


@pytest.fixture
def seeded(endpoint: LocalEndpoint) -> tuple[Any, str, list[str]]:
    mi = endpoint.client("medical-imaging")
    datastore_id = create_active_datastore(mi)
    return mi, datastore_id, seed(endpoint, datastore_id, 40)


def test_each_filter_attribute(seeded: tuple[Any, str, list[str]]) -> None:
    mi, datastore_id, ids = seeded
    recorder = WireRecorder(mi)
    assert {s["imageSetId"] for s in search(mi, datastore_id, equal("DICOMPatientId", "P3"))} == {
        ids[i] for i in range(40) if i % 7 == 3
    }
    assert [s["imageSetId"] for s in search(mi, datastore_id, equal("DICOMAccessionNumber", "A12"))] == [
        ids[12]
    ]
    assert len(search(mi, datastore_id, equal("DICOMStudyId", "S1"))) == len(
        [i for i in range(40) if i % 3 == 1]
    )
    assert [s["imageSetId"] for s in search(mi, datastore_id, equal("DICOMStudyInstanceUID", "1.2.5"))] == [
        ids[5]
    ]
    assert [s["imageSetId"] for s in search(mi, datastore_id, equal("DICOMSeriesInstanceUID", "1.3.6"))] == [
        ids[6]
    ]
    assert len(search(mi, datastore_id, equal("isPrimary", False))) == 8
    assert len(search(mi, datastore_id, equal("isPrimary", True))) == 32
    created = search(mi, datastore_id, between("createdAt", 1_600_000_010, 1_600_000_019))
    assert {s["imageSetId"] for s in created} == set(ids[10:20])
    updated = search(mi, datastore_id, between("updatedAt", 1_600_000_000, 1_600_000_004.5))
    assert {s["imageSetId"] for s in updated} == set(ids[0:5])
    study_day_3 = time.strftime("%Y%m%d", time.gmtime(1_600_000_000 + 3 * 86400))
    study_day_6 = time.strftime("%Y%m%d", time.gmtime(1_600_000_000 + 6 * 86400))
    dated = search(
        mi,
        datastore_id,
        between(
            "DICOMStudyDateAndTime",
            {"DICOMStudyDate": study_day_3, "DICOMStudyTime": "101500"},
            {"DICOMStudyDate": study_day_6},
        ),
    )
    assert {s["imageSetId"] for s in dated} == set(ids[3:6])  # day 6 at 10:15 is after day 6 00:00
    combined = search(
        mi, datastore_id, between("createdAt", 1_600_000_000, 1_600_000_039), equal("DICOMPatientId", "P0")
    )
    assert {s["imageSetId"] for s in combined} == {ids[i] for i in range(40) if i % 7 == 0}
    summary = search(mi, datastore_id, equal("DICOMAccessionNumber", "A1"))[0]
    assert summary["DICOMTags"]["DICOMAccessionNumber"] == "A1"
    assert summary["version"] == 1
    assert_wire_conforms(mi, recorder)


def test_sort_and_default_order(seeded: tuple[Any, str, list[str]]) -> None:
    mi, datastore_id, ids = seeded
    assert [s["imageSetId"] for s in search(mi, datastore_id)] == ids[::-1]
    for field in ("createdAt", "updatedAt", "DICOMStudyDateAndTime"):
        ascending = search(mi, datastore_id, sort={"sortOrder": "ASC", "sortField": field})
        assert [s["imageSetId"] for s in ascending] == ids
    response = mi.search_image_sets(
        datastoreId=datastore_id, searchCriteria={"sort": {"sortOrder": "DESC", "sortField": "createdAt"}}
    )
    assert response["sort"] == {"sortOrder": "DESC", "sortField": "createdAt"}


@pytest.mark.parametrize(
    "criteria",
    [
        {"filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "a"}, {"DICOMPatientId": "b"}]}]},
        {"filters": [{"operator": "BETWEEN", "values": [{"DICOMPatientId": "a"}, {"DICOMPatientId": "b"}]}]},
        {"filters": [{"operator": "EQUAL", "values": [{"createdAt": 1}]}]},
        {"filters": [{"operator": "BETWEEN", "values": [{"createdAt": 5}]}]},
        {"filters": [{"operator": "BETWEEN", "values": [{"createdAt": 5}, {"createdAt": 1}]}]},
        {"filters": [{"operator": "BETWEEN", "values": [{"createdAt": 1}, {"updatedAt": 5}]}]},
        {"filters": [equal("DICOMPatientId", "a")] * 3},
        {"filters": [{"operator": "LIKE", "values": [{"DICOMPatientId": "a"}]}]},
        {"filters": [{"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": "not-a-uid"}]}]},
        {"sort": {"sortOrder": "UP", "sortField": "createdAt"}},
        {
            "filters": [
                {
                    "operator": "BETWEEN",
                    "values": [{"DICOMStudyDateAndTime": {"DICOMStudyDate": "x" * 40}}] * 2,
                }
            ]
        },
    ],
)
def test_invalid_criteria(seeded: tuple[Any, str, list[str]], criteria: dict[str, Any]) -> None:
    mi, datastore_id, _ = seeded
    with pytest.raises(mi.exceptions.ValidationException):
        mi.search_image_sets(datastoreId=datastore_id, searchCriteria=criteria)


def test_pagination_over_more_than_a_thousand(endpoint: LocalEndpoint) -> None:
    mi = endpoint.client("medical-imaging")
    datastore_id = create_active_datastore(mi)
    ids = seed(endpoint, datastore_id, 1_234)
    tokens: list[str] = []
    found: list[str] = []
    for page in mi.get_paginator("search_image_sets").paginate(
        datastoreId=datastore_id, PaginationConfig={"PageSize": 50}
    ):
        found += [s["imageSetId"] for s in page["imageSetsMetadataSummaries"]]
        if "NextToken" in page or page.get("nextToken"):
            tokens.append(page["nextToken"])
    assert found == ids[::-1]
    assert len(tokens) == len(set(tokens)) == 24


def test_tokens_are_bound_to_criteria_and_tamper_evident(seeded: tuple[Any, str, list[str]]) -> None:
    mi, datastore_id, _ = seeded
    first = mi.search_image_sets(datastoreId=datastore_id, maxResults=5)
    token = first["nextToken"]
    second = mi.search_image_sets(datastoreId=datastore_id, maxResults=5, nextToken=token)
    assert second["nextToken"] != token
    last = mi.search_image_sets(datastoreId=datastore_id, maxResults=50)
    assert "nextToken" not in last
    with pytest.raises(mi.exceptions.ValidationException):
        mi.search_image_sets(
            datastoreId=datastore_id,
            nextToken=token,
            searchCriteria={"sort": {"sortOrder": "ASC", "sortField": "createdAt"}},
        )
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(mi.exceptions.ValidationException):
        mi.search_image_sets(datastoreId=datastore_id, nextToken=tampered)


def test_other_list_operations_paginate(endpoint: LocalEndpoint) -> None:
    mi = endpoint.client("medical-imaging")
    created = [mi.create_datastore(datastoreName=f"d{i}")["datastoreId"] for i in range(7)]
    pages = list(mi.get_paginator("list_datastores").paginate(PaginationConfig={"PageSize": 3}))
    assert [d["datastoreId"] for p in pages for d in p["datastoreSummaries"]] == created
    assert len(pages) == 3
    active = mi.list_datastores(datastoreStatus="ACTIVE")["datastoreSummaries"]
    assert len(active) == 7
    assert mi.list_datastores(datastoreStatus="DELETED")["datastoreSummaries"] == []
