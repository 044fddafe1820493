"""Helpers shared by the server tests: scraping the Prometheus endpoint, PNG files and
the visionserve.v1 answer to compare other paths with."""

from __future__ import annotations

import re
import subprocess
import urllib.request

import cv2
import numpy as np
from visionserve.protos import visionserve_pb2 as pb


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def png(array: np.ndarray) -> bytes:
    """RGB (HxWx3) or index (HxW) uint8 -> PNG bytes."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array)
    assert ok
    return buffer.tobytes()


def v1_segment(stub, model: str, image: bytes, truth: bytes) -> tuple[np.ndarray, pb.IoUReport]:
    """visionserve.v1 ``Segment`` of an encoded image with a PNG ground truth: (mask, IoU)."""
    reply = stub.Segment(
        pb.SegmentRequest(
            model=model,
            image=pb.Image(encoded=image),
            ground_truth=pb.Mask(data=truth, format=pb.MASK_FORMAT_PNG),
            mask_format=pb.MASK_FORMAT_RAW,
        ),
        timeout=20,
    )
    mask = np.frombuffer(reply.mask.data, np.uint8).reshape(reply.mask.height, reply.mask.width)
    return mask, reply.iou


def read_port(process: subprocess.Popen) -> int:
    """The port a ``visionserve serve`` process announces ("serving on HOST:PORT")."""
    for line in process.stdout:
        match = re.search(r"serving on .*:(\d+)$", line.strip())
        if match:
            return int(match.group(1))
    raise AssertionError(f"server exited (rc={process.wait()}) without announcing its port")
