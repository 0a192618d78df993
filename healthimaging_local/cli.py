"""The ``healthimaging-local`` command: serve the endpoint, or create sample data."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def exposure_warning(host: str, verify_signatures: bool) -> str | None:
    """The warning printed when the endpoint listens beyond loopback without authentication.

    :param host: the address bound.
    :param verify_signatures: whether signatures are checked.
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or verify_signatures:
        return None
    return (
        f"WARNING: healthimaging-local listens on {host} and has no authentication: anyone who can reach "
        "this port can read and change its data (including PHI). Bind 127.0.0.1, or pass --verify-signatures "
        "with --access-key AKID:SECRET."
    )


def _serve(args: argparse.Namespace) -> int:
    from healthimaging_local.auth import access_keys_from_env, parse_access_keys
    from healthimaging_local.server import LocalEndpoint, wait_forever

    access_keys = parse_access_keys(args.access_key) or access_keys_from_env()
    if args.verify_signatures and not access_keys:
        print("healthimaging-local: --verify-signatures needs --access-key AKID:SECRET", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host, args.verify_signatures)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    endpoint = LocalEndpoint(
        Path(args.state_dir),
        host=args.host,
        port=args.port,
        import_seconds=args.import_seconds,
        throttle_rate=args.throttle_rate,
        max_concurrent_imports=args.max_concurrent_imports,
        seed=args.seed,
        verify_signatures=args.verify_signatures,
        access_keys=access_keys,
    )
    try:
        settings = endpoint.settings()
        if args.verify_signatures:  # print where the secret goes, never the secret itself
            settings["env"]["AWS_SECRET_ACCESS_KEY"] = "<secret key>"
            settings["airflow_connection"]["password"] = "<secret key>"
        print(f"healthimaging-local: serving on {endpoint.url}", flush=True)
        print("# AWS CLI / environment:")
        for name, value in settings["env"].items():
            print(f"export {name}={value}")
        print("# boto3:")
        print(
            f'boto3.client("medical-imaging", endpoint_url="{endpoint.url}", region_name="us-east-1",'
            f' aws_access_key_id="{settings["env"]["AWS_ACCESS_KEY_ID"]}",'
            f' aws_secret_access_key="{settings["env"]["AWS_SECRET_ACCESS_KEY"]}",'
            " config=botocore.config.Config(inject_host_prefix=False))"
        )
        print("# Airflow connection (AIRFLOW_CONN_AWS_DEFAULT):")
        print(json.dumps(settings["airflow_connection"]), flush=True)
        wait_forever(stop)
    finally:
        endpoint.stop()
    print("healthimaging-local: stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``healthimaging-local``."""
    parser = argparse.ArgumentParser(prog="healthimaging-local", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve HealthImaging and S3 on one local URL")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=4566, help="0 picks a free port")
    serve.add_argument("--state-dir", required=True, help="folder where state persists across restarts")
    serve.add_argument("--import-seconds", type=float, default=0.0, help="minimum IN_PROGRESS time of a job")
    serve.add_argument("--throttle-rate", type=float, default=0.0, help="fraction of requests answered 429")
    serve.add_argument("--max-concurrent-imports", type=int, default=100, help="running jobs per data store")
    serve.add_argument("--seed", type=int, default=None, help="seed of the fault injection")
    serve.add_argument("--log-level", default="WARNING")
    serve.add_argument(
        "--verify-signatures",
        action="store_true",
        help="check SigV4 signatures against the access keys (default: any credentials are accepted)",
    )
    serve.add_argument(
        "--access-key",
        action="append",
        default=[],
        metavar="AKID:SECRET",
        help="an accepted access key (repeatable; default: env HEALTHIMAGING_LOCAL_ACCESS_KEYS, comma-separated)",
    )
    serve.set_defaults(func=_serve)
    try:
        from healthimaging_local import sample_data
    except ImportError:
        pass
    else:
        sample = commands.add_parser("sample-data", help="generate synthetic DICOM and upload it")
        sample_data.add_arguments(sample)
        sample.set_defaults(func=sample_data.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console command.

    :param argv: arguments (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"), format="%(asctime)s %(name)s %(message)s"
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
