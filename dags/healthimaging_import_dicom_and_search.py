"""The import DAG: plan each S3 prefix, import its chunks, account for every file (doc_md: the ``.md`` next to it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable

# Imported from their module, not from ``airflow.sdk``: the dag-processor pre-imports the ``airflow.*`` modules a
# DAG file names before it forks a parser, so the decorators' import chain is paid once, not at every parse.
from airflow.sdk.definitions.decorators import task

from healthimaging import config
from healthimaging.assets import IMAGE_SETS, IMAGE_SETS_ASSET_NAME  # noqa: F401 (the asset this DAG updates)
from healthimaging.import_tasks import compose_imports
from healthimaging.params import build_params, resolve_run_imports

DAG_ID = "healthimaging_import_dicom_and_search"

# Parallel runs (nightly, backfill, manual): ``[healthimaging] max_active_runs``, read at parse time.
MAX_ACTIVE_RUNS = config.max_active_runs()


@task(task_id="resolve_imports", execution_timeout=timedelta(minutes=5))
def resolve_imports() -> list[dict[str, Any]]:
    """Resolve the run's inputs (params > Variables > data interval) into one import spec per prefix."""
    from airflow.sdk import get_current_context

    return resolve_run_imports(get_current_context())


with DAG(
    dag_id=DAG_ID,
    description="Import DICOM from S3 into AWS HealthImaging and find the image sets it became",
    doc_md=Path(__file__).with_suffix(".md").read_text(),
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=MAX_ACTIVE_RUNS,
    dagrun_timeout=timedelta(hours=24),
    params=build_params(),
    tags=["healthimaging", "dicom", "medical-imaging", "import"],
    default_args={
        "owner": "data-engineering",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": timedelta(minutes=30),
    },
) as dag:
    compose_imports(resolve_imports())
