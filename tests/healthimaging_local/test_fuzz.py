"""Property-based fuzzing of the endpoint's HealthImaging request handling (hypothesis).

Generated requests (method, path, query, headers, body) go to the endpoint's WSGI callable in-process (werkzeug's
test client) and, fewer of them, over real HTTP. Every answer must be a well-formed AWS error (4xx with
``x-amzn-ErrorType`` and a JSON ``message``; 501 only as ``NotImplementedException`` for a modelled operation the
emulator does not offer) or a 2xx whose JSON conforms to the operation's output shape. Afterwards the store must
be consistent and the list/search operations must still answer.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from endpoint_helpers import (
    WireRecorder,
    create_active_datastore,
    run_import,
    synthetic,
    upload,
    wire_problems,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client, EnvironBuilder

from healthimaging_local.model import (
    UnknownOperationException,
    match_route,
    routes,
    service_model,
)
from healthimaging_local.server import LocalEndpoint, goes_to_healthimaging

AKID, SECRET = "AKIDFUZZ", "fuzz-secret"
JOB_STATUSES = {"SUBMITTED", "IN_PROGRESS", "COMPLETED", "FAILED"}
IN_PROCESS_EXAMPLES = 1500
HTTP_EXAMPLES = 150


@dataclass
class Target:
    """A running endpoint with known resources, and a verifying one, both driven in-process."""

    endpoint: LocalEndpoint
    secured: LocalEndpoint
    datastore_id: str
    image_set_id: str
    job_id: str

    def apps(self) -> dict[str, Any]:
        return {"open": self.endpoint._server.app, "secured": self.secured._server.app}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    with (
        LocalEndpoint(root / "open", delete_seconds=0.0) as endpoint,
        LocalEndpoint(root / "secured", verify_signatures=True, access_keys={AKID: SECRET}) as secured,
    ):
        mi, s3 = endpoint.client("medical-imaging"), endpoint.client("s3")
        datastore_id = create_active_datastore(mi)
        upload(s3, "fuzz-in", "", synthetic(series=2, instances=1))
        upload(s3, "fuzz-out", "", [])
        job = run_import(mi, datastore_id, "s3://fuzz-in/", "s3://fuzz-out/")
        image_set_id = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"][0][
            "imageSetId"
        ]
        yield Target(endpoint, secured, datastore_id, image_set_id, job["jobId"])


# ------------------------------------------------------------------------------------------- strategies

MODEL = service_model()
ROUTES = [MODEL.operation_model(route.name) for route in routes()]
NASTY_SEGMENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F",
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "a%00b",
    "%ff%fe",
    "%c0%ae",
    "%",
    "%zz",
    "",
    "datastore",
    "%E2%80%AE",
    "\u202e",
    "ü",
    "😀",
    "a" * 300,
    "0" * 32,
    "A" * 32,
]


def _string(shape: Any) -> st.SearchStrategy[Any]:
    if shape.enum:
        return st.sampled_from(list(shape.enum))
    pattern = shape.metadata.get("pattern")
    options: list[st.SearchStrategy[Any]] = [st.text(max_size=40)]
    if pattern:
        try:
            regex = re.compile(pattern.replace(r"\p{ASCII}", r"[\x00-\x7f]"))
            options.append(
                st.from_regex(regex, fullmatch=True).map(lambda s: s[: shape.metadata.get("max", 64)])
            )
        except re.error:
            pass
    return st.one_of(options)


def value_for(shape: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped like a model member: usually valid, sometimes not (wrong types, bounds)."""
    kind = shape.type_name
    if depth > 4:
        return st.none()
    if kind == "structure":
        members = shape.members
        required = {n: value_for(members[n], depth + 1) for n in shape.required_members}
        optional = {n: value_for(m, depth + 1) for n, m in members.items() if n not in required}
        return st.fixed_dictionaries(required, optional=optional)
    if kind == "list":
        return st.lists(value_for(shape.member, depth + 1), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
    if kind == "string":
        return _string(shape)
    if kind in ("integer", "long"):
        return st.integers(min_value=-5, max_value=120)
    if kind == "boolean":
        return st.booleans()
    if kind == "timestamp":
        return st.one_of(
            st.floats(min_value=0, max_value=2e9), st.just("2025-01-01T00:00:00Z"), st.text(max_size=5)
        )
    return st.none()


def body_members(operation: Any) -> Any:
    """The shape a JSON body of ``operation`` takes (payload member or body members), or None."""
    shape = operation.input_shape
    if shape is None:
        return None
    payload = shape.serialization.get("payload")
    if payload:
        return shape.members[payload] if shape.members[payload].type_name == "structure" else None
    return shape


def model_body(operation: Any) -> st.SearchStrategy[Any]:
    shape = body_members(operation)
    if shape is None:
        return st.just({})
    strategy = value_for(shape)
    if shape is operation.input_shape:  # drop path/query members from a body
        located = {n for n, m in shape.members.items() if "location" in m.serialization}
        strategy = strategy.map(lambda body: {k: v for k, v in body.items() if k not in located})
    return strategy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def requests_(draw: st.DrawFn, target: Target) -> dict[str, Any]:
    """One HealthImaging-bound request: method, raw path, query string, headers, body."""
    known_ids = [target.datastore_id, target.image_set_id, target.job_id]
    segment = st.one_of(
        st.sampled_from(known_ids),
        st.from_regex(r"[0-9a-z]{32}", fullmatch=True),
        st.sampled_from(NASTY_SEGMENTS),
        st.text(min_size=1, max_size=20).map(lambda s: quote(s, safe="")),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=10).map(lambda s: quote(s, safe="/%")),
    )
    operation = draw(st.sampled_from(ROUTES))
    template = operation.http["requestUri"].split("?", 1)[0]
    kind = draw(st.sampled_from(["valid", "valid", "route", "route", "mangled", "random"]))
    if kind == "valid":  # well-formed calls with the known ids reach the handlers
        by_name = {"datastoreId": target.datastore_id, "jobId": target.job_id}
        path = re.sub(r"\{([^}]+)\}", lambda m: by_name.get(m.group(1), target.image_set_id), template)
        body = json.dumps(draw(model_body(operation))).encode()
        return {
            "method": operation.http["method"],
            "path": path,
            "query": "",
            "headers": {"Content-Type": "application/json"},
            "body": body,
            "auth": draw(st.sampled_from(["none", "signed"])),
        }
    if kind == "random":
        path = "/" + "/".join(draw(st.lists(segment, min_size=0, max_size=6)))
    else:
        path = re.sub(r"\{[^}]+\}", lambda _: draw(segment), template)
        if kind == "mangled":
            path = draw(
                st.sampled_from(
                    [
                        path + "/",
                        path + "//",
                        "/" + path,
                        path.replace("/", "//", 1),
                        path + "/..",
                        "/x/.." + path,
                        path.replace("datastore", "%64atastore", 1),
                        path + "%00",
                        path + "?",
                        path.upper(),
                    ]
                )
            )
    method = draw(
        st.one_of(
            st.just(operation.http["method"]),
            st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        )
    )
    query_members = [
        m.serialization.get("name", n)
        for n, m in (operation.input_shape.members.items() if operation.input_shape else [])
        if m.serialization.get("location") == "querystring"
    ]
    query = draw(
        st.dictionaries(
            st.sampled_from([*query_members, "maxResults", "nextToken", "x"]) | st.text(max_size=8),
            st.one_of(
                st.integers(-3, 80).map(str), st.text(max_size=30), st.sampled_from(["", "true", "FAILED"])
            ),
            max_size=3,
        )
    )
    body_kind = draw(st.sampled_from(["model", "model", "json", "bytes", "invalid-utf8", "none"]))
    body: bytes | None
    if body_kind == "model":
        body = json.dumps(draw(model_body(operation))).encode()
    elif body_kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif body_kind == "invalid-utf8":
        body = b'{"datastoreName": "' + draw(st.sampled_from([b"\xff", b"\xc0\xae", b"\xed\xa0\x80"])) + b'"}'
    else:
        body = None
    content_type = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "application/x-amz-json-1.1",
                "text/plain",
                "application/xml",
                "",
                "a/b; x=\x01",
            ]
        )
    )
    headers = {} if content_type is None else {"Content-Type": content_type}
    return {
        "method": method,
        "path": path,
        "query": urlencode(query),
        "headers": headers,
        "body": body,
        "auth": draw(st.sampled_from(["none", "bogus", "signed"])),
    }


def sign(request: dict[str, Any], host: str, secret: str = SECRET) -> dict[str, str]:
    """Headers of ``request`` plus an Authorization header: real SigV4 (``signed``) or a forged one (``bogus``)."""
    headers = dict(request["headers"])
    if request["auth"] == "bogus":
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        headers["X-Amz-Date"] = stamp
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={AKID}/{stamp[:8]}/us-east-1/medical-imaging/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
        )
    elif request["auth"] == "signed":
        url = f"http://{host}{request['path']}" + (f"?{request['query']}" if request["query"] else "")
        aws = AWSRequest(method=request["method"], url=url, data=request["body"] or b"", headers=headers)
        aws.headers["Host"] = host
        SigV4Auth(Credentials(AKID, secret), "medical-imaging", "us-east-1").add_auth(aws)
        headers = {k: v for k, v in aws.headers.items() if k.lower() != "host"}
    return headers


# ------------------------------------------------------------------------------------------- checks


def _wsgi_str(text: str) -> str:
    """A WSGI environ string: the UTF-8 bytes read as latin-1, as a server puts them there."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def check_s3_response(status: int, body: bytes) -> None:
    """A request the dispatcher hands to S3 (moto): never a 5xx. (Its 4xx bodies are moto's: usually S3 XML,
    a Flask HTML 404 for keys its router rejects, empty for a failed CORS preflight.)"""
    assert status < 500, (status, body[:300])


def check_response(method: str, path: str, status: int, headers: Any, body: bytes) -> None:
    """A well-formed AWS error, or a 2xx that conforms to the matched operation's output shape."""
    assert status < 500 or (status == 501 and headers.get("x-amzn-ErrorType") == "NotImplementedException"), (
        status,
        body[:300],
    )
    assert headers.get("x-amzn-RequestId")
    if status >= 400:
        assert headers.get("x-amzn-ErrorType"), (status, body[:200])
        if method != "HEAD":
            document = json.loads(body)
            assert isinstance(document["message"], str)
            assert document["__type"] == headers["x-amzn-ErrorType"]
        return
    assert 200 <= status < 300
    operation, _ = match_route(method, path.split("?", 1)[0])
    output = operation.output_shape
    if output is None or output.serialization.get("payload") or method == "HEAD":
        return
    problems = output_problems(output, json.loads(body), operation.name)
    assert not problems, problems


def output_problems(shape: Any, body: Any, name: str) -> list[str]:
    """``wire_problems`` minus one documented deviation (healthimaging-api.md §2): no jobName when none was given."""
    return [
        p for p in wire_problems(shape, body, name) if not p.endswith(".jobName: required member missing")
    ]


def check_state(target: Target) -> None:
    """Store invariants, and the list/search operations still answer with conforming output."""
    for endpoint in (target.endpoint, target.secured):
        store = endpoint.store
        for job in store.query("SELECT status, ended_at FROM jobs"):
            assert job["status"] in JOB_STATUSES
            if job["status"] in ("COMPLETED", "FAILED"):
                assert job["ended_at"] is not None
        for row in store.query(
            "SELECT s.id, s.version, group_concat(v.version) AS versions FROM image_sets s "
            "JOIN image_set_versions v ON v.image_set_id = s.id GROUP BY s.id"
        ):
            versions = sorted(int(v) for v in str(row["versions"]).split(","))
            assert versions == list(range(1, len(versions) + 1)), row["id"]
            assert row["version"] == versions[-1]
        mi = endpoint.client("medical-imaging", retries={"max_attempts": 1})
        recorder = WireRecorder(mi)
        for datastore in mi.list_datastores()["datastoreSummaries"]:
            if datastore["datastoreStatus"] == "ACTIVE":
                mi.list_dicom_import_jobs(datastoreId=datastore["datastoreId"])
                mi.search_image_sets(datastoreId=datastore["datastoreId"])
        for name, bodies in recorder.bodies.items():
            for body in bodies:
                problems = output_problems(
                    mi.meta.service_model.operation_model(name).output_shape, body, name
                )
                assert not problems, problems


def _ids_for(request: dict[str, Any]) -> str:
    return f"{request['method']} {request['path']!r} auth={request['auth']}"


# ------------------------------------------------------------------------------------------- properties


@pytest.mark.slow
def test_in_process_requests_get_well_formed_answers(target: Target) -> None:
    clients = {name: Client(app) for name, app in target.apps().items()}
    seen: dict[str, int] = {}

    @settings(
        max_examples=IN_PROCESS_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        # Fixed examples, so CI is reproducible; set FUZZ_EXPLORE=1 to draw new ones.
        derandomize=os.environ.get("FUZZ_EXPLORE") != "1",
    )
    @given(request=requests_(target), which=st.sampled_from(["open", "open", "secured"]))
    def run(request: dict[str, Any], which: str) -> None:
        headers = sign(request, "localhost")
        path = request["path"] + (f"?{request['query']}" if request["query"] else "")
        # A path starting with "//" would be read as a host name by werkzeug's test client itself, so it
        # goes into the environ directly, as a server puts a request line's path there.
        raw = request["path"].startswith("//")
        builder = EnvironBuilder(
            "/" if raw else path,
            method=request["method"],
            headers=headers,
            data=request["body"],
            environ_overrides=(
                {
                    "PATH_INFO": _wsgi_str(request["path"]),
                    "RAW_URI": _wsgi_str(path),
                    "QUERY_STRING": _wsgi_str(request["query"]),
                }
                if raw
                else {}
            ),
        )
        # The dispatcher's own rule, on the environ the request arrives with, says which service answers.
        to_healthimaging = goes_to_healthimaging(builder.get_environ())
        response = clients[which].open(builder)
        status = response.status_code
        if not to_healthimaging:
            seen["s3"] = seen.get("s3", 0) + 1
            check_s3_response(status, response.get_data())
            return
        kind = "501" if status == 501 else f"{status // 100}xx"  # 501: modelled operations not emulated
        seen[kind] = seen.get(kind, 0) + 1
        check_response(request["method"], path, status, response.headers, response.get_data())
        if which == "secured" and request["auth"] != "signed":
            assert status == 403, _ids_for(request)

    run()
    check_state(target)
    print(f"in-process answers by class: {seen}")
    assert seen.get("2xx", 0) > 10, seen  # the generator reaches the handlers, not only the error paths
    assert seen.get("4xx", 0) > 10, seen


def _raw_path(path: str) -> str:
    """A request-target http.client accepts (no control characters or spaces)."""
    return "".join(ch if 0x20 < ord(ch) < 0x7F else quote(ch) for ch in path) or "/"


@pytest.mark.slow
def test_over_http_the_server_keeps_serving(target: Target) -> None:
    host = urlsplit(target.endpoint.url).netloc
    secured_host = urlsplit(target.secured.url).netloc

    @settings(
        max_examples=HTTP_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        # Fixed examples, so CI is reproducible; set FUZZ_EXPLORE=1 to draw new ones.
        derandomize=os.environ.get("FUZZ_EXPLORE") != "1",
    )
    @given(request=requests_(target), secured=st.booleans())
    def run(request: dict[str, Any], secured: bool) -> None:
        netloc = secured_host if secured else host
        request = {**request, "path": _raw_path(request["path"])}
        headers = sign(request, netloc)
        connection = http.client.HTTPConnection(netloc, timeout=30)
        try:
            target_path = request["path"] + (f"?{request['query']}" if request["query"] else "")
            connection.request(request["method"], target_path, body=request["body"], headers=headers)
            response = connection.getresponse()
            body = response.read()
            # What the HTTP server puts in the environ for the parts the dispatcher reads; http.server turns a
            # leading "//" into "/" before werkzeug sees the path.
            served = "/" + target_path.lstrip("/") if target_path.startswith("//") else target_path
            environ = {
                "RAW_URI": served,
                "QUERY_STRING": request["query"],
                "HTTP_AUTHORIZATION": headers.get("Authorization", ""),
            }
            if goes_to_healthimaging(environ):
                check_response(request["method"], served, response.status, response.headers, body)
            else:
                check_s3_response(response.status, body)
            # The same connection still serves a well-formed request afterwards (keep-alive stays in sync).
            if not response.will_close:
                follow = {
                    "auth": "signed",
                    "method": "GET",
                    "path": "/datastore",
                    "query": "",
                    "headers": {},
                    "body": None,
                }
                connection.request("GET", "/datastore", headers=sign(follow, netloc))
                again = connection.getresponse()
                again.read()
                assert again.status == 200
        finally:
            connection.close()

    run()
    check_state(target)
    for endpoint in (target.endpoint, target.secured):
        assert (
            endpoint.client("medical-imaging").list_datastores()["ResponseMetadata"]["HTTPStatusCode"] == 200
        )


def test_unknown_route_check_is_not_vacuous() -> None:
    """``check_response`` fails on a 5xx and on a 2xx that does not conform (so the properties can fail)."""
    with pytest.raises(AssertionError):
        check_response("GET", "/datastore", 500, {"x-amzn-RequestId": "r", "x-amzn-ErrorType": "X"}, b"{}")
    with pytest.raises(AssertionError):
        check_response("GET", "/datastore", 200, {"x-amzn-RequestId": "r"}, b'{"datastoreSummaries": 5}')
    with pytest.raises(AssertionError):
        check_response("GET", "/nothing", 404, {"x-amzn-RequestId": "r"}, b'{"message": "m"}')
    with pytest.raises(UnknownOperationException):
        check_response("GET", "/nothing", 200, {"x-amzn-RequestId": "r"}, b"{}")
