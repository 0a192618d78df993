"""The event-driven DAGs: their AssetWatchers (queue URL from the environment at parse) and their task shapes."""

from __future__ import annotations

from typing import Any

import pytest
from dag_test_helpers import load_dag_module

ARRIVAL = "healthimaging_import_on_arrival"
INDEX = "healthimaging_index_image_sets_example"
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/healthimaging-arrivals"
EVENTS_QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/healthimaging-image-set-events"


@pytest.mark.parametrize(
    ("stem", "variable", "queue"),
    [
        (ARRIVAL, "HEALTHIMAGING_ARRIVALS_QUEUE_URL", QUEUE),
        (INDEX, "HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL", EVENTS_QUEUE),
    ],
)
def test_watcher_polls_the_configured_queue_through_the_sqs_trigger(
    stem: str, variable: str, queue: str
) -> None:
    module = load_dag_module(stem, {variable: queue, "HEALTHIMAGING_AWS_CONN_ID": "aws_imaging"})
    asset = module.ARRIVALS if stem == ARRIVAL else module.IMAGE_SET_EVENTS
    (watcher,) = asset.watchers
    path, kwargs = watcher.trigger.serialize()
    assert path == "airflow.providers.amazon.aws.triggers.sqs.SqsSensorTrigger"
    assert kwargs["sqs_queue"] == queue
    assert kwargs["aws_conn_id"] == "aws_imaging"
    assert kwargs["delete_message_on_reception"] is True
    assert kwargs["message_filtering"] is None  # a filter would leave unmatched messages in the queue forever
    assert kwargs["num_batches"] == 1  # more batches would hold an event back for empty long polls
    assert 1 <= kwargs["wait_time_seconds"] <= 20
    assert kwargs["max_messages"] == 10


@pytest.mark.parametrize("stem", [ARRIVAL, INDEX])
def test_no_queue_no_watcher(stem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEALTHIMAGING_ARRIVALS_QUEUE_URL", raising=False)
    monkeypatch.delenv("HEALTHIMAGING_IMAGE_SET_EVENTS_QUEUE_URL", raising=False)
    module = load_dag_module(stem)
    asset = module.ARRIVALS if stem == ARRIVAL else module.IMAGE_SET_EVENTS
    assert asset.watchers == []


def test_arrival_dag_settles_each_folder_deferred_before_importing() -> None:
    module = load_dag_module(ARRIVAL, {"HEALTHIMAGING_ARRIVALS_QUEUE_URL": QUEUE})
    dag: Any = module.dag
    wait = dag.get_task("settle.wait_until_settled")
    from airflow.providers.amazon.aws.sensors.s3 import S3KeysUnchangedSensor

    assert isinstance(wait, S3KeysUnchangedSensor)
    assert wait.deferrable is True
    assert "inactivity_period" in wait.template_fields
    assert "settle.wait_until_settled" in dag.get_task("settle.settled_import_spec").upstream_task_ids
    assert dag.get_task("settled_folders").trigger_rule == "none_failed_min_one_success"


def test_index_summary_names_no_patient_or_study_attribute() -> None:
    module = load_dag_module(INDEX)
    document = {
        "Patient": {"DICOM": {"PatientName": "DOE^JANE", "PatientID": "P1"}},
        "Study": {
            "DICOM": {"StudyInstanceUID": "1.2", "AccessionNumber": "A1"},
            "Series": {
                "1.2.1": {"DICOM": {"Modality": "CT"}, "Instances": {"a": {}, "b": {}}},
                "1.2.2": {"DICOM": {"Modality": "SR"}, "Instances": {"c": {}}},
            },
        },
    }
    assert module.metadata_summary(document) == {
        "seriesCount": 2,
        "instanceCount": 3,
        "modalities": ["CT", "SR"],
    }
