"""Request rates (token buckets, 429) and the concurrent-import quota (402), through real HTTP with stock boto3.

Rate tests count answers over a measured window and compare them with what the bucket allows in that window
(``burst + rate * elapsed``), so a slow machine changes the window, never the verdict.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from endpoint_helpers import (
    create_active_datastore,
    receive_all,
    route_events,
    run_import,
    start_job,
    synthetic,
    upload,
    wait_job,
)

from healthimaging_local.cli import build_parser
from healthimaging_local.server import LocalEndpoint
from healthimaging_local.throttling import (
    DOCUMENTED_RATE_LIMITS,
    RateLimit,
    RateLimiter,
    TokenBucket,
    default_rate_limits,
    parse_rate_limit,
    rate_limits,
)

NO_RETRIES = {"retries": {"max_attempts": 1, "mode": "standard"}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(RateLimit(rate=2, burst=3), clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.49
    assert not bucket.take()
    clock.now += 0.02  # 0.51 s at 2/s: one token back
    assert bucket.take()
    assert not bucket.take()
    clock.now += 60  # a long quiet period refills up to the burst only
    assert sum(bucket.take() for _ in range(10)) == 3


def test_limiter_limits_only_named_operations() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        {"StartDICOMImportJob": RateLimit(1, 1), "GetDICOMImportJob": RateLimit(0, 5)}, clock
    )
    assert limiter.allow("StartDICOMImportJob")
    assert not limiter.allow("StartDICOMImportJob")
    assert all(limiter.allow("GetDICOMImportJob") for _ in range(100))  # rate 0: off
    assert all(limiter.allow("SearchImageSets") for _ in range(100))


def test_documented_defaults_and_flag_parsing() -> None:
    assert default_rate_limits() == {
        "StartDICOMImportJob": RateLimit(1, 2),
        "GetDICOMImportJob": RateLimit(25, 50),
    }
    assert parse_rate_limit("SearchImageSets=25/50") == ("SearchImageSets", RateLimit(25, 50))
    assert parse_rate_limit("DeleteImageSet=0.25") == ("DeleteImageSet", RateLimit(0.25, 1))
    for bad in ("NoSuchOperation=1", "SearchImageSets", "SearchImageSets=-1", "SearchImageSets=x"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)
    args = build_parser().parse_args(["serve", "--state-dir", "s"])
    limits = rate_limits(
        RateLimit(args.start_rate, args.start_burst),
        RateLimit(args.get_rate, args.get_burst),
        args.documented_rate_limits,
        args.rate_limit,
    )
    assert limits == default_rate_limits()
    args = build_parser().parse_args(
        [
            "serve",
            "--state-dir",
            "s",
            "--start-rate",
            "0",
            "--documented-rate-limits",
            "--rate-limit",
            "SearchImageSets=5/5",
        ]
    )
    limits = rate_limits(
        RateLimit(args.start_rate, args.start_burst),
        RateLimit(args.get_rate, args.get_burst),
        args.documented_rate_limits,
        args.rate_limit,
    )
    assert "StartDICOMImportJob" not in limits
    assert limits["SearchImageSets"] == RateLimit(5, 5)
    assert limits["DeleteImageSet"] == DOCUMENTED_RATE_LIMITS["DeleteImageSet"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--state-dir", "s", "--rate-limit", "Bogus=1"])


def _fire(call: Any, count: int, threads: int) -> tuple[int, int, float]:
    """Send ``count`` calls from ``threads`` threads; return (accepted, throttled, elapsed seconds)."""

    def one(_: int) -> str:
        try:
            call()
        except ClientError as error:
            return f"{error.response['ResponseMetadata']['HTTPStatusCode']} {error.response['Error']['Code']}"
        return "ok"

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - started
    throttled = outcomes.count("429 ThrottlingException")
    assert outcomes.count("ok") + throttled == count, outcomes
    return outcomes.count("ok"), throttled, elapsed


@pytest.fixture
def limited(tmp_path: Path) -> Any:
    """An endpoint with the default (documented) rates and a data store and buckets made before they matter."""
    with LocalEndpoint(tmp_path / "state") as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        datastore_id = create_active_datastore(mi)
        upload(s3, "rates-in", "", synthetic(instances=1))
        upload(s3, "rates-out", "", [])
        yield endpoint, datastore_id


def test_start_rate_is_1_per_second_with_burst_2(limited: Any) -> None:
    endpoint, datastore_id = limited
    mi = endpoint.client("medical-imaging", **NO_RETRIES)
    tokens = iter(range(1000))

    def start() -> None:
        start_job(mi, datastore_id, "s3://rates-in/", "s3://rates-out/", clientToken=f"rate-{next(tokens)}")

    accepted, throttled, elapsed = _fire(start, 12, threads=4)
    assert 2 <= accepted <= 2 + 1.0 * elapsed + 1e-9, (accepted, elapsed)
    assert accepted + throttled == 12
    if elapsed < 9:  # the window allowed at most 11 starts
        assert throttled > 0
    listed = mi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"]
    assert len(listed) == accepted  # a throttled start started nothing

    # Sustained: a steady stream of starts for 3 s gets about one per second (each attempt takes far less than 1 s).
    accepted = throttled = 0
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        try:
            start()
            accepted += 1
        except ClientError:
            throttled += 1
    elapsed = time.monotonic() - started
    assert 2 <= accepted <= 2 + 1.0 * elapsed + 1e-9, (accepted, elapsed)
    assert throttled > 0


def test_get_rate_is_25_per_second_with_burst_50(limited: Any) -> None:
    endpoint, datastore_id = limited
    mi = endpoint.client("medical-imaging")
    job_id = run_import(mi, datastore_id, "s3://rates-in/", "s3://rates-out/")["jobId"]
    time.sleep(2.1)  # the polls of wait_job took tokens: let the bucket fill up to its burst again
    fast = endpoint.client("medical-imaging", **NO_RETRIES)

    def get() -> None:
        fast.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)

    accepted, throttled, elapsed = _fire(get, 160, threads=4)
    assert 50 <= accepted <= 50 + 25 * elapsed + 1e-9, (accepted, elapsed)
    if elapsed < 4:  # the window allowed fewer than 150 of the 160
        assert throttled > 0
    # Other operations are not limited by default.
    accepted, throttled, _ = _fire(
        lambda: fast.list_dicom_import_jobs(datastoreId=datastore_id), 80, threads=4
    )
    assert (accepted, throttled) == (80, 0)


def test_botocore_retries_a_throttled_start(limited: Any) -> None:
    """A stock client with its default retries gets every start through, just later."""
    endpoint, datastore_id = limited
    mi = endpoint.client("medical-imaging", retries={"max_attempts": 10, "mode": "standard"})
    started = [start_job(mi, datastore_id, "s3://rates-in/", "s3://rates-out/") for _ in range(4)]
    assert len({s["jobId"] for s in started}) == 4
    assert sum(s["ResponseMetadata"]["RetryAttempts"] for s in started) > 0


def test_rates_off(tmp_path: Path) -> None:
    with LocalEndpoint(tmp_path / "state", rate_limits={}) as endpoint:
        mi = endpoint.client("medical-imaging", **NO_RETRIES)
        datastore_id = create_active_datastore(mi)
        codes = []
        for n in range(8):
            try:
                start_job(
                    mi, datastore_id, "s3://no-such-bucket/", "s3://no-such-bucket/", clientToken=f"off-{n}"
                )
                codes.append("ok")
            except ClientError as error:
                codes.append(error.response["Error"]["Code"])
        assert codes == ["ok"] * 8


def _start(mi: Any, datastore_id: str, token: str) -> dict[str, Any]:
    return start_job(mi, datastore_id, "s3://quota-in/", "s3://quota-out/", clientToken=token)


def test_quota_of_concurrent_imports_answers_402_and_replays_still_return_their_job(tmp_path: Path) -> None:
    with LocalEndpoint(
        tmp_path / "state", max_concurrent_imports=2, import_seconds=2, rate_limits={}, import_workers=1
    ) as endpoint:
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        datastore_id = create_active_datastore(mi)
        other_store = create_active_datastore(mi, "other")
        upload(s3, "quota-in", "", synthetic(instances=1))
        upload(s3, "quota-out", "", [])
        events_url = route_events(
            endpoint,
            "progress",
            {
                "source": ["aws.medical-imaging"],
                "detail-type": ["Import Job In Progress", "Import Job Completed"],
            },
            "progress",
        )
        first = _start(mi, datastore_id, "job-1")
        second = _start(mi, datastore_id, "job-2")
        with pytest.raises(mi.exceptions.ServiceQuotaExceededException) as raised:
            _start(mi, datastore_id, "job-3")
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 402
        assert raised.value.response["ResponseMetadata"]["RetryAttempts"] == 0  # botocore does not retry 402
        # A replay of a token is not a new job: it returns its job even at the quota.
        assert _start(mi, datastore_id, "job-1")["jobId"] == first["jobId"]
        assert _start(mi, datastore_id, "job-2")["jobId"] == second["jobId"]
        # The quota is per data store.
        _start(mi, other_store, "job-3")
        # Both admitted jobs run at once although one worker thread processes jobs: workers are no quota.
        # (Were a job to hold its worker while IN_PROGRESS, the second would start only after the first ended.)
        for job in (first, second):
            assert wait_job(mi, datastore_id, job["jobId"])["jobStatus"] == "COMPLETED"
        ours = {first["jobId"], second["jobId"]}
        events = receive_all(endpoint.client("sqs"), events_url)
        order = [(e["detail-type"], e["detail"]["jobId"]) for e in events if e["detail"]["jobId"] in ours]
        assert order == [
            ("Import Job In Progress", first["jobId"]),
            ("Import Job In Progress", second["jobId"]),
            ("Import Job Completed", first["jobId"]),
            ("Import Job Completed", second["jobId"]),
        ]
        listed = mi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"]
        assert len(listed) == 2  # the refused start left nothing behind
        # Jobs that ended no longer count.
        third = _start(mi, datastore_id, "job-3")
        assert third["jobStatus"] == "SUBMITTED"
        # A replay after its job ended still returns it, with its current status.
        assert _start(mi, datastore_id, "job-1")["jobStatus"] == "COMPLETED"
