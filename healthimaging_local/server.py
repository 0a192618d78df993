"""The HTTP layer: one endpoint URL serving HealthImaging (our WSGI app) and S3, SQS and EventBridge (moto's).

A request goes to the service named in its SigV4 credential scope (``medical-imaging``, ``sqs``, ``events``, else
S3); an unsigned request goes to HealthImaging when its path is one of HealthImaging's, else to S3.

Bad client input never yields a 500: bodies over ``MAX_BODY_BYTES`` (1 MiB), invalid JSON, invalid UTF-8 and
non-JSON content types are 400 ValidationException; unknown routes and wrong methods are 404
UnknownOperationException; modelled operations outside the emulator's scope are 501 NotImplementedException.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import boto3
from botocore.config import Config
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.datastructures import EnvironHeaders
from werkzeug.serving import make_server

from healthimaging_local import fidelity, s3_listing
from healthimaging_local.auth import SignatureVerifier
from healthimaging_local.events import EventPublisher
from healthimaging_local.importer import Importer
from healthimaging_local.messaging import MessagingStorage, PersistentMessagingApp
from healthimaging_local.model import (
    REGION,
    SERVICE_NAME,
    ApiError,
    InternalServerException,
    NotImplementedOperationException,
    ThrottlingException,
    ValidationException,
    encode_error,
    is_service_path,
    match_route,
    parse_request,
    serialize_response,
)
from healthimaging_local.operations import Operations
from healthimaging_local.s3 import S3Storage, encode_s3_error
from healthimaging_local.store import Store
from healthimaging_local.throttling import RateLimiter, default_rate_limits
from healthimaging_local.wsgi import FailedBeforeAnswering, answer_of

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from botocore.client import BaseClient

    from healthimaging_local.throttling import RateLimit

log = logging.getLogger(__name__)
access_log = logging.getLogger("healthimaging_local.access")

MAX_BODY_BYTES = 1024 * 1024
ACCESS_KEY_ID = "test"
SECRET_ACCESS_KEY = "test"
_CREDENTIAL = re.compile(r"Credential=[^/,\s]+/[0-9]{8}/[^/,\s]+/([^/,\s]+)/aws4_request")

StartResponse = Any
WsgiApp = Any


def signed_service(environ: dict[str, Any]) -> str | None:
    """The service named in a request's SigV4 credential scope (header or presigned query), if any.

    :param environ: the WSGI environ.
    """
    found = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    if found:
        return found.group(1)
    query = parse_qs(environ.get("QUERY_STRING", ""))
    credential = (query.get("X-Amz-Credential") or [""])[0].split("/")
    return credential[3] if len(credential) == 5 else None


def raw_path(environ: dict[str, Any]) -> str:
    """The request path as sent (still percent-encoded).

    :param environ: the WSGI environ.
    """
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if uri:
        path = uri.split("?", 1)[0]
        return path if path.startswith("/") else "/" + path.split("/", 3)[-1]
    path_info: str = environ.get("PATH_INFO", "/")
    return path_info.encode("latin-1").decode("utf-8", "replace")


MESSAGING_SERVICES = ("sqs", "events")


def goes_to_healthimaging(environ: dict[str, Any]) -> bool:
    """Whether a request is HealthImaging's: signed for it, or unsigned on one of its paths.

    :param environ: the WSGI environ.
    """
    service = signed_service(environ)
    return service == SERVICE_NAME or (service is None and is_service_path(raw_path(environ)))


def service_for(environ: dict[str, Any]) -> str:
    """The service that answers a request: ``medical-imaging``, ``sqs``, ``events`` or ``s3``.

    :param environ: the WSGI environ.
    """
    if goes_to_healthimaging(environ):
        return SERVICE_NAME
    service = signed_service(environ)
    return service if service in MESSAGING_SERVICES else "s3"


class HealthImagingApp:
    """The WSGI application answering the HealthImaging operations.

    :param store: the persistence layer.
    :param operations: data store and image set handlers.
    :param importer: import job handlers.
    :param throttle_rate: fraction of requests answered with ThrottlingException (a fault, on top of the rates).
    :param seed: seed of the throttling dice (reproducible faults).
    :param limiter: the per-operation request rates (token buckets).
    """

    def __init__(
        self,
        store: Store,
        operations: Operations,
        importer: Importer,
        throttle_rate: float,
        seed: int | None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.store = store
        self.operations = operations
        self.limiter = limiter or RateLimiter({})
        self.throttle_rate = throttle_rate
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "CreateDatastore": operations.create_datastore,
            "GetDatastore": operations.get_datastore,
            "ListDatastores": operations.list_datastores,
            "DeleteDatastore": operations.delete_datastore,
            "StartDICOMImportJob": importer.start_job,
            "GetDICOMImportJob": importer.get_job,
            "ListDICOMImportJobs": importer.list_jobs,
            "SearchImageSets": operations.search_image_sets,
            "GetImageSet": operations.get_image_set,
            "GetImageSetMetadata": operations.get_image_set_metadata,
            "ListImageSetVersions": operations.list_image_set_versions,
            "DeleteImageSet": operations.delete_image_set,
        }

    def _throttled(self) -> bool:
        with self._random_lock:
            return self._random.random() < self.throttle_rate

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request_id = str(uuid.uuid4())
        try:
            status, headers, body = self._answer(environ)
        except ApiError as error:
            status, headers, body = encode_error(error, request_id)
        except Exception:
            log.exception("Unexpected error answering %s", environ.get("REQUEST_METHOD"))
            status, headers, body = encode_error(InternalServerException("Internal server error"), request_id)
        headers = [h for h in headers if h[0].lower() not in ("x-amzn-requestid", "content-length")]
        headers += [("x-amzn-RequestId", request_id), ("Content-Length", str(len(body)))]
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        return [body]

    def _answer(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        body = _read_body(environ)
        if self.throttle_rate and self._throttled():
            raise ThrottlingException("Rate exceeded")
        try:
            operation, path_params = match_route(environ.get("REQUEST_METHOD", "GET"), raw_path(environ))
        except UnicodeDecodeError as exc:
            raise ValidationException("The request path is not valid UTF-8") from exc
        handler = self.handlers.get(operation.name)
        if handler is None:
            raise NotImplementedOperationException(
                f"{operation.name} is not implemented by healthimaging-local"
            )
        # Every request of a limited operation takes a token before its input is looked at, replays of a client
        # token included: AWS documents per-operation request rates, nothing that exempts a replay (a guess).
        if not self.limiter.allow(operation.name):
            raise ThrottlingException("Rate exceeded")
        query = {
            k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()
        }
        params = parse_request(
            operation, path_params, query, dict(EnvironHeaders(environ).items()), _decode_json(environ, body)
        )
        self.operations.settle()
        headers, payload = serialize_response(operation, handler(params))
        return 200, headers, payload


_REASONS = {200: "OK", 400: "Bad Request", 402: "Payment Required", 403: "Forbidden", 404: "Not Found"}
_REASONS.update(
    {409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented"}
)


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    length_text = environ.get("CONTENT_LENGTH") or ""
    if length_text:
        if not length_text.isdigit():
            raise ValidationException("Invalid Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            while length > 0:  # drain so the connection stays usable
                chunk = stream.read(min(length, 1 << 20))
                if not chunk:
                    break
                length -= len(chunk)
            raise ValidationException(f"Request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        return stream.read(length) if length else b""
    if environ.get("wsgi.input_terminated"):
        data: bytes = stream.read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            raise ValidationException(f"Request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        return data
    return b""


def _decode_json(environ: dict[str, Any], body: bytes) -> Any:
    if not body.strip():
        return None
    content_type = environ.get("CONTENT_TYPE", "")
    if content_type and "json" not in content_type.lower():
        raise ValidationException("Unsupported Content-Type: the request body must be application/json")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValidationException("The request body is not valid UTF-8") from exc
    except ValueError as exc:
        raise ValidationException("Could not parse the request body as JSON") from exc


class PersistentS3App:
    """moto's S3 server app, persisting every successful mutating request.

    :param storage: the S3 persistence.
    """

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self.app = create_backend_app("s3")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        listing = s3_listing.answer(environ)
        if listing is not None:
            start_response(listing[0], listing[1])
            return [listing[2]]
        try:
            status, body = answer_of(self.app, environ, start_response)
        except FailedBeforeAnswering as failure:
            # moto raises on some malformed requests (e.g. a POST to a key without a form): answer 400, not 500.
            # The exception text is not logged: it may quote object keys, which can name patients.
            log.warning(
                "S3 emulation could not handle a %s request (%s)", environ.get("REQUEST_METHOD"), failure
            )
            code, headers, body = encode_s3_error(400, "InvalidRequest", "The request could not be handled")
            start_response(f"{code} Bad Request", headers)
            return [body]
        if status < 300:
            self.storage.sync_request(
                environ.get("REQUEST_METHOD", ""), environ.get("HTTP_HOST", ""), raw_path(environ)
            )
        return [body]


class Dispatcher:
    """Choose the answering app by the SigV4 service, else by path (regardless of Host); see :func:`service_for`.

    :param healthimaging: the HealthImaging app.
    :param s3: the S3 app.
    :param verifier: when given, every request must carry a valid SigV4 signature.
    :param messaging: the apps of ``sqs`` and ``events``, by service name.
    """

    def __init__(
        self,
        healthimaging: WsgiApp,
        s3: WsgiApp,
        verifier: SignatureVerifier | None = None,
        messaging: Mapping[str, WsgiApp] | None = None,
    ) -> None:
        self.apps: dict[str, WsgiApp] = {SERVICE_NAME: healthimaging, "s3": s3, **(messaging or {})}
        self.verifier = verifier

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        service = service_for(environ)
        if service not in self.apps:
            service = "s3"
        app = self.apps[service]
        if self.verifier is not None:
            return self.verifier(environ, start_response, app, service, raw_path(environ))
        result: Iterable[bytes] = app(environ, start_response)
        return result


class AccessLogHandler(MotoRequestHandler):
    """Request handler whose access log has method, path and status only (no query string, no body)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log one request without its query string.

        :param code: response status.
        :param size: response size.
        """
        path = getattr(self, "path", "").split("?", 1)[0]
        access_log.info("%s %s %s", getattr(self, "command", "-"), path, code)


class LocalEndpoint:
    """A running endpoint (context manager): HealthImaging, S3, SQS and EventBridge on one URL, served from a thread.

    Only one endpoint per process owns moto's (process-global) S3, SQS and EventBridge state: the first one
    started resets it and loads ``<state_dir>/s3`` and ``<state_dir>/messaging.json``; endpoints started while it
    runs share that state.

    :param state_dir: where SQLite, S3 and messaging state persist.
    :param host: address to bind.
    :param port: port to bind (0 picks a free one).
    :param import_seconds: minimum time an import job stays IN_PROGRESS.
    :param throttle_rate: fraction of HealthImaging requests answered 429 ThrottlingException (a fault).
    :param max_concurrent_imports: the service quota: SUBMITTED/IN_PROGRESS jobs per data store (402 beyond).
    :param seed: seed for fault injection.
    :param datastore_seconds: how long a new data store stays CREATING.
    :param delete_seconds: how long a deleted image set stays LOCKED/DELETING.
    :param verify_signatures: check SigV4 on every request (else any credentials are accepted).
    :param access_keys: access key id to secret key, when verifying signatures.
    :param rate_limits: request rates per operation (default: the documented StartDICOMImportJob and
        GetDICOMImportJob rates; ``{}`` switches rate limiting off).
    :param import_workers: threads that list, parse and commit import jobs (not a limit on jobs in flight).
    :param fail_jobs: fault injection: the first this many import jobs of each data store end FAILED.
    """

    _active = 0
    _active_lock = threading.Lock()
    SETTLE_INTERVAL = 0.25

    def __init__(
        self,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        import_seconds: float = 0.0,
        throttle_rate: float = 0.0,
        max_concurrent_imports: int = 100,
        seed: int | None = None,
        datastore_seconds: float = 0.0,
        delete_seconds: float = 0.5,
        verify_signatures: bool = False,
        access_keys: Mapping[str, str] | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        import_workers: int = 4,
        fail_jobs: int = 0,
    ) -> None:
        self.state_dir = state_dir
        self.access_key_id, self.secret_access_key = next(
            iter((access_keys or {ACCESS_KEY_ID: SECRET_ACCESS_KEY}).items())
        )
        verifier = SignatureVerifier(access_keys or {}, MAX_BODY_BYTES) if verify_signatures else None
        fidelity.install()
        s3_listing.install()
        self.store = Store(state_dir)
        self.s3 = S3Storage(state_dir / "s3")
        self.messaging = MessagingStorage(state_dir / "messaging.json")
        with LocalEndpoint._active_lock:
            self._owner = LocalEndpoint._active == 0
            if self._owner:
                self.s3.load()
                self.messaging.load()
            LocalEndpoint._active += 1
        events = EventPublisher()
        self.operations = Operations(self.store, datastore_seconds, delete_seconds, events)
        self.importer = Importer(
            self.store, self.s3, import_seconds, max_concurrent_imports, import_workers, events, fail_jobs
        )
        self.limiter = RateLimiter(default_rate_limits() if rate_limits is None else rate_limits)
        app = Dispatcher(
            HealthImagingApp(self.store, self.operations, self.importer, throttle_rate, seed, self.limiter),
            PersistentS3App(self.s3),
            verifier,
            {service: PersistentMessagingApp(service, self.messaging) for service in MESSAGING_SERVICES},
        )
        self._server = make_server(host, port, app, threaded=True, request_handler=AccessLogHandler)
        self._server.daemon_threads = True  # type: ignore[attr-defined]
        bound_host, bound_port = self._server.server_address[:2]
        if isinstance(bound_host, bytes):
            bound_host = bound_host.decode()
        self.url = f"http://{bound_host}:{bound_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="healthimaging-local", daemon=True
        )
        self._thread.start()
        self.importer.start()
        self._stopping = threading.Event()
        self._settler = threading.Thread(
            target=self._settle_periodically, name="healthimaging-settle", daemon=True
        )
        self._settler.start()
        self._stopped = False

    def _settle_periodically(self) -> None:
        """Finish time-based transitions (and publish their events) even when no client asks."""
        while not self._stopping.wait(self.SETTLE_INTERVAL):
            try:
                self.operations.settle()
            except Exception:
                log.exception("Could not settle time-based transitions")

    def __enter__(self) -> LocalEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, service: str, **config: Any) -> BaseClient:
        """A boto3 client for this endpoint (us-east-1, the first access key or dummy credentials, no host prefix).

        :param service: e.g. ``"medical-imaging"`` or ``"s3"``.
        :param config: extra ``botocore.config.Config`` keyword arguments.
        """
        options: dict[str, Any] = {"inject_host_prefix": False}
        if service == "s3":
            options["s3"] = {"addressing_style": "path"}
        options.update(config)
        return boto3.session.Session().client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(**options),
        )

    def settings(self) -> dict[str, Any]:
        """What a client needs: env vars for the AWS CLI, boto3 arguments and the Airflow connection."""
        return endpoint_settings(self.url, self.access_key_id, self.secret_access_key)

    def stop(self) -> None:
        """Stop serving and the import workers (idempotent); unfinished jobs resume at the next start.

        The owner of the shared state also saves the messages left in each SQS queue.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._settler.join(10)
        self.importer.stop()
        self.store.close()
        if self._owner:
            try:
                self.messaging.save(with_messages=True)
            except Exception:
                log.exception("Could not save the SQS and EventBridge state")
        with LocalEndpoint._active_lock:
            LocalEndpoint._active -= 1


def endpoint_settings(
    url: str, access_key_id: str = ACCESS_KEY_ID, secret_access_key: str = SECRET_ACCESS_KEY
) -> dict[str, Any]:
    """Client settings for an endpoint URL.

    :param url: the endpoint URL.
    :param access_key_id: the access key id clients use.
    :param secret_access_key: its secret key.
    """
    return {
        "endpoint_url": url,
        "env": {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_DISABLE_HOST_PREFIX_INJECTION": "true",
        },
        "boto3": {
            "endpoint_url": url,
            "region_name": REGION,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "config_kwargs": {"inject_host_prefix": False},
        },
        "airflow_connection": {
            "conn_type": "aws",
            "login": access_key_id,
            "password": secret_access_key,
            "extra": {
                "region_name": REGION,
                "endpoint_url": url,
                "config_kwargs": {"inject_host_prefix": False},
            },
        },
    }


def wait_forever(stop: threading.Event) -> None:
    """Block until ``stop`` is set (polling so signals are handled promptly).

    :param stop: the event to wait for.
    """
    while not stop.wait(0.2):
        time.sleep(0)
