from __future__ import annotations

from unittest import mock

from healthimaging.links import HealthImagingDatastoreLink, HealthImagingImportJobLink

DS = "0123456789abcdef0123456789abcdef"
JOB = "fedcba9876543210fedcba9876543210"


def test_datastore_link_format() -> None:
    url = HealthImagingDatastoreLink().format_link(
        region_name="eu-west-1", aws_domain="aws.amazon.com", datastore_id=DS
    )
    assert (
        url
        == f"https://eu-west-1.console.aws.amazon.com/medical-imaging/home?region=eu-west-1#/data-stores/{DS}"
    )


def test_import_job_link_format() -> None:
    url = HealthImagingImportJobLink().format_link(
        region_name="us-east-1", aws_domain="aws.amazon.com", datastore_id=DS, job_id=JOB
    )
    assert url.startswith(
        f"https://us-east-1.console.aws.amazon.com/medical-imaging/home?region=us-east-1#/data-stores/{DS}"
    )
    assert url.endswith(JOB)


def test_missing_argument_gives_empty_link() -> None:
    assert (
        HealthImagingImportJobLink().format_link(region_name="us-east-1", aws_domain="aws.amazon.com") == ""
    )


def test_persist_and_get_link() -> None:
    ti = mock.MagicMock()
    operator = mock.MagicMock(do_xcom_push=True)
    HealthImagingImportJobLink.persist(
        context={"ti": ti},
        operator=operator,
        region_name="us-gov-west-1",
        aws_partition="aws-us-gov",
        datastore_id=DS,
        job_id=JOB,
    )
    stored = ti.xcom_push.call_args.kwargs
    assert stored["key"] == "healthimaging_import_job"
    assert stored["value"] == {
        "region_name": "us-gov-west-1",
        "aws_domain": "amazonaws-us-gov.com",
        "datastore_id": DS,
        "job_id": JOB,
    }
    from airflow.sdk.execution_time.xcom import XCom

    with mock.patch.object(XCom, "get_value", return_value=stored["value"]) as get_value:
        url = HealthImagingImportJobLink().get_link(operator, ti_key=mock.MagicMock())
    assert get_value.call_args.kwargs["key"] == "healthimaging_import_job"
    assert url.startswith("https://us-gov-west-1.console.amazonaws-us-gov.com/medical-imaging/")
    with mock.patch.object(XCom, "get_value", side_effect=RuntimeError("no API server")):
        assert HealthImagingImportJobLink().get_link(operator, ti_key=mock.MagicMock()) == ""


def test_links_match_the_amazon_providers_links_base() -> None:
    """Same partition domains and formatting as the provider's ``BaseAwsLink`` that these replace."""
    from airflow.providers.amazon.aws.links.base_aws import BaseAwsLink

    for partition in ("aws", "aws-cn", "aws-us-gov", "unknown", None):
        assert HealthImagingDatastoreLink.get_aws_domain(partition) == BaseAwsLink.get_aws_domain(partition)


def test_persist_skipped_without_xcom_push() -> None:
    ti = mock.MagicMock()
    HealthImagingDatastoreLink.persist(
        context={"ti": ti},
        operator=mock.MagicMock(do_xcom_push=False),
        region_name="us-east-1",
        aws_partition="aws",
        datastore_id=DS,
    )
    ti.xcom_push.assert_not_called()


def test_operators_declare_the_links() -> None:
    from healthimaging.operators import SearchImageSetsOperator, StartDICOMImportOperator

    names = {link.name for link in StartDICOMImportOperator.operator_extra_links}
    assert names == {"HealthImaging Data Store", "HealthImaging Import Job"}
    assert {link.name for link in SearchImageSetsOperator.operator_extra_links} == {
        "HealthImaging Data Store"
    }


def test_console_url_setting_moves_the_links(monkeypatch) -> None:
    """Issue 12 item 8: an offline or other-partition console is a setting, read when the link is built."""
    monkeypatch.setenv(
        "AIRFLOW__HEALTHIMAGING__CONSOLE_URL", "http://console.internal:8080/hi?r={region_name}"
    )
    url = HealthImagingImportJobLink().format_link(
        region_name="eu-west-1", aws_domain="aws.amazon.com", datastore_id=DS, job_id=JOB
    )
    assert url == f"http://console.internal:8080/hi?r=eu-west-1#/data-stores/{DS}/import-jobs/{JOB}"
