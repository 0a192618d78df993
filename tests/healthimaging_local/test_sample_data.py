"""Synthetic and bundled sample data, uploaded through boto3 to moto's real S3 server."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pydicom
import pytest
from endpoint_helpers import create_queue, receive_all
from moto.server import ThreadedMotoServer
from pydicom.uid import UID

from healthimaging_local import sample_data
from healthimaging_local.dicom import parse_p10
from healthimaging_local.sample_data import (
    drip_schedule,
    pydicom_bundled_files,
    s3_client_for,
    synthetic_study_files,
    upload,
)


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port; stopped afterwards."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sample_data.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_synthetic_files_round_trip_through_the_parser() -> None:
    files = list(synthetic_study_files(2, 2, 2, 3))
    assert len(files) == 2 * 2 * 2 * 3
    assert len({key for key, _ in files}) == len(files)
    for key, data in files:
        ds = pydicom.dcmread(BytesIO(data), force=False)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        parsed = parse_p10(data)
        assert parsed.sop_uid == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+\^\d+", parsed.patient["PatientName"])
        assert parsed.patient["PatientName"] == str(ds.PatientName)
        assert parsed.patient["PatientID"] == ds.PatientID
        assert re.fullmatch(r"\d{8}", parsed.study["StudyDate"])
        assert re.fullmatch(r"\d{6}", parsed.study["StudyTime"])
        assert parsed.series["Modality"] == ds.Modality
        assert parsed.series["SeriesNumber"] == str(ds.SeriesNumber)
        assert parsed.instance["InstanceNumber"] == str(ds.InstanceNumber)
        assert key.endswith(f"instance-{ds.InstanceNumber:05d}.dcm")
        assert len(parsed.frames) == 1
        for uid in (parsed.study_uid, parsed.series_uid, parsed.sop_uid):
            assert uid.startswith(sample_data.UID_ROOT)
            assert UID(uid).is_valid


def test_synthetic_uids_are_deterministic_and_unique() -> None:
    def uids(seed: int) -> list[tuple[str, str, str]]:
        parsed = [parse_p10(data) for _, data in synthetic_study_files(3, 2, 2, 2, seed=seed)]
        return [(p.study_uid, p.series_uid, p.sop_uid) for p in parsed]

    first = uids(0)
    assert uids(0) == first
    assert len({sop for _, _, sop in first}) == len(first) == 24
    assert len({series for _, series, _ in first}) == 12
    assert len({study for study, _, _ in first}) == 6
    other_seed = uids(1)
    assert not {sop for _, _, sop in first} & {sop for _, _, sop in other_seed}
    assert list(synthetic_study_files(1, 1, 1, 2, seed=5)) == list(synthetic_study_files(1, 1, 1, 2, seed=5))


def test_synthetic_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="patients"):
        list(synthetic_study_files(-1, 1, 1, 1))


def test_pydicom_bundled_files_leave_out_dicomdir_unless_asked() -> None:
    plain = dict(pydicom_bundled_files())
    with_dicomdir = dict(pydicom_bundled_files(include_dicomdir=True))
    assert len(plain) == 81
    extra = set(with_dicomdir) - set(plain)
    assert len(extra) == 8
    assert all("DICOMDIR" in key for key in extra)
    assert all(key.startswith("pydicom/dicomdirtests/") for key in with_dicomdir)


def test_upload_to_moto_s3_server(s3_endpoint: str) -> None:
    client = s3_client_for(s3_endpoint)
    client.create_bucket(Bucket="dicom")
    summary = upload(synthetic_study_files(2, 1, 2, 3), client, "dicom", "input")
    assert (summary.files, summary.patients, summary.studies, summary.series) == (12, 2, 2, 4)
    assert summary.not_importable == 0
    listed = client.list_objects_v2(Bucket="dicom", Prefix="input/")
    assert listed["KeyCount"] == 12
    assert sum(obj["Size"] for obj in listed["Contents"]) == summary.bytes
    key = listed["Contents"][0]["Key"]
    body = client.get_object(Bucket="dicom", Key=key)["Body"].read()
    assert parse_p10(body).sop_uid.startswith(sample_data.UID_ROOT)


def test_run_creates_the_bucket_and_prints_counts_without_phi(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse_args(
        "--endpoint-url",
        s3_endpoint,
        "--bucket",
        "samples",
        "--prefix",
        "in/",
        "--include-pydicom-files",
        "--include-dicomdir",
    )
    assert sample_data.run(args) == 0
    output = capsys.readouterr().out
    assert "Uploaded 101 files" in output  # 12 synthetic + 81 bundled + 8 DICOMDIR
    assert "5 patients, 9 studies, 18 series" in output
    assert "8 not importable" in output
    phi = set()
    for _, data in synthetic_study_files(2, 1, 2, 3):
        parsed = parse_p10(data)
        phi |= {parsed.patient["PatientName"], parsed.patient["PatientID"]}
    for _, data in pydicom_bundled_files():
        parsed = parse_p10(data)
        phi |= {str(parsed.patient["PatientName"]), str(parsed.patient["PatientID"])}
    assert not [value for value in phi if value and value in output]
    listed = s3_client_for(s3_endpoint).list_objects_v2(Bucket="samples", Prefix="in/", MaxKeys=1000)
    assert listed["KeyCount"] == 12 + 81 + 8


def test_run_without_bucket_creation_fails_cleanly(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse_args(
        "--endpoint-url", s3_endpoint, "--bucket", "missing", "--prefix", "x", "--no-create-bucket"
    )
    assert sample_data.run(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_argument_defaults() -> None:
    args = _parse_args("--endpoint-url", "http://127.0.0.1:1", "--bucket", "b", "--prefix", "p")
    assert (args.patients, args.studies_per_patient, args.series_per_study, args.instances_per_series) == (
        2,
        1,
        2,
        3,
    )
    assert (args.create_bucket, args.include_pydicom_files, args.include_dicomdir, args.seed) == (
        True,
        False,
        False,
        0,
    )
    with pytest.raises(SystemExit):
        _parse_args("--endpoint-url", "u", "--bucket", "b", "--prefix", "p", "--patients", "-1")


def test_drip_schedule_spreads_evenly() -> None:
    assert drip_schedule(5, 8.0) == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert drip_schedule(1, 8.0) == [0.0]
    assert drip_schedule(3, 0.0) == [0.0, 0.0, 0.0]
    assert drip_schedule(0, 5.0) == []
    args = _parse_args("--endpoint-url", "u", "--bucket", "b", "--prefix", "p")
    assert args.drip_seconds == 0.0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            _parse_args("--endpoint-url", "u", "--bucket", "b", "--prefix", "p", "--drip-seconds", bad)


def test_drip_puts_one_object_at_a_time_on_schedule() -> None:
    """With a fake clock: each put happens at its scheduled moment, in key order, none early."""
    now = [50.0]
    puts: list[tuple[float, str]] = []

    class Recorder:
        def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
            puts.append((now[0], Key))

    def sleep(seconds: float) -> None:
        assert seconds > 0
        now[0] += seconds

    files = list(synthetic_study_files(1, 1, 2, 3))
    summary = upload(files, Recorder(), "b", "in", drip_seconds=10.0, sleep=sleep, clock=lambda: now[0])
    assert summary.files == 6
    assert [key for _, key in puts] == [f"in/{key}" for key, _ in files]
    assert [round(t - 50.0, 6) for t, _ in puts] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_drip_into_the_endpoint_arrives_over_time(endpoint: Any) -> None:
    """Real time, real HTTP: the bucket's notifications arrive one per object, in order, over the drip period."""
    s3, sqs = endpoint.client("s3"), endpoint.client("sqs")
    url, arn = create_queue(sqs, "drip")
    s3.create_bucket(Bucket="drip")
    s3.put_bucket_notification_configuration(
        Bucket="drip",
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    receive_all(sqs, url)
    args = _parse_args(
        "--endpoint-url", endpoint.url, "--bucket", "drip", "--prefix", "study/", "--patients", "1",
        "--series-per-study", "1", "--instances-per-series", "4", "--drip-seconds", "1.5",
    )  # fmt: skip
    started = time.monotonic()
    assert sample_data.run(args) == 0
    assert time.monotonic() - started >= 1.5  # the last object waited for its moment
    records = [body["Records"][0] for body in receive_all(sqs, url, expected=4)]
    keys = [record["s3"]["object"]["key"] for record in records]
    assert keys == sorted(keys)
    assert keys[0].startswith("study/patient-0001/")
    times = [record["eventTime"] for record in records]
    assert times[0] < times[-1]
