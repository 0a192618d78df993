"""Arrival messages -> study folders (``healthimaging.arrivals``), and the settle sensor's trigger."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from healthimaging.arrivals import (
    ArrivalSettings,
    ArrivalSummary,
    StudyGrouping,
    group_arrivals,
    image_set_events,
    iter_messages,
    parse_body,
)

DS = "0123456789abcdef0123456789abcdef"
ROLE = "arn:aws:iam::123456789012:role/HealthImagingImport"


def s3_record(
    key: str, bucket: str = "dicom", event: str = "ObjectCreated:Put", etag: str = "e1"
) -> dict[str, Any]:
    """One record as S3 sends it (the key URL-encoded)."""
    from urllib.parse import quote_plus

    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": event,
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": quote_plus(key, safe="/"), "size": 10, "eTag": etag},
        },
    }


def message(body: Any) -> dict[str, Any]:
    return {
        "MessageId": "m",
        "ReceiptHandle": "r",
        "Body": body if isinstance(body, str) else json.dumps(body),
    }


def notification(*keys: str, bucket: str = "dicom") -> dict[str, Any]:
    return message({"Records": [s3_record(k, bucket) for k in keys]})


def eventbridge(key: str, bucket: str = "dicom", detail_type: str = "Object Created") -> dict[str, Any]:
    return message(
        {
            "version": "0",
            "detail-type": detail_type,
            "source": "aws.s3",
            "detail": {"bucket": {"name": bucket}, "object": {"key": key, "size": 5, "etag": "x"}},
        }
    )


TEST_EVENT = message({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "dicom"})
DEPTH_2 = StudyGrouping(depth=2, base_prefix="incoming/")


def test_groups_keys_into_study_folders_once_each() -> None:
    messages = [
        notification("incoming/P1/S1/series-1/a.dcm", "incoming/P1/S1/series-2/b.dcm"),
        notification("incoming/P2/S9/c.dcm"),
        eventbridge("incoming/P1/S1/series-1/d.dcm"),
    ]
    folders, summary = group_arrivals(messages, DEPTH_2)
    assert [(f.bucket, f.prefix, f.arrivals) for f in folders] == [
        ("dicom", "incoming/P1/S1/", 3),
        ("dicom", "incoming/P2/S9/", 1),
    ]
    assert folders[0].s3_uri == "s3://dicom/incoming/P1/S1/"
    assert summary.messages == 3
    assert summary.records == 4


def test_keys_are_url_decoded_in_s3_records_not_in_eventbridge() -> None:
    folders, _ = group_arrivals(
        [notification("incoming/Pat ient+1/S 1/a.dcm"), eventbridge("incoming/Q+1/S%201/b.dcm")], DEPTH_2
    )
    assert [f.prefix for f in folders] == ["incoming/Pat ient+1/S 1/", "incoming/Q+1/S%201/"]


def test_test_event_removals_and_junk_are_counted_not_grouped() -> None:
    removed = message({"Records": [s3_record("incoming/P1/S1/a.dcm", event="ObjectRemoved:Delete")]})
    other = message({"source": "aws.medical-imaging", "detail-type": "Image Set Created", "detail": {}})
    folders, summary = group_arrivals(
        [TEST_EVENT, removed, message("not json"), message({"Records": [{"eventSource": "aws:s3"}]}), other],
        DEPTH_2,
    )
    assert folders == []
    assert (summary.test_events, summary.ignored, summary.unreadable) == (1, 3, 1)


def test_sns_wrapped_notification() -> None:
    inner = json.dumps({"Records": [s3_record("incoming/P1/S1/a.dcm")]})
    folders, _ = group_arrivals([message({"Type": "Notification", "Message": inner})], DEPTH_2)
    assert [f.prefix for f in folders] == ["incoming/P1/S1/"]


def test_shallow_keys_and_keys_outside_the_base_belong_to_no_study() -> None:
    folders, summary = group_arrivals(
        [notification("incoming/P1/loose.dcm", "incoming/P1/S1/", "elsewhere/P1/S1/a.dcm", "incoming//S1/a")],
        DEPTH_2,
    )
    assert folders == []
    assert summary.ungrouped == 4


def test_excluded_prefixes_skip_the_import_outputs() -> None:
    grouping = StudyGrouping(depth=1, exclude_prefixes=("s3://dicom/output/", "staging/"))
    folders, summary = group_arrivals(
        [
            notification("output/job-1/job-output-manifest.json", "staging/x/a.dcm", "study-1/a.dcm"),
            notification("output/study-2/a.dcm", bucket="other"),
        ],
        grouping,
    )
    assert [(f.bucket, f.prefix) for f in folders] == [("dicom", "study-1/"), ("other", "output/")]
    assert summary.excluded == 2


def test_pattern_grouping() -> None:
    grouping = StudyGrouping(pattern=r"^day/\d{4}/[^/]+/")
    folders, summary = group_arrivals(
        [notification("day/2025/S1/a/b.dcm", "day/2025/S1/c.dcm", "day/abcd/S1/a.dcm", "day/2025/S1/")],
        grouping,
    )
    assert [f.prefix for f in folders] == ["day/2025/S1/"]
    assert summary.ungrouped == 2


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"depth": 0},
        {"depth": "2"},
        {"depth": True},
        {"depth": 2, "pattern": "^a/"},
        {"pattern": "("},
        {"depth": 1, "base_prefix": "no-slash"},
        {"depth": 1, "exclude_prefixes": "out/"},
        {"depth": 1, "colour": "blue"},
    ],
)
def test_bad_grouping_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StudyGrouping.from_config(config)


def test_logs_counts_never_keys_or_folders(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="healthimaging.arrivals")
    group_arrivals([notification("incoming/DOE^JOHN/ACC123/a.dcm"), TEST_EVENT], DEPTH_2)
    text = caplog.text
    assert "1 study folder(s)" in text
    assert "1 test event(s)" in text
    assert "DOE" not in text
    assert "ACC123" not in text


def test_folder_id_names_no_folder() -> None:
    folders, _ = group_arrivals([notification("incoming/DOE^JOHN/ACC123/a.dcm")], DEPTH_2)
    assert folders[0].folder_id.startswith("study-")
    assert "DOE" not in folders[0].folder_id
    assert folders[0].as_dict()["prefix"] == "incoming/DOE^JOHN/ACC123/"


def test_iter_messages_reads_trigger_payloads_only() -> None:
    msg = notification("incoming/P1/S1/a.dcm")
    events = [
        SimpleNamespace(
            extra={"from_trigger": True, "payload": {"status": "success", "message_batch": [msg]}}
        ),
        SimpleNamespace(extra={"datastoreId": DS}),
        SimpleNamespace(extra=None),
        {"extra": {"payload": {"message_batch": [msg, "junk"]}}},
    ]
    assert list(iter_messages(events)) == [msg, msg]


def test_parse_body_accepts_decoded_bodies() -> None:
    summary = ArrivalSummary()
    assert [a.key for a in parse_body({"Records": [s3_record("a/b.dcm")]}, summary)] == ["a/b.dcm"]
    assert parse_body(["list"], summary) == []
    assert summary.unreadable == 1


def variables(**overrides: str | None) -> Any:
    values: dict[str, str | None] = {
        "healthimaging_datastore_id": DS,
        "healthimaging_data_access_role_arn": ROLE,
        "healthimaging_output_s3_uri": "s3://dicom/output/",
        **overrides,
    }
    return values.get


def test_settings_from_variables_exclude_output_and_staging() -> None:
    settings = ArrivalSettings.from_variables(
        variables(
            healthimaging_staging_s3_uri="s3://dicom/staging/",
            healthimaging_arrivals_grouping='{"depth": 2, "base_prefix": "incoming/"}',
            healthimaging_arrivals_settle_seconds="20",
        )
    )
    assert settings.settle_seconds == 20.0
    assert settings.grouping.exclude_prefixes == ("s3://dicom/output/", "s3://dicom/staging/")
    assert settings.import_spec("dicom", "incoming/P1/S1/") == {
        "input_s3_uri": "s3://dicom/incoming/P1/S1/",
        "output_s3_uri": "s3://dicom/output/",
        "datastore_id": DS,
        "data_access_role_arn": ROLE,
        "staging_s3_uri": "s3://dicom/staging/",
        "allow_empty": False,
        "job_name": None,
        "client_token": None,
        "max_failed_files": None,
        "max_results": 50,
        "include_phi": False,
        "phi_allow_tags": [],
    }


def test_settings_defaults() -> None:
    settings = ArrivalSettings.from_variables(variables())
    assert settings.grouping.depth == 2
    assert settings.settle_seconds == 120.0
    assert settings.staging_s3_uri is None


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"healthimaging_datastore_id": None}, "healthimaging_datastore_id"),
        ({"healthimaging_output_s3_uri": " "}, "healthimaging_output_s3_uri"),
        ({"healthimaging_output_s3_uri": "dicom/output/"}, "healthimaging_output_s3_uri"),
        ({"healthimaging_arrivals_grouping": "[1]"}, "healthimaging_arrivals_grouping"),
        ({"healthimaging_arrivals_grouping": '{"depth": 0}'}, "healthimaging_arrivals_grouping"),
        ({"healthimaging_arrivals_settle_seconds": "soon"}, "healthimaging_arrivals_settle_seconds"),
        ({"healthimaging_arrivals_settle_seconds": "-1"}, "healthimaging_arrivals_settle_seconds"),
    ],
)
def test_bad_settings_name_the_variable(overrides: dict[str, str | None], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ArrivalSettings.from_variables(variables(**overrides))


def image_set_message(detail_type: str, image_set_id: str, version: str, spelling: str = "imagesetId") -> Any:
    return message(
        {
            "version": "0",
            "detail-type": detail_type,
            "source": "aws.medical-imaging",
            "detail": {
                "imagingVersion": "1.0",
                "datastoreId": DS,
                spelling: image_set_id,
                "imageSetVersion": version,
            },
        }
    )


def test_image_set_events_once_each_both_spellings() -> None:
    a, b = "a" * 32, "b" * 32
    events = image_set_events(
        [
            image_set_message("Image Set Created", a, "1"),
            image_set_message("Image Set Created", a, "1"),
            image_set_message("Image Set Updated", a, "2", spelling="imageSetId"),
            image_set_message("Image Set Deleted", b, "1"),
            image_set_message("Import Job Completed", b, "1"),
            TEST_EVENT,
            message("junk"),
        ]
    )
    assert [(e.image_set_id, e.version, e.detail_type) for e in events] == [
        (a, "1", "Image Set Created"),
        (a, "2", "Image Set Updated"),
    ]


class TestSettleSensor:
    """The provider's sensor with the trigger's polling period mended."""

    def test_provider_trigger_still_ignores_its_polling_period(self) -> None:
        """If this fails, the provider fixed the defect and ``healthimaging.settle`` can go."""
        from airflow.providers.amazon.aws.triggers.s3 import S3KeysUnchangedTrigger

        trigger = S3KeysUnchangedTrigger(bucket_name="b", prefix="p/")
        _, kwargs = trigger.serialize()
        assert S3KeysUnchangedTrigger(**kwargs).polling_period_seconds == 0

    def test_trigger_keeps_its_polling_period_through_serialization(self) -> None:
        from healthimaging.settle import S3PrefixSettledTrigger

        trigger = S3PrefixSettledTrigger(bucket_name="b", prefix="p/", polling_period_seconds=7)
        path, kwargs = trigger.serialize()
        assert path == "healthimaging.settle.S3PrefixSettledTrigger"
        assert S3PrefixSettledTrigger(**kwargs).polling_period_seconds == 7

    def test_sensor_defers_with_its_poke_interval(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from airflow.sdk.exceptions import TaskDeferred

        from healthimaging.settle import S3PrefixSettledSensor, S3PrefixSettledTrigger

        sensor = S3PrefixSettledSensor(
            task_id="t",
            bucket_name="b",
            prefix="p/",
            inactivity_period="30",
            poke_interval=5,
            deferrable=True,
        )
        monkeypatch.setattr(S3PrefixSettledSensor, "poke", lambda self, context: False)
        with pytest.raises(TaskDeferred) as deferred:
            sensor.execute({})  # type: ignore[arg-type]
        trigger = deferred.value.trigger
        assert isinstance(trigger, S3PrefixSettledTrigger)
        assert (trigger.polling_period_seconds, trigger.inactivity_period) == (5, 30.0)

    @pytest.mark.parametrize("period", ["soon", -1])
    def test_bad_period_fails_before_listing(self, period: Any) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        from healthimaging.settle import S3PrefixSettledSensor

        sensor = S3PrefixSettledSensor(task_id="t", bucket_name="b", prefix="p/", inactivity_period=period)
        with pytest.raises(AirflowFailException, match="inactivity_period"):
            sensor.execute({})  # type: ignore[arg-type]

    def test_trigger_settles_a_real_prefix_and_lists_at_its_pace(self, live: Any) -> None:
        """Real path: aiobotocore against the local endpoint's S3; new objects reset the wait."""
        from healthimaging.settle import S3PrefixSettledTrigger

        live.s3.put_object(Bucket="input", Key="in/P1/S1/a.dcm", Body=b"x")
        trigger = S3PrefixSettledTrigger(
            bucket_name="input",
            prefix="in/P1/S1/",
            inactivity_period=2,
            polling_period_seconds=1,
            aws_conn_id="aws_default",
        )
        calls: list[int] = []
        original = trigger.hook.is_keys_unchanged_async

        async def counted(**kwargs: Any) -> Any:
            calls.append(len(kwargs.get("previous_objects") or ()))
            if len(calls) == 2:
                live.s3.put_object(Bucket="input", Key="in/P1/S1/b.dcm", Body=b"y")
            return await original(**kwargs)

        trigger.hook.is_keys_unchanged_async = counted  # type: ignore[method-assign]

        async def first_event() -> Any:
            async for event in trigger.run():
                return event.payload

        payload = asyncio.run(asyncio.wait_for(first_event(), timeout=60))
        assert payload["status"] == "success", payload
        assert "2 objects" in payload["message"]
        # Listings about one per second over >= 2 s of quiet after the second object: a handful, not thousands.
        assert 3 <= len(calls) <= 15
