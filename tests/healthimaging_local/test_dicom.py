"""parse_p10 against pydicom's real test files and synthetic files."""

from __future__ import annotations

import json
import re
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from healthimaging_local import dicom
from healthimaging_local.dicom import DicomParseError, ParsedInstance, parse_p10
from healthimaging_local.sample_data import synthetic_study_files

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DICOMDIRTESTS = TEST_FILES / "dicomdirtests"
DICOMDIR_UID = "1.2.840.10008.1.3.10"
HEX32 = re.compile(r"[0-9a-f]{32}")


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read_with_pydicom(path: Path) -> Dataset | None:
    """The file as pydicom reads it (force=False), or None when pydicom refuses it."""
    try:
        return pydicom.dcmread(path, force=False, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        return None


def _one_synthetic_file() -> bytes:
    return next(synthetic_study_files(1, 1, 1, 1))[1]


def _p10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dataset_without(keyword: str) -> bytes:
    ds = pydicom.dcmread(BytesIO(_one_synthetic_file()))
    delattr(ds, keyword)
    return _p10(ds)


def test_every_dicomdirtests_file_parses_except_dicomdir_and_non_dicom() -> None:
    parsed = rejected_dicomdir = rejected_other = 0
    for path in _all_files(DICOMDIRTESTS):
        data = path.read_bytes()
        ds = _read_with_pydicom(path)
        if ds is None:
            with pytest.raises(DicomParseError, match="DICM"):
                parse_p10(data)
            rejected_other += 1
        elif ds.file_meta.MediaStorageSOPClassUID == DICOMDIR_UID:
            with pytest.raises(DicomParseError, match="DICOMDIR") as info:
                parse_p10(data)
            assert info.value.exception_type == "ValidationException"
            rejected_dicomdir += 1
        else:
            instance = parse_p10(data)
            assert (instance.study_uid, instance.series_uid, instance.sop_uid) == (
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
            )
            assert instance.patient["PatientID"] == ds.PatientID
            assert instance.patient["PatientName"] == str(ds.PatientName)
            assert instance.size == len(data)
            json.dumps(instance.instance, allow_nan=False)
            parsed += 1
    assert parsed == 81
    assert rejected_dicomdir == 8
    assert rejected_other == 2  # the two README files


def test_dicomdirtests_patient_study_series_counts_match_an_independent_walk() -> None:
    expected_patients: set[str] = set()
    expected_series: set[tuple[str, str]] = set()
    for path in _all_files(DICOMDIRTESTS):
        ds = _read_with_pydicom(path)
        if ds is not None and "SeriesInstanceUID" in ds:
            expected_patients.add(ds.PatientID)
            expected_series.add((ds.StudyInstanceUID, ds.SeriesInstanceUID))
    parsed: list[ParsedInstance] = []
    for path in _all_files(DICOMDIRTESTS):
        try:
            parsed.append(parse_p10(path.read_bytes()))
        except DicomParseError:
            pass
    assert {(p.study_uid, p.series_uid) for p in parsed} == expected_series
    assert {p.patient["PatientID"] for p in parsed} == expected_patients
    assert len(expected_patients) == 3
    assert len({study for study, _ in expected_series}) == 7
    assert len(expected_series) == 14


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "DICM"),
        (b"hello, this is not DICOM" * 20, "DICM"),
        (b"\0" * 128 + b"DICM", "corrupt|TransferSyntaxUID"),
        (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00", "corrupt|truncated|TransferSyntaxUID"),
    ],
)
def test_non_dicom_bytes_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(DicomParseError, match=message) as info:
        parse_p10(data)
    assert info.value.exception_type == "ValidationException"


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "no_meta.dcm"])
def test_files_without_preamble_and_file_meta_are_rejected(name: str) -> None:
    with pytest.raises(DicomParseError, match="DICM"):
        parse_p10((TEST_FILES / name).read_bytes())


def test_missing_transfer_syntax_is_reported_like_the_real_service() -> None:
    with pytest.raises(DicomParseError, match="^DICOM attribute TransferSyntaxUID does not exist$"):
        parse_p10((TEST_FILES / "meta_missing_tsyntax.dcm").read_bytes())


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uid_is_reported(keyword: str) -> None:
    with pytest.raises(DicomParseError, match=f"^DICOM attribute {keyword} does not exist$"):
        parse_p10(_dataset_without(keyword))


def test_invalid_uid_is_reported() -> None:
    ds = pydicom.dcmread(BytesIO(_one_synthetic_file()))
    ds.SeriesInstanceUID = "1.2.abc"
    with pytest.raises(DicomParseError, match="SeriesInstanceUID is not a valid UID"):
        parse_p10(_p10(ds))


@pytest.mark.parametrize("cut", [1, 100, 511])
def test_file_truncated_inside_pixel_data_is_rejected(cut: int) -> None:
    data = _one_synthetic_file()
    with pytest.raises(DicomParseError, match="truncated"):
        parse_p10(data[:-cut])


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_pydicom_truncated_files_are_rejected(name: str) -> None:
    with pytest.raises(DicomParseError, match="truncated"):
        parse_p10((TEST_FILES / name).read_bytes())


def test_every_pydicom_test_file_parses_or_raises_dicom_parse_error() -> None:
    outcomes = {"parsed": 0, "rejected": 0}
    for path in _all_files(TEST_FILES):
        try:
            parse_p10(path.read_bytes())
            outcomes["parsed"] += 1
        except DicomParseError:
            outcomes["rejected"] += 1
    assert outcomes["parsed"] > 100
    assert outcomes["rejected"] > 10


@pytest.mark.parametrize(
    "name", ["ExplVR_BigEnd.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "CT_small.dcm"]
)
def test_big_endian_and_implicit_vr_values_match_pydicom(name: str) -> None:
    data = (TEST_FILES / name).read_bytes()
    ds = pydicom.dcmread(BytesIO(data))
    instance = parse_p10(data)
    assert instance.instance["Rows"] == ds.Rows
    assert instance.instance["Columns"] == ds.Columns
    assert instance.instance["BitsAllocated"] == ds.BitsAllocated
    assert instance.patient["PatientName"] == str(ds.PatientName)
    assert instance.instance["ImageType"] == list(ds.ImageType)
    assert instance.instance["PixelData"] is None
    [frame] = instance.frames
    assert frame["FrameSizeInBytes"] == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    assert frame["PixelDataChecksumFromBaseToFullResolution"][0]["Width"] == ds.Columns


def test_encapsulated_pixel_data_is_split_without_decoding() -> None:
    data = (TEST_FILES / "JPEG2000.dcm").read_bytes()
    ds = pydicom.dcmread(BytesIO(data))
    instance = parse_p10(data)
    assert len(instance.frames) == int(ds.get("NumberOfFrames", 1))
    assert all(HEX32.fullmatch(frame["ID"]) for frame in instance.frames)
    assert instance.frames[0]["FrameSizeInBytes"] == ds.Rows * ds.Columns * ds.SamplesPerPixel * 2


def test_multi_frame_native_pixel_data_gives_one_entry_per_frame() -> None:
    ds = pydicom.dcmread(BytesIO(_one_synthetic_file()))
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(range(256)) * 2 + bytes(512) + bytes(range(256)) * 2
    frames = parse_p10(_p10(ds)).frames
    assert len(frames) == 3
    assert len({frame["ID"] for frame in frames}) == 3
    assert {frame["FrameSizeInBytes"] for frame in frames} == {16 * 16 * 2}
    # identical pixel bytes in frames 0 and 2 still get distinct IDs but the same checksum
    checksums = [frame["PixelDataChecksumFromBaseToFullResolution"][0]["Checksum"] for frame in frames]
    assert checksums[0] == checksums[2] != checksums[1]


def test_json_values_follow_the_document_rules() -> None:
    data = _one_synthetic_file()
    ds = pydicom.dcmread(BytesIO(data))
    instance = parse_p10(data)
    assert instance.patient["PatientName"] == str(ds.PatientName)
    assert instance.instance["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert instance.instance["SpecificCharacterSet"] == ["ISO_IR 100"]  # VM 1-n: always a list
    assert instance.instance["InstanceNumber"] == "1"  # IS keeps its text, like the real service
    assert instance.instance["PixelSpacing"] == ["0.5", "0.5"]
    assert instance.instance["Rows"] == 16
    assert instance.instance["TransferSyntaxUID"] == ExplicitVRLittleEndian
    assert instance.study["PatientWeight"] is None
    assert instance.series["SeriesNumber"] == "1"
    assert "StudyInstanceUID" not in instance.instance
    assert "PatientName" not in instance.instance
    assert instance.vrs == {"SmallestImagePixelValue": "US", "LargestImagePixelValue": "US"}
    [frame] = instance.frames
    assert (frame["MinPixelValue"], frame["MaxPixelValue"]) == (
        ds.SmallestImagePixelValue,
        ds.LargestImagePixelValue,
    )


def test_private_tags_sequences_and_binary_values() -> None:
    ds = pydicom.dcmread(BytesIO(_one_synthetic_file()))
    block = ds.private_block(0x0011, "ACME TEST", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "OB", b"\x01\x02")
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [item]
    instance = parse_p10(_p10(ds))
    assert instance.instance["00111001"] == "private text"
    assert instance.instance["00111002"] == "AQI="
    assert instance.instance["00110010"] == "ACME TEST"
    assert instance.vrs["00111001"] == "LO"
    assert instance.vrs["00111002"] == "OB"
    assert instance.instance["AnatomicRegionSequence"] == [{"CodeValue": "T-D3000", "CodeMeaning": "Chest"}]


def test_frame_ids_are_deterministic() -> None:
    data = _one_synthetic_file()
    assert parse_p10(data).frames == parse_p10(data).frames
    assert HEX32.fullmatch(parse_p10(data).frames[0]["ID"])


def test_fast_decoding_matches_pydicom_on_every_test_file() -> None:
    """The direct decoder must give what pydicom's own conversion gives, element by element."""
    compared = 0
    for path in _all_files(TEST_FILES):
        try:
            ds = pydicom.dcmread(path, force=False)
        except Exception:
            continue
        ascii_text = dicom._charset_is_ascii_compatible(ds)
        for base_tag in list(ds._dict):
            raw = ds._dict[base_tag]
            tag = int(base_tag)
            if not isinstance(raw, RawDataElement) or raw.value is None:
                continue
            vr = raw.VR if raw.VR is not None else dicom._dictionary_vr(tag)
            if vr is None or vr not in dicom.FAST_VRS:
                continue
            fast = dicom._fast_json_value(raw, vr, tag, ascii_text)
            if fast is dicom.NOT_HANDLED:
                continue
            assert fast == dicom._json_value(ds[base_tag]), f"{path.name} {base_tag}"
            compared += 1
    assert compared > 5000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_any_bytes_parse_or_raise_dicom_parse_error(data: bytes) -> None:
    for candidate in (data, b"\0" * 128 + b"DICM" + data):
        try:
            parse_p10(candidate)
        except DicomParseError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_synthetic_files_parse_or_raise_dicom_parse_error(data: st.DataObject) -> None:
    original = bytearray(next(synthetic_study_files(1, 1, 1, 1, seed=3))[1])
    cut = data.draw(st.integers(min_value=0, max_value=len(original)))
    for _ in range(data.draw(st.integers(min_value=0, max_value=4))):
        position = data.draw(st.integers(min_value=132, max_value=len(original) - 1))
        original[position] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        instance = parse_p10(bytes(original[:cut]))
    except DicomParseError:
        pass
    else:
        json.dumps(instance.instance)


def test_new_uid_dataset_without_pixel_data_has_no_frames() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    instance = parse_p10(_p10(ds))
    assert instance.frames == []
    assert instance.patient == dict.fromkeys(["PatientName", "PatientID", "PatientBirthDate", "PatientSex"])
