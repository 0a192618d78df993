from __future__ import annotations

import importlib
import json
import subprocess
import sys

import healthimaging


def test_get_provider_info() -> None:
    info = healthimaging.get_provider_info()
    assert info["package-name"] == "airflow-healthimaging"
    assert info["versions"] == [healthimaging.__version__]
    assert info["hooks"] == [
        {"integration-name": "AWS HealthImaging", "python-modules": ["healthimaging.hooks"]}
    ]
    assert "connection-types" not in info  # the standard `aws` connection type is reused
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert getattr(importlib.import_module(module), name).name
    for section in ("hooks", "operators", "sensors", "triggers"):
        for module in info[section][0]["python-modules"]:
            importlib.import_module(module)
    json.dumps(info)


def test_provider_info_matches_airflow_schema() -> None:
    import jsonschema
    from airflow.providers_manager import ProvidersManager

    schema = ProvidersManager()._provider_schema_validator.schema  # the runtime schema Airflow validates with
    jsonschema.validate(healthimaging.get_provider_info(), schema)


def test_providers_manager_lists_the_package() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert manager.providers["airflow-healthimaging"].version == healthimaging.__version__
    assert "healthimaging.links.HealthImagingImportJobLink" in manager.extra_links_class_names
    assert "healthimaging.links.HealthImagingDatastoreLink" in manager.extra_links_class_names
    assert any(t.trigger_class_name == "healthimaging.triggers" for t in manager.trigger)


def test_package_import_is_light() -> None:
    """The plugin manager and the entry point import the package: no boto3 or airflow at import time."""
    code = "import sys, healthimaging; healthimaging.get_provider_info(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'airflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
