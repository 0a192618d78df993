"""Apache Airflow integration for AWS HealthImaging DICOM import jobs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """Describe this package to Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""
    from healthimaging.config import provider_config

    return {
        "package-name": "airflow-healthimaging",
        "name": "AWS HealthImaging",
        "description": "Operators, a deferrable sensor and a trigger for AWS HealthImaging DICOM import jobs.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "AWS HealthImaging",
                "external-doc-url": "https://docs.aws.amazon.com/healthimaging/",
                "tags": ["aws"],
            }
        ],
        "operators": [
            {"integration-name": "AWS HealthImaging", "python-modules": ["healthimaging.operators"]}
        ],
        "sensors": [{"integration-name": "AWS HealthImaging", "python-modules": ["healthimaging.sensors"]}],
        "hooks": [{"integration-name": "AWS HealthImaging", "python-modules": ["healthimaging.hooks"]}],
        "triggers": [{"integration-name": "AWS HealthImaging", "python-modules": ["healthimaging.triggers"]}],
        "extra-links": [
            "healthimaging.links.HealthImagingDatastoreLink",
            "healthimaging.links.HealthImagingImportJobLink",
        ],
        "config": provider_config(),
    }
