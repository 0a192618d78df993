"""End to end: wall time of ``make demo`` (after install) and the DAG run's time beyond the imports' own time.

Each round runs ``make demo`` and times it (as ``time make demo`` would). The DAG run's start/end come from
the demo's ``DEMO_RUN`` line (read from the metadata DB by the demo); the import jobs' ``submittedAt`` and
``endedAt`` from the endpoint's state left in ``.demo/state`` (the demo imports two prefixes, in parallel, each
job IN_PROGRESS for at least 5 s: ``--import-seconds 5``). Overhead = run time - (first submittedAt -> last
endedAt).

Usage: ``.venv/bin/python benchmarks/demo_e2e.py --rounds 3``
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS, ROOT, command_line, machine, write_result


def one_round() -> dict[str, Any]:
    """Run ``make demo`` once and return its figures."""
    started = time.perf_counter()
    done = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"make demo exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("DEMO_RUN "))
    run = json.loads(line.removeprefix("DEMO_RUN "))
    run_start, run_end = (datetime.fromisoformat(run[k]).timestamp() for k in ("start_date", "end_date"))
    with sqlite3.connect(ROOT / ".demo" / "state" / "healthimaging.sqlite3") as db:
        jobs = db.execute("SELECT submitted_at, ended_at FROM jobs ORDER BY submitted_at").fetchall()
    imports_span = max(e for _, e in jobs) - min(s for s, _ in jobs)
    run_seconds = run_end - run_start
    demo_wall = next(float(ln.split()[2]) for ln in done.stdout.splitlines() if ln.startswith("Wall time:"))
    return {
        "make_demo_wall_s": round(wall, 2),
        "demo_script_wall_s": demo_wall,
        "dag_run_s": round(run_seconds, 2),
        "job_seconds": [round(e - s, 2) for s, e in jobs],
        "imports_span_s": round(imports_span, 2),
        "dag_run_minus_imports_s": round(run_seconds - imports_span, 2),
        "job_submit_after_run_start_s": round(min(s for s, _ in jobs) - run_start, 2),
        "run_end_after_last_job_end_s": round(run_end - max(e for _, e in jobs), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "demo_e2e.json")
    args = parser.parse_args()
    subprocess.run(["make", "install"], cwd=ROOT, check=True, capture_output=True)
    runs = []
    for index in range(args.rounds):
        runs.append(one_round())
        print(f"round {index + 1}: {runs[-1]}", flush=True)
    medians = {
        key: round(statistics.median(r[key] for r in runs), 2)
        for key in ("make_demo_wall_s", "dag_run_s", "imports_span_s", "dag_run_minus_imports_s")
    }
    write_result(
        "demo_e2e",
        {
            "benchmark": "demo_e2e",
            "machine": machine(),
            "command": command_line(),
            "runs": runs,
            "medians": medians,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
