from __future__ import annotations

import json
from unittest import mock

import botocore.session
import pytest
from airflow.providers.amazon.aws.exceptions import WaiterMaxAttemptsError, WaiterTerminalFailure
from airflow.providers.amazon.aws.utils.waiter_with_logging import wait
from botocore.exceptions import EndpointConnectionError, WaiterError

from healthimaging.hooks import IMPORT_JOB_WAITER, WAITERS_PATH, HealthImagingHook, import_job_states
from healthimaging.triggers import TransientTolerantWaiter


def _acceptors() -> list[dict]:
    return json.loads(WAITERS_PATH.read_text())["waiters"][IMPORT_JOB_WAITER]["acceptors"]


def test_every_job_status_has_exactly_one_acceptor() -> None:
    model = botocore.session.get_session().get_service_model("medical-imaging")
    job_status = (
        model.operation_model("GetDICOMImportJob").output_shape.members["jobProperties"].members["jobStatus"]
    )
    expected = [a["expected"] for a in _acceptors() if a["matcher"] == "path"]
    assert sorted(expected) == sorted(job_status.enum)
    assert len(expected) == len(set(expected))


def test_every_acceptor_has_an_argument() -> None:
    assert all("argument" in acceptor for acceptor in _acceptors())


def test_states_are_derived_from_the_json() -> None:
    states = import_job_states()
    assert states == {
        "retry": frozenset({"SUBMITTED", "IN_PROGRESS"}),
        "success": frozenset({"COMPLETED"}),
        "failure": frozenset({"FAILED"}),
    }


def _expect(stubber, kit, *statuses: str) -> None:
    for status in statuses:
        stubber.add_response(
            "get_dicom_import_job",
            {"jobProperties": kit.job_properties(status)},
            {"datastoreId": kit.DATASTORE_ID, "jobId": kit.JOB_ID},
        )


def _wait(attempts: int = 5) -> None:
    wait(
        waiter=TransientTolerantWaiter(HealthImagingHook().get_waiter(IMPORT_JOB_WAITER)),  # type: ignore[arg-type]
        waiter_delay=0,
        waiter_max_attempts=attempts,
        args={"datastoreId": "0123456789abcdef0123456789abcdef", "jobId": "fedcba9876543210fedcba9876543210"},
        failure_message="failed",
        status_message="status",
        status_args=["jobProperties.jobStatus"],
    )


def test_waiter_reaches_completed(stubber, kit) -> None:
    _expect(stubber, kit, "SUBMITTED", "IN_PROGRESS", "COMPLETED")
    _wait()


def test_waiter_fails_on_failed(stubber, kit) -> None:
    _expect(stubber, kit, "SUBMITTED", "FAILED")
    with pytest.raises(WaiterTerminalFailure):
        _wait()


def test_waiter_max_attempts(stubber, kit) -> None:
    _expect(stubber, kit, "IN_PROGRESS", "IN_PROGRESS")
    with pytest.raises(WaiterMaxAttemptsError):
        _wait(attempts=2)


@pytest.mark.parametrize("code", ["ThrottlingException", "InternalServerException"])
def test_waiter_waits_out_transient_service_errors(stubber, kit, code: str) -> None:
    stubber.add_client_error("get_dicom_import_job", service_error_code=code, http_status_code=500)
    _expect(stubber, kit, "COMPLETED")
    _wait()


def test_transient_errors_spend_attempts(stubber, kit) -> None:
    for _ in range(2):
        stubber.add_client_error(
            "get_dicom_import_job", service_error_code="InternalServerException", http_status_code=500
        )
    with pytest.raises(WaiterMaxAttemptsError):
        _wait(attempts=2)


def test_waiter_fails_on_not_found(stubber, kit) -> None:
    stubber.add_client_error(
        "get_dicom_import_job", service_error_code="ResourceNotFoundException", http_status_code=404
    )
    with pytest.raises(Exception, match="ResourceNotFoundException"):
        _wait()


def test_waiter_waits_out_dropped_connection(stubber, kit) -> None:
    waiter = TransientTolerantWaiter(HealthImagingHook().get_waiter(IMPORT_JOB_WAITER))
    inner = mock.MagicMock()
    inner.wait.side_effect = [EndpointConnectionError(endpoint_url="http://x"), None]
    waiter._waiter = inner
    with pytest.raises(WaiterError, match="transient error EndpointConnectionError"):
        waiter.wait(datastoreId="d", jobId="j")
    waiter.wait(datastoreId="d", jobId="j")
