"""Helpers shared by the DAG tests (import them by name: ``tests/dags`` is on ``sys.path``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
IMPORT_DAG_ID = "healthimaging_import_dicom_and_search"
EXAMPLE_DAG_ID = "healthimaging_new_image_sets_example"


def load_dag_module(stem: str, env: dict[str, str] | None = None) -> ModuleType:
    """
    Import ``dags/<stem>.py`` afresh as a module (parse-time settings taken from ``env``).

    :param stem: the file stem (= dag_id).
    :param env: environment variables set while the file is executed.
    """
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        spec = importlib.util.spec_from_file_location(f"_dag_under_test_{stem}", DAGS / f"{stem}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module


def run_xcoms(dag_id: str, run_id: str) -> dict[tuple[str, int, str], Any]:
    """
    Every XCom of one DAG run, read from the metadata DB.

    :return: ``{(task_id, map_index, key): value}``.
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)
        )
        return {(r.task_id, r.map_index, r.key): XComModel.deserialize_value(r) for r in rows}


def task_states(dag_run: Any) -> dict[tuple[str, int], str | None]:
    """
    State of every task instance of a DAG run returned by ``dag.test()``.

    :return: ``{(task_id, map_index): state}``.
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        )
        return {(ti.task_id, ti.map_index): (str(ti.state) if ti.state else None) for ti in tis}
