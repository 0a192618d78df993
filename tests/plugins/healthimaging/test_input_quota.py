"""``check_input_quota``: a prefix over the per-job file quota is refused before any job starts (real endpoint)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowException

from healthimaging.operators import MAX_FILES_PER_JOB, StartDICOMImportOperator


@pytest.mark.slow
def test_prefix_over_the_file_quota_is_refused_before_starting(live: Any, kit: Any) -> None:
    keys = [f"big/part-{i // 1000}/f{i:05d}.dcm" for i in range(MAX_FILES_PER_JOB + 1)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: live.s3.put_object(Bucket="input", Key=key, Body=b"x"), keys))
    operator = StartDICOMImportOperator(
        task_id="start",
        datastore_id=live.datastore_id,
        data_access_role_arn=kit.ROLE_ARN,
        input_s3_uri="s3://input/big/",
        output_s3_uri="s3://output/results/",
        check_input_quota=True,
    )
    with pytest.raises(AirflowException) as refused:
        operator.execute(kit.make_context())
    message = str(refused.value)
    assert f"holds {MAX_FILES_PER_JOB + 1} files" in message
    assert "at most 5000 files" in message
    assert "Split it into several jobs" in message
    assert "s3://input/big/part-0/: 1000 files" in message  # names the sub-prefixes to split by
    assert live.jobs() == []

    # At the quota exactly, the same check lets the job start.
    live.s3.delete_object(Bucket="input", Key=keys[-1])
    job_id = operator.execute(kit.make_context(run_id="manual__second"))
    assert [job["jobId"] for job in live.jobs()] == [job_id]
