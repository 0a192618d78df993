"""
Airflow fixtures for the DAG tests: a temporary AIRFLOW_HOME on SQLite, the parsed DagBag, DAG modules.

Test modules are imported at collection time, before any fixture runs, and Airflow reads its home when it is first
imported; so the temporary home is set when this conftest is loaded (before Airflow is imported), and the
``airflow_db`` session fixture migrates it. Nothing here touches a developer's own ``~/airflow``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dag_test_helpers import DAGS, IMPORT_DAG_ID, ROOT, load_dag_module

if "airflow" not in sys.modules:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-dag-tests-")
# If another conftest imported Airflow first, its home is used, but only if it is a throwaway one.
_HOME = os.environ.get("AIRFLOW_HOME", "")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")


def _is_throwaway_home(home: str) -> bool:
    return bool(home) and Path(home).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """A fresh SQLite metadata DB in the temporary AIRFLOW_HOME (reset once per session)."""
    if not _is_throwaway_home(_HOME):
        pytest.fail(f"AIRFLOW_HOME={_HOME!r} is not a temporary directory; refusing to reset its database")
    from airflow.utils import db

    db.resetdb()
    yield Path(_HOME)
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def dagbag() -> Any:
    """All DAGs of ``dags/``, parsed once (no examples)."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="session")
def import_dag_module() -> ModuleType:
    """The import DAG's module, for its constants and its pure input resolution."""
    return load_dag_module(IMPORT_DAG_ID)
