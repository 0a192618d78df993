"""The HealthImaging wire format: routes, input validation, output serialization and error encoding.

Everything here is derived from botocore's ``medical-imaging`` service model, the single authority on shapes.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import botocore.session

if TYPE_CHECKING:
    from collections.abc import Mapping

    from botocore.model import OperationModel, ServiceModel, Shape

SERVICE_NAME = "medical-imaging"
REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
JSON_CONTENT_TYPE = "application/json"


class ApiError(Exception):
    """An error answered to the client as a modelled AWS error.

    :param message: the human readable message (never carries PHI).
    """

    code = "InternalServerException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationException(ApiError):
    """Invalid input (400)."""

    code, status = "ValidationException", 400


class AccessDeniedException(ApiError):
    """Caller not allowed (403)."""

    code, status = "AccessDeniedException", 403


class ResourceNotFoundException(ApiError):
    """Unknown data store, job or image set (404)."""

    code, status = "ResourceNotFoundException", 404


class ConflictException(ApiError):
    """Resource in the wrong state, or client token reused with other parameters (409)."""

    code, status = "ConflictException", 409


class ThrottlingException(ApiError):
    """Request rate exceeded (429)."""

    code, status = "ThrottlingException", 429


class ServiceQuotaExceededException(ApiError):
    """A quota was exceeded at request time (402, as modelled)."""

    code, status = "ServiceQuotaExceededException", 402


class InternalServerException(ApiError):
    """Unexpected server fault (500)."""

    code, status = "InternalServerException", 500


class UnknownOperationException(ApiError):
    """No operation matches method and path (404; not modelled, the generic AWS answer)."""

    code, status = "UnknownOperationException", 404


class NotImplementedOperationException(ApiError):
    """A modelled operation this emulator does not offer (501)."""

    code, status = "NotImplementedException", 501


def encode_error(error: ApiError, request_id: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """Encode an error the way botocore's rest-json parser reads it.

    :param error: the error to send.
    :param request_id: the request id echoed in ``x-amzn-RequestId``.
    :return: HTTP status, headers and body.
    """
    body = json.dumps({"message": error.message, "__type": error.code}).encode()
    headers = [
        ("Content-Type", JSON_CONTENT_TYPE),
        ("x-amzn-ErrorType", error.code),
        ("x-amzn-RequestId", request_id),
        ("Content-Length", str(len(body))),
    ]
    return error.status, headers, body


@functools.cache
def service_model() -> ServiceModel:
    """The botocore service model of HealthImaging (loaded once)."""
    return botocore.session.get_session().get_service_model(SERVICE_NAME)


def _translate_pattern(pattern: str) -> re.Pattern[str]:
    """Translate a model (Java) regular expression to a Python one that must match the whole value."""
    translated = pattern.replace(r"\p{ASCII}", r"[\x00-\x7f]")
    return re.compile(translated, re.ASCII | re.DOTALL)


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return _translate_pattern(pattern)


# ---------------------------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """One operation's HTTP binding."""

    name: str
    method: str
    regex: re.Pattern[str]


@functools.cache
def routes() -> tuple[Route, ...]:
    """Every operation of the model as a route, most specific first."""
    result = []
    for name in service_model().operation_names:
        http = service_model().operation_model(name).http
        path = http["requestUri"].split("?", 1)[0]
        regex = "".join(
            f"(?P<{part[1:-1].rstrip('+')}>[^/]+)" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{[^}]+\})", path)
        )
        result.append(Route(name, http["method"], re.compile(f"^{regex}/?$")))
    return tuple(result)


def match_route(method: str, path: str) -> tuple[OperationModel, dict[str, str]]:
    """Find the operation for a request.

    :param method: HTTP method.
    :param path: the raw (still percent-encoded) path.
    :return: the operation model and its decoded path parameters.
    :raises UnknownOperationException: when no route matches method and path.
    """
    for route in routes():
        found = route.regex.match(path)
        if found and route.method == method:
            params = {k: unquote(v, errors="strict") for k, v in found.groupdict().items()}
            return service_model().operation_model(route.name), params
    raise UnknownOperationException(f"No operation matches {method} on this path")


@functools.cache
def _unambiguous_first_segments() -> frozenset[str]:
    """First path segments of HealthImaging routes that no S3 bucket can have (bucket names are lower case)."""
    firsts = {
        service_model().operation_model(name).http["requestUri"].lstrip("/").split("/", 1)[0]
        for name in service_model().operation_names
    }
    return frozenset(first for first in firsts if first != first.lower())


def is_service_path(path: str) -> bool:
    """True if the path belongs to a HealthImaging route (any method).

    A path under ``/startDICOMImportJob/``, ``/getDICOMImportJob/`` or ``/listDICOMImportJobs/`` belongs to
    HealthImaging even when malformed (say, an empty id): it cannot name an S3 bucket, and its caller should get
    HealthImaging's error, not S3's ``NoSuchBucket``.

    :param path: the raw request path.
    """
    if any(route.regex.match(path) for route in routes()):
        return True
    return path.lstrip("/").split("/", 1)[0] in _unambiguous_first_segments()


# ---------------------------------------------------------------------------------------------- input


def _describe(value: Any, sensitive: bool) -> str:
    if sensitive:
        return "***"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 256 else text[:256] + "..."


class _Validator:
    """Collects every constraint violation of one request, AWS style."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, value: Any, where: str, constraint: str, sensitive: bool) -> None:
        self.errors.append(
            f"Value '{_describe(value, sensitive)}' at '{where}' failed to satisfy constraint: {constraint}"
        )

    def check(self, shape: Shape, value: Any, where: str, sensitive: bool = False) -> Any:
        """Validate ``value`` against ``shape`` and return it normalised (timestamps as epoch floats)."""
        sensitive = sensitive or bool(shape.serialization.get("sensitive") or shape.metadata.get("sensitive"))
        kind = shape.type_name
        meta = shape.metadata
        if kind == "structure":
            return self._structure(shape, value, where, sensitive)
        if kind == "list":
            if not isinstance(value, list):
                self.fail(value, where, "Member must be a list", sensitive)
                return value
            self._size(len(value), meta, value, where, "length", sensitive)
            member = shape.member  # type: ignore[attr-defined]
            return [
                self.check(member, item, f"{where}.{i + 1}.member", sensitive) for i, item in enumerate(value)
            ]
        if kind == "map":
            if not isinstance(value, dict):
                self.fail(value, where, "Member must be a map", sensitive)
                return value
            self._size(len(value), meta, value, where, "length", sensitive)
            return {
                self.check(shape.key, k, f"{where}.key", sensitive): self.check(  # type: ignore[attr-defined]
                    shape.value,  # type: ignore[attr-defined]
                    v,
                    f"{where}.{k}",
                    sensitive,
                )
                for k, v in value.items()
            }
        if kind == "string":
            if not isinstance(value, str):
                self.fail(value, where, "Member must be a string", sensitive)
                return value
            self._size(len(value), meta, value, where, "length", sensitive)
            if "pattern" in meta and not _compiled(meta["pattern"]).fullmatch(value):
                self.fail(
                    value,
                    where,
                    f"Member must satisfy regular expression pattern: {meta['pattern']}",
                    sensitive,
                )
            if shape.enum and value not in shape.enum:
                self.fail(
                    value, where, f"Member must satisfy enum value set: [{', '.join(shape.enum)}]", sensitive
                )
            return value
        if kind in ("integer", "long"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(value, where, "Member must be an integer", sensitive)
                return value
            self._size(value, meta, value, where, "value", sensitive)
            return value
        if kind == "boolean":
            if not isinstance(value, bool):
                self.fail(value, where, "Member must be a boolean", sensitive)
            return value
        if kind == "timestamp":
            return self._timestamp(value, where, sensitive)
        if kind in ("double", "float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.fail(value, where, "Member must be a number", sensitive)
            return value
        return value

    def _size(
        self, size: int, meta: Mapping[str, Any], value: Any, where: str, what: str, sens: bool
    ) -> None:
        if "min" in meta and size < meta["min"]:
            self.fail(value, where, f"Member must have {what} greater than or equal to {meta['min']}", sens)
        if "max" in meta and size > meta["max"]:
            self.fail(value, where, f"Member must have {what} less than or equal to {meta['max']}", sens)

    def _timestamp(self, value: Any, where: str, sensitive: bool) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                pass
            else:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=datetime.UTC)
                return parsed.timestamp()
        self.fail(value, where, "Member must be a timestamp (epoch seconds)", sensitive)
        return value

    def _structure(self, shape: Shape, value: Any, where: str, sensitive: bool) -> Any:
        if not isinstance(value, dict):
            self.fail(value, where, "Member must be a structure", sensitive)
            return value
        members = shape.members  # type: ignore[attr-defined]
        present = {k: v for k, v in value.items() if v is not None and k in members}
        prefix = f"{where}." if where else ""
        for name in shape.required_members:  # type: ignore[attr-defined]
            if name not in present:
                self.errors.append(
                    f"Value null at '{prefix}{name}' failed to satisfy constraint: Member must not be null"
                )
        if shape.metadata.get("union") and len(present) != 1:
            self.errors.append(
                f"Value at '{where or 'input'}' failed to satisfy constraint: "
                f"Member must have exactly one of: {', '.join(members)}"
            )
        return {k: self.check(members[k], v, f"{prefix}{k}", sensitive) for k, v in present.items()}


def _query_value(shape: Shape, raw: str, where: str) -> Any:
    if shape.type_name in ("integer", "long"):
        if not re.fullmatch(r"-?[0-9]{1,18}", raw):
            raise ValidationException(
                f"1 validation error detected: Value '{_describe(raw, False)}' at '{where}' "
                "failed to satisfy constraint: Member must be an integer"
            )
        return int(raw)
    if shape.type_name == "boolean":
        return raw.lower() == "true"
    return raw


def parse_request(
    operation: OperationModel,
    path_params: Mapping[str, str],
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: Any,
) -> dict[str, Any]:
    """Build and validate the input parameters of an operation from the request parts.

    :param operation: the matched operation.
    :param path_params: decoded path parameters by location name.
    :param query: query parameters (first value of each name).
    :param headers: request headers (case-insensitive mapping).
    :param body: the decoded JSON body (``None`` when the body was empty).
    :return: the input as botocore member names to values.
    :raises ValidationException: listing every violated constraint.
    """
    shape = operation.input_shape
    if shape is None:
        return {}
    members = shape.members
    raw: dict[str, Any] = {}
    payload_name = shape.serialization.get("payload")
    for name, member in members.items():
        location = member.serialization.get("location")
        key = member.serialization.get("name", name)
        if location == "uri" and key in path_params:
            raw[name] = path_params[key]
        elif location == "querystring" and key in query:
            raw[name] = _query_value(member, query[key], name)
        elif location == "header" and key in headers:
            raw[name] = _query_value(member, headers[key], name)
    if body is not None and not isinstance(body, dict):
        raise ValidationException("Request body must be a JSON object")
    if payload_name:
        payload_shape = members[payload_name]
        if payload_shape.type_name == "structure" and body is not None:
            # Clients generated from OpenAPI wrap the payload in its member name.
            if set(body) == {payload_name} and payload_name not in payload_shape.members:
                body = body[payload_name]
            raw[payload_name] = body if body is not None else None
    elif body:
        for name, member in members.items():
            if "location" not in member.serialization and name in body:
                raw[name] = body[name]
    validator = _Validator()
    result = validator.check(shape, raw, "")
    if validator.errors:
        count = len(validator.errors)
        noun = "error" if count == 1 else "errors"
        raise ValidationException(f"{count} validation {noun} detected: " + "; ".join(validator.errors))
    return dict(result)


def validation_error(where: str, constraint: str) -> ValidationException:
    """A single-field ValidationException in the AWS wording (for semantic checks outside the model).

    :param where: the member path.
    :param constraint: what the member must satisfy.
    """
    return ValidationException(
        f"1 validation error detected: Value at '{where}' failed to satisfy constraint: {constraint}"
    )


# ---------------------------------------------------------------------------------------------- output


def _serialize(shape: Shape, value: Any) -> Any:
    kind = shape.type_name
    if kind == "structure":
        members = shape.members  # type: ignore[attr-defined]
        unknown = set(value) - set(members)
        if unknown:
            raise AssertionError(f"{shape.name} has no members {sorted(unknown)}")
        return {
            members[k].serialization.get("name", k): _serialize(members[k], v)
            for k, v in value.items()
            if v is not None
        }
    if kind == "list":
        return [_serialize(shape.member, item) for item in value]  # type: ignore[attr-defined]
    if kind == "map":
        return {k: _serialize(shape.value, v) for k, v in value.items()}  # type: ignore[attr-defined]
    if kind == "timestamp":
        return round(float(value), 3)
    if kind == "string" and not isinstance(value, str):
        return str(value)
    return value


def serialize_response(
    operation: OperationModel, output: Mapping[str, Any]
) -> tuple[list[tuple[str, str]], bytes]:
    """Serialize an operation's output dict (botocore member names) to headers and body.

    :param operation: the operation answered.
    :param output: output members; ``None`` values are omitted.
    :return: response headers and body bytes.
    """
    shape = operation.output_shape
    headers: list[tuple[str, str]] = []
    if shape is None:
        return [("Content-Type", JSON_CONTENT_TYPE)], b"{}"
    members = shape.members
    payload_name = shape.serialization.get("payload")
    body_members: dict[str, Any] = {}
    body: bytes | None = None
    for name, value in output.items():
        if name not in members:
            raise AssertionError(f"{shape.name} has no member {name}")
        if value is None:
            continue
        member = members[name]
        if member.serialization.get("location") == "header":
            headers.append((member.serialization.get("name", name), str(value)))
        elif name == payload_name:
            body = value if member.type_name == "blob" else json.dumps(_serialize(member, value)).encode()
        else:
            body_members[name] = value
    if body is None:
        body = json.dumps(_serialize(shape, body_members)).encode()
    if not any(h.lower() == "content-type" for h, _ in headers):
        headers.append(("Content-Type", JSON_CONTENT_TYPE))
    return headers, body


def sanitize_message(text: str) -> str:
    """Make a free-text message satisfy the model's ``Message`` shape (pattern and length).

    :param text: the message to send.
    """
    meta = service_model().shape_for("Message").metadata
    pattern = _compiled(meta["pattern"])
    cleaned = "".join(ch if pattern.fullmatch(ch) else " " for ch in text).strip() or "Unknown error"
    return cleaned[: meta.get("max", 2048)]


def datastore_arn(datastore_id: str) -> str:
    """The ARN of a data store.

    :param datastore_id: the data store id.
    """
    return f"arn:aws:medical-imaging:{REGION}:{ACCOUNT_ID}:datastore/{datastore_id}"


def image_set_arn(datastore_id: str, image_set_id: str) -> str:
    """The ARN of an image set.

    :param datastore_id: the data store id.
    :param image_set_id: the image set id.
    """
    return f"{datastore_arn(datastore_id)}/imageset/{image_set_id}"


def max_results_default() -> int:
    """Page size when the client sends no ``maxResults`` (undocumented upstream; the model maximum)."""
    return 50
