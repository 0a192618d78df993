"""A tiny DAG that exercises the deployment harness: a deferrable wait and an XCom."""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import DAG, Param, task

with DAG(
    dag_id="deployment_smoke",
    schedule=None,
    params={"seconds": Param(5, type="integer", minimum=1, maximum=60)},
    tags=["test"],
):

    @task(retries=0)
    def start(**context: object) -> dict[str, object]:
        return {"seconds": context["params"]["seconds"]}  # type: ignore[index]

    wait = TimeDeltaSensor(task_id="wait", delta=timedelta(seconds=8), deferrable=True)

    @task
    def finish(started: dict[str, object]) -> str:
        return f"waited after {started['seconds']}"

    started = start()
    started >> wait >> finish(started)
