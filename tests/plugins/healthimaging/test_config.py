from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from healthimaging import config


def _airflow(*args: str, **env: str) -> str:
    """Run the real ``airflow`` CLI of this venv with extra environment variables; return its stdout."""
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    result = subprocess.run(
        [airflow, *args], env=dict(os.environ, **env), capture_output=True, text=True, check=True, timeout=300
    )
    return result.stdout


def test_config_list_shows_every_setting_with_its_description_and_default() -> None:
    out = _airflow("config", "list", "--section", "healthimaging", "--show-values", "--include-descriptions")
    assert "[healthimaging]" in out
    for name, (_, default, description) in config.OPTIONS.items():
        shown = f"{name} = {default}" if default else f"# {name} = "
        assert shown in out, name
        assert description.split(".")[0][:60] in " ".join(out.split()), name
    assert "conservative documented figure" in out


def test_setting_from_the_environment_reaches_airflow_config() -> None:
    out = _airflow(
        "config", "get-value", "healthimaging", "poll_interval", AIRFLOW__HEALTHIMAGING__POLL_INTERVAL="7"
    )
    assert out.strip() == "7"


@pytest.mark.parametrize(
    ("accessor", "expected"),
    [
        (config.poll_interval, 30.0),
        (config.import_pool, "default_pool"),
        (config.max_active_runs, 8),
        (config.triggerer_max_polls_per_second, 20.0),
        (config.max_files_per_job, 5000),
        (config.start_rate, 0.25),
        (config.max_imports_in_flight, 100),
        (config.max_failed_files, None),
    ],
)
def test_defaults(accessor, expected, monkeypatch) -> None:
    for old in config.DEPRECATED_ENV.values():
        monkeypatch.delenv(old, raising=False)
    assert accessor() == expected


def test_accessors_read_at_call_time(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__POLL_INTERVAL", "3")
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__MAX_FAILED_FILES", "2")
    assert config.poll_interval() == 3.0
    assert config.max_failed_files() == 2
    monkeypatch.setenv("AIRFLOW__HEALTHIMAGING__POLL_INTERVAL", "4.5")
    assert config.poll_interval() == 4.5


@pytest.mark.parametrize(
    ("name", "old", "value", "expected"),
    [
        ("poll_interval", "HEALTHIMAGING_POKE_INTERVAL", "2", 2.0),
        ("import_pool", "HEALTHIMAGING_IMPORT_POOL", "imports", "imports"),
        ("max_active_runs", "HEALTHIMAGING_MAX_ACTIVE_RUNS", "25", 25),
        ("triggerer_max_polls_per_second", "HEALTHIMAGING_TRIGGERER_MAX_POLLS_PER_SECOND", "5", 5.0),
    ],
)
def test_old_environment_names_still_work_with_a_warning(monkeypatch, name, old, value, expected) -> None:
    monkeypatch.setenv(old, value)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated; set \[healthimaging\] {name}"):
        assert getattr(config, name)() == expected
    monkeypatch.setenv(f"AIRFLOW__HEALTHIMAGING__{name.upper()}", "9")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert getattr(config, name)() == type(expected)("9")  # the section wins


def test_provider_info_declares_the_section() -> None:
    import healthimaging

    section = healthimaging.get_provider_info()["config"]["healthimaging"]
    assert set(section["options"]) == set(config.OPTIONS)
    assert section["options"]["start_rate"]["default"] == "0.25"
    assert section["options"]["max_failed_files"]["default"] is None


@pytest.mark.parametrize("variable", ["AIRFLOW__HEALTHIMAGING__POLL_INTERVAL", "HEALTHIMAGING_POKE_INTERVAL"])
def test_the_import_dag_reads_the_setting_when_parsed(variable) -> None:
    code = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from healthimaging.sensors import DICOMImportJobSensor\n"
        "bag = DagBag('dags/healthimaging_import_dicom_and_search.py')\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "(dag,) = bag.dags.values()\n"
        "print(sorted({t.poke_interval for t in dag.tasks if isinstance(t, DICOMImportJobSensor)}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, **{variable: "3"})
    env.pop("HEALTHIMAGING_POKE_INTERVAL" if variable.startswith("AIRFLOW") else "_", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[3.0]"
