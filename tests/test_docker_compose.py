"""
``docker-compose.yaml``, ``Dockerfile`` and ``.env.example`` describe the official Airflow 3.3 CeleryExecutor
stack with this package installed, an offline ``local`` profile, and no secrets in tracked files.

No Docker engine runs here and no compose-spec JSON schema is installed, so the checks are structural.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-worker": "celery worker",
    "airflow-triggerer": "triggerer",
}
MOUNTS = {f"./{name}:/opt/airflow/{name}" for name in ("dags", "logs", "config")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yaml").read_text()))


def mounts(service: dict[str, Any]) -> set[str]:
    return {v.replace("${AIRFLOW_PROJ_DIR:-.}", ".") for v in service.get("volumes", [])}


def test_services_of_the_official_topology(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {
        *AIRFLOW_SERVICES,
        "postgres",
        "redis",
        "airflow-init",
        "healthimaging-local",
    }
    for name, command in AIRFLOW_SERVICES.items():
        service = compose["services"][name]
        assert service["command"] == command, name
        assert "healthcheck" in service, name
        assert service["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}, name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "profiles" not in service, name
    assert (
        compose["services"]["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"]
        == "service_healthy"
    )
    for name in ("postgres", "redis"):
        assert "healthcheck" in compose["services"][name]


def test_airflow_services_share_image_env_mounts_and_env_file(compose: dict[str, Any]) -> None:
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        service = compose["services"][name]
        assert service["build"] == "."
        assert MOUNTS <= mounts(service), name
        assert {"path": ".env", "required": False} in service["env_file"], name
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW__API_AUTH__JWT_SECRET:?")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        assert "postgres/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert env["AIRFLOW__HEALTHIMAGING__IMPORT_POOL"]
    assert compose["services"]["airflow-worker"]["environment"]["DUMB_INIT_SETSID"] == "0"


def test_init_migrates_creates_user_and_import_pool(compose: dict[str, Any]) -> None:
    init = compose["services"]["airflow-init"]
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"
    script = "\n".join(init["command"])
    assert re.search(r"/entrypoint airflow pools set .*--include-deferred", script, re.S)


def test_local_profile_serves_the_endpoint_offline_on_loopback(compose: dict[str, Any]) -> None:
    local = compose["services"]["healthimaging-local"]
    assert local["profiles"] == ["local"]
    assert local["image"] == compose["services"]["airflow-apiserver"]["image"]
    assert local["entrypoint"][-1] == "healthimaging-local"
    command = [str(c) for c in local["command"]]
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--state-dir" in command
    assert all(p.startswith("127.0.0.1:") for p in local["ports"])
    assert local["healthcheck"]["test"]
    example = (ROOT / ".env.example").read_text()
    assert re.search(
        r'^AIRFLOW_CONN_AWS_DEFAULT=.*"endpoint_url":"http://healthimaging-local:4566"', example, re.M
    )


def test_dockerfile_installs_the_package_pinned() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The base image's Python is the one constraints.txt was resolved for, not Airflow's moving default.
    assert re.search(
        r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}-python\$\{PYTHON_VERSION\}$", dockerfile, re.M
    )
    assert re.search(
        r"pip install .*-c constraints\.txt .*apache-airflow==\$\{AIRFLOW_VERSION\}.*\.\[local\]", dockerfile
    )
    assert "ARG AIRFLOW_VERSION=3.3.2" in dockerfile
    assert "ARG PYTHON_VERSION=3.11" in dockerfile
    for source in ("pyproject.toml", "constraints.txt", "plugins/healthimaging", "healthimaging_local"):
        assert re.search(rf"^COPY .*{re.escape(source)}", dockerfile, re.M), source
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_the_installed_package_is_the_one_airflow_runs(compose: dict[str, Any]) -> None:
    """One copy of the package: installed (not editable) in the image, and no mount of ./plugins to shadow or be
    shadowed by it (Airflow appends the plugins folder to sys.path, after site-packages)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (install,) = re.findall(r"pip install [^\n]*", dockerfile)
    assert not re.search(r"(^|\s)(-e|--editable)\s", install), install
    package_sources = {"./plugins", "./plugins/healthimaging", "./healthimaging_local"}
    shadowing = [
        (name, volume)
        for name, service in compose["services"].items()
        for volume in mounts(service)
        if volume.split(":")[1].startswith("/opt/airflow/plugins") or volume.split(":")[0] in package_sources
    ]
    assert shadowing == []


def test_env_is_git_ignored_and_example_is_not() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".env must be git-ignored"
    example = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, check=False)
    assert example.returncode == 1, ".env.example must be trackable"


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key[ \t]*[:=][ \t]*[^\s$]+"),
    # a YAML key naming a secret with a literal value (not ${...} from .env)
    re.compile(r"(?im)^\s*[\w.-]*(password|secret|fernet_key|token)[\w.-]*\s*:[ \t]+(?!\$\{)\S+"),
    re.compile(r"postgres(ql)?(\+psycopg2)?://[^:]+:(?!\$\{)[^@]+@"),  # a literal DB password in a URL
]


@pytest.mark.parametrize("name", ["docker-compose.yaml", ".env.example", "Dockerfile"])
def test_no_secret_values_in_tracked_files(name: str) -> None:
    text = (ROOT / name).read_text()
    if name == ".env.example":
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if re.search(r"PASSWORD|SECRET|FERNET|TOKEN", key) and not key.startswith("#"):
                assert value == "", f"{key} must be left empty in .env.example"
        text = text.replace('"password":"testing"', "")  # the local endpoint's documented dummy credentials
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), (name, pattern.pattern)
