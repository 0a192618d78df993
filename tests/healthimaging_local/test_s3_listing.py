"""ListObjectsV2 without a delimiter, served page by page from one sorted snapshot: the same pages as moto's own.

Through real HTTP (boto3 against the endpoint), compared with moto's original code on the same bucket.
"""

from __future__ import annotations

import random
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.s3.models import S3Backend

from healthimaging_local import s3_listing
from healthimaging_local.s3 import backend

BUCKET = "listing"


def _s3(endpoint: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture
def filled(endpoint: Any) -> Any:
    client = _s3(endpoint)
    client.create_bucket(Bucket=BUCKET)
    names = [f"day/p{n % 7}/s{n % 3}/i{n:04d}.dcm" for n in range(230)] + ["day.txt", "dayz/x", "other/y"]
    names += ["sp ace/a+b&c.dcm", "sp ace/ü<1>.dcm", "sp ace/%41.dcm"]
    random.Random(5).shuffle(names)
    for name in names:
        client.put_object(Bucket=BUCKET, Key=name, Body=b"x")
    return client


@pytest.mark.parametrize(
    "kwargs",
    [
        {"Prefix": "day/", "PaginationConfig": {"PageSize": 17}},
        {"Prefix": "day", "PaginationConfig": {"PageSize": 50}},
        {"PaginationConfig": {"PageSize": 1000}},
        {"Prefix": "day/p3/", "StartAfter": "day/p3/s1/i0100.dcm", "PaginationConfig": {"PageSize": 9}},
        {"Prefix": "nothing/"},
        {"Prefix": "day/", "Delimiter": "/"},  # moto's own code
        {"Prefix": "sp ace/", "PaginationConfig": {"PageSize": 2}},  # keys URL-encoded (botocore asks for it)
    ],
)
def test_pages_are_moto_s_own(filled: Any, kwargs: dict[str, Any], monkeypatch) -> None:
    ours = _pages(filled, **kwargs)
    monkeypatch.setattr(S3Backend, "list_objects_v2", _moto_original())
    monkeypatch.setattr(s3_listing, "answer", lambda environ: None)  # moto's own XML too
    assert _pages(filled, **kwargs) == ours
    flat = [obj["Key"] for page in ours for obj in page.get("Contents", [])]
    assert flat == sorted(flat)
    assert len(flat) == len(set(flat))


def _pages(client: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Every page as botocore parses it, less what differs by design (request ids, tokens' text)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, **kwargs)
    ignored = {"ResponseMetadata", "ContinuationToken", "NextContinuationToken"}
    return [{k: v for k, v in page.items() if k not in ignored} for page in pages]


def _moto_original() -> Any:
    # install() wrapped moto's method; its closure holds the original
    wrapped = S3Backend.list_objects_v2
    for cell in wrapped.__closure__ or ():
        if callable(cell.cell_contents) and cell.cell_contents.__name__ == "list_objects_v2":
            return cell.cell_contents
    raise AssertionError("moto's list_objects_v2 not found in the installed wrapper")


def test_a_page_reads_objects_as_they_are_now(filled: Any) -> None:
    first = filled.list_objects_v2(Bucket=BUCKET, Prefix="day/", MaxKeys=100)
    listed = [obj["Key"] for obj in first["Contents"]]
    rest = sorted(
        obj["Key"]
        for page in filled.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="day/")
        for obj in page["Contents"]
    )[100:]
    deleted = rest[:5]
    for key in deleted:
        filled.delete_object(Bucket=BUCKET, Key=key)
    filled.put_object(Bucket=BUCKET, Key="day/p9/late.dcm", Body=b"y")  # after the listing's position
    token = first["NextContinuationToken"]
    later: list[str] = []
    while token:
        page = filled.list_objects_v2(Bucket=BUCKET, Prefix="day/", MaxKeys=100, ContinuationToken=token)
        later.extend(obj["Key"] for obj in page.get("Contents", []))
        token = page.get("NextContinuationToken")
    assert not set(deleted) & set(later)
    assert later == sorted([key for key in rest if key not in deleted] + ["day/p9/late.dcm"])
    assert listed[-1] < later[0]


def test_a_dropped_snapshot_continues_from_moto_s_token(filled: Any, monkeypatch) -> None:
    monkeypatch.setattr(s3_listing, "_snapshots", type(s3_listing._snapshots)())
    first = filled.list_objects_v2(Bucket=BUCKET, Prefix="day/", MaxKeys=100)
    s3_listing._snapshots.clear()  # as if 64 other listings had been continued since
    second = filled.list_objects_v2(
        Bucket=BUCKET, Prefix="day/", MaxKeys=100, ContinuationToken=first["NextContinuationToken"]
    )
    assert second["Contents"][0]["Key"] > first["Contents"][-1]["Key"]
    assert backend()._pagination_tokens[first["NextContinuationToken"]] == first["Contents"][-1]["Key"]


def test_an_unknown_continuation_token_is_refused(filled: Any) -> None:
    with pytest.raises(filled.exceptions.ClientError, match="InvalidArgument|continuation"):
        filled.list_objects_v2(Bucket=BUCKET, Prefix="day/", ContinuationToken="not-a-token")


def test_what_the_fast_answer_leaves_to_moto(endpoint: Any) -> None:
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": f"/{BUCKET}",
        "QUERY_STRING": "list-type=2&delimiter=%2F",
    }
    assert s3_listing.answer(environ) is None  # a delimiter
    assert s3_listing.answer({**environ, "QUERY_STRING": "list-type=2&fetch-owner=true"}) is None
    assert s3_listing.answer({**environ, "QUERY_STRING": "prefix=a"}) is None  # ListObjects (v1)
    assert (
        s3_listing.answer({**environ, "QUERY_STRING": "list-type=2", "PATH_INFO": "/no-such-bucket"}) is None
    )
    assert s3_listing.answer({**environ, "QUERY_STRING": "list-type=2", "REQUEST_METHOD": "PUT"}) is None
    assert s3_listing.answer({**environ, "QUERY_STRING": "list-type=2", "PATH_INFO": "/"}) is None
