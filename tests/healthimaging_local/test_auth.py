"""``--verify-signatures``: SigV4 is checked for HealthImaging and S3 (headers and presigned URLs) with stock boto3.

Also: the endpoint binds 127.0.0.1 by default and warns when told to listen elsewhere without authentication.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from endpoint_helpers import (
    create_active_datastore,
    read_json,
    run_import,
    synthetic,
    upload,
)

from healthimaging_local import cli
from healthimaging_local.auth import access_keys_from_env, parse_access_keys
from healthimaging_local.server import LocalEndpoint

AKID, SECRET = "AKIDLOCALTEST", "local-secret-Zq81"
BIN = Path(sys.executable).parent
MISMATCH = "The request signature we calculated does not match the signature you provided"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[LocalEndpoint]:
    """An endpoint that verifies signatures against one access key."""
    with LocalEndpoint(tmp_path / "state", verify_signatures=True, access_keys={AKID: SECRET}) as endpoint:
        yield endpoint


def client(
    endpoint: LocalEndpoint, service: str, key: str = AKID, secret: str = SECRET, **config: Any
) -> Any:
    """A stock boto3 client with the given credentials (no retries, so each test sees the first answer)."""
    options: dict[str, Any] = {"inject_host_prefix": False, "retries": {"max_attempts": 1}, **config}
    if service == "s3":
        options.setdefault("s3", {"addressing_style": "path"})
    return boto3.session.Session().client(
        service,  # type: ignore[call-overload]
        endpoint_url=endpoint.url,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(**options),
    )


def send(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> Any:
    """Send a request as given; return (status, headers, body)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def signed_request(
    endpoint: LocalEndpoint, method: str, path: str, body: bytes, when: datetime.datetime | None = None
) -> AWSRequest:
    """A medical-imaging request signed by botocore's SigV4Auth (optionally at another time)."""
    request = AWSRequest(
        method=method, url=endpoint.url + path, data=body, headers={"Content-Type": "application/json"}
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=when or _now()):
        SigV4Auth(Credentials(AKID, SECRET), "medical-imaging", "us-east-1").add_auth(request)
    return request


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def error_code(error: ClientError) -> str:
    return str(error.response["Error"]["Code"])


class TestGoodCredentials:
    def test_every_operation_and_an_s3_import_work(self, secured: LocalEndpoint) -> None:
        mi, s3 = client(secured, "medical-imaging"), client(secured, "s3")
        datastore_id = create_active_datastore(mi)
        assert [d["datastoreId"] for d in mi.list_datastores()["datastoreSummaries"]] == [datastore_id]
        upload(s3, "auth-in", "study/", synthetic(instances=2))
        upload(s3, "auth-out", "", [])
        job = run_import(mi, datastore_id, "s3://auth-in/study/", "s3://auth-out/")
        assert job["jobStatus"] == "COMPLETED"
        assert mi.list_dicom_import_jobs(datastoreId=datastore_id)["jobSummaries"][0]["jobId"] == job["jobId"]
        manifest = read_json(s3, job["outputS3Uri"] + "job-output-manifest.json")
        assert manifest["jobSummary"]["numberOfImportedFiles"] == 2
        (summary,) = mi.search_image_sets(datastoreId=datastore_id)["imageSetsMetadataSummaries"]
        image_set_id = summary["imageSetId"]
        assert mi.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)["versionId"] == "1"
        metadata = mi.get_image_set_metadata(datastoreId=datastore_id, imageSetId=image_set_id)
        assert metadata["imageSetMetadataBlob"].read()
        versions = mi.list_image_set_versions(datastoreId=datastore_id, imageSetId=image_set_id)
        assert len(versions["imageSetPropertiesList"]) == 1
        mi.delete_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
        assert s3.get_object(Bucket="auth-in", Key="study/" + synthetic(instances=2)[0][0])["Body"].read()

    def test_the_endpoints_own_clients_and_settings_use_the_configured_key(
        self, secured: LocalEndpoint
    ) -> None:
        assert secured.client("medical-imaging").list_datastores()["datastoreSummaries"] == []
        settings = secured.settings()
        assert settings["env"]["AWS_ACCESS_KEY_ID"] == AKID
        assert settings["airflow_connection"]["login"] == AKID

    def test_presigned_urls_v4_and_v2(self, secured: LocalEndpoint) -> None:
        s3 = client(secured, "s3")
        s3.create_bucket(Bucket="presign")
        s3.put_object(Bucket="presign", Key="a b/c+d.dcm", Body=b"dicom bytes")
        for signature_version in ("s3v4", "s3"):
            signer = client(secured, "s3", signature_version=signature_version)
            url = signer.generate_presigned_url(
                "get_object", Params={"Bucket": "presign", "Key": "a b/c+d.dcm"}
            )
            assert send(url)[::2] == (200, b"dicom bytes"), signature_version
            tampered = url.replace("a%20b", "a%20c")
            status, _, body = send(tampered)
            assert status == 403
            assert b"<Code>SignatureDoesNotMatch</Code>" in body
        put_url = client(secured, "s3", signature_version="s3v4").generate_presigned_url(
            "put_object", Params={"Bucket": "presign", "Key": "uploaded.dcm"}
        )
        assert send(put_url, "PUT", b"uploaded", {"Content-Type": "application/octet-stream"})[0] == 200
        assert s3.get_object(Bucket="presign", Key="uploaded.dcm")["Body"].read() == b"uploaded"


class TestRejected:
    def test_wrong_secret(self, secured: LocalEndpoint) -> None:
        with pytest.raises(ClientError, match=MISMATCH) as mi_error:
            client(secured, "medical-imaging", secret="wrong").list_datastores()
        assert error_code(mi_error.value) == "InvalidSignatureException"
        assert mi_error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError) as s3_error:
            client(secured, "s3", secret="wrong").list_buckets()
        assert error_code(s3_error.value) == "SignatureDoesNotMatch"
        assert s3_error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    def test_unknown_access_key(self, secured: LocalEndpoint) -> None:
        with pytest.raises(
            ClientError, match="security token included in the request is invalid"
        ) as mi_error:
            client(secured, "medical-imaging", key="AKIDUNKNOWN").list_datastores()
        assert error_code(mi_error.value) == "UnrecognizedClientException"
        with pytest.raises(ClientError) as s3_error:
            client(secured, "s3", key="AKIDUNKNOWN").list_buckets()
        assert error_code(s3_error.value) == "InvalidAccessKeyId"

    def test_unsigned_requests(self, secured: LocalEndpoint) -> None:
        status, headers, body = send(secured.url + "/datastore")
        assert (status, headers["x-amzn-ErrorType"]) == (403, "MissingAuthenticationTokenException")
        assert json.loads(body)["message"] == "Missing Authentication Token"
        status, _, body = send(secured.url + "/datastore", "POST", b'{"datastoreName": "x"}')
        assert status == 403
        status, _, body = send(secured.url + "/some-bucket", "PUT")
        assert status == 403
        assert b"<Code>AccessDenied</Code>" in body
        unsigned = boto3.session.Session().client(
            "s3",
            endpoint_url=secured.url,
            region_name="us-east-1",
            config=Config(signature_version=UNSIGNED),
        )
        with pytest.raises(ClientError) as error:
            unsigned.list_buckets()
        assert error_code(error.value) == "AccessDenied"
        assert client(secured, "s3").list_buckets()["Buckets"] == []
        assert client(secured, "medical-imaging").list_datastores()["datastoreSummaries"] == []

    def test_tampered_body(self, secured: LocalEndpoint) -> None:
        good = signed_request(
            secured, "POST", "/datastore", b'{"datastoreName": "honest", "clientToken": "t1"}'
        )
        headers = dict(good.headers.items())
        status, reply_headers, body = send(
            secured.url + "/datastore", "POST", b'{"datastoreName": "forged", "clientToken": "t1"}', headers
        )
        assert (status, reply_headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")
        assert MISMATCH in json.loads(body)["message"]
        assert send(secured.url + "/datastore", "POST", good.body, headers)[0] == 200
        names = [
            d["datastoreName"]
            for d in client(secured, "medical-imaging").list_datastores()["datastoreSummaries"]
        ]
        assert names == ["honest"]

    def test_tampered_s3_upload_is_not_stored(self, secured: LocalEndpoint) -> None:
        s3 = client(secured, "s3")
        s3.create_bucket(Bucket="tamper")
        sent: dict[str, Any] = {}

        def tamper(request: Any, **_: Any) -> None:
            request.body = b"forged!"  # after signing: x-amz-content-sha256 still names the original body
            sent["done"] = True

        s3.meta.events.register("before-send.s3.PutObject", tamper)
        with pytest.raises(ClientError) as error:
            s3.put_object(Bucket="tamper", Key="k", Body=b"honest!")
        assert sent
        assert error_code(error.value) in {"XAmzContentSHA256Mismatch", "SignatureDoesNotMatch"}
        assert client(secured, "s3").list_objects_v2(Bucket="tamper")["KeyCount"] == 0

    @pytest.mark.parametrize("minutes", [-20, 20])
    def test_request_date_outside_15_minutes(self, secured: LocalEndpoint, minutes: int) -> None:
        when = _now() + datetime.timedelta(minutes=minutes)
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            with pytest.raises(ClientError, match="Signature expired") as mi_error:
                client(secured, "medical-imaging").list_datastores()
            with pytest.raises(ClientError) as s3_error:
                client(secured, "s3").list_buckets()
        assert error_code(mi_error.value) == "InvalidSignatureException"
        assert error_code(s3_error.value) == "RequestTimeTooSkewed"
        request = signed_request(secured, "GET", "/datastore", b"", when - datetime.timedelta(minutes=0))
        status, headers, _ = send(request.url, "GET", None, dict(request.headers.items()))
        assert (status, headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")
        with mock.patch(
            "botocore.auth.get_current_datetime",
            return_value=_now() + datetime.timedelta(minutes=minutes // 4),
        ):
            assert client(secured, "medical-imaging").list_datastores()["datastoreSummaries"] == []

    def test_expired_presigned_url(self, secured: LocalEndpoint) -> None:
        s3 = client(secured, "s3")
        s3.create_bucket(Bucket="expiring")
        s3.put_object(Bucket="expiring", Key="k", Body=b"v")
        for signature_version in ("s3v4", "s3"):
            signer = client(secured, "s3", signature_version=signature_version)
            with mock.patch(
                "botocore.auth.get_current_datetime", return_value=_now() - datetime.timedelta(hours=2)
            ):
                with mock.patch("time.time", return_value=(_now() - datetime.timedelta(hours=2)).timestamp()):
                    url = signer.generate_presigned_url(
                        "get_object", Params={"Bucket": "expiring", "Key": "k"}, ExpiresIn=3600
                    )
            status, _, body = send(url)
            assert status == 403, signature_version
            assert b"Request has expired" in body

    def test_malformed_authorization_header(self, secured: LocalEndpoint) -> None:
        status, headers, _ = send(
            secured.url + "/datastore", headers={"Authorization": "AWS4-HMAC-SHA256 garbage"}
        )
        assert (status, headers["x-amzn-ErrorType"]) == (403, "IncompleteSignatureException")


class TestConfiguration:
    def test_default_accepts_any_credentials(self, endpoint: LocalEndpoint) -> None:
        assert client(endpoint, "medical-imaging", key="anything", secret="at-all").list_datastores()
        assert client(endpoint, "s3", key="anything", secret="at-all").list_buckets()["Buckets"] == []

    def test_verifying_without_keys_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="access key"):
            LocalEndpoint(tmp_path / "state", verify_signatures=True)

    def test_access_key_parsing(self) -> None:
        assert parse_access_keys(["A:x", "B:y:z"]) == {"A": "x", "B": "y:z"}
        assert access_keys_from_env({"HEALTHIMAGING_LOCAL_ACCESS_KEYS": "A:x, B:y"}) == {"A": "x", "B": "y"}
        assert access_keys_from_env({}) == {}
        with pytest.raises(ValueError, match="AKID:SECRET"):
            parse_access_keys(["no-secret"])

    @pytest.mark.parametrize("via", ["flag", "env"])
    def test_serve_cli_verifies_and_never_prints_the_secret(self, tmp_path: Path, via: str) -> None:
        args = [str(BIN / "healthimaging-local"), "serve", "--port", "0", "--state-dir", str(tmp_path / "s")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if via == "flag":
            args += [
                "--verify-signatures",
                "--access-key",
                f"{AKID}:{SECRET}",
                "--access-key",
                "OTHER:other-secret",
            ]
        else:
            args += ["--verify-signatures"]
            env["HEALTHIMAGING_LOCAL_ACCESS_KEYS"] = f"{AKID}:{SECRET}"
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            url = first.strip().rsplit(" ", 1)[1]
            lines = [process.stdout.readline() for _ in range(10)]
            stub = mock.Mock(url=url)
            assert client(stub, "medical-imaging").list_datastores()["datastoreSummaries"] == []
            with pytest.raises(ClientError) as error:
                client(stub, "medical-imaging", secret="wrong").list_datastores()
            assert error_code(error.value) == "InvalidSignatureException"
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        printed = first + "".join(lines) + out + err
        assert f"export AWS_ACCESS_KEY_ID={AKID}" in printed
        assert SECRET not in printed
        assert "other-secret" not in printed

    def test_serve_cli_refuses_verification_without_keys(self, tmp_path: Path, capsys: Any) -> None:
        env = {k: v for k, v in os.environ.items() if k != "HEALTHIMAGING_LOCAL_ACCESS_KEYS"}
        with mock.patch.dict(os.environ, env, clear=True):
            assert cli.main(["serve", "--verify-signatures", "--state-dir", str(tmp_path / "s")]) == 2
        assert "--access-key" in capsys.readouterr().err


class TestBinding:
    def test_local_endpoint_binds_loopback_by_default(self, endpoint: LocalEndpoint) -> None:
        assert inspect.signature(LocalEndpoint).parameters["host"].default == "127.0.0.1"
        assert endpoint.url.startswith("http://127.0.0.1:")
        assert endpoint._server.server_address[0] == "127.0.0.1"  # type: ignore[attr-defined]

    def test_serve_parser_defaults_to_loopback(self) -> None:
        args = cli.build_parser().parse_args(["serve", "--state-dir", "x"])
        assert args.host == "127.0.0.1"
        assert args.verify_signatures is False

    @pytest.mark.parametrize(
        ("argv", "warned"),
        [
            (["--host", "0.0.0.0"], True),
            (["--host", "192.168.1.10"], True),
            (["--host", "0.0.0.0", "--verify-signatures", "--access-key", "A:b"], False),
            ([], False),
            (["--host", "localhost"], False),
            (["--host", "::1"], False),
        ],
    )
    def test_serve_warns_when_exposed_without_authentication(
        self, tmp_path: Path, capsys: Any, argv: list[str], warned: bool
    ) -> None:
        """The real ``serve`` code path, with the endpoint replaced so that no test binds beyond loopback."""
        fake = mock.MagicMock()
        fake.return_value.url = "http://fake:1"
        fake.return_value.settings.return_value = {
            "env": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
            "airflow_connection": {"password": "test"},
        }
        with (
            mock.patch("healthimaging_local.server.LocalEndpoint", fake),
            mock.patch("healthimaging_local.server.wait_forever"),
            mock.patch("signal.signal"),
        ):
            assert cli.main(["serve", "--state-dir", str(tmp_path / "s"), *argv]) == 0
        err = capsys.readouterr().err
        assert ("has no authentication" in err) is warned
        if warned:
            assert "--verify-signatures" in err
        assert fake.call_args.kwargs["host"] == (argv[1] if argv else "127.0.0.1")
