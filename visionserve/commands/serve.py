"""``visionserve serve``: serve a model repository over gRPC until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from visionserve.commands._args import comma_list
from visionserve.server.decoder_guard import limit_decoders
from visionserve.server.settings import MIB, MODEL_CONTROL_MODES, load_settings

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
    parser.add_argument(
        "--workers",
        type=int,
        help="threads decoding and pre/post-processing requests (default 0 = the usable cores)",
    )
    parser.add_argument(
        "--max-message-mb", type=float, help="largest request/response message in MiB (default 64)"
    )
    parser.add_argument(
        "--max-pixels", type=int, help="largest decoded image, height*width (default 40,000,000)"
    )
    parser.add_argument(
        "--intra-op-threads", type=int, help="ONNX Runtime threads per model instance (default 0 = the usable cores divided by the model's instances)"
    )
    parser.add_argument(
        "--grace", type=float, help="seconds to drain in-flight requests on shutdown (default 10)"
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the warm-up inference at load"
    )
    _add_batching(parser.add_argument_group("dynamic batching (override every model.yaml)"))
    _add_operations(parser.add_argument_group("operations"))
    _add_security(parser.add_argument_group("security"))


def _add_batching(batching: argparse._ArgumentGroup) -> None:
    batching.add_argument("--max-batch-size", type=int, help="largest batch sent to a backend")
    batching.add_argument(
        "--max-queue-delay-ms", type=float, help="longest wait for a batch to fill (ms)"
    )
    batching.add_argument("--instances", type=int, help="batches run in parallel per model")
    batching.add_argument(
        "--max-queue-size", type=int, help="waiting requests per model; past it RESOURCE_EXHAUSTED"
    )
    batching.add_argument(
        "--backends",
        type=comma_list,
        help="backends to try in order for every model, comma-separated "
        "(e.g. tensorrt,onnxruntime-cuda; default: each model.yaml's list)",
    )
    batching.add_argument(
        "--admission-wait-ms",
        type=float,
        help="admission control: a model takes what its measured capacity serves within this "
        "wait; past it RESOURCE_EXHAUSTED at once (default 1000; 0 = off)",
    )
    batching.add_argument(
        "--max-admitted",
        type=int,
        help="admission control: a fixed limit of requests queued + running per model "
        "(default 0 = derived from capacity and --admission-wait-ms)",
    )


def _add_operations(ops: argparse._ArgumentGroup) -> None:
    ops.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics HTTP port (off unless given; 0 = free)",
    )
    ops.add_argument(
        "--model-control",
        choices=MODEL_CONTROL_MODES,
        help="none: load all at start (default); poll: rescan the repository and swap in new "
        "versions; explicit: load/unload via KServe RepositoryModelLoad/Unload",
    )
    ops.add_argument("--poll-interval", type=float, help="seconds between polls (default 5)")
    ops.add_argument(
        "--max-streams",
        type=int,
        help="open streaming calls (SegmentStream, SegmentBatches); past it RESOURCE_EXHAUSTED "
        "(default 2048)",
    )
    ops.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="explicit mode: load this model at start (repeatable; default: all)",
    )
    ops.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per log line",
    )


def _add_security(security: argparse._ArgumentGroup) -> None:
    security.add_argument("--tls-cert", help="server certificate chain, PEM (enables TLS)")
    security.add_argument("--tls-key", help="server private key, PEM")
    security.add_argument(
        "--tls-client-ca", help="CA bundle, PEM: require client certificates it signed (mTLS)"
    )
    security.add_argument(
        "--auth-token-file",
        help="file holding the bearer token clients must send (env VISIONSERVE_AUTH_TOKEN)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    token = None
    if args.auth_token_file is not None:
        token = Path(args.auth_token_file).read_text(encoding="utf-8").strip()
    return {
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
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "instances": args.instances,
        "max_queue_size": args.max_queue_size,
        "backends": args.backends,
        "admission_wait_ms": args.admission_wait_ms,
        "max_admitted": args.max_admitted,
        "max_streams": args.max_streams,
        "metrics_port": args.metrics_port,
        "model_control": args.model_control,
        "poll_interval_s": args.poll_interval,
        "load_models": tuple(args.load_model) if args.load_model else None,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "auth_token": token,
    }


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(_overrides(args))
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
