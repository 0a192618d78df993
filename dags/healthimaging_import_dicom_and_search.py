"""The import DAG: one mapped import per S3 prefix (doc_md: the ``.md`` file next to this one)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, XComArg

# Imported from their module, not from ``airflow.sdk``: the dag-processor pre-imports the ``airflow.*`` modules a
# DAG file names before it forks a parser, so the decorators' import chain is paid once, not at every parse.
from airflow.sdk.definitions.decorators import task, task_group
from airflow.sdk.exceptions import AirflowSkipException

from healthimaging.operators import SearchImageSetsOperator, StartDICOMImportOperator
from healthimaging.params import build_params, resolve_run_imports
from healthimaging.sensors import DICOMImportJobSensor

DAG_ID = "healthimaging_import_dicom_and_search"

#: Downstream DAGs schedule on this asset itself (same name and URI; not ``Asset.ref``, whose runs get no events).
IMAGE_SETS_ASSET_NAME = "healthimaging_image_sets"
IMAGE_SETS = Asset(name=IMAGE_SETS_ASSET_NAME, uri="x-medical-imaging://image-sets", group="medical-imaging")

#: Pool for jobs in flight; a parse-time setting, so it comes from the environment, not from a Variable.
IMPORT_POOL = os.environ.get("HEALTHIMAGING_IMPORT_POOL", "default_pool")
MAX_IMPORTS_IN_FLIGHT = 90
#: Seconds between GetDICOMImportJob polls (parse time; lower it for the local endpoint).
POKE_INTERVAL = float(os.environ.get("HEALTHIMAGING_POKE_INTERVAL", "30"))
# Parallel runs (nightly, backfill, manual); environment, read at parse time like the pool.
MAX_ACTIVE_RUNS = int(os.environ.get("HEALTHIMAGING_MAX_ACTIVE_RUNS", "8"))
IMPORT_TIMEOUT = timedelta(hours=12)


@task(task_id="resolve_imports", execution_timeout=timedelta(minutes=5))
def resolve_imports() -> list[dict[str, Any]]:
    """Resolve the run's inputs (params > Variables > data interval) into one import spec per prefix."""
    from airflow.sdk import get_current_context

    return resolve_run_imports(get_current_context())


@task(task_id="publish_image_sets", outlets=[IMAGE_SETS], execution_timeout=timedelta(minutes=5))
def publish_image_sets(
    datastore_id: str, job_id: str, image_set_ids: list[str] | None, **context: Any
) -> list[str]:
    """
    Emit an asset event naming this import's image sets (ids only) for downstream DAGs.

    :param datastore_id: the data store imported into.
    :param job_id: the import job.
    :param image_set_ids: ids of exactly this import's image sets.
    """
    ids = list(image_set_ids or [])
    if not ids:
        raise AirflowSkipException(f"Import job {job_id} produced no image sets: no asset event.")
    context["outlet_events"][IMAGE_SETS].extra = {
        "datastoreId": datastore_id,
        "jobId": job_id,
        "imageSetIds": ids,
    }
    return ids


@task_group(group_id="import_dicom")
def import_dicom(
    datastore_id: str,
    data_access_role_arn: str,
    input_s3_uri: str,
    output_s3_uri: str,
    job_name: str | None,
    client_token: str | None,
    max_failed_files: int | None,
    max_results: int,
    include_phi: bool,
    staging_s3_uri: str | None = None,
    allow_empty: bool = False,
    phi_allow_tags: list[str] | None = None,
) -> None:
    """One import per prefix: start the job, wait for it (deferred), find its image sets, announce them."""
    # [START howto_operator_start_dicom_import]
    start = StartDICOMImportOperator(
        task_id="start_import_job",
        datastore_id=datastore_id,
        data_access_role_arn=data_access_role_arn,
        input_s3_uri=input_s3_uri,
        output_s3_uri=output_s3_uri,
        job_name=job_name,
        client_token=client_token,
        wait_for_completion=False,
        max_active_tis_per_dag=1,
        pool=IMPORT_POOL,
        priority_weight=1,
        weight_rule="absolute",
        execution_timeout=timedelta(minutes=10),
        map_index_template="{{ task.input_s3_uri }}",
    )
    # [END howto_operator_start_dicom_import]
    job_id: Any = start.output  # the job id, resolved per map index at run time
    # [START howto_sensor_dicom_import_job]
    wait = DICOMImportJobSensor(
        task_id="wait_for_import_job",
        datastore_id=datastore_id,
        job_id=job_id,
        deferrable=True,
        poke_interval=POKE_INTERVAL,
        timeout=IMPORT_TIMEOUT.total_seconds(),
        max_failed_files=max_failed_files,
        max_active_tis_per_dag=MAX_IMPORTS_IN_FLIGHT,
        pool=IMPORT_POOL,
        priority_weight=10,
        weight_rule="absolute",
        execution_timeout=timedelta(minutes=30),
        map_index_template="{{ task.job_id }}",
    )
    # [END howto_sensor_dicom_import_job]
    # [START howto_operator_search_image_sets]
    search = SearchImageSetsOperator(
        task_id="search_image_sets",
        datastore_id=datastore_id,
        search_criteria="{{ params.search_criteria | tojson }}",
        max_results=max_results,
        all_pages=True,
        import_job_id=job_id,
        include_phi=include_phi,
        execution_timeout=timedelta(minutes=30),
        map_index_template="{{ task.import_job_id }}",
    )
    # [END howto_operator_search_image_sets]
    wait >> search
    image_set_ids: Any = XComArg(search, key="imageSetIds")
    publish_image_sets(datastore_id, job_id, image_set_ids)


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
    import_dicom.expand_kwargs(resolve_imports())
