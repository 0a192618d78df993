"""Synthetic DICOM P10 studies (and pydicom's bundled real files) uploaded to S3 for demos, tests and benchmarks.

Wired as ``healthimaging-local sample-data`` through :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import array
import itertools
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pydicom
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from healthimaging_local.cli import non_negative_float, non_negative_int
from healthimaging_local.dicom import DICOMDIR_SOP_CLASS_UID, DicomParseError, parse_p10

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for UIDs that are not registered anywhere
IMAGE_SIZE = 16
BITS_STORED = 12
UPLOAD_THREADS = 8
FAMILY_NAMES = ("DOE", "ROE", "SMITH", "GARCIA", "MULLER", "ROSSI", "TANAKA", "NOVAK", "SILVA", "KOWALSKI")
GIVEN_NAMES = ("JANE", "JOHN", "ALEX", "MARIA", "SAM", "YUKI", "OMAR", "LENA", "IVAN", "ANA")
SERIES_KINDS = (  # (Modality, SOP Class, BodyPartExamined, SeriesDescription)
    ("CT", CTImageStorage, "CHEST", "CT CHEST AXIAL"),
    ("MR", MRImageStorage, "HEAD", "MR BRAIN T1"),
    ("CT", CTImageStorage, "ABDOMEN", "CT ABDOMEN"),
    ("OT", SecondaryCaptureImageStorage, "CHEST", "SECONDARY CAPTURE"),
)


@dataclass(frozen=True)
class UploadSummary:
    """What :func:`upload` put in S3. Counts only: no patient names or ids.

    :param files: objects uploaded
    :param bytes: total bytes uploaded
    :param patients: distinct patients among the files that parse as importable DICOM
    :param studies: distinct Study Instance UIDs among them
    :param series: distinct (Study, Series) Instance UID pairs among them
    :param not_importable: uploaded files that the importer will reject (for example DICOMDIR)
    """

    files: int
    bytes: int
    patients: int
    studies: int
    series: int
    not_importable: int


def synthetic_study_files(
    patients: int,
    studies_per_patient: int,
    series_per_study: int,
    instances_per_series: int,
    seed: int = 0,
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative key, P10 bytes)`` for a deterministic synthetic cohort.

    The same arguments always give the same bytes; UIDs are ``UID_ROOT`` + kind + seed + 1-based indices,
    so they are unique across indices and seeds.

    :param patients: number of patients
    :param studies_per_patient: studies for each patient
    :param series_per_study: series in each study
    :param instances_per_series: SOP instances in each series (one 16x16 16-bit frame each)
    :param seed: varies names, dates and UIDs
    """
    for name, count in (
        ("patients", patients),
        ("studies_per_patient", studies_per_patient),
        ("series_per_study", series_per_study),
        ("instances_per_series", instances_per_series),
        ("seed", seed),
    ):
        if count < 0:
            raise ValueError(f"{name} must be >= 0")
    for p in range(1, patients + 1):
        rng = random.Random(f"{seed}/{p}")
        patient = {
            "PatientName": f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}^{p}",
            "PatientID": f"SYN{seed}-{p:05d}",
            "PatientBirthDate": (date(1940, 1, 1) + timedelta(days=rng.randrange(365 * 60))).strftime(
                "%Y%m%d"
            ),
            "PatientSex": rng.choice(("F", "M", "O")),
        }
        for s in range(1, studies_per_patient + 1):
            study_date = date(2020, 1, 1) + timedelta(days=rng.randrange(365 * 4))
            study = {
                "StudyInstanceUID": f"{UID_ROOT}1.{seed}.{p}.{s}",
                "StudyID": str(s),
                "StudyDate": study_date.strftime("%Y%m%d"),
                "StudyTime": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
                "AccessionNumber": f"ACC{p:06d}{s:04d}"[-16:],
                "StudyDescription": f"SYNTHETIC STUDY {s}",
                "ReferringPhysicianName": "WHO^CARES",
            }
            for r in range(1, series_per_study + 1):
                modality, sop_class, body_part, description = SERIES_KINDS[(s + r - 2) % len(SERIES_KINDS)]
                series = {
                    "SeriesInstanceUID": f"{UID_ROOT}2.{seed}.{p}.{s}.{r}",
                    "SeriesNumber": r,
                    "Modality": modality,
                    "BodyPartExamined": body_part,
                    "SeriesDescription": description,
                    "SeriesDate": study["StudyDate"],
                }
                for i in range(1, instances_per_series + 1):
                    sop_uid = f"{UID_ROOT}3.{seed}.{p}.{s}.{r}.{i}"
                    ds = _synthetic_instance(patient | study | series, sop_class, sop_uid, i, seed)
                    key = f"patient-{p:04d}/study-{s:03d}/series-{r:03d}/instance-{i:05d}.dcm"
                    yield key, _to_p10(ds)


def _synthetic_instance(
    attributes: dict[str, Any], sop_class: str, sop_uid: str, number: int, seed: int
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Manufacturer = "HEALTHIMAGING-LOCAL"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = IMAGE_SIZE
    ds.Columns = IMAGE_SIZE
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    pixels = _pixels(sop_uid, number, seed)
    ds.SmallestImagePixelValue = min(pixels)
    ds.LargestImagePixelValue = max(pixels)
    if sys.byteorder == "big":
        pixels.byteswap()
    ds.PixelData = pixels.tobytes()
    return ds


def _pixels(sop_uid: str, number: int, seed: int) -> array.array[int]:
    """A gradient plus deterministic noise, different for every instance."""
    rng = random.Random(f"{seed}/{sop_uid}")
    limit = 1 << BITS_STORED
    return array.array(
        "H",
        (
            (x * 97 + y * 13 + number * 31 + rng.randrange(64)) % limit
            for y in range(IMAGE_SIZE)
            for x in range(IMAGE_SIZE)
        ),
    )


def _to_p10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pydicom_test_files_folder() -> Path:
    """pydicom's installed ``data/test_files/dicomdirtests`` folder."""
    return Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def pydicom_bundled_files(include_dicomdir: bool = False) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative key, bytes)`` for the real DICOM files in pydicom's ``dicomdirtests`` folder.

    Files that are not DICOM P10 (the README files) are always left out; DICOMDIR files unless asked for.

    :param include_dicomdir: also yield the DICOMDIR variants (the importer rejects them)
    """
    root = pydicom_test_files_folder()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            continue
        if not include_dicomdir and _is_dicomdir(data):
            continue
        yield f"pydicom/dicomdirtests/{path.relative_to(root).as_posix()}", data


def _is_dicomdir(data: bytes) -> bool:
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=[]).file_meta
    return bool(meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS_UID)


def drip_schedule(count: int, seconds: float) -> list[float]:
    """When each of ``count`` uploads starts, in seconds after the first: evenly spread, the last at ``seconds``.

    :param count: number of files
    :param seconds: the spread (0: all at once)
    """
    if count <= 1 or seconds <= 0:
        return [0.0] * count
    step = seconds / (count - 1)
    return [i * step for i in range(count)]


def upload(
    files: Iterable[tuple[str, bytes]],
    s3_client: Any,
    bucket: str,
    prefix: str,
    drip_seconds: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> UploadSummary:
    """Put every file under ``prefix`` in ``bucket`` and count what was uploaded.

    :param files: ``(relative key, bytes)`` pairs, for example from :func:`synthetic_study_files`
    :param s3_client: a boto3 S3 client
    :param bucket: the bucket, which must exist
    :param prefix: the key prefix; a ``/`` is added between it and each key when missing
    :param drip_seconds: spread the uploads evenly over this many seconds, one at a time in key order as
        generated (0: upload in parallel, as fast as possible), so arrivals can be watched
    :param sleep: waits between dripped uploads (for tests)
    :param clock: monotonic seconds (for tests)
    """
    key_prefix = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
    patients: set[str] = set()
    studies: set[str] = set()
    series: set[tuple[str, str]] = set()
    counts = {"files": 0, "bytes": 0, "not_importable": 0}

    def put(item: tuple[str, bytes]) -> None:
        key, data = item
        s3_client.put_object(Bucket=bucket, Key=f"{key_prefix}{key}", Body=data)

    def counted(items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        for key, data in items:
            counts["files"] += 1
            counts["bytes"] += len(data)
            try:
                parsed = parse_p10(data)
            except DicomParseError:
                counts["not_importable"] += 1
            else:
                patients.add(str(parsed.patient.get("PatientID") or parsed.patient.get("PatientName")))
                studies.add(parsed.study_uid)
                series.add((parsed.study_uid, parsed.series_uid))
            yield key, data

    if drip_seconds > 0:
        items = list(files)
        started = clock()
        for offset, item in zip(drip_schedule(len(items), drip_seconds), counted(items), strict=True):
            delay = started + offset - clock()
            if delay > 0:
                sleep(delay)
            put(item)
    else:
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            for _ in pool.map(put, counted(files)):
                pass
    return UploadSummary(
        files=counts["files"],
        bytes=counts["bytes"],
        patients=len(patients),
        studies=len(studies),
        series=len(series),
        not_importable=counts["not_importable"],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sample-data`` options to ``parser``.

    :param parser: the sub-command's parser
    """
    parser.add_argument(
        "--endpoint-url", required=True, help="S3 endpoint, for example http://127.0.0.1:4566"
    )
    parser.add_argument("--bucket", required=True, help="bucket to upload into")
    parser.add_argument("--prefix", required=True, help="key prefix, for example dicom/input/")
    parser.add_argument("--patients", type=non_negative_int, default=2)
    parser.add_argument("--studies-per-patient", type=non_negative_int, default=1)
    parser.add_argument("--series-per-study", type=non_negative_int, default=2)
    parser.add_argument("--instances-per-series", type=non_negative_int, default=3)
    parser.add_argument(
        "--include-pydicom-files",
        action="store_true",
        help="also upload pydicom's bundled real files (dicomdirtests: 3 patients, 7 studies, 14 series)",
    )
    parser.add_argument(
        "--include-dicomdir",
        action="store_true",
        help="with --include-pydicom-files, also upload the DICOMDIR files (the import rejects them)",
    )
    parser.add_argument(
        "--create-bucket",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="create the bucket if it does not exist (default: yes)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="varies names, dates and UIDs")
    parser.add_argument(
        "--drip-seconds",
        type=non_negative_float,
        default=0.0,
        metavar="N",
        help="spread the uploads evenly over N seconds, one object at a time, to demonstrate arrivals"
        " (default 0: upload everything at once)",
    )


def s3_client_for(endpoint_url: str) -> Any:
    """A stock boto3 S3 client for a local endpoint (dummy credentials, us-east-1, path-style addressing).

    :param endpoint_url: the S3 endpoint
    """
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def _ensure_bucket(s3_client: Any, bucket: str, create: bool) -> bool:
    """True when the bucket exists (creating it if allowed)."""
    try:
        s3_client.head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    if not create:
        return False
    s3_client.create_bucket(Bucket=bucket)
    return True


def run(args: argparse.Namespace) -> int:
    """Generate, upload and summarise; returns the process exit code.

    :param args: parsed options from :func:`add_arguments`
    """
    s3_client = s3_client_for(args.endpoint_url)
    try:
        if not _ensure_bucket(s3_client, args.bucket, args.create_bucket):
            print(f"error: bucket {args.bucket!r} does not exist (and --no-create-bucket)", file=sys.stderr)
            return 2
        files: Iterable[tuple[str, bytes]] = synthetic_study_files(
            args.patients,
            args.studies_per_patient,
            args.series_per_study,
            args.instances_per_series,
            args.seed,
        )
        if args.include_pydicom_files:
            files = itertools.chain(files, pydicom_bundled_files(include_dicomdir=args.include_dicomdir))
        summary = upload(files, s3_client, args.bucket, args.prefix, drip_seconds=args.drip_seconds)
    except (BotoCoreError, ClientError) as exc:
        print(f"error: upload to {args.endpoint_url} failed: {exc}", file=sys.stderr)
        return 1
    location = f"s3://{args.bucket}/{args.prefix}"
    print(
        f"Uploaded {summary.files} files ({summary.bytes} bytes) to {location}: "
        f"{summary.patients} patients, {summary.studies} studies, {summary.series} series"
        + (f", {summary.not_importable} not importable" if summary.not_importable else "")
    )
    return 0
