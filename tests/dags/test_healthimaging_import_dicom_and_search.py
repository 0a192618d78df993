"""
``healthimaging_import_dicom_and_search`` mirrors the Arazzo workflow ``import-dicom-and-search`` and resolves its
inputs as documented: params > Airflow Variables > the run's data interval.

The structural checks read the workflow from the repository's copy in ``docs/arazzo/``; the end-to-end test runs the DAG with
``dag.test()`` (the sensor really defers, its trigger polls over HTTP) against the local endpoint and reads the
workflow's outputs from XCom.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from dag_test_helpers import IMPORT_DAG_ID, ROOT, load_dag_module, run_xcoms, task_states

from healthimaging.params import WORKFLOW_INPUT_PARAMS

WORKFLOW_PATH = ROOT / "docs/arazzo/amazon-healthimaging-import-dicom-and-search-workflow.yml"
DATASTORE = "0123456789abcdef0123456789abcdef"
ROLE_ARN = "arn:aws:iam::123456789012:role/HealthImagingImport"
OUTPUT = "s3://dicom-bucket/import-output/"
TEMPLATE = "s3://dicom-bucket/incoming/{{ data_interval_start.strftime('%Y/%m/%d') }}/"

#: stepId -> (task id, operator class name). The operation each one calls is checked below.
STEP_TASKS = {
    # One task starts every chunk's job (a StartDICOMImportOperator per chunk, at the service's pace).
    "startImportJob": ("start_imports", "StartDICOMImportOperator"),
    "pollImportJob": ("import_dicom.wait_for_import_job", "DICOMImportJobSensor"),
    # One task finds the image sets of every job of the run (imageSetIdsByJob: which job made which).
    "searchImageSets": ("search_image_sets", "SearchImageSetsOperator"),
}
#: workflow output -> (step's task, XCom key, key inside the value or None)
OUTPUT_XCOMS = {
    # start_imports returns every started job; per import (map index), the sensor's result names its job.
    "jobId": ("import_dicom.wait_for_import_job", "return_value", "jobId"),
    "jobStatus": ("import_dicom.wait_for_import_job", "return_value", "jobStatus"),
    # of the whole run (every import's image sets, each once)
    "firstImageSetId": ("search_image_sets", "firstImageSetId", None),
    "imageSetsMetadataSummaries": ("search_image_sets", "imageSetsMetadataSummaries", None),
}


def snake(name: str) -> str:
    """``inputS3Uri`` -> ``input_s3_uri``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def step_operator(task: Any) -> type:
    """The operator class that performs a step: the task's own, or, for ``start_imports``, the one it runs per chunk."""
    if task.task_id == "start_imports":
        from healthimaging import import_tasks
        from healthimaging.operators import StartDICOMImportOperator

        assert "StartDICOMImportOperator(" in inspect.getsource(import_tasks.start_imports.function)
        return StartDICOMImportOperator
    return type(task)


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    document = yaml.safe_load(WORKFLOW_PATH.read_text())
    (flow,) = [w for w in document["workflows"] if w["workflowId"] == "import-dicom-and-search"]
    return dict(flow)


@pytest.fixture(scope="module")
def dag(dagbag: Any) -> Any:
    return dagbag.dags[IMPORT_DAG_ID]


class TestMirrorsWorkflow:
    def test_a_task_per_step_in_order(self, workflow: dict[str, Any], dag: Any) -> None:
        step_ids = [step["stepId"] for step in workflow["steps"]]
        assert step_ids == list(STEP_TASKS)
        tasks = [dag.get_task(STEP_TASKS[step][0]) for step in step_ids]
        for task, (_, class_name) in zip(tasks, STEP_TASKS.values(), strict=True):
            assert class_name in [cls.__name__ for cls in step_operator(task).__mro__]
            if task.task_id == "import_dicom.wait_for_import_job":
                assert task.task_group.group_id == "import_dicom"
        start, wait, search = tasks
        # The wait runs beside the start (each chunk's wait begins when its own job exists): it takes its job
        # from the start's XCom "jobs" at run time, so the order is a data dependency, not a graph edge.
        assert wait.started_by == start.task_id
        assert start.task_id not in wait.get_flat_relative_ids(upstream=True)
        assert wait.task_id in search.get_flat_relative_ids(upstream=True)
        assert search.trigger_rule == "all_done_min_one_success"  # found what imported, whatever failed
        assert start.task_id in dag.get_task("import_report").get_flat_relative_ids(upstream=True)

    def test_each_task_calls_its_steps_operation(self, workflow: dict[str, Any], dag: Any) -> None:
        """operationId -> boto3 method (botocore's own name mapping) -> called by the task's operator."""
        import botocore.session
        from botocore import xform_name

        from healthimaging.hooks import IMPORT_JOB_WAITER, HealthImagingHook

        model = botocore.session.get_session().get_service_model("medical-imaging")
        waiters = json.loads((ROOT / "plugins/healthimaging/waiters/medical-imaging.json").read_text())[
            "waiters"
        ]
        for step in workflow["steps"]:
            operation = step["operationId"]
            assert operation in model.operation_names
            method = xform_name(operation)
            task = dag.get_task(STEP_TASKS[step["stepId"]][0])
            if step["stepId"] == "pollImportJob":
                # The sensor polls through the waiter (trigger) and the hook (poke): both call GetDICOMImportJob.
                assert waiters[IMPORT_JOB_WAITER]["operation"] == operation
                assert f".{method}(" in inspect.getsource(HealthImagingHook.get_import_job)
                assert "get_import_job" in inspect.getsource(type(task).poke)
            else:
                source = "".join(
                    inspect.getsource(cls)
                    for cls in step_operator(task).__mro__
                    if cls.__module__.startswith("healthimaging")
                )
                assert f".{method}(" in source or f'"{method}"' in source, (step["stepId"], method)

    def test_poll_step_branches_match_the_waiter(self, workflow: dict[str, Any]) -> None:
        """The workflow's onSuccess branches (COMPLETED -> search, FAILED -> end, else poll) are the waiter's acceptors."""
        from healthimaging.hooks import IMPORT_JOB_WAITER

        waiter = json.loads((ROOT / "plugins/healthimaging/waiters/medical-imaging.json").read_text())[
            "waiters"
        ]
        acceptors = {a["expected"]: a["state"] for a in waiter[IMPORT_JOB_WAITER]["acceptors"]}
        (poll,) = [s for s in workflow["steps"] if s["stepId"] == "pollImportJob"]
        for branch in poll["onSuccess"]:
            (status,) = re.findall(r'jobStatus == "([A-Z_]+)"', branch["criteria"][0]["condition"])
            expected = {"goto:searchImageSets": "success", "end": "failure", "goto:pollImportJob": "retry"}
            key = branch["type"] if branch["type"] == "end" else f"goto:{branch['stepId']}"
            assert acceptors[status] == expected[key], status

    def test_a_param_per_workflow_input(self, workflow: dict[str, Any], dag: Any) -> None:
        inputs = workflow["inputs"]["properties"]
        assert WORKFLOW_INPUT_PARAMS == {name: snake(name) for name in inputs}
        for name in inputs:
            param = dag.params.get_param(snake(name))
            assert name in (param.schema.get("title") or ""), name
            assert "string" in param.schema["type"], name

    def test_step_requests_map_to_operator_arguments(self, workflow: dict[str, Any], dag: Any) -> None:
        """Every path parameter and payload member of a step is a templated argument of its task."""
        for step in workflow["steps"]:
            operator = step_operator(dag.get_task(STEP_TASKS[step["stepId"]][0]))
            names = [p["name"] for p in step.get("parameters", [])]
            names += list((step.get("requestBody") or {}).get("payload") or {})
            for name in names:
                argument = snake(name)
                assert argument in operator.template_fields, (step["stepId"], argument)

    def test_workflow_outputs_are_mapped(self, workflow: dict[str, Any]) -> None:
        assert set(workflow["outputs"]) == set(OUTPUT_XCOMS)
        for output, expression in workflow["outputs"].items():
            step = expression.split(".")[1]
            if output == "jobId":  # the start step's job id, per import in the sensor's result
                assert step == "startImportJob"
                continue
            assert OUTPUT_XCOMS[output][0] == STEP_TASKS[step][0], output

    def test_source_description_is_kept_beside_the_workflow(self, workflow: dict[str, Any]) -> None:
        """The OpenAPI description the workflow names resolves inside the repository and has each step's operation."""
        document = yaml.safe_load(WORKFLOW_PATH.read_text())
        (source,) = document["sourceDescriptions"]
        openapi = yaml.safe_load((WORKFLOW_PATH.parent / source["url"]).read_text())
        operations = {
            op["operationId"]
            for path in openapi["paths"].values()
            for op in path.values()
            if "operationId" in op
        }
        assert {step["operationId"] for step in workflow["steps"]} <= operations


BUCKET = "e2e-dicom"


def prepare_endpoint(
    endpoint: Any, monkeypatch: pytest.MonkeyPatch, prefixes: list[str]
) -> tuple[str, Any, Any]:
    """
    Upload a small synthetic study per prefix, create an ACTIVE data store, point Airflow at the endpoint.

    :return: the data store id, an S3 client and a medical-imaging client.
    """
    from healthimaging_local.sample_data import synthetic_study_files, upload

    s3 = endpoint.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for seed, prefix in enumerate(prefixes):
        upload(synthetic_study_files(1, 1, 2, 2, seed=seed), s3, BUCKET, prefix)
    mi = endpoint.client("medical-imaging")
    datastore_id = str(mi.create_datastore(datastoreName="e2e")["datastoreId"])
    deadline = time.monotonic() + 60
    while mi.get_datastore(datastoreId=datastore_id)["datastoreProperties"]["datastoreStatus"] != "ACTIVE":
        assert time.monotonic() < deadline, "data store did not become ACTIVE"
        time.sleep(0.2)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(endpoint.settings()["airflow_connection"]))
    # Configuration as a deployment sets it: Airflow Variables from AIRFLOW_VAR_<NAME>.
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_DATASTORE_ID", datastore_id)
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_DATA_ACCESS_ROLE_ARN", ROLE_ARN)
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_OUTPUT_S3_URI", f"s3://{BUCKET}/output/")
    monkeypatch.setenv(
        "AIRFLOW_VAR_HEALTHIMAGING_INPUT_S3_URI_TEMPLATE",
        f"s3://{BUCKET}/incoming/{{{{ data_interval_start.strftime('%Y/%m/%d') }}}}/",
    )
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__POLL_INTERVAL", "1")
    return datastore_id, s3, mi


def manifest_image_set_ids(s3: Any, job: dict[str, Any]) -> list[str]:
    """The image-set ids in an import job's own output manifest."""
    key = job["outputS3Uri"].split("/", 3)[3] + "job-output-manifest.json"
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    return [summary["imageSetId"] for summary in manifest["jobSummary"]["imageSetsSummary"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_end_to_end_workflow_outputs_in_xcom(
    airflow_db: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch, workflow: dict[str, Any]
) -> None:
    """A manual run over two prefixes, one mapped import each; XCom holds the workflow's outputs per import."""
    prefixes = ["incoming/a/", "incoming/b/"]
    datastore_id, s3, mi = prepare_endpoint(endpoint, monkeypatch, prefixes)
    dag = load_dag_module(IMPORT_DAG_ID).dag
    run = dag.test(logical_date=None, run_conf={"input_s3_uris": [f"s3://{BUCKET}/{p}" for p in prefixes]})

    assert run.state == "success", task_states(run)
    xcoms = run_xcoms(IMPORT_DAG_ID, run.run_id)
    seen: set[str] = set()
    by_job = xcoms[("search_image_sets", -1, "imageSetIdsByJob")]
    for map_index, prefix in enumerate(prefixes):
        outputs = {}
        for name, (task_id, key, member) in OUTPUT_XCOMS.items():
            value = xcoms[(task_id, map_index if task_id.startswith("import_dicom.") else -1, key)]
            outputs[name] = value[member] if member else value
        assert set(outputs) == set(workflow["outputs"])
        assert re.fullmatch(r"[0-9a-z]{32}", outputs["jobId"])
        assert outputs["jobStatus"] == "COMPLETED"
        job = mi.get_dicom_import_job(datastoreId=datastore_id, jobId=outputs["jobId"])["jobProperties"]
        assert job["inputS3Uri"] == f"s3://{BUCKET}/{prefix}"
        ids = by_job[outputs["jobId"]]
        assert sorted(ids) == sorted(manifest_image_set_ids(s3, job))  # exactly this import's image sets
        assert len(ids) == 2
        assert not seen & set(ids)
        seen |= set(ids)
    ids = xcoms[("search_image_sets", -1, "imageSetIds")]
    assert sorted(ids) == sorted(seen)  # every import's image sets, each once
    assert outputs["firstImageSetId"] == ids[0]
    assert [s["imageSetId"] for s in outputs["imageSetsMetadataSummaries"]] == ids
    for summary in outputs["imageSetsMetadataSummaries"]:  # include_phi defaults to False
        assert summary.get("DICOMTags", {}).get("DICOMPatientName") in (None, "")
    # the summaries are written once: under the workflow's name, not again in return_value (issue 12)
    assert ("search_image_sets", -1, "return_value") not in xcoms

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run.run_id)).all()
        extras = [e.extra for e in events]
    # One event per run (events of one task reach a consumer's run together), one entry per import in it.
    assert len(extras) == 1
    jobs = sorted(j["job_id"] for j in xcoms[("start_imports", -1, "return_value")])
    assert sorted(extras[0]["jobIds"]) == jobs
    assert sorted(item["jobId"] for item in extras[0]["imports"]) == jobs
    assert extras[0]["datastoreId"] == datastore_id
    assert set(extras[0]["imageSetIds"]) == seen
    assert {i for item in extras[0]["imports"] for i in item["imageSetIds"]} == seen


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nightly_run_imports_its_data_intervals_prefix(
    airflow_db: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No params: everything comes from Variables, the prefix from the run's data interval (as in a backfill)."""
    datastore_id, s3, mi = prepare_endpoint(
        endpoint, monkeypatch, ["incoming/2025/01/30/", "incoming/2025/01/31/"]
    )
    dag = load_dag_module(IMPORT_DAG_ID).dag
    # CronDataIntervalTimetable("0 2 * * *"): the run at 2025-01-31 02:00 covers 2025-01-30 02:00 -> 01-31 02:00.
    run = dag.test(logical_date=datetime(2025, 1, 31, 2, tzinfo=UTC))

    assert run.state == "success", task_states(run)
    xcoms = run_xcoms(IMPORT_DAG_ID, run.run_id)
    specs = xcoms[("resolve_imports", -1, "return_value")]
    assert [s["input_s3_uri"] for s in specs] == [f"s3://{BUCKET}/incoming/2025/01/30/"]
    job_id = xcoms[("start_imports", -1, "return_value")][0]["job_id"]
    job = mi.get_dicom_import_job(datastoreId=datastore_id, jobId=job_id)["jobProperties"]
    assert job["inputS3Uri"] == f"s3://{BUCKET}/incoming/2025/01/30/"
    assert sorted(xcoms[("search_image_sets", -1, "imageSetIds")]) == sorted(manifest_image_set_ids(s3, job))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "conf",
    [{}, {"input_s3_uri": "s3://dicom-bucket/"}],
    ids=["no-prefix-no-interval", "input-contains-output"],
)
def test_manual_run_that_resolve_refuses_fails_at_once(
    airflow_db: Path, monkeypatch: pytest.MonkeyPatch, conf: dict[str, Any]
) -> None:
    """
    The run is created; resolve_imports fails on its first try (no retry) and nothing else runs: no prefix and no
    data interval, or an input prefix that contains the output prefix (issue 12 items 2 and 7).
    """
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_DATASTORE_ID", DATASTORE)
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_DATA_ACCESS_ROLE_ARN", ROLE_ARN)
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_OUTPUT_S3_URI", OUTPUT)
    monkeypatch.setenv("AIRFLOW_VAR_HEALTHIMAGING_INPUT_S3_URI_TEMPLATE", TEMPLATE)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({"conn_type": "aws", "extra": {"endpoint_url": "http://127.0.0.1:9"}}),
    )
    dag = load_dag_module(IMPORT_DAG_ID).dag
    run = dag.test(logical_date=None, run_conf=conf)
    assert run.state == "failed"
    states = task_states(run)
    assert states[("resolve_imports", -1)] == "failed"
    assert [key for key, state in states.items() if key[0] != "resolve_imports" and state == "success"] == []
    (resolve,) = [ti for ti in run.get_task_instances() if ti.task_id == "resolve_imports"]
    assert resolve.try_number == 1


def test_example_dag_reads_ids_from_asset_events(dagbag: Any) -> None:
    """The downstream example collects ids per import from the events' extra, and ignores events without ids."""
    from types import SimpleNamespace

    module = load_dag_module("healthimaging_new_image_sets_example")
    events = [
        SimpleNamespace(extra={"datastoreId": DATASTORE, "jobId": "j1", "imageSetIds": ["a" * 32, "b" * 32]}),
        SimpleNamespace(extra={"datastoreId": DATASTORE, "jobId": "j2", "imageSetIds": []}),
        SimpleNamespace(extra=None),
        SimpleNamespace(
            extra={
                "datastoreId": DATASTORE,
                "imageSetIds": ["c" * 32],
                "imports": [{"datastoreId": DATASTORE, "jobId": "j3", "imageSetIds": ["c" * 32]}],
            }
        ),
    ]
    assert module.new_image_sets(events) == [
        {"datastoreId": DATASTORE, "jobId": "j1", "imageSetIds": ["a" * 32, "b" * 32]},
        {"datastoreId": DATASTORE, "jobId": "j3", "imageSetIds": ["c" * 32]},
    ]
