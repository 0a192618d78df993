"""The ``healthimaging-local`` command: serve the endpoint, or create sample data."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    from healthimaging_local.server import LocalEndpoint, wait_forever

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
    )
    try:
        settings = endpoint.settings()
        print(f"healthimaging-local: serving on {endpoint.url}", flush=True)
        print("# AWS CLI / environment:")
        for name, value in settings["env"].items():
            print(f"export {name}={value}")
        print("# boto3:")
        print(
            f'boto3.client("medical-imaging", endpoint_url="{endpoint.url}", region_name="us-east-1",'
            ' aws_access_key_id="test", aws_secret_access_key="test",'
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
