"""500 deferred DICOMImportJobSensors on one triggerer: its CPU and memory, and the poll rate at the endpoint.

On a real Airflow (``tests/deployment/harness.py``: CeleryExecutor, PostgreSQL, Redis, one triggerer with the
default capacity of 1000), S import jobs are started directly with boto3 (``serve --import-seconds`` long
enough that none ends during the measurement), then one run of ``bench_triggerer_scale`` maps the deferrable
sensor over them (``benchmarks/dags/bench_triggerer_scale.py``; poll interval and first-poke jitter from
``--poll``/``--jitter``). Once every sensor is deferred, the triggerer is sampled (``ResourceSampler``: CPU
seconds, peak RSS of its process tree) for ``--window`` seconds, and the GetDICOMImportJob calls of that window
are counted from the endpoint's access log in 1-second buckets (mean and peak rate; the service's default
quota is 25 per second).

Usage: ``.venv/bin/python benchmarks/triggerer_scale.py --sensors 500 --poll 30 --window 120``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.airflow_bench import PG_HOST, PG_PORT, PG_USER, Site, deployment, wait_until
from benchmarks.harness import RESULTS, command_line, machine, write_result

DAG_ID = "bench_triggerer_scale"
QUOTA_PER_SECOND = 25.0


def rate_in(calls: list[tuple[datetime, str]], start: datetime, end: datetime) -> dict[str, Any]:
    """Mean and peak GetDICOMImportJob calls per second over the 1-s windows of ``[start, end)``.

    :param calls: ``(time, job id)`` from the access log
    :param start: window start (naive local time, as the log)
    :param end: window end
    """
    seconds = int((end - start).total_seconds())
    buckets = Counter(int((t - start).total_seconds()) for t, _ in calls if start <= t < end)
    per_second = [buckets.get(i, 0) for i in range(seconds)]
    distinct_jobs = len({job for t, job in calls if start <= t < end})
    return {
        "window_s": seconds,
        "calls": sum(per_second),
        "mean_per_s": round(statistics.mean(per_second), 2),
        "peak_per_s": max(per_second),
        "p95_per_s": statistics.quantiles(per_second, n=100, method="inclusive")[94] if seconds > 1 else 0,
        "distinct_jobs_polled": distinct_jobs,
    }


def ti_states(deploy: Any, run_id: str) -> dict[str, int]:
    """``{state: count}`` of the mapped sensor's task instances, read from the metadata database.

    (The REST API pages at 100 task instances; one query is cheaper than six pages every 5 s.)

    :param deploy: the deployment
    :param run_id: the run
    """
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=deploy.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT coalesce(state, 'none'), count(*) FROM task_instance"
                " WHERE dag_id = %s AND run_id = %s AND task_id = 'wait' GROUP BY 1",
                (DAG_ID, run_id),
            )
            return {str(state): int(count) for state, count in cursor.fetchall()}
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=500)
    parser.add_argument(
        "--poll", type=float, default=30.0, help="sensor poke_interval (trigger waiter delay)"
    )
    parser.add_argument("--jitter", type=float, default=0.0, help="sensor first_poke_jitter")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured once all are deferred")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds between ramp end and window")
    parser.add_argument("--worker-concurrency", type=int, default=8)
    parser.add_argument("--ramp-timeout", type=float, default=1500.0, help="seconds for all to defer")
    parser.add_argument(
        "--import-seconds", type=float, default=2400.0, help="job duration (outlasts the test)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "triggerer_scale.json")
    args = parser.parse_args()
    env = {"BENCH_SCALE_POLL": str(args.poll), "BENCH_SCALE_JITTER": str(args.jitter)}
    result: dict[str, Any] = {
        "benchmark": "triggerer_scale",
        "machine": machine(),
        "command": command_line(),
        "sensors": args.sensors,
        "poll_interval_s": args.poll,
        "first_poke_jitter_s": args.jitter,
        "celery_worker_concurrency": args.worker_concurrency,
        "triggerer_capacity": "1000 (Airflow default, not overridden)",
        "note": "one run; figures over the measurement window after every sensor deferred",
    }
    with deployment(["bench_triggerer_scale.py"], args.worker_concurrency, env) as deploy:
        api = deploy.api
        # Thousands of jobs started at once and polled by thousands of triggers: no service rates, no quota.
        options = ["--import-seconds", str(args.import_seconds), "--max-concurrent-imports", "10000"]
        options += ["--start-rate", "0", "--get-rate", "0"]
        site = Site(deploy, options)
        try:
            api.wait_for_dag(DAG_ID)
            api.unpause(DAG_ID)
            with deploy.sample("triggerer") as idle:
                time.sleep(10)
            result["triggerer_idle"] = idle.usage.as_dict()
            offset = site.log_offset()
            job_ids = site.start_jobs(args.sensors)
            run_id = f"bench_scale_{int(time.time())}"
            ramp_started = time.monotonic()
            with deploy.sample("triggerer") as ramp:
                api.trigger(DAG_ID, {"datastore_id": site.datastore_id, "job_ids": job_ids}, run_id=run_id)
                wait_until(
                    lambda: ti_states(deploy, run_id).get("deferred", 0) >= args.sensors,
                    timeout=args.ramp_timeout,
                    interval=5.0,
                    what=f"{args.sensors} deferred sensors",
                )
            result["ramp_s"] = round(time.monotonic() - ramp_started, 1)
            result["triggerer_during_ramp"] = ramp.usage.as_dict()
            print(f"all {args.sensors} deferred after {result['ramp_s']} s", flush=True)
            time.sleep(args.settle)
            window_start = datetime.now()
            with deploy.sample("triggerer", interval=0.5) as steady:
                time.sleep(args.window)
            window_end = datetime.now()
            usage = steady.usage
            result["ti_states_at_window_end"] = ti_states(deploy, run_id)
            result["triggerer_window"] = {
                **usage.as_dict(),
                "cpu_fraction_of_one_core": round(usage.cpu_seconds / args.window, 3),
            }
            calls = site.get_job_calls(offset)
            result["get_job_rate_window"] = rate_in(calls, window_start, window_end)
            first = min(t for t, _ in calls)
            last = max(t for t, _ in calls) + timedelta(seconds=1)
            result["get_job_rate_whole_test"] = rate_in(calls, first, last)
            expected = args.sensors / args.poll
            result["expected_rate_per_s"] = round(expected, 2)
            result["targets"] = {
                "rate_under_quota": {
                    "target": f"< {QUOTA_PER_SECOND}/s (peak over 1-s windows)",
                    "pass": result["get_job_rate_window"]["peak_per_s"] < QUOTA_PER_SECOND,
                },
            }
        finally:
            site.stop()
    write_result("triggerer_scale", result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
