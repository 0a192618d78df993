"""Apache Airflow integration for AWS HealthImaging DICOM import jobs."""

from __future__ import annotations

__version__ = "0.1.0"
