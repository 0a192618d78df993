"""The deployment harness itself, on a tiny DAG: runs, deferral, XCom, REST errors, component restarts."""

from __future__ import annotations

import pytest
from harness import AirflowDeployment, wait_until

pytestmark = pytest.mark.deployment

SMOKE = "deployment_smoke"


def test_smoke_run_defers_and_pushes_xcom(deployment: AirflowDeployment) -> None:
    api = deployment.api
    assert api is not None
    api.wait_for_dag(SMOKE)
    api.unpause(SMOKE)
    run_id = api.trigger(SMOKE, conf={"seconds": 7})
    wait_until(
        lambda: api.ti_states(SMOKE, run_id).get("wait") == "deferred", timeout=120, what="wait to defer"
    )
    with deployment.sample("triggerer") as sampler:
        run = api.wait_for_run(SMOKE, run_id, timeout=180)
    assert run["state"] == "success", api.ti_states(SMOKE, run_id)
    assert api.xcom(SMOKE, run_id, "start") == {"seconds": 7}
    assert api.xcom(SMOKE, run_id, "finish") == "waited after 7"
    assert sampler.usage.samples > 0
    assert sampler.usage.peak_rss_bytes > 0


def test_invalid_conf_is_refused(deployment: AirflowDeployment) -> None:
    api = deployment.api
    assert api is not None
    api.wait_for_dag(SMOKE)
    before = {run["dag_run_id"] for run in api.dag_runs(SMOKE)}
    response = api.trigger_run(SMOKE, conf={"seconds": 1000})
    assert 400 <= response.status_code < 500, response.text
    assert {run["dag_run_id"] for run in api.dag_runs(SMOKE)} == before
