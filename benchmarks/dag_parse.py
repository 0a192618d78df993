"""DAG parse cost: our DAG file against an empty DAG, parsed the way the dag-processor parses.

The dag-processor imports Airflow once, freezes the garbage collector (``gc.freeze()``), pre-imports the
``airflow.*`` modules a DAG file names (``[dag_processor] parsing_pre_import_modules``), then forks a child per
DAG file; every other module a DAG file imports is paid again in every child. Each measurement here does the
same: pre-import in the warm, frozen parent with the dag-processor's own function, fork, parse the file in the
child and report the child's wall time. The two files alternate within one run, and the ratio of medians is the
figure (target at most 1.5). The child also reports whether boto3, botocore, pydicom or the local endpoint were
imported while parsing.

Two figures per run:

- ``ratio_of_medians`` (the target's figure): the child fills a ``DagBag`` from the file (import the file, build
  and validate the DAG).
- ``dag_processor_child``: the child runs the dag-processor's own ``_parse_file``, i.e. also the file-stability
  check and the serialization of every DAG (``DagSerialization.to_dict``) whose result it sends to the manager.
  Serializing compares each task's params with the DAG's, which checks every Param's schema again about ten times.
  Measured after the DagBag rounds, with ``airflow.dag_processing.manager`` (the parsers' real parent) imported in
  the parent as well. Not measured: encoding the result for the manager's socket.

Bytecode: a deployed dag-processor compiles a module (the DAG file, the ``healthimaging`` operators, Airflow's own
modules) once and reads the cached bytecode at every later parse. Here the parent points ``sys.pycache_prefix``
at a temporary folder and allows writing bytecode, so the warm-up parses cache every module and the measured
parses read it, whatever ``PYTHONDONTWRITEBYTECODE`` says and without writing into the repository.
``--compile-from-source`` keeps the interpreter's own setting instead (with ``PYTHONDONTWRITEBYTECODE=1`` every
child then compiles the DAG file and ``plugins/healthimaging`` from source, as this benchmark did before).

Usage: ``.venv/bin/python benchmarks/dag_parse.py [--rounds 15] [--json benchmarks/results/dag_parse.json]
[--compile-from-source]``
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = Path(os.environ.get("DAG_FILE", ROOT / "dags" / "healthimaging_import_dicom_and_search.py"))
HEAVY_MODULES = ("boto3", "botocore", "aiobotocore", "pydicom", "healthimaging_local", "moto")
#: What the child does: fill a DagBag (the target's figure), or run the dag-processor's ``_parse_file``.
MODES = ("dagbag", "dag_processor_child")

EMPTY_DAG = '''"""An empty DAG with the same schedule, for comparison."""
from __future__ import annotations

from airflow.sdk import DAG

with DAG(dag_id="empty_reference", schedule="0 2 * * *", catchup=False):
    pass
'''


class _NullLog:
    """Stands in for the dag-processor's logger (its warnings and exceptions become import errors here)."""

    def warning(self, *args: object, **kwargs: object) -> None:
        """Drop the warning.

        :param args: ignored.
        :param kwargs: ignored.
        """

    def exception(self, *args: object, **kwargs: object) -> None:
        """Drop the message: ``_parse_file`` also records the failure as an import error, which is checked.

        :param args: ignored.
        :param kwargs: ignored.
        """


def _parse(path: Path, mode: str) -> dict[str, Any]:
    """
    Parse ``path`` in this (child) process and describe the outcome.

    :param path: the DAG file to parse.
    :param mode: one of ``MODES``.
    :return: dag count, import error count and the heavy modules loaded while parsing.
    """
    before = set(sys.modules)
    if mode == "dagbag":
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(path))
        dags, errors = len(bag.dags), len(bag.import_errors)
    else:
        from airflow.dag_processing.processor import DagFileParseRequest, _parse_file

        os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "client"  # as _parse_file_entrypoint sets it
        request = DagFileParseRequest(file=str(path), bundle_path=path.parent, bundle_name="dags-folder")
        result = _parse_file(request, _NullLog())  # type: ignore[arg-type]
        assert result is not None
        dags, errors = len(result.serialized_dags), len(result.import_errors)
    loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(HEAVY_MODULES))
    return {"dags": dags, "errors": errors, "heavy": loaded}


def _parse_in_child(path: Path, mode: str = "dagbag") -> tuple[float, list[str], int]:
    """Fork, parse ``path`` in the child, and return (seconds, heavy modules loaded, dag count).

    :param path: the DAG file to parse.
    :param mode: one of ``MODES``.
    """
    from airflow.dag_processing.processor import _pre_import_airflow_modules

    _pre_import_airflow_modules(str(path), _NullLog())  # type: ignore[arg-type]
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        payload = _parse(path, mode)
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
    if payload["errors"] or not payload["dags"]:
        raise SystemExit(f"{path} has import errors (mode {mode})")
    return elapsed, payload["heavy"], payload["dags"]


def _figure(ours: list[float], reference: list[float]) -> dict[str, float]:
    """
    Medians of both files and their ratio.

    :param ours: seconds per parse of our DAG file.
    :param reference: seconds per parse of the empty DAG.
    """
    return {
        "dag_file_median_s": round(statistics.median(ours), 4),
        "empty_dag_median_s": round(statistics.median(reference), 4),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(reference), 3),
    }


def main() -> int:
    """Run the benchmark and print (and optionally record) the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument(
        "--compile-from-source",
        action="store_true",
        help="do not cache bytecode in a temporary pycache_prefix (keep the interpreter's own setting)",
    )
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="dagparse-")
    os.environ.setdefault("AIRFLOW_HOME", home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    sys.path.insert(0, str(ROOT / "plugins"))
    import airflow.sdk  # noqa: F401  (warm parent, as the dag-processor is)
    from airflow.dag_processing.dagbag import DagBag  # noqa: F401
    from airflow.dag_processing.processor import _parse_file  # noqa: F401

    if not args.compile_from_source:  # after the parent's own imports, which read the installed bytecode
        sys.pycache_prefix = str(Path(home) / "pycache")
        sys.dont_write_bytecode = False

    empty = Path(home) / "empty_reference.py"
    empty.write_text(EMPTY_DAG)

    times: dict[tuple[str, Path], list[float]] = {(mode, f): [] for mode in MODES for f in (DAG_FILE, empty)}
    heavy: set[str] = set()
    for mode in MODES:  # warm the page cache (and the bytecode cache) for both files
        _parse_in_child(empty, mode)
        _parse_in_child(DAG_FILE, mode)
    gc.freeze()  # as DagFileProcessorManager does before it forks parsers
    for mode in MODES:  # one mode after the other, so the DagBag figure is measured as it always was
        if mode == "dag_processor_child":
            importlib.import_module("airflow.dag_processing.manager")  # the parsers' real parent process
            gc.freeze()
        for _ in range(args.rounds):
            for path in (DAG_FILE, empty):
                t, loaded, _n = _parse_in_child(path, mode)
                times[mode, path].append(t)
                if path == DAG_FILE:
                    heavy.update(loaded)

    flags = " --compile-from-source" if args.compile_from_source else ""
    result = {
        "benchmark": "dag_parse",
        "command": f"python benchmarks/dag_parse.py --rounds {args.rounds}{flags}",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "rounds": args.rounds,
        "bytecode": (
            f"interpreter setting (dont_write_bytecode={sys.flags.dont_write_bytecode})"
            if args.compile_from_source
            else "cached by the warm-up parses in a temporary pycache_prefix, read by every measured parse"
        ),
        **_figure(times["dagbag", DAG_FILE], times["dagbag", empty]),
        "target_ratio_at_most": 1.5,
        "heavy_modules_imported_at_parse": sorted(heavy),
        "dag_processor_child": {
            "what": "the child runs airflow.dag_processing.processor._parse_file: file-stability check, "
            "DagBag, DagSerialization.to_dict of every DAG",
            **_figure(times["dag_processor_child", DAG_FILE], times["dag_processor_child", empty]),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    # The empty DAG, the bytecode cache and the throwaway AIRFLOW_HOME.
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
