"""
# New HealthImaging image sets (downstream example)

Scheduled on the asset `healthimaging_image_sets`, which every import run updates once when its imports found
image sets. Each asset event's `extra` is `{"datastoreId": ..., "jobIds": [...], "imageSetIds": [...], "imports":
[{"datastoreId", "jobId", "imageSetIds"}, ...]}` (ids only, never PHI). Several events (of several import runs) can
fold into one run, so the task reads them all from `triggering_asset_events`. On Airflow 3.3.2 an event that lands
while another one is still queued for this DAG (two import runs finishing together) is handed to this DAG's next
run, which Airflow starts on the asset's next event (apache/airflow#54659); no event is consumed twice.

Copy this DAG as the start of an inference, QA or de-identification pipeline: replace the logging task with
your own work on the listed image sets (for example `GetImageSetMetadata` per id).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import dag, task

# The asset the import DAG updates; schedule on it itself (not Asset.ref, whose runs get no asset events).
from healthimaging.assets import IMAGE_SETS, IMAGE_SETS_ASSET_NAME  # noqa: F401

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


log = logging.getLogger(__name__)


def new_image_sets(events: Iterable[Any]) -> list[dict[str, Any]]:
    """
    Collect the image sets announced by asset events, one entry per import job.

    :param events: asset events (anything with an ``extra`` mapping), e.g. from ``triggering_asset_events``.
    :return: ``[{"datastoreId", "jobId", "imageSetIds"}, ...]``; events without image-set ids are dropped.
    """
    imports = []
    for event in events:
        extra = getattr(event, "extra", None) or {}
        for item in extra.get("imports") or [extra]:
            ids = [str(i) for i in item.get("imageSetIds") or []]
            if ids:
                imports.append(
                    {"datastoreId": item.get("datastoreId"), "jobId": item.get("jobId"), "imageSetIds": ids}
                )
    return imports


@dag(
    dag_id="healthimaging_new_image_sets_example",
    description="Example consumer of new HealthImaging image sets (asset-scheduled)",
    doc_md=__doc__,
    schedule=[IMAGE_SETS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # No max_active_runs=1: while a run is active Airflow 3.3.2 keeps one queue entry for the asset, and of the
    # events landing meanwhile only the first reaches the next run; the rest wait for a later event.
    tags=["healthimaging", "medical-imaging", "example"],
    default_args={
        "owner": "data-engineering",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": timedelta(minutes=10),
    },
)
def healthimaging_new_image_sets_example() -> None:
    @task
    def log_new_image_sets(triggering_asset_events: Mapping[Any, Iterable[Any]] | None = None) -> list[str]:
        """Log the new image-set ids (ids only) and return them."""
        events = [event for per_asset in (triggering_asset_events or {}).values() for event in per_asset]
        imports = new_image_sets(events)
        ids: list[str] = []
        for item in imports:
            log.info(
                "Import job %s in data store %s: %d new image set(s): %s",
                item["jobId"],
                item["datastoreId"],
                len(item["imageSetIds"]),
                ", ".join(item["imageSetIds"]),
            )
            ids.extend(item["imageSetIds"])
        return ids

    log_new_image_sets()


healthimaging_new_image_sets_example()
