"""The asset an import updates: schedule downstream DAGs on :data:`IMAGE_SETS` itself (not ``Asset.ref``)."""

from __future__ import annotations

from airflow.sdk import Asset

IMAGE_SETS_ASSET_NAME = "healthimaging_image_sets"
#: Updated after each import that produced image sets; ``extra``: ``datastoreId``, ``jobId``, ``imageSetIds``.
#: On ``Asset.ref(name=...)`` Airflow 3.3 creates the consumer's runs without their asset events.
IMAGE_SETS = Asset(name=IMAGE_SETS_ASSET_NAME, uri="x-medical-imaging://image-sets", group="medical-imaging")
