"""Importing the operators, sensor and links (what a DAG file does at parse time) loads no AWS or DICOM code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("boto3", "botocore", "aiobotocore", "pydicom", "healthimaging_local")


def test_operator_modules_import_no_aws_sdk() -> None:
    # ``import airflow`` itself loads ``airflow.providers.amazon.get_provider_info`` (the providers manager),
    # so Amazon modules are compared against what Airflow alone loads.
    code = """
import json, sys
import airflow.sdk
before = set(sys.modules)
import healthimaging.operators, healthimaging.sensors, healthimaging.links
print(json.dumps({"all": sorted(sys.modules), "new": sorted(set(sys.modules) - before)}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    ).stdout
    modules = json.loads(out.strip().splitlines()[-1])
    assert "healthimaging.operators" in modules["new"]
    assert [m for m in modules["all"] if m.split(".")[0] in HEAVY] == []
    assert [m for m in modules["new"] if m.startswith("airflow.providers.amazon")] == []
    assert "healthimaging.hooks" not in modules["all"]
    assert "healthimaging.triggers" not in modules["all"]


def test_dag_parse_benchmark_child_loads_no_heavy_module(tmp_path: Path) -> None:
    """
    The benchmark's own child parse (fork from a warm parent, DagBag) of the import DAG loads no heavy module.

    Run from a fresh interpreter: this test process has boto3 loaded already, so a child forked from it
    could not tell.
    """
    code = """
import json, sys
sys.path.insert(0, "benchmarks")
import dag_parse
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
assert not set(dag_parse.HEAVY_MODULES) & {m.split(".")[0] for m in sys.modules}
_seconds, heavy, dags = dag_parse._parse_in_child(dag_parse.DAG_FILE)
print(json.dumps({"heavy_modules_imported_at_parse": heavy, "dags": dags}))
"""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "plugins"),
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    env.pop("DAG_FILE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert result == {"heavy_modules_imported_at_parse": [], "dags": 1}


def test_validation_reads_the_service_model_lazily() -> None:
    code = "import sys, healthimaging.validation; print(sorted(m for m in sys.modules if m.startswith('botocore')))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"
