"""What each bench prints about the backend that ran: bare (loaded here) and served
(asked of the server with GetModel), so a GPU figure cannot silently be a CPU one."""

from __future__ import annotations

from typing import Any


def bare_line(backend: Any) -> str:
    from visionserve.server.backends.registry import describe

    return f"bare   backend: {describe(backend)}"


def served_line(address: str, model: str, bare: Any = None) -> str:
    """The served model's backend (GetModel), and a warning when it is not ``bare``'s."""
    import grpc
    from visionserve.protos import visionserve_pb2 as pb
    from visionserve.protos import visionserve_pb2_grpc as pb_grpc
    from visionserve.server.backends.registry import describe

    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.VisionServiceStub(channel).GetModel(pb.GetModelRequest(model=model), timeout=30)
    served = f"{info.backend} on {info.device}, {info.precision}"
    line = f"served backend: {served}"
    if bare is not None and served != describe(bare):
        line += f"\nWARNING: served and bare ran on different backends ({describe(bare)}): the ratio compares unlike things"
    return line
