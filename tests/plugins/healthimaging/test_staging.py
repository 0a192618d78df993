"""Staging: server-side copies of staged chunks (moto S3 and fault-injecting fakes), idempotent re-runs, removal."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from healthimaging.planner import ImportLimits, Plan, PlanSettings, S3Object, plan_objects, plan_prefix
from healthimaging.staging import StagingError, remove_staged_copies, stage_chunks

INPUT = "s3://input-bucket/day/"
STAGING = "s3://staging-bucket/stage/"
NO_SLEEP = {"sleep": lambda seconds: None}


def keys_under(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def staged_plan(s3: Any) -> Plan:
    """12 loose files in day/flat/ (5 per job: 3 staged chunks) beside a folder that gets its own prefix."""
    s3.create_bucket(Bucket="staging-bucket")
    for i in range(12):
        s3.put_object(Bucket="input-bucket", Key=f"day/flat/f{i:02d}.dcm", Body=f"body {i}".encode())
    s3.put_object(Bucket="input-bucket", Key="day/P1/a.dcm", Body=b"a")
    limits = ImportLimits(max_files_per_job=5)
    return plan_prefix(s3, INPUT, PlanSettings(limits, staging_s3_uri=STAGING, run_scope="run-1"))


def test_staging_copies_every_staged_object_under_its_chunk_prefix(s3: Any, staged_plan: Plan) -> None:
    assert [c.files for c in staged_plan.staged_chunks] == [5, 5, 2]
    result = stage_chunks(s3, staged_plan, max_workers=4)
    assert result.as_dict() == {
        "chunks": 3,
        "copied": 12,
        "already_staged": 0,
        "strays_removed": 0,
        "bytes_copied": sum(o.size for c in staged_plan.staged_chunks for o in c.objects),
    }
    for chunk in staged_plan.staged_chunks:
        prefix = chunk.input_s3_uri.removeprefix("s3://staging-bucket/")
        assert keys_under(s3, "staging-bucket", prefix) == [f"{prefix}{o.key}" for o in chunk.objects]
        for o in chunk.objects:
            copy = s3.get_object(Bucket="staging-bucket", Key=chunk.staged_key(o.key))["Body"].read()
            assert copy == s3.get_object(Bucket="input-bucket", Key=o.key)["Body"].read()
    assert len(keys_under(s3, "input-bucket")) == 13  # originals untouched


def test_staging_again_keeps_copies_in_place_and_removes_strays(s3: Any, staged_plan: Plan) -> None:
    stage_chunks(s3, staged_plan)
    first = staged_plan.staged_chunks[0]
    stray = first.input_s3_uri.removeprefix("s3://staging-bucket/") + "day/flat/old.dcm"
    s3.put_object(Bucket="staging-bucket", Key=stray, Body=b"from an earlier attempt")
    s3.delete_object(Bucket="staging-bucket", Key=first.staged_key(first.objects[0].key))
    again = stage_chunks(s3, staged_plan)
    assert (again.copied, again.already_staged, again.strays_removed) == (1, 11, 1)
    assert stray not in keys_under(s3, "staging-bucket")


def test_removing_staged_copies_deletes_only_the_chunks_asked_for(s3: Any, staged_plan: Plan) -> None:
    stage_chunks(s3, staged_plan)
    first, *others = staged_plan.staged_chunks
    assert remove_staged_copies(s3, staged_plan, chunk_ids=[first.id]) == 5
    remaining = keys_under(s3, "staging-bucket")
    assert len(remaining) == 7
    assert not any(k.startswith(first.staged_key("")) for k in remaining)
    assert remove_staged_copies(s3, staged_plan) == 7
    assert keys_under(s3, "staging-bucket") == []
    assert remove_staged_copies(s3, staged_plan) == 0  # idempotent
    with pytest.raises(ValueError, match="not staged chunks"):
        remove_staged_copies(s3, staged_plan, chunk_ids=[staged_plan.chunks[0].id])


def test_removal_deletes_in_batches_of_1000(s3: Any) -> None:
    s3.create_bucket(Bucket="staging-bucket")
    listing = [S3Object(f"day/flat/f{i:04d}", 1, "e") for i in range(2500)]
    plan = plan_objects(
        listing, INPUT, PlanSettings(ImportLimits(max_files_per_job=2499), staging_s3_uri=STAGING)
    )
    chunk = plan.staged_chunks[0]
    for o in listing[:1100]:
        s3.put_object(Bucket="staging-bucket", Key=chunk.staged_key(o.key), Body=b"x")
    client = Recording(s3)
    assert remove_staged_copies(client, plan) == 1100
    batches = [len(c["Delete"]["Objects"]) for name, c in client.calls if name == "delete_objects"]
    assert batches == [1000, 100]


class Recording:
    """Wraps a client: records calls, and raises queued errors before delegating."""

    def __init__(self, client: Any, errors: dict[str, list[Exception]] | None = None) -> None:
        self.client = client
        self.errors = errors or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            if self.errors.get(name):
                raise self.errors[name].pop(0)
            return method(*args, **kwargs)

        return call


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "CopyObject",
    )


def test_copies_are_conditional_on_the_listed_etag_and_retried_on_throttling(
    s3: Any, staged_plan: Plan
) -> None:
    client = Recording(
        s3,
        {
            "copy_object": [
                client_error("SlowDown", 503),
                client_error("InternalError", 500),
                EndpointConnectionError(endpoint_url="http://s3"),
            ]
        },
    )
    slept: list[float] = []
    result = stage_chunks(client, staged_plan, max_workers=1, sleep=slept.append)
    assert result.copied == 12
    assert len(slept) == 3
    copies = [kwargs for name, kwargs in client.calls if name == "copy_object"]
    assert len(copies) == 15
    first = staged_plan.staged_chunks[0].objects[0]
    assert copies[-12]["CopySource"] == {"Bucket": "input-bucket", "Key": first.key}
    assert copies[-12]["CopySourceIfMatch"] == f'"{first.etag}"'


def test_a_source_changed_since_the_listing_fails_staging_without_naming_keys(
    s3: Any, staged_plan: Plan
) -> None:
    client = Recording(s3, {"copy_object": [client_error("PreconditionFailed", 412)]})
    with pytest.raises(StagingError) as error:
        stage_chunks(client, staged_plan, max_workers=1, **NO_SLEEP)
    message = str(error.value)
    first = staged_plan.staged_chunks[0]
    assert message == (
        "Staging failed (objects changed or vanished since the listing: plan again):"
        f" {first.id}: 1 x PreconditionFailed"
    )
    assert "f00" not in message


def test_non_retryable_errors_are_not_retried_and_retries_end(s3: Any, staged_plan: Plan) -> None:
    client = Recording(
        s3, {"copy_object": [client_error("AccessDenied", 403)] + [client_error("SlowDown", 503)] * 3}
    )
    with pytest.raises(StagingError, match="1 x AccessDenied.*1 x SlowDown"):
        stage_chunks(client, staged_plan, max_workers=1, attempts=3, **NO_SLEEP)
    assert len([c for c in client.calls if c[0] == "copy_object"]) == 1 + 3 + 10


def test_objects_over_5_gib_use_a_multipart_copy() -> None:
    calls: list[Any] = []

    class Client:
        def get_paginator(self, name: str) -> Any:
            class Paginator:
                def paginate(self, **kwargs: Any) -> Any:
                    return iter([{}])

            return Paginator()

        def copy(self, source: Any, bucket: str, key: str, ExtraArgs: Any) -> None:
            calls.append((source, bucket, key, ExtraArgs))

        def copy_object(self, **kwargs: Any) -> None:
            pass

    big = S3Object("day/flat/big.dcm", 6 * 1024**3, "abc-2")
    listing = [big, *(S3Object(f"day/flat/s{i}", 1, "e") for i in range(5))]
    plan = plan_objects(
        listing, INPUT, PlanSettings(ImportLimits(max_files_per_job=5), staging_s3_uri=STAGING)
    )
    chunk = next(c for c in plan.staged_chunks if big in c.objects)
    stage_chunks(Client(), plan)
    assert calls == [
        (
            {"Bucket": "input-bucket", "Key": big.key},
            "staging-bucket",
            chunk.staged_key(big.key),
            {"CopySourceIfMatch": '"abc-2"'},
        )
    ]


def test_delete_errors_per_key_are_retried_then_reported(s3: Any, staged_plan: Plan) -> None:
    stage_chunks(s3, staged_plan)
    real = s3.delete_objects
    answers = iter(
        [
            {"Errors": [{"Key": "k", "Code": "SlowDown"}]},
            {},
            {"Errors": [{"Key": "k", "Code": "AccessDenied"}]},
        ]
    )

    class Client(Recording):
        def __getattr__(self, name: str) -> Any:
            if name == "delete_objects":
                return lambda **kwargs: (real(**kwargs), next(answers))[1]
            return super().__getattr__(name)

    with pytest.raises(StagingError, match="Removing staged copies failed: staging-bucket: 1 x AccessDenied"):
        remove_staged_copies(Client(s3), staged_plan, **NO_SLEEP)
