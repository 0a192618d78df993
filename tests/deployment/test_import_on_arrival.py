"""Import on arrival (issue 15) on the real deployment: S3 notifications -> SQS -> AssetWatcher in the triggerer.

Each test wires a fresh endpoint with ``scripts/wire_arrivals.py`` (the queues' names are fixed, so the queue URLs
the DAG files read at parse, set in ``conftest.py``, name them; moto ignores a queue URL's host), sets the DAG's
Variables, unpauses the DAG (watchers exist only for unpaused DAGs) and drips studies into the bucket.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_deployment
from harness import REPO_ROOT, AirflowApi, AirflowDeployment, wait_until
from test_deployment import BUCKET, OUTPUT_BUCKET, ROLE_ARN, Site

from healthimaging_local.sample_data import synthetic_study_files, upload

pytestmark = pytest.mark.deployment
api = test_deployment.api
make_site = test_deployment.make_site

ARRIVAL_DAG_ID = "healthimaging_import_on_arrival"
INDEX_DAG_ID = "healthimaging_index_image_sets_example"
INDEX_TASK = "index_image_sets"
ARRIVALS_ASSET = "healthimaging_dicom_arrivals"
EVENTS_ASSET = "healthimaging_image_set_events"
SETTLE_SECONDS = 8
INDEX_S3_URI = f"s3://{OUTPUT_BUCKET}/index/"
TERMINAL = {"success", "failed"}


def wire(site: Site) -> dict[str, Any]:
    """Run the wiring script's ``wire`` against the site's endpoint (notifications under ``incoming/``)."""
    spec = importlib.util.spec_from_file_location("wire_arrivals", REPO_ROOT / "scripts" / "wire_arrivals.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import boto3

    session = boto3.session.Session(
        region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    return dict(
        module.wire(
            session,
            bucket=BUCKET,
            prefix="incoming/",
            arrivals_queue="healthimaging-arrivals",
            events_queue="healthimaging-image-set-events",
            s3_via="notification",
            datastore_id=site.datastore_id,
            endpoint_url=site.endpoint.url,
        )
    )


def watcher_registered(deployment: AirflowDeployment, asset: str) -> bool:
    rows = deployment.query(
        "SELECT count(*) FROM asset_watcher w JOIN asset a ON a.id = w.asset_id WHERE a.name = %s", asset
    )
    return bool(rows and rows[0][0])


def unpause_watched(api: AirflowApi, deployment: AirflowDeployment, dag_id: str, asset: str) -> None:
    api.wait_for_dag(dag_id)
    api.unpause(dag_id)
    wait_until(lambda: watcher_registered(deployment, asset), timeout=120, what=f"the watcher of {asset}")


@pytest.fixture
def arrival_site(
    api: AirflowApi, deployment: AirflowDeployment, make_site: Callable[..., Site]
) -> Iterator[tuple[Site, dict[str, Any]]]:
    """A wired site, the arrival DAG's Variables set and the DAG unpaused; paused again afterwards."""
    site = make_site("--import-seconds", "2")
    wiring = wire(site)
    for key, value in {
        "healthimaging_datastore_id": site.datastore_id,
        "healthimaging_data_access_role_arn": ROLE_ARN,
        "healthimaging_output_s3_uri": f"s3://{OUTPUT_BUCKET}/out/",
        "healthimaging_arrivals_grouping": json.dumps({"depth": 2, "base_prefix": "incoming/"}),
        "healthimaging_arrivals_settle_seconds": str(SETTLE_SECONDS),
        "healthimaging_index_s3_uri": INDEX_S3_URI,
    }.items():
        api.set_variable(key, value)
    unpause_watched(api, deployment, ARRIVAL_DAG_ID, ARRIVALS_ASSET)
    yield site, wiring
    api.json("PATCH", f"/api/v2/dags/{ARRIVAL_DAG_ID}", json={"is_paused": True})
    api.json("PATCH", f"/api/v2/dags/{INDEX_DAG_ID}", json={"is_paused": True})


def study(folder: str, seed: int, series: int = 2, instances: int = 5) -> list[tuple[str, bytes]]:
    """One synthetic study's files under ``<folder>/`` (relative to ``incoming/``)."""
    return [(f"{folder}/{key}", data) for key, data in synthetic_study_files(1, 1, series, instances, seed)]


def queue_drained(site: Site, queue_url: str) -> bool:
    attributes = site.client("sqs").get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(int(v) == 0 for v in attributes.values())


def settled(api: AirflowApi, site: Site, queue_url: str, jobs: int) -> list[dict[str, Any]]:
    """
    Wait until the queue is drained, every run of the arrival DAG ended and at least ``jobs`` jobs ended; then
    wait out one more settle period (a late run would start a job) and return the runs.
    """

    def done() -> list[dict[str, Any]] | None:
        runs = api.dag_runs(ARRIVAL_DAG_ID)
        ended = [j for j in site.jobs() if j["jobStatus"] in {"COMPLETED", "FAILED"}]
        if not queue_drained(site, queue_url) or not runs or len(ended) < jobs:
            return None
        return runs if all(r["state"] in TERMINAL for r in runs) else None

    wait_until(done, timeout=420, interval=2.0, what="the arrivals to be imported")
    time.sleep(SETTLE_SECONDS + 4)
    return list(wait_until(done, timeout=240, interval=2.0, what="late runs to end"))


def imported_files(site: Site, job: dict[str, Any]) -> int:
    return int(site.manifest(job["jobId"]).get("numberOfImportedFiles") or 0)


def assert_runs_succeeded(api: AirflowApi, runs: list[dict[str, Any]]) -> None:
    for run in runs:
        states = api.ti_states(ARRIVAL_DAG_ID, run["dag_run_id"])
        assert run["state"] == "success", (run["dag_run_id"], states)


def test_dripped_study_is_imported_once_after_it_settles(
    api: AirflowApi, arrival_site: tuple[Site, dict[str, Any]]
) -> None:
    site, wiring = arrival_site
    files = study("patient-a/study-1", seed=1501)
    upload(files, site.client("s3"), BUCKET, "incoming/", drip_seconds=20)
    runs = settled(api, site, wiring["arrivals_queue_url"], jobs=1)
    assert_runs_succeeded(api, runs)
    jobs = site.jobs()
    assert len(jobs) == 1, jobs
    job = site.job(jobs[0]["jobId"])
    assert job["jobStatus"] == "COMPLETED"
    assert job["inputS3Uri"].startswith(f"s3://{BUCKET}/incoming/patient-a/study-1/")
    # Every dripped file in the one job: it started after the last one landed, not before.
    assert imported_files(site, jobs[0]) == len(files)


def test_two_interleaved_studies_become_two_imports(
    api: AirflowApi, arrival_site: tuple[Site, dict[str, Any]]
) -> None:
    site, wiring = arrival_site
    first, second = study("patient-b/study-1", seed=1502), study("patient-c/study-7", seed=1503)
    interleaved = [f for pair in zip(first, second, strict=True) for f in pair]
    upload(interleaved, site.client("s3"), BUCKET, "incoming/", drip_seconds=15)
    runs = settled(api, site, wiring["arrivals_queue_url"], jobs=2)
    assert_runs_succeeded(api, runs)
    jobs = site.jobs()
    assert len(jobs) == 2, jobs
    by_folder = {site.job(j["jobId"])["inputS3Uri"]: j for j in jobs}
    assert sorted(by_folder) == [
        f"s3://{BUCKET}/incoming/patient-b/study-1/",
        f"s3://{BUCKET}/incoming/patient-c/study-7/",
    ]
    assert [imported_files(site, j) for j in by_folder.values()] == [len(first), len(second)]


def test_stopping_the_triggerer_mid_arrival_loses_no_study(
    api: AirflowApi, deployment: AirflowDeployment, arrival_site: tuple[Site, dict[str, Any]]
) -> None:
    """
    The first files arrive and start a run; the triggerer stops (its watcher and the deferred settle sensor with
    it); the rest arrives while it is down and waits in the queue; after the restart the study is imported once.
    """
    site, wiring = arrival_site
    files = study("patient-d/study-2", seed=1504)
    first, rest = files[:3], files[3:]
    upload(first, site.client("s3"), BUCKET, "incoming/", drip_seconds=2)
    wait_until(lambda: api.dag_runs(ARRIVAL_DAG_ID), timeout=120, what="a first run from the arrivals")
    triggerer = deployment.component("triggerer")
    triggerer.stop()
    upload(rest, site.client("s3"), BUCKET, "incoming/", drip_seconds=8)
    assert not queue_drained(site, wiring["arrivals_queue_url"])  # nobody polls: the rest waits in the queue
    triggerer.start()
    deployment.wait_healthy()
    runs = settled(api, site, wiring["arrivals_queue_url"], jobs=1)
    assert_runs_succeeded(api, runs)
    jobs = site.jobs()
    assert len(jobs) == 1, jobs
    assert imported_files(site, jobs[0]) == len(files)


def test_index_example_runs_for_each_new_image_set(
    api: AirflowApi, deployment: AirflowDeployment, arrival_site: tuple[Site, dict[str, Any]]
) -> None:
    """The service's own "Image Set Created" events (EventBridge -> SQS) reach the index example."""
    site, wiring = arrival_site
    api.json("PATCH", f"/api/v2/dags/{ARRIVAL_DAG_ID}", json={"is_paused": True})
    unpause_watched(api, deployment, INDEX_DAG_ID, EVENTS_ASSET)
    prefix = "manual/patient-e/"
    site.upload_sample(prefix, seed=1505, series=3, instances=2)
    run_id = api.trigger(test_deployment.DAG_ID, conf=site.conf(prefix))
    assert api.wait_for_run(test_deployment.DAG_ID, run_id, timeout=300)["state"] == "success"
    created = site.image_set_ids()
    assert created

    def indexed() -> dict[str, dict[str, Any]] | None:
        if not queue_drained(site, wiring["image_set_events_queue_url"]):
            return None
        runs = api.dag_runs(INDEX_DAG_ID)
        if not runs or not all(r["state"] in TERMINAL for r in runs):
            return None
        records: dict[str, dict[str, Any]] = {}
        for run in runs:
            assert run["state"] == "success", api.ti_states(INDEX_DAG_ID, run["dag_run_id"])
            for record in api.xcom(INDEX_DAG_ID, run["dag_run_id"], INDEX_TASK):
                records[record["imageSetId"]] = record
        return records if set(records) >= created else None

    records = wait_until(indexed, timeout=240, interval=2.0, what="every image set to be indexed")
    assert set(records) == created
    s3 = site.client("s3")
    for image_set_id, record in records.items():
        assert record["datastoreId"] == site.datastore_id
        assert record["event"] in {"Image Set Created", "Image Set Updated"}
        assert record["seriesCount"] >= 1
        assert record["instanceCount"] >= 1
        assert "Patient" not in record
        bucket, _, key = record["indexS3Uri"].removeprefix("s3://").partition("/")
        document = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert document["ImageSetID"] == image_set_id
