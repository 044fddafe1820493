"""``visionserve serve``: serve a model repository over gRPC until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys

from visionserve.server.settings import MIB, load_settings

NAME = "serve"
HELP = "Serve a model repository over gRPC"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options; each falls back to its VISIONSERVE_* environment variable, then a default."""
    parser.add_argument(
        "--repository", help="model repository directory (env VISIONSERVE_REPOSITORY)"
    )
    parser.add_argument(
        "--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)"
    )
    parser.add_argument(
        "--port", type=int, help="port (default 8001; 0 = pick a free one, printed on stdout)"
    )
    parser.add_argument("--workers", type=int, help="gRPC worker threads (default 8)")
    parser.add_argument(
        "--max-message-mb", type=float, help="largest request/response message in MiB (default 64)"
    )
    parser.add_argument(
        "--max-pixels", type=int, help="largest decoded image, height*width (default 40,000,000)"
    )
    parser.add_argument(
        "--intra-op-threads", type=int, help="ONNX Runtime threads per model (default 0 = auto)"
    )
    parser.add_argument(
        "--grace", type=float, help="seconds to drain in-flight requests on shutdown (default 10)"
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the warm-up inference at load"
    )


def run(args: argparse.Namespace) -> int:
    from visionserve.server.app import serve

    overrides = {
        "repository": args.repository,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "max_message_bytes": int(args.max_message_mb * MIB)
        if args.max_message_mb is not None
        else None,
        "max_decoded_pixels": args.max_pixels,
        "intra_op_threads": args.intra_op_threads,
        "grace_period_s": args.grace,
        "warmup": False if args.no_warmup else None,
    }
    try:
        settings = load_settings(overrides)
    except ValueError as exc:
        print(f"visionserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(settings, on_ready=_announce)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("could not start serving %s: %s", settings.repository, exc)
        return 1


def _announce(host: str, port: int) -> None:
    print(f"visionserve: serving on {host}:{port}", flush=True)
