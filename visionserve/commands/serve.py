"""``visionserve serve``: serve a model repository over gRPC until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys

from visionserve.commands._settings_cli import add_setting_options, overrides
from visionserve.server.decoder_guard import limit_decoders
from visionserve.server.settings import OPERATIONS, load_settings

NAME = "serve"
HELP = "Serve a model repository over gRPC"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per server setting (declared in server/settings.py), and --log-format.

    Each option falls back to its VISIONSERVE_* environment variable, then the default.
    """
    groups = add_setting_options(parser)
    groups[OPERATIONS].add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per log line (default: %(default)s; not a server setting)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(overrides(args))
    except (OSError, ValueError) as exc:
        print(f"visionserve serve: {exc}", file=sys.stderr)
        return 2
    limit_decoders(settings.max_decoded_pixels)  # before anything imports cv2
    from visionserve.server.app import serve

    if args.log_format == "json":
        from visionserve.server.logs import use_json_logs

        use_json_logs()
    try:
        return serve(settings, on_ready=_announce)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("could not start serving %s: %s", settings.repository, exc)
        return 1


def _announce(host: str, port: int) -> None:
    print(f"visionserve: serving on {host}:{port}", flush=True)
