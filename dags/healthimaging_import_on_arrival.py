"""
# Import DICOM studies as they arrive in S3

Scheduled on the asset `healthimaging_dicom_arrivals`, whose `AssetWatcher` runs the messaging provider's
`MessageQueueTrigger` (scheme `sqs`) in the triggerer on the SQS queue that receives the bucket's ObjectCreated
notifications (S3 event notifications, or an EventBridge rule on `aws.s3` "Object Created"; see
docs/import-on-arrival.md and `scripts/wire_arrivals.py`). Each batch of messages becomes an asset event; events
that arrive while a run is being created fold into that run.

Per run:

| Task | What it does |
|---|---|
| `group_study_folders` | reads the SQS messages of the run's triggering asset events, takes the created keys (S3 records, EventBridge events, SNS-wrapped ones; `s3:TestEvent` is skipped), groups them into study folders (`healthimaging.arrivals`) and skips the run when there are none |
| `settle.wait_until_settled` | one per folder: `S3KeysUnchangedSensor` (deferrable, in the triggerer; no worker slot) until the folder has had no new object for the settle period |
| `settle.settled_import_spec` | the import spec of the settled folder |
| `settled_folders` | the specs of every folder that settled, as one list |
| `plan_imports`, `start_imports`, `import_dicom.*`, `search_image_sets`, `publish_image_sets`, `import_report` | the shared import pipeline (`healthimaging.import_tasks.compose_imports`): plan each folder, start its jobs with a client token derived from the planned content (keys and ETags), wait, search, announce the image sets on the asset `healthimaging_image_sets`, account for every object |

Arrivals that keep coming while a folder settles start more runs; each waits for the same folder to settle and
plans the same content, so their start tasks send the same client token and attach to one job. A folder that grows
after its import has new content, hence a new token and a new job (HealthImaging then updates its image sets).

## Settings

| Setting | Where | Read |
|---|---|---|
| queue URL | environment `HEALTHIMAGING_ARRIVALS_QUEUE_URL` (unset: the DAG has no watcher and never runs by itself) | parse |
| AWS connection | environment `HEALTHIMAGING_AWS_CONN_ID` (default `aws_default`); its endpoint decides where calls go | parse |
| SQS long poll / pause between empty polls | environment `HEALTHIMAGING_ARRIVALS_WAIT_SECONDS` (default 20, SQS's maximum), `HEALTHIMAGING_ARRIVALS_POLL_DELAY` (default 10) | parse |
| listing interval while settling | environment `HEALTHIMAGING_SETTLE_POKE_INTERVAL` (default 30) | parse |
| data store, role, output prefix | Variables `healthimaging_datastore_id`, `healthimaging_data_access_role_arn`, `healthimaging_output_s3_uri` | run |
| staging prefix (planner) | Variable `healthimaging_staging_s3_uri` (optional) | run |
| study folders | Variable `healthimaging_arrivals_grouping`, JSON: `{"depth": 2, "base_prefix": "incoming/"}` or `{"pattern": "^incoming/[^/]+/[^/]+/"}`, optional `exclude_prefixes` (default `{"depth": 2}`); the output and staging prefixes are always excluded | run |
| settle period | Variable `healthimaging_arrivals_settle_seconds` (default 120) | run |

The queue URL is a parse-time setting because the trigger is part of the serialized DAG; it is read from the
environment, never resolved against AWS at parse.

Logs name counts and bucket names, not study folders (their names can be patient ids). The provider's S3 sensor
logs the listed prefix at INFO; see `healthimaging.settle`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import DAG, Asset, AssetWatcher
from airflow.sdk.definitions.decorators import task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from healthimaging.import_tasks import compose_imports
from healthimaging.params import PARAMS
from healthimaging.settle import S3PrefixSettledSensor

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

DAG_ID = "healthimaging_import_on_arrival"

QUEUE_URL = os.environ.get("HEALTHIMAGING_ARRIVALS_QUEUE_URL", "").strip()
AWS_CONN_ID = os.environ.get("HEALTHIMAGING_AWS_CONN_ID", "aws_default")
WAIT_SECONDS = int(os.environ.get("HEALTHIMAGING_ARRIVALS_WAIT_SECONDS", "20"))
POLL_DELAY = int(os.environ.get("HEALTHIMAGING_ARRIVALS_POLL_DELAY", "10"))
SETTLE_POKE_INTERVAL = float(os.environ.get("HEALTHIMAGING_SETTLE_POKE_INTERVAL", "30"))
MAX_ACTIVE_RUNS = int(os.environ.get("HEALTHIMAGING_ARRIVALS_MAX_ACTIVE_RUNS", "16"))
SETTLE_TIMEOUT = timedelta(hours=12)


def arrival_watchers(queue_url: str) -> list[AssetWatcher]:
    """
    The watcher of the arrivals queue (none when no queue is configured).

    :param queue_url: the SQS queue URL, or empty.
    """
    if not queue_url:
        return []
    trigger = MessageQueueTrigger(
        scheme="sqs",
        sqs_queue=queue_url,
        aws_conn_id=AWS_CONN_ID,
        max_messages=10,
        num_batches=1,
        wait_time_seconds=WAIT_SECONDS,
        waiter_delay=POLL_DELAY,
    )
    return [AssetWatcher(name="s3_object_created", trigger=trigger)]


ARRIVALS = Asset(
    name="healthimaging_dicom_arrivals",
    uri="x-medical-imaging://dicom-arrivals",
    group="medical-imaging",
    watchers=arrival_watchers(QUEUE_URL),
)


def _settings() -> Any:
    from airflow.sdk import Variable

    from healthimaging.arrivals import ArrivalSettings

    try:
        return ArrivalSettings.from_variables(lambda key: Variable.get(key, default=None))
    except ValueError as err:
        raise AirflowFailException(str(err)) from None


@task(task_id="group_study_folders", execution_timeout=timedelta(minutes=5))
def group_study_folders(
    triggering_asset_events: Mapping[Any, Iterable[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Group the keys the triggering messages announce into study folders, as the settle sensor's arguments."""
    from healthimaging.arrivals import group_arrivals, iter_messages

    settings = _settings()
    events = [event for per_asset in (triggering_asset_events or {}).values() for event in per_asset]
    folders, _ = group_arrivals(iter_messages(events), settings.grouping)
    if not folders:
        raise AirflowSkipException(f"No study folder in {len(events)} asset event(s): nothing to import.")
    return [
        {"bucket_name": f.bucket, "prefix": f.prefix, "inactivity_period": settings.settle_seconds}
        for f in folders
    ]


@task(task_id="settled_import_spec", multiple_outputs=False, execution_timeout=timedelta(minutes=5))
def settled_import_spec(bucket_name: str, prefix: str) -> dict[str, Any]:
    """The import spec of a folder that has settled."""
    return dict(_settings().import_spec(bucket_name, prefix))


@task_group(group_id="settle")
def settle(bucket_name: str, prefix: str, inactivity_period: float) -> Any:
    """Wait for one study folder to be quiet for the settle period (deferred), then name its import."""
    wait = S3PrefixSettledSensor(
        task_id="wait_until_settled",
        bucket_name=bucket_name,
        prefix=prefix,
        inactivity_period=inactivity_period,
        min_objects=1,
        allow_delete=True,
        deferrable=True,
        poke_interval=SETTLE_POKE_INTERVAL,
        timeout=SETTLE_TIMEOUT.total_seconds(),
        aws_conn_id=AWS_CONN_ID,
    )
    spec = settled_import_spec(bucket_name, prefix)
    wait >> spec
    return spec


@task(
    task_id="settled_folders",
    trigger_rule="none_failed_min_one_success",
    execution_timeout=timedelta(minutes=5),
)
def settled_folders(specs: Any) -> list[dict[str, Any]]:
    """
    The import specs of the folders that settled, as one list.

    The spec task sits in a mapped task group, so Airflow hands over one dict when the group ran once and a
    sequence otherwise.
    """
    from collections.abc import Mapping

    items = [specs] if isinstance(specs, Mapping) else list(specs or [])
    if not items:
        raise AirflowSkipException("No study folder settled: nothing to import.")
    return [dict(item) for item in items]


with DAG(
    dag_id=DAG_ID,
    description="Import DICOM studies from S3 as they arrive (SQS notifications, settle, import)",
    doc_md=__doc__,
    schedule=[ARRIVALS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=MAX_ACTIVE_RUNS,
    dagrun_timeout=timedelta(hours=24),
    # The shared search task renders this param; an arrival run searches all image sets of each import.
    params={"search_criteria": PARAMS["search_criteria"]},
    tags=["healthimaging", "dicom", "medical-imaging", "import", "event-driven"],
    default_args={
        "owner": "data-engineering",
        "retries": 3,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=30),
    },
) as dag:
    specs = settled_folders(settle.expand_kwargs(group_study_folders()))
    compose_imports(specs)
