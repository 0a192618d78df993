"""A local endpoint that speaks the AWS HealthImaging API (and S3, through moto's server)."""

from __future__ import annotations

__version__ = "0.1.0"
