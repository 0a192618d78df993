"""Run every benchmark in turn (``make benchmarks``); each records its JSON under ``benchmarks/results/``.

Usage: ``.venv/bin/python benchmarks/run_all.py [--skip dag_parse ...]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "import_throughput": ["import_throughput.py"],
    "search_latency": ["search_latency.py"],
    "dag_parse": ["dag_parse.py", "--json", str(HERE / "results" / "dag_parse.json")],
    "planner_memory": ["planner_memory.py"],
}


def main() -> int:
    """Run the benchmarks; the exit code is the first failing one's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(BENCHMARKS))
    args = parser.parse_args()
    for name, argv in BENCHMARKS.items():
        if name in args.skip:
            continue
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
