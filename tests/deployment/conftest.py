"""Fixtures for the deployment tests: one real Airflow per session, a fresh local endpoint per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest
from browser import ARTIFACTS, chromium_context, find_chromium, log_in, screenshot
from harness import (
    ADMIN_USER,
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    REPO_ROOT,
    AirflowDeployment,
    DeploymentSettings,
    LocalEndpoint,
    tail,
    tcp_reachable,
)

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

HARNESS_DAGS = Path(__file__).parent / "harness_dags"
AWS_CONN_ID = "aws_healthimaging_local"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; under ``CI=true`` a missing prerequisite is a failure.

    :param reason: what is missing and how to get it
    """
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


def require_services() -> None:
    """Skip (locally) or fail (under ``CI=true``) when PostgreSQL or Redis cannot be reached."""
    missing = [
        f"{name} at {host}:{port}"
        for name, host, port in (("PostgreSQL", PG_HOST, PG_PORT), ("Redis", REDIS_HOST, REDIS_PORT))
        if not tcp_reachable(host, port)
    ]
    if not missing:
        return
    skip_or_fail(f"deployment tests need {' and '.join(missing)} (TCP connect failed)")


def build_dags_folder(target: Path) -> Path:
    """A DAGs folder holding the repository's DAG files (symlinked) and the harness smoke DAG.

    :param target: the folder to create
    """
    target.mkdir(parents=True, exist_ok=True)
    repo_dags = REPO_ROOT / "dags"
    if repo_dags.is_dir():
        for entry in repo_dags.iterdir():
            if entry.name != "__pycache__":
                (target / entry.name).symlink_to(entry)
    for entry in HARNESS_DAGS.glob("*.py"):
        (target / entry.name).symlink_to(entry)
    return target


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call")
    )


@pytest.fixture(scope="session")
def deployment_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Temporary folder of the session's deployment (AIRFLOW_HOME, logs, endpoint state).

    Kept when a test failed or ``KEEP_DEPLOYMENT_DIR=1``, so the full logs can be read afterwards.
    """
    path = Path(tempfile.mkdtemp(prefix="airflow_deploy_"))
    yield path
    if request.session.testsfailed or os.environ.get("KEEP_DEPLOYMENT_DIR") == "1":
        print(f"\ndeployment logs kept in {path / 'logs'}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_deployment(deployment_dir: Path) -> Iterator[AirflowDeployment]:
    """A running Airflow (CeleryExecutor, PostgreSQL, Redis) shared by the whole session."""
    require_services()
    settings = DeploymentSettings(
        dags_folder=build_dags_folder(deployment_dir / "dags"),
        # Parse-time setting of the DAG: poll GetDICOMImportJob every 2 s instead of 30 s.
        extra_env={
            "AIRFLOW__HEALTHIMAGING__POLL_INTERVAL": "2",
            # so that twenty runs really run at once (test 10)
            "AIRFLOW__HEALTHIMAGING__MAX_ACTIVE_RUNS": "25",
            # Import on arrival: the queues scripts/wire_arrivals.py creates on each test's endpoint (moto ignores
            # the host of a queue URL); short long polls and settle listings so the tests stay short.
            "HEALTHIMAGING_ARRIVALS_QUEUE_URL": "http://127.0.0.1:4566/123456789012/healthimaging-arrivals",
            "HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL": (
                "http://127.0.0.1:4566/123456789012/healthimaging-image-set-events"
            ),
            "HEALTHIMAGING_ARRIVALS_WAIT_SECONDS": "5",
            "HEALTHIMAGING_ARRIVALS_POLL_DELAY": "1",
            "HEALTHIMAGING_SETTLE_POKE_INTERVAL": "2",
            # Pace starts at the endpoint's own StartDICOMImportJob rate (1/s) so that pacing does not slow
            # tests that are not about it. The pacing test restarts the worker with its own rate.
            "AIRFLOW__HEALTHIMAGING__START_RATE": "1",
        },
        worker_concurrency=4,
    )
    deployment = AirflowDeployment(settings, base_dir=deployment_dir)
    try:
        deployment.start()
    except BaseException:
        print(deployment.log_tails(lines=80))
        deployment.stop()
        raise
    yield deployment
    deployment.stop()


@pytest.fixture
def deployment(
    airflow_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> Iterator[AirflowDeployment]:
    """The session deployment, with components restarted if a previous test left one dead.

    Prints the tails of every component log when the test fails.
    """
    for component in airflow_deployment.components.values():
        if not component.alive():
            component.start()
    airflow_deployment.wait_healthy()
    yield airflow_deployment
    if test_failed(request):
        print(f"\n===== component logs (full logs in {airflow_deployment.log_dir}) =====")
        print(airflow_deployment.log_tails(lines=60))


@pytest.fixture
def make_endpoint(
    airflow_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LocalEndpoint]]:
    """Factory: ``make_endpoint(*options)`` starts a fresh ``healthimaging-local serve`` with its own state dir.

    Every endpoint started is stopped at teardown; its log tail is printed when the test fails.
    """
    started: list[LocalEndpoint] = []

    def make(*options: str) -> LocalEndpoint:
        state_dir = Path(tempfile.mkdtemp(prefix="state_", dir=airflow_deployment.base_dir))
        endpoint = LocalEndpoint(state_dir, airflow_deployment.log_dir, options)
        started.append(endpoint)
        endpoint.start()
        return endpoint

    yield make
    failed = test_failed(request)
    for endpoint in started:
        endpoint.stop()
        if failed:
            print(f"----- {endpoint.name} -----\n{tail(endpoint.component.log_path, 60)}")


@pytest.fixture(scope="module")
def browser_context() -> Iterator[BrowserContext]:
    """Debian's chromium, headless with a fresh profile, shared by the tests of one module.

    Module-scoped so that Playwright's event loop is gone before asyncio tests of other modules run.
    """
    executable = find_chromium()
    if executable is None:
        skip_or_fail(
            "browser tests need Debian's chromium: apt-get install -y chromium (.ci/run installs it)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("browser tests need Python playwright: make install (the dev extra)")
    with chromium_context(executable) as context:
        yield context


@pytest.fixture
def ui_page(
    deployment: AirflowDeployment, browser_context: BrowserContext, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A page of the api-server's UI, signed in as the deployment's admin; a screenshot is kept when the test fails."""
    assert deployment.api is not None
    at_failure = f"{request.node.name}-at-failure"
    (ARTIFACTS / f"{at_failure}.png").unlink(missing_ok=True)
    page = browser_context.new_page()
    log_in(page, deployment.api.base_url, ADMIN_USER, deployment.password)
    yield page
    if test_failed(request):
        print(f"\nscreenshot at failure: {screenshot(page, at_failure)}")
    page.close()
