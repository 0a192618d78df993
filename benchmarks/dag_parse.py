"""DAG parse cost: our DAG file against an empty DAG, parsed the way the dag-processor parses.

The dag-processor imports Airflow once, freezes the garbage collector (``gc.freeze()``), pre-imports the
``airflow.*`` modules a DAG file names (``[dag_processor] parsing_pre_import_modules``), then forks a child per
DAG file; every other module a DAG file imports is paid again in every child. Each measurement here does the
same: pre-import in the warm, frozen parent with the dag-processor's own function, fork, parse the file with
``DagBag`` in the child and report the child's wall time. The two files alternate within one run, and the
ratio of medians is the figure (target at most 1.5). The child also reports whether boto3, botocore,
pydicom or the local endpoint were imported while parsing.

Usage: ``.venv/bin/python benchmarks/dag_parse.py [--rounds 15] [--json benchmarks/results/dag_parse.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = Path(os.environ.get("DAG_FILE", ROOT / "dags" / "healthimaging_import_dicom_and_search.py"))
HEAVY_MODULES = ("boto3", "botocore", "aiobotocore", "pydicom", "healthimaging_local", "moto")

EMPTY_DAG = '''"""An empty DAG with the same schedule, for comparison."""
from __future__ import annotations

from airflow.sdk import DAG

with DAG(dag_id="empty_reference", schedule="0 2 * * *", catchup=False):
    pass
'''


class _NullLog:
    """Stands in for the dag-processor's logger (pre-import failures are only warned about there)."""

    def warning(self, *args: object, **kwargs: object) -> None:
        """Drop the warning.

        :param args: ignored.
        :param kwargs: ignored.
        """


def _parse_in_child(path: Path) -> tuple[float, list[str], int]:
    """Fork, parse ``path`` with DagBag in the child, and return (seconds, heavy modules loaded, dag count).

    :param path: the DAG file to parse.
    """
    from airflow.dag_processing.processor import _pre_import_airflow_modules

    _pre_import_airflow_modules(str(path), _NullLog())
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        from airflow.dag_processing.dagbag import DagBag

        before = set(sys.modules)
        bag = DagBag(dag_folder=str(path))
        loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(HEAVY_MODULES))
        payload = {"dags": len(bag.dags), "errors": len(bag.import_errors), "heavy": loaded}
        os.write(write_fd, json.dumps(payload).encode())
        os.close(write_fd)
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    payload = json.loads(data)
    if payload["errors"]:
        raise SystemExit(f"{path} has import errors")
    return elapsed, payload["heavy"], payload["dags"]


def main() -> int:
    """Run the benchmark and print (and optionally record) the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="dagparse-")
    os.environ.setdefault("AIRFLOW_HOME", home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    sys.path.insert(0, str(ROOT / "plugins"))
    import airflow.sdk  # noqa: F401  (warm parent, as the dag-processor is)
    from airflow.dag_processing.dagbag import DagBag  # noqa: F401

    empty = Path(home) / "empty_reference.py"
    empty.write_text(EMPTY_DAG)

    ours: list[float] = []
    reference: list[float] = []
    heavy: set[str] = set()
    _parse_in_child(empty)  # warm the page cache for both files
    _parse_in_child(DAG_FILE)
    gc.freeze()  # as DagFileProcessorManager does before it forks parsers
    for _ in range(args.rounds):
        t, loaded, _n = _parse_in_child(DAG_FILE)
        ours.append(t)
        heavy.update(loaded)
        t, _l, _n = _parse_in_child(empty)
        reference.append(t)

    result = {
        "benchmark": "dag_parse",
        "command": f"python benchmarks/dag_parse.py --rounds {args.rounds}",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "rounds": args.rounds,
        "dag_file_median_s": round(statistics.median(ours), 4),
        "empty_dag_median_s": round(statistics.median(reference), 4),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(reference), 3),
        "target_ratio_at_most": 1.5,
        "heavy_modules_imported_at_parse": sorted(heavy),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
