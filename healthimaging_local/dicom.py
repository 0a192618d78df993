"""Parse one DICOM Part 10 object into the pieces an ImageSetMetadata document is built from.

Decisions (the real service documents none of them):

- Only Part 10 objects are accepted: a 128-byte preamble, ``DICM`` and a File Meta Information group with a
  TransferSyntaxUID. Files that pydicom could only read with ``force=True`` (no preamble, no file meta) fail
  with ``ValidationException``, like the real service's "DICOM attribute TransferSyntaxUID does not exist".
- Attributes are split into Patient, Study, Series and Instance level by keyword (the sets below). Values are
  JSON: strings for text VRs (IS and DS keep their original text, as the real service does), numbers for binary
  numeric VRs, base64 for OB/OW/UN and friends (``None`` above 64 KiB), lists of objects for sequences, ``None``
  for empty values. An attribute whose dictionary VM is not exactly 1 is always a list.
- ``vrs`` (the document's ``DICOMVRs``) holds the VR of every instance-level attribute whose VR the standard
  dictionary cannot tell: private or unknown tags (keyed by 8 upper-case hex digits) and ambiguous VRs such as
  ``US or SS``.
- Frames: the raw PixelData bytes are split into frames (natively by size, encapsulated by pydicom's
  ``generate_frames``) and never decoded. A frame ID is the 32-hex BLAKE2b digest of the SOP Instance UID, the
  frame index and the frame bytes, so it is deterministic yet unique inside an image set.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.datadict import DicomDictionary, dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

DICOMDIR_SOP_CLASS_UID = "1.2.840.10008.1.3.10"
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_BINARY_VALUE_BYTES = 64 * 1024
UID_PATTERN = re.compile(r"[0-9.]{1,64}")
PIXEL_DATA_TAGS = frozenset(
    {0x7FE00010, 0x7FE00008, 0x7FE00009}
)  # PixelData, FloatPixelData, DoubleFloatPixelData
SPECIFIC_CHARACTER_SET_TAG = 0x00080005
NOT_HANDLED: Any = object()
STRUCT_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "UV": "Q", "SV": "q", "FL": "f", "FD": "d"}
STRUCT_SIZES = {vr: struct.calcsize(f"<{fmt}") for vr, fmt in STRUCT_FORMATS.items()}
FLOAT_VRS = frozenset({"FL", "FD"})
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
SINGLE_VALUE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
FAST_VRS = frozenset(STRUCT_FORMATS) | ASCII_VRS | CHARSET_VRS | {"UR"}
ASCII_COMPATIBLE_CHARSETS = frozenset(
    {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127"}
    | {"ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192", "GB18030", "GBK"}
)
TEXT_LIKE_VRS = frozenset({"PN", "IS", "DS"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})

# Always present in the document (None when absent), like the real service's documents.
PATIENT_REQUIRED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
PATIENT_OPTIONAL = frozenset(
    {
        "IssuerOfPatientID",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthTime",
        "PatientComments",
        "EthnicGroup",
        "PatientSpeciesDescription",
        "PatientBreedDescription",
        "ResponsiblePerson",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
    }
)
STUDY_REQUIRED = (
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "PatientWeight",
    "PatientSize",
)
STUDY_OPTIONAL = frozenset(
    {"PatientAge", "IssuerOfAccessionNumberSequence", "PhysiciansOfRecord", "AdmittingDiagnosesDescription"}
)
SERIES_REQUIRED = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "BodyPartExamined",
    "ProtocolName",
    "Manufacturer",
    "DeviceSerialNumber",
    "SoftwareVersions",
)
SERIES_OPTIONAL = frozenset({"SeriesTime", "Laterality", "PerformingPhysicianName", "OperatorsName"})

PATIENT_KEYWORDS = frozenset(PATIENT_REQUIRED) | PATIENT_OPTIONAL
STUDY_KEYWORDS = frozenset(STUDY_REQUIRED) | STUDY_OPTIONAL
SERIES_KEYWORDS = frozenset(SERIES_REQUIRED) | SERIES_OPTIONAL
NON_INSTANCE_KEYWORDS = PATIENT_KEYWORDS | STUDY_KEYWORDS | SERIES_KEYWORDS


class DicomParseError(Exception):
    """A file that cannot be imported; ``message`` and ``exception_type`` go to failure.ndjson.

    :param message: why the file was rejected; never contains attribute values (they may be PHI)
    :param exception_type: the failure.ndjson ``exceptionType``
    """

    def __init__(self, message: str, exception_type: str = "ValidationException") -> None:
        super().__init__(message)
        self.message = message
        self.exception_type = exception_type


@dataclass(frozen=True)
class ParsedInstance:
    """One SOP instance, split by level, ready for :func:`healthimaging_local.metadata.build_metadata`."""

    study_uid: str
    series_uid: str
    sop_uid: str
    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    vrs: dict[str, str]
    frames: list[dict[str, Any]]
    size: int


def parse_p10(data: bytes) -> ParsedInstance:
    """Parse a DICOM Part 10 object without decoding its pixel data.

    :param data: the whole file
    :raises DicomParseError: not DICOM P10, corrupt or truncated, a DICOMDIR, or a missing/invalid UID
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomParseError("Not a DICOM P10 file: the 128-byte preamble and 'DICM' prefix are missing")
    try:
        ds = pydicom.dcmread(BytesIO(data), force=False)
        meta = ds.file_meta
        if not meta.get("TransferSyntaxUID"):
            raise DicomParseError("DICOM attribute TransferSyntaxUID does not exist")
        if meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS_UID:
            raise DicomParseError("DICOMDIR media directory files cannot be imported")
        _check_not_truncated(ds)
        return _split_levels(ds, data)
    except DicomParseError:
        raise
    except Exception as exc:  # pydicom raises many kinds (ValueError, OSError, NotImplementedError, ...)
        raise DicomParseError(f"DICOM file is corrupt or truncated: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """Exception class and message, shortened (pydicom messages name tags and offsets, not values)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _check_not_truncated(ds: Dataset) -> None:
    """pydicom reads a value cut short by the end of the file silently: compare read and declared lengths."""
    for elem in ds._dict.values():
        if (
            isinstance(elem, RawDataElement)
            and elem.length != UNDEFINED_LENGTH
            and elem.value is not None
            and len(elem.value) < elem.length
        ):
            raise DicomParseError(f"DICOM file is truncated inside attribute {_key_for(int(elem.tag))}")


def _split_levels(ds: Dataset, data: bytes) -> ParsedInstance:
    patient: dict[str, Any] = dict.fromkeys(PATIENT_REQUIRED)
    study: dict[str, Any] = dict.fromkeys(STUDY_REQUIRED)
    series: dict[str, Any] = dict.fromkeys(SERIES_REQUIRED)
    instance: dict[str, Any] = {}
    vrs: dict[str, str] = {}
    ascii_text = _charset_is_ascii_compatible(ds)
    for container in (ds.file_meta, ds):
        elements = container._dict
        for base_tag in list(elements):
            tag = int(base_tag)  # plain ints hash and compare in C; BaseTag.__eq__ is Python code
            if not tag & 0xFFFF:
                continue
            key = _key_for(tag)
            if tag in PIXEL_DATA_TAGS:
                instance[key] = None
                continue
            value, vr = _element_json(container, base_tag, tag, ascii_text)
            if key in NON_INSTANCE_KEYWORDS:
                if key in PATIENT_KEYWORDS:
                    patient[key] = value
                elif key in STUDY_KEYWORDS:
                    study[key] = value
                else:
                    series[key] = value
            else:
                instance[key] = value
                if _vr_is_not_implied(tag):
                    vrs[key] = vr
    study_uid = _required_uid(study["StudyInstanceUID"], "StudyInstanceUID")
    series_uid = _required_uid(series["SeriesInstanceUID"], "SeriesInstanceUID")
    sop_uid = _required_uid(instance.get("SOPInstanceUID"), "SOPInstanceUID")
    return ParsedInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient=patient,
        study=study,
        series=series,
        instance=instance,
        vrs=vrs,
        frames=_image_frames(ds, instance, sop_uid),
        size=len(data),
    )


def _element_json(container: Dataset, base_tag: Any, tag: int, ascii_text: bool) -> tuple[Any, str]:
    """The JSON value and VR of one element: decoded directly when simple, else through pydicom."""
    raw = container._dict[base_tag]
    if isinstance(raw, RawDataElement):
        vr = raw.VR if raw.VR is not None else _dictionary_vr(tag)
        if vr is not None and vr in FAST_VRS and raw.value is not None:
            value = _fast_json_value(raw, vr, tag, ascii_text)
            if value is not NOT_HANDLED:
                return value, vr
    elem = container[base_tag]
    return _json_value(elem), elem.VR


def _charset_is_ascii_compatible(ds: Dataset) -> bool:
    """True when ASCII bytes of a text value decode to the same ASCII text (no ISO 2022, no JIS X 0201)."""
    elements: dict[int, Any] = ds._dict  # type: ignore[assignment]  # BaseTag is an int
    raw = elements.get(SPECIFIC_CHARACTER_SET_TAG)
    if raw is None:
        return True
    value = raw.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").split("\\")
    terms = [value] if isinstance(value, str) else list(value or [])
    return all(term.strip(" \x00") in ASCII_COMPATIBLE_CHARSETS for term in terms)


def _fast_json_value(raw: RawDataElement, vr: str, tag: int, ascii_text: bool) -> Any:
    """The JSON value of a raw element decoded without pydicom, or NOT_HANDLED for the uncommon cases.

    Gives the same result as ``_json_value(ds[tag])`` (a test compares both on every pydicom test file).

    :param raw: the element as read, with a value
    :param vr: its explicit VR, or the dictionary VR for implicit VR files (never ambiguous: not in FAST_VRS)
    :param tag: its tag
    :param ascii_text: whether ASCII bytes mean ASCII text in this dataset's character set
    """
    value = raw.value or b""
    if vr in STRUCT_FORMATS:
        size = STRUCT_SIZES[vr]
        count, remainder = divmod(len(value), size)
        if remainder:
            return NOT_HANDLED
        if count == 0:
            return None
        prefix = "<" if raw.is_little_endian else ">"
        numbers = struct.unpack(f"{prefix}{count}{STRUCT_FORMATS[vr]}", value)
        if vr in FLOAT_VRS:
            numbers = tuple(n if math.isfinite(n) else None for n in numbers)
        return list(numbers) if count > 1 or _always_list(tag) else numbers[0]
    if not value.isascii() or b"\x1b" in value or (vr in CHARSET_VRS and not ascii_text):
        return NOT_HANDLED
    text = value.decode("ascii")
    if vr in SINGLE_VALUE_TEXT_VRS:
        text = text.rstrip(" \x00")
        return text or None
    if not text.strip(" \x00"):
        return None
    items = [item.strip(" \x00") for item in text.split("\\")]
    return items if len(items) > 1 or _always_list(tag) else items[0]


def _required_uid(value: Any, keyword: str) -> str:
    if value is None or value == "":
        raise DicomParseError(f"DICOM attribute {keyword} does not exist")
    if not isinstance(value, str) or not UID_PATTERN.fullmatch(value):
        raise DicomParseError(f"DICOM attribute {keyword} is not a valid UID")
    return value


@lru_cache(maxsize=4096)
def _key_for(tag: int) -> str:
    """The document key: the keyword for a standard attribute, else 8 upper-case hex digits."""
    if tag in DicomDictionary:
        return keyword_for_tag(tag) or f"{tag:08X}"
    return f"{tag:08X}"


@lru_cache(maxsize=4096)
def _always_list(tag: int) -> bool:
    """True when the dictionary VM of a standard attribute allows more than one value."""
    if tag not in DicomDictionary:
        return False
    return dictionary_VM(tag) != "1"


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    return dictionary_VR(tag) if tag in DicomDictionary else None


@lru_cache(maxsize=4096)
def _vr_is_not_implied(tag: int) -> bool:
    """True for private/unknown tags and for attributes whose dictionary VR is ambiguous."""
    if tag not in DicomDictionary:
        return True
    return " or " in dictionary_VR(tag)


def _json_value(elem: DataElement) -> Any:
    """The JSON value of one element, following the rules in the module docstring."""
    vr = elem.VR
    value = elem.value
    if vr == "SQ":
        return [_dataset_json(item) for item in value]
    if value is None:
        return None
    if vr in BINARY_VRS and isinstance(value, bytes | bytearray):
        if len(value) > MAX_BINARY_VALUE_BYTES:
            return None
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, MultiValue | list | tuple):
        if not value:
            return None
        return [_scalar(vr, v) for v in value]
    if value == "":
        return None
    scalar = _scalar(vr, value)
    return [scalar] if _always_list(int(elem.tag)) else scalar


def _scalar(vr: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) or vr in TEXT_LIKE_VRS:  # IS and DS keep the text they were read from
        text = str(value)
        return text.rstrip(" \x00") if vr in SINGLE_VALUE_TEXT_VRS else text.strip(" \x00")
    if vr == "AT":
        return f"{int(value):08X}"
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _dataset_json(item: Dataset) -> dict[str, Any]:
    """A sequence item as a JSON object (group lengths left out)."""
    return {_key_for(int(elem.tag)): _json_value(elem) for elem in item if elem.tag.element != 0}


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _image_frames(ds: Dataset, instance: dict[str, Any], sop_uid: str) -> list[dict[str, Any]]:
    """ImageFrames entries computed from the raw (possibly compressed) pixel bytes.

    :param ds: the dataset
    :param instance: its instance-level JSON attributes (already converted)
    :param sop_uid: the SOP Instance UID, part of every frame ID
    """
    elements: dict[int, Any] = ds._dict  # type: ignore[assignment]  # BaseTag is an int
    pixel_tag = next((tag for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) if tag in elements), None)
    if pixel_tag is None:
        return []
    pixel_elem = elements[pixel_tag]
    pixels = pixel_elem.value
    if not isinstance(pixels, bytes | bytearray) or not pixels:
        return []
    number_of_frames = max(_int_or(instance.get("NumberOfFrames"), 1), 1)
    undefined_length = (
        pixel_elem.length == UNDEFINED_LENGTH
        if isinstance(pixel_elem, RawDataElement)
        else pixel_elem.is_undefined_length
    )
    if undefined_length:  # encapsulated (compressed) pixel data
        try:
            frames: list[bytes | bytearray] = list(
                generate_frames(bytes(pixels), number_of_frames=number_of_frames)
            )
        except Exception as exc:
            raise DicomParseError(f"DICOM encapsulated PixelData is corrupt: {_describe(exc)}") from exc
    else:
        frame_length = len(pixels) // number_of_frames
        if frame_length == 0:
            raise DicomParseError("DICOM PixelData is shorter than NumberOfFrames")
        frames = [pixels[i * frame_length : (i + 1) * frame_length] for i in range(number_of_frames)]
    rows = _int_or(instance.get("Rows"), 0)
    columns = _int_or(instance.get("Columns"), 0)
    samples = _int_or(instance.get("SamplesPerPixel"), 1)
    bits = _int_or(instance.get("BitsAllocated"), 0)
    decoded_size = (rows * columns * samples * bits + 7) // 8
    minimum = instance.get("SmallestImagePixelValue")
    maximum = instance.get("LargestImagePixelValue")
    entries: list[dict[str, Any]] = []
    for index, frame in enumerate(frames):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(sop_uid.encode("ascii"))
        digest.update(index.to_bytes(4, "big"))
        digest.update(frame)
        entry: dict[str, Any] = {
            "ID": digest.hexdigest(),
            "PixelDataChecksumFromBaseToFullResolution": [
                {"Width": columns, "Height": rows, "Checksum": zlib.crc32(frame)}
            ],
        }
        if type(minimum) is int and type(maximum) is int:
            entry["MinPixelValue"] = int(minimum)
            entry["MaxPixelValue"] = int(maximum)
        entry["FrameSizeInBytes"] = decoded_size or len(frame)
        entries.append(entry)
    return entries
