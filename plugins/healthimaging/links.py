"""
AWS console links for HealthImaging data stores and import jobs.

The links behave as the Amazon provider's ``BaseAwsLink`` (same ``persist``/``get_link``, same XCom value), but
build on ``airflow.sdk.BaseOperatorLink``: the provider's links module imports botocore, which a DAG file would
then pay for at every parse.

The console's base URL is the ``[healthimaging] console_url`` setting, read when a link is built, so that a user
of another partition or of an offline console can point the links there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperatorLink

from healthimaging import config

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

DATASTORE_PATH = "#/data-stores/{datastore_id}"
#: AWS partition -> console domain (as in the Amazon provider's links).
AWS_DOMAINS = {"aws": "aws.amazon.com", "aws-cn": "amazonaws.cn", "aws-us-gov": "amazonaws-us-gov.com"}


class HealthImagingLink(BaseOperatorLink):
    """A console link whose arguments a task stores in XCom under ``key`` (see :meth:`persist`)."""

    name: ClassVar[str]
    key: ClassVar[str]
    #: The page below ``[healthimaging] console_url``, with ``str.format`` placeholders.
    path: ClassVar[str]

    @property
    def format_str(self) -> str:
        """The link's template: the configured console base URL and :attr:`path`."""
        return config.console_url() + self.path

    @staticmethod
    def get_aws_domain(aws_partition: str | None) -> str | None:
        """
        Return the console domain of an AWS partition, None if unknown.

        :param aws_partition: e.g. ``aws``, ``aws-cn``, ``aws-us-gov``
        """
        return AWS_DOMAINS.get(aws_partition or "")

    def format_link(self, **kwargs: Any) -> str:
        """Fill ``format_str``; an empty string when an argument is missing."""
        try:
            return self.format_str.format(**kwargs)
        except KeyError:
            return ""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the link stored by :meth:`persist` for one task instance; empty if none or on any error.

        :param operator: the operator
        :param ti_key: the task instance
        """
        try:
            from airflow.sdk.execution_time.xcom import XCom

            conf = XCom.get_value(key=self.key, ti_key=ti_key)
            return self.format_link(**conf) if conf else ""
        except Exception:
            log.debug("Could not build the %s link", self.name, exc_info=True)
            return ""

    @classmethod
    def persist(
        cls,
        context: Context,
        operator: BaseOperator,
        region_name: str,
        aws_partition: str,
        **kwargs: Any,
    ) -> None:
        """
        Store the link's arguments in XCom (skipped when the operator does not push XCom; never raises).

        :param context: the task context
        :param operator: the operator
        :param region_name: the AWS region
        :param aws_partition: the AWS partition
        :param kwargs: the other ``format_str`` arguments
        """
        if not operator.do_xcom_push:
            return
        try:
            context["ti"].xcom_push(
                key=cls.key,
                value={"region_name": region_name, "aws_domain": cls.get_aws_domain(aws_partition), **kwargs},
            )
        except Exception:
            log.debug("Could not store the %s link", cls.key, exc_info=True)


class HealthImagingDatastoreLink(HealthImagingLink):
    """Link to a HealthImaging data store in the AWS console."""

    name = "HealthImaging Data Store"
    key = "healthimaging_datastore"
    path = DATASTORE_PATH


class HealthImagingImportJobLink(HealthImagingLink):
    """Link to a DICOM import job of a HealthImaging data store in the AWS console."""

    name = "HealthImaging Import Job"
    key = "healthimaging_import_job"
    path = DATASTORE_PATH + "/import-jobs/{job_id}"
