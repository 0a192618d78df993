"""The downstream example is scheduled on the import DAG's asset and receives each import's image-set ids.

Issue 12, item 1: scheduled on ``Asset.ref(name=...)``, Airflow 3.3 created the example's runs with no consumed
asset events. On the running scheduler: the schedule reference row exists, each run of the example consumed the
import's events, and its task returned the image-set ids the search found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import test_deployment
from harness import AirflowApi, AirflowDeployment, wait_until
from test_deployment import BUCKET, DAG_ID, Site

pytestmark = pytest.mark.deployment
# The fixtures of test_deployment: a site (endpoint, data store, buckets, aws_default) and the unpaused import DAG.
api = test_deployment.api
make_site = test_deployment.make_site

EXAMPLE_DAG_ID = "healthimaging_new_image_sets_example"
EXAMPLE_TASK = "log_new_image_sets"
ASSET_NAME = "healthimaging_image_sets"


def downstream_runs_of(api: AirflowApi, run_id: str) -> list[dict[str, Any]]:
    """Wait until the run's one asset event was consumed by a run of the example, and that run ended.

    The import run announces all its image sets in one event (``publish_image_sets``): Airflow 3.3.2 queues one
    entry per (asset, DAG) and hands an event registered while that entry is pending to the consumer's next run,
    which only the asset's next event starts (apache/airflow#54659); one event per run never waits for another.

    :param api: the REST API
    :param run_id: the import DAG's run
    :return: the run's asset events (with ``created_dagruns``)
    """

    def ready() -> list[dict[str, Any]] | None:
        events = api.asset_events(source_dag_id=DAG_ID, source_run_id=run_id)
        if not events or not all(event["created_dagruns"] for event in events):
            return None
        for event in events:
            for created in event["created_dagruns"]:
                if api.dag_run(EXAMPLE_DAG_ID, created["run_id"])["state"] not in {"success", "failed"}:
                    return None
        return list(events)

    return list(wait_until(ready, timeout=180, interval=1.0, what=f"the example's runs for {run_id}"))


@pytest.fixture
def two_prefix_site(api: AirflowApi, make_site: Callable[..., Site]) -> tuple[Site, list[str]]:
    """A fresh site with a small study under each of two prefixes, and the downstream example unpaused."""
    site = make_site("--import-seconds", "2")
    prefixes = ["incoming/site-a/", "incoming/site-b/"]
    for seed, prefix in enumerate(prefixes, start=1301):
        site.upload_sample(prefix, seed=seed)
    api.wait_for_dag(EXAMPLE_DAG_ID)
    api.unpause(EXAMPLE_DAG_ID)
    return site, prefixes


def test_downstream_example_consumes_each_imports_asset_event(
    api: AirflowApi, deployment: AirflowDeployment, two_prefix_site: tuple[Site, list[str]]
) -> None:
    site, prefixes = two_prefix_site
    rows = deployment.query(
        "SELECT r.dag_id FROM dag_schedule_asset_reference r JOIN asset a ON a.id = r.asset_id "
        "WHERE a.name = %s",
        ASSET_NAME,
    )
    assert rows == [(EXAMPLE_DAG_ID,)]
    name_refs = deployment.query(
        "SELECT dag_id FROM dag_schedule_asset_name_reference WHERE dag_id = %s", EXAMPLE_DAG_ID
    )
    assert name_refs == []

    conf = {
        **site.conf(prefixes[0]),
        "input_s3_uri": None,
        "input_s3_uris": [f"s3://{BUCKET}/{p}" for p in prefixes],
    }
    run_id = api.trigger(DAG_ID, conf=conf)
    assert api.wait_for_run(DAG_ID, run_id, timeout=300)["state"] == "success"

    events = downstream_runs_of(api, run_id)
    assert len(events) == 1
    # The site is this test's own: every job and image set in its data store is this run's.
    jobs = {job["jobId"] for job in site.jobs()}
    assert len(jobs) == len(prefixes)
    assert set(events[0]["extra"]["jobIds"]) == jobs
    assert {item["jobId"] for item in events[0]["extra"]["imports"]} == jobs
    found = site.image_set_ids()
    assert {i for event in events for i in event["extra"]["imageSetIds"]} == found
    received: set[str] = set()
    for event in events:
        for created in event["created_dagruns"]:
            downstream = created["run_id"]
            assert api.dag_run(EXAMPLE_DAG_ID, downstream)["state"] == "success"
            consumed = api.consumed_asset_events(EXAMPLE_DAG_ID, downstream)
            assert event["id"] in {c["id"] for c in consumed}
            returned = api.xcom(EXAMPLE_DAG_ID, downstream, EXAMPLE_TASK)
            consumed_ids = {i for c in consumed for i in c["extra"].get("imageSetIds", [])}
            assert set(returned) == consumed_ids
            received |= set(returned)
    assert found <= received
