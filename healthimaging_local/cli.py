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
    from healthimaging_local.throttling import RateLimit, rate_limits

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
        rate_limits=rate_limits(
            RateLimit(args.start_rate, args.start_burst),
            RateLimit(args.get_rate, args.get_burst),
            args.documented_rate_limits,
            args.rate_limit,
        ),
        import_workers=args.import_workers,
        fail_jobs=args.fail_jobs,
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


SERVE_EPILOG = """\
Services on the one URL, chosen by the SigV4 credential scope of each request: medical-imaging (this emulator),
s3, sqs and events (moto). S3 bucket notifications reach SQS; EventBridge rules deliver to SQS targets;
HealthImaging publishes its documented events (source aws.medical-imaging) to the default event bus.

What survives a restart (everything under --state-dir): data stores, import jobs and image sets (SQLite); S3
buckets, objects and bucket notification configurations; SQS queues and EventBridge buses, rules and targets; the
messages left in SQS queues when the endpoint stops cleanly (SIGINT/SIGTERM; after SIGKILL they are lost).
Not kept: other S3 bucket settings (versioning, policies), EventBridge archives and rate-limit buckets.
"""


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0.

    :param text: the argument.
    """
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0.

    :param text: the argument.
    """
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1.

    :param text: the argument.
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _rate_limit(text: str) -> Any:
    from healthimaging_local.throttling import parse_rate_limit

    try:
        return parse_rate_limit(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``healthimaging-local``."""
    parser = argparse.ArgumentParser(prog="healthimaging-local", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve HealthImaging, S3, SQS and EventBridge on one local URL",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=4566, help="0 picks a free port")
    serve.add_argument("--state-dir", required=True, help="folder where state persists across restarts")
    serve.add_argument("--import-seconds", type=float, default=0.0, help="minimum IN_PROGRESS time of a job")
    serve.add_argument(
        "--throttle-rate",
        type=float,
        default=0.0,
        help="fault injection: fraction of HealthImaging requests answered 429 at random, on top of the rates",
    )
    serve.add_argument(
        "--fail-jobs",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="fault injection: the first N import jobs of each data store end FAILED with an INJECTED_FAILURE"
        " message (default 0)",
    )
    serve.add_argument(
        "--max-concurrent-imports",
        type=int,
        default=100,
        help="service quota: SUBMITTED/IN_PROGRESS jobs per data store; a new StartDICOMImportJob beyond it is"
        " answered 402 ServiceQuotaExceededException (default 100, as AWS; 20 in ap-southeast-2)",
    )
    serve.add_argument(
        "--import-workers",
        type=positive_int,
        default=4,
        help="threads that list, parse and commit import jobs; not a limit on jobs in flight (default 4)",
    )
    rates = serve.add_argument_group(
        "request rates (token buckets, 429 ThrottlingException when empty; a rate of 0 switches a limit off)"
    )
    rates.add_argument(
        "--start-rate", type=non_negative_float, default=1.0, help="StartDICOMImportJob per second (1)"
    )
    rates.add_argument(
        "--start-burst", type=non_negative_int, default=2, help="StartDICOMImportJob burst (2)"
    )
    rates.add_argument(
        "--get-rate", type=non_negative_float, default=25.0, help="GetDICOMImportJob per second (25)"
    )
    rates.add_argument("--get-burst", type=non_negative_int, default=50, help="GetDICOMImportJob burst (50)")
    rates.add_argument(
        "--documented-rate-limits",
        action="store_true",
        help="also enforce AWS's documented rates of every other operation (e.g. CreateDatastore 0.085/s)",
    )
    rates.add_argument(
        "--rate-limit",
        type=_rate_limit,
        action="append",
        default=[],
        metavar="OPERATION=RATE[/BURST]",
        help="set one operation's rate (repeatable; wins over the flags above), e.g. SearchImageSets=25/50",
    )
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
