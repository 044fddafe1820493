"""The common end of ``export`` and ``import``: audit -> validation -> serving mode -> entry.

Both commands hand over an ONNX graph with its fused outputs, the ``model.yaml`` config and a
reference (PyTorch, or ONNX Runtime on the original file); :func:`finish_entry` audits the
graph for TensorRT, validates it against the reference, picks how segmenters are served
(:func:`choose_input_mode`), and writes the repository entry -- or writes nothing and raises.

Serving mode of segmenters with a dynamic H, W: ``pad`` (the image at its own resolution,
padded to a shape bucket) unless padding changes the masks. Models with global pooling (ASPP,
LR-ASPP, PSP) see the padded border in their image-level features, so their masks can differ
from the masks at the image's exact size. The graph is run on generated images at sizes that
need padding, both ways; below ``PAD_AGREEMENT_FLOOR`` of equal pixels the model is served in
``resize`` mode at its input size instead. The measurement goes into ``validation.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from visionserve.export.audit import AuditReport
from visionserve.export.datasets import sample
from visionserve.export.receptive_field import receptive_field
from visionserve.export.repository import write_repository_entry
from visionserve.export.validate import (
    ExportValidationError,
    Reference,
    Tolerances,
    validate_onnx,
)
from visionserve.server.model_config import ModelConfig
from visionserve.server.preprocess import layout, preprocess

logger = logging.getLogger(__name__)

PAD_AGREEMENT_FLOOR = 0.99
PAD_PROBE_SIZES = ((75, 131), (100, 150), (200, 140))  # each needs padding to a bucket
PAD_PROBE_SEED = 4321


def _masks(session: ort.InferenceSession, config: ModelConfig, image: np.ndarray,
           spec: Any) -> np.ndarray:
    x = preprocess(image, spec)[None]
    (mask,) = session.run([config.outputs["mask"]], {config.input.name: x})
    plan = layout(*image.shape[:2], spec)
    return mask[0, : plan.content[0], : plan.content[1]]


def choose_input_mode(model_bytes: bytes, config: ModelConfig) -> tuple[ModelConfig, dict[str, Any]]:
    """``config`` in the mode its masks support (see the module docstring) and the measurement.

    Only segmenters served in ``pad`` mode are measured; others are returned unchanged.
    """
    if config.task != "segmentation" or config.input.mode != "pad":
        return config, {"mode": config.input.mode, "measured": False}
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(PAD_PROBE_SEED)
    same = total = 0
    for height, width in PAD_PROBE_SIZES:
        image = cv2.resize(sample(rng, 96)[0], (width, height), interpolation=cv2.INTER_LINEAR)
        exact = dataclasses.replace(config.input, mode="resize", height=height, width=width, buckets=())
        padded, at_size = _masks(session, config, image, config.input), _masks(session, config, image, exact)
        same, total = same + int((padded == at_size).sum()), total + at_size.size
    agreement = same / total
    mode = "pad" if agreement >= PAD_AGREEMENT_FLOOR else "resize"
    measured = {"mode": mode, "measured": True, "pad_mask_agreement": agreement,
                "floor": PAD_AGREEMENT_FLOOR, "sizes": [list(s) for s in PAD_PROBE_SIZES],
                "why": (f"masks with bucket padding equal {agreement:.2%} of the pixels at the exact "
                        f"size ({'>=' if mode == 'pad' else '<'} {PAD_AGREEMENT_FLOOR:.0%})")}
    if mode == "resize":
        config = dataclasses.replace(config, input=dataclasses.replace(config.input, mode="resize",
                                                                       buckets=()))
    logger.info("%s: serving in %s mode: %s", config.name, mode, measured["why"])
    return config, measured


def record_receptive_field(model_bytes: bytes, config: ModelConfig) -> tuple[ModelConfig, dict[str, Any]]:
    """``config`` with ``input.receptive_field`` computed from the graph, and the record for
    ``validation.json``. A graph whose geometry cannot be read is served with the default
    tile margin; the record says why (tiling stays exact only with a margin >= the radius)."""
    try:
        field = receptive_field(onnx.load_from_string(model_bytes))
    except Exception as exc:  # UnsupportedGraph, or a graph shape inference cannot read
        logger.warning("%s: receptive field not computed (%s); tiles overlap by the default "
                       "margin (a quarter of the tile)", config.name, exc)
        return config, {"computed": False, "why": str(exc)}
    config = dataclasses.replace(config, input=dataclasses.replace(config.input, receptive_field=field))
    return config, {"computed": True, **dataclasses.asdict(field)}


def finish_entry(model_bytes: bytes, config: ModelConfig, audit: AuditReport, reference: Reference,
                 inputs: dict[str, np.ndarray], *, repository: Path, version: int | None,
                 tolerances: Tolerances, details: dict[str, Any],
                 mask_reference: bool = False) -> dict[str, Any]:
    """Validate ``model_bytes`` against ``reference``, choose the serving mode, write the entry.

    ``mask_reference``: ``reference`` gives a segmenter's class-index mask, not its scores
    (:func:`visionserve.export.validate.validate_onnx`).

    Returns the validation report (also ``validation.json``) with ``details`` merged in;
    raises :class:`ExportValidationError` (nothing written) when validation fails.
    """
    report = validate_onnx(model_bytes, reference, config.task, inputs, tolerances=tolerances,
                           mask_reference=mask_reference)
    report["audit"] = audit.to_dict() | {"allowed_unsupported": not audit.ok}
    report.update(details)
    if not report["passed"]:
        raise ExportValidationError(report)
    config, report["serving"] = choose_input_mode(model_bytes, config)
    config, report["receptive_field"] = record_receptive_field(model_bytes, config)
    report["serving"]["max_batch_size"] = config.max_batch_size
    files = {"model.onnx": model_bytes, "validation.json": (json.dumps(report, indent=2) + "\n").encode()}
    version_dir = write_repository_entry(Path(repository), config, files, version=version)
    report["version_dir"], report["version"] = str(version_dir), int(version_dir.name)
    return report
