"""Optional SigV4 verification for both services of the endpoint (``--verify-signatures``).

The signature of each request is recomputed with botocore's own signer (``SigV4Auth`` for HealthImaging,
``S3SigV4Auth``/``S3SigV4QueryAuth`` for S3; SQS and EventBridge like HealthImaging) over a request rebuilt from the signed headers, the request's
``X-Amz-Date`` and its payload hash, and compared in constant time. Failures are answered the way each service
does: HealthImaging, SQS and EventBridge as a JSON error with ``x-amzn-ErrorType``, S3 as an XML ``<Error>``. Secrets are never logged.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from botocore.auth import HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

from healthimaging_local.model import SERVICE_NAME, ApiError, encode_error
from healthimaging_local.s3 import encode_s3_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

ACCESS_KEYS_ENV = "HEALTHIMAGING_LOCAL_ACCESS_KEYS"
MAX_SKEW = datetime.timedelta(minutes=15)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_AUTH_HEADER = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*$"
)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)

StartResponse = Any


@dataclass(frozen=True)
class AuthFailure(Exception):
    """A rejected request, with the code and message each service answers.

    :param code: the HealthImaging error code (``x-amzn-ErrorType``).
    :param message: the HealthImaging message.
    :param s3_code: the S3 ``<Code>``.
    :param s3_message: the S3 ``<Message>``.
    :param status: HTTP status for HealthImaging.
    :param s3_status: HTTP status for S3.
    """

    code: str
    message: str
    s3_code: str
    s3_message: str
    status: int = 403
    s3_status: int = 403


def _missing() -> AuthFailure:
    return AuthFailure(
        "MissingAuthenticationTokenException", "Missing Authentication Token", "AccessDenied", "Access Denied"
    )


def _incomplete(detail: str) -> AuthFailure:
    return AuthFailure(
        "IncompleteSignatureException", detail, "AuthorizationHeaderMalformed", detail, 403, 400
    )


def _unknown_key() -> AuthFailure:
    return AuthFailure(
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
        "InvalidAccessKeyId",
        "The AWS Access Key Id you provided does not exist in our records.",
    )


def _mismatch() -> AuthFailure:
    return AuthFailure(
        "InvalidSignatureException",
        _SIGNATURE_MISMATCH,
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    )


def parse_access_keys(entries: Iterable[str]) -> dict[str, str]:
    """Parse ``AKID:SECRET`` entries (each may also be a comma-separated list, as in the environment variable).

    :param entries: the entries.
    :raises ValueError: on an entry without both parts.
    """
    keys: dict[str, str] = {}
    for entry in entries:
        for item in filter(None, (part.strip() for part in entry.split(","))):
            access_key, sep, secret = item.partition(":")
            if not sep or not access_key or not secret:
                raise ValueError("access keys must be given as AKID:SECRET")
            keys[access_key] = secret
    return keys


def access_keys_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Access keys from ``HEALTHIMAGING_LOCAL_ACCESS_KEYS`` (``AKID:SECRET[,AKID2:SECRET2...]``).

    :param environ: the environment to read.
    """
    value = environ.get(ACCESS_KEYS_ENV, "")
    return parse_access_keys([value]) if value else {}


@dataclass(frozen=True)
class _Signed:
    """What a request claims about its signature."""

    access_key: str
    date: str
    region: str
    signed_headers: list[str]
    signature: str
    timestamp: datetime.datetime
    presigned: bool
    expires: int


def _parse_timestamp(text: str) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(text, SIGV4_TIMESTAMP).replace(tzinfo=datetime.UTC)
    except ValueError:
        pass
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise _incomplete(f"Date must be in ISO-8601 'basic format'. Got '{text[:32]}'.") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _scope(credential: str) -> tuple[str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts):
        raise _incomplete("Credential must have the form AKID/yyyymmdd/region/service/aws4_request.")
    return parts[0], parts[1], parts[2]


def _claims(environ: Mapping[str, Any], query: list[tuple[str, str]]) -> _Signed:
    header = environ.get("HTTP_AUTHORIZATION")
    params = dict(query)
    if header is not None:
        found = _AUTH_HEADER.match(header)
        if not found:
            raise _incomplete(
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters."
            )
        access_key, scope_date, region = _scope(found["credential"])
        date_text = environ.get("HTTP_X_AMZ_DATE") or environ.get("HTTP_DATE")
        if not date_text:
            raise _incomplete(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
            )
        return _Signed(
            access_key,
            scope_date,
            region,
            found["signed"].split(";"),
            found["signature"].lower(),
            _parse_timestamp(date_text),
            presigned=False,
            expires=0,
        )
    if "X-Amz-Signature" in params or "X-Amz-Credential" in params:
        needed = (
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
        )
        if any(not params.get(name) for name in needed) or params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
            raise _incomplete(f"Query-string authentication requires the parameters {', '.join(needed)}.")
        access_key, scope_date, region = _scope(params["X-Amz-Credential"])
        expires_text = params.get("X-Amz-Expires", str(MAX_PRESIGN_EXPIRES))
        if not expires_text.isdigit() or int(expires_text) > MAX_PRESIGN_EXPIRES:
            raise _incomplete("X-Amz-Expires must be a number of seconds up to 604800.")
        return _Signed(
            access_key,
            scope_date,
            region,
            params["X-Amz-SignedHeaders"].split(";"),
            params["X-Amz-Signature"].lower(),
            _parse_timestamp(params["X-Amz-Date"]),
            presigned=True,
            expires=int(expires_text),
        )
    raise _missing()


def _check_time(claims: _Signed, now: datetime.datetime) -> None:
    stamp = claims.timestamp.strftime(SIGV4_TIMESTAMP)
    if claims.presigned:
        if now > claims.timestamp + datetime.timedelta(seconds=claims.expires):
            raise AuthFailure(
                "InvalidSignatureException", "Signature expired", "AccessDenied", "Request has expired"
            )
        if claims.timestamp - now > MAX_SKEW:
            raise AuthFailure(
                "InvalidSignatureException",
                "Signature not yet current",
                "AccessDenied",
                "Request is not yet valid",
            )
        return
    if abs(now - claims.timestamp) > MAX_SKEW:
        bound = (now - MAX_SKEW if claims.timestamp < now else now + MAX_SKEW).strftime(SIGV4_TIMESTAMP)
        relation, sign = ("earlier", "-") if claims.timestamp < now else ("later", "+")
        raise AuthFailure(
            "InvalidSignatureException",
            f"Signature expired: {stamp} is now {relation} than {bound} "
            f"({now.strftime(SIGV4_TIMESTAMP)} {sign} 15 min.)",
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )


def _spool_body(environ: dict[str, Any], limit: int | None) -> str | None:
    """Buffer the body (spilling to disk) so it can be hashed and still be read by the app.

    :param environ: the WSGI environ (its ``wsgi.input`` and ``CONTENT_LENGTH`` are replaced).
    :param limit: the most bytes read; beyond it the app refuses the body itself.
    :return: the body's hex SHA-256, or None when the app refuses the body unread (bad or oversized length).
    """
    stream = environ["wsgi.input"]
    length_text = environ.get("CONTENT_LENGTH") or ""
    remaining: int | None
    if length_text:
        if not length_text.isdigit() or (limit is not None and int(length_text) > limit):
            return None
        remaining = int(length_text)
    elif environ.get("wsgi.input_terminated"):
        remaining = None
    else:
        remaining = 0
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    digest = hashlib.sha256()
    size = 0
    while remaining is None or remaining > 0:
        chunk = stream.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
        if not chunk:
            break
        spool.write(chunk)
        digest.update(chunk)
        size += len(chunk)
        if remaining is not None:
            remaining -= len(chunk)
        if limit is not None and size > limit:
            break
    spool.seek(0)
    environ["wsgi.input"] = spool
    environ["CONTENT_LENGTH"] = str(size)
    return digest.hexdigest()


def expected_signature(
    environ: Mapping[str, Any],
    service: str,
    path: str,
    query: list[tuple[str, str]],
    claims: _Signed,
    secret: str,
    payload_hash: str,
) -> str:
    """Recompute a request's SigV4 signature with botocore's signer.

    :param environ: the WSGI environ (signed header values).
    :param service: the service the request is answered by (``medical-imaging`` or ``s3``).
    :param path: the raw (percent-encoded) request path.
    :param query: the decoded query parameters (without ``X-Amz-Signature``).
    :param claims: the parsed signature claims.
    :param secret: the secret key of the claimed access key.
    :param payload_hash: the hex SHA-256 of the body as received.
    """
    headers: dict[str, str] = {}
    for name in claims.signed_headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        headers[name] = str(environ.get(key, ""))
    scheme = environ.get("wsgi.url_scheme", "http")
    request = AWSRequest(
        method=environ.get("REQUEST_METHOD", "GET"),
        url=f"{scheme}://{headers.get('host', 'localhost')}{path}",
        headers=headers,
    )
    request.params = query  # type: ignore[assignment]
    request.context["timestamp"] = claims.timestamp.strftime(SIGV4_TIMESTAMP)
    signer_class: type[SigV4Auth]
    if claims.presigned:
        signer_class = S3SigV4QueryAuth if service == "s3" else SigV4QueryAuth
    else:
        signer_class = S3SigV4Auth if service == "s3" else SigV4Auth
    signer = signer_class(Credentials("", secret), service, claims.region)
    canonical = signer.canonical_request(request)
    if "x-amz-content-sha256" not in claims.signed_headers and not (claims.presigned and service == "s3"):
        # botocore hashes the body it holds; the rebuilt request has none, so put the real body's hash in.
        canonical = canonical.rsplit("\n", 1)[0] + "\n" + payload_hash
    return str(signer.signature(signer.string_to_sign(request, canonical), request))


class SignatureVerifier:
    """Checks SigV4 on every request before it reaches the HealthImaging or S3 app.

    :param access_keys: access key id to secret key.
    :param max_body_bytes: largest HealthImaging body read for hashing (larger ones are refused by the app).
    :param clock: the current UTC time (for tests).
    """

    def __init__(
        self,
        access_keys: Mapping[str, str],
        max_body_bytes: int,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        if not access_keys:
            raise ValueError("verifying signatures needs at least one access key (AKID:SECRET)")
        self.access_keys = dict(access_keys)
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse, app: Any, service: str, path: str
    ) -> Iterable[bytes]:
        """Answer the request with ``app`` if its signature verifies, else with the service's auth error.

        :param environ: the WSGI environ.
        :param start_response: the WSGI start_response.
        :param app: the WSGI app of the service.
        :param service: ``medical-imaging``, ``s3``, ``sqs`` or ``events``.
        :param path: the raw request path.
        """
        try:
            self.verify(environ, service, path)
        except AuthFailure as failure:
            log.info(
                "Rejected %s request: %s",
                service,
                failure.s3_code if service == "s3" else failure.code,
            )
            _drain(environ)
            return _error_response(failure, service, start_response)
        result: Iterable[bytes] = app(environ, start_response)
        return result

    def verify(self, environ: dict[str, Any], service: str, path: str) -> None:
        """Raise :class:`AuthFailure` unless the request carries a valid signature of a known key.

        :param environ: the WSGI environ (the body is buffered so the app can still read it).
        :param service: the service answering the request.
        :param path: the raw request path.
        """
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if service == "s3" and "HTTP_AUTHORIZATION" not in environ and "AWSAccessKeyId" in dict(query):
            self._verify_presigned_v2(environ, path, dict(query))
            return
        claims = _claims(environ, query)
        secret = self.access_keys.get(claims.access_key)
        if secret is None:
            raise _unknown_key()
        if claims.date != claims.timestamp.strftime("%Y%m%d"):
            raise _mismatch()
        _check_time(claims, self.clock())
        declared = environ.get("HTTP_X_AMZ_CONTENT_SHA256")
        body_hash = _spool_body(environ, self.max_body_bytes if service == SERVICE_NAME else None)
        if body_hash is None and service == SERVICE_NAME:
            return  # the app refuses this body (bad or oversized Content-Length) before acting on it
        if body_hash is None:
            raise AuthFailure(
                "InvalidArgument", "Bad Content-Length", "InvalidArgument", "Bad Content-Length", 400, 400
            )
        unsigned = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        computed = expected_signature(environ, service, path, unsigned, claims, secret, body_hash)
        if not hmac.compare_digest(computed, claims.signature):
            raise _mismatch()
        if declared and _SHA256_HEX.match(declared) and not hmac.compare_digest(declared, body_hash):
            raise AuthFailure(
                "InvalidSignatureException",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
                400,
                400,
            )

    def _verify_presigned_v2(self, environ: Mapping[str, Any], path: str, params: Mapping[str, str]) -> None:
        """Check an S3 URL presigned with signature version 2 (boto3's default for ``generate_presigned_url``).

        :param environ: the WSGI environ.
        :param path: the raw request path.
        :param params: the decoded query parameters.
        """
        secret = self.access_keys.get(params["AWSAccessKeyId"])
        if secret is None:
            raise _unknown_key()
        expires = params.get("Expires", "")
        if not expires.isdigit() or not params.get("Signature"):
            raise _incomplete("Query-string authentication requires the Signature and Expires parameters.")
        if int(expires) < self.clock().timestamp():
            raise AuthFailure(
                "InvalidSignatureException", "Signature expired", "AccessDenied", "Request has expired"
            )
        headers = HTTPHeaders()
        for key, value in environ.items():
            if key.startswith("HTTP_X_AMZ_"):
                headers[key[5:].lower().replace("_", "-")] = str(value)
        for key, name in (("CONTENT_TYPE", "content-type"), ("HTTP_CONTENT_MD5", "content-md5")):
            if environ.get(key):
                headers[name] = str(environ[key])
        signer = HmacV1QueryAuth(Credentials(params["AWSAccessKeyId"], secret))
        signer._get_date = lambda: expires  # type: ignore[method-assign]  # sign with the URL's Expires
        split = urlsplit(f"http://host{path}?{environ.get('QUERY_STRING', '')}")
        computed = signer.get_signature(environ.get("REQUEST_METHOD", "GET"), split, headers)
        if not hmac.compare_digest(str(computed), params["Signature"]):
            raise _mismatch()


def _drain(environ: dict[str, Any], limit: int = 1024 * 1024) -> None:
    """Read an unread body (up to ``limit``) so a keep-alive connection stays in sync."""
    length_text = environ.get("CONTENT_LENGTH") or ""
    if length_text.isdigit() and 0 < int(length_text) <= limit:
        environ["wsgi.input"].read(int(length_text))


def _error_response(failure: AuthFailure, service: str, start_response: StartResponse) -> list[bytes]:
    if service != "s3":  # HealthImaging, SQS (JSON protocol) and EventBridge read JSON errors
        error = ApiError(failure.message)
        error.code, error.status = failure.code, failure.status
        status, headers, body = encode_error(error, str(uuid.uuid4()))
    else:
        status, headers, body = encode_s3_error(failure.s3_status, failure.s3_code, failure.s3_message)
    start_response(f"{status} {'Bad Request' if status == 400 else 'Forbidden'}", headers)
    return [body]
