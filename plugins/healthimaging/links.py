"""AWS console links for HealthImaging data stores and import jobs."""

from __future__ import annotations

from airflow.providers.amazon.aws.links.base_aws import BaseAwsLink

HEALTHIMAGING_CONSOLE = (
    "https://{region_name}.console.{aws_domain}/medical-imaging/home?region={region_name}"
    "#/data-stores/{datastore_id}"
)


class HealthImagingDatastoreLink(BaseAwsLink):
    """Link to a HealthImaging data store in the AWS console."""

    name = "HealthImaging Data Store"
    key = "healthimaging_datastore"
    format_str = HEALTHIMAGING_CONSOLE


class HealthImagingImportJobLink(BaseAwsLink):
    """Link to a DICOM import job of a HealthImaging data store in the AWS console."""

    name = "HealthImaging Import Job"
    key = "healthimaging_import_job"
    format_str = HEALTHIMAGING_CONSOLE + "/import-jobs/{job_id}"
