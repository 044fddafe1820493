"""FP32 ONNX -> FP16 ONNX, validated against FP32 on ONNX Runtime.

TensorRT 11 and TensorRT-RTX are strongly typed (and ``visionserve build`` builds TensorRT
10 strongly typed too): an engine computes in the precision of its ONNX tensors, so FP16
is an ONNX-level transformation. ``model.fp16.onnx`` is written beside ``model.onnx``:
weights and activations in float16, graph inputs and outputs kept float32 (the server
feeds the same tensors), and the ops in :data:`KEEP_FP32_OPS` kept in float32 — class
decisions (``ArgMax``, ``TopK``) and ``Softmax`` see float32 inputs, so near-ties are
decided in the precision the logits are compared in.

Validation runs the FP32 and FP16 models on the same generated images on ONNX Runtime
CPU and records top-1 agreement (classifiers) or mask pixel agreement (segmenters) in
``validation.json`` under ``"fp16_onnx"``. Caveat, recorded with the figures: ONNX Runtime's
CPU provider lacks float16 kernels for most ops and inserts casts, so on CPU this measures
the float16 rounding of weights and of activations between ops, not float16 accumulation
inside kernels (GPU kernels accumulate in float32 for convolutions and GEMMs, too).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from visionserve.export.agreement import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    MIN_MASK_AGREEMENT,
    MIN_TOP1_AGREEMENT,
    agreement,
    merge_validation,
    passes,
    run_batched,
    validation_images,
)
from visionserve.server.model_config import ModelConfig
from visionserve.server.repository import ONNX_FILE, ONNX_FP16_FILE

logger = logging.getLogger(__name__)

FP32_FILE = ONNX_FILE
FP16_FILE = ONNX_FP16_FILE
VALIDATION_FILE = "validation.json"
VALIDATION_KEY = "fp16_onnx"
KEEP_FP32_OPS: tuple[str, ...] = ("ArgMax", "ArgMin", "Softmax", "LogSoftmax", "TopK")
_EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf's 2 GiB limit, with room to spare


class Fp16ValidationError(RuntimeError):
    """FP16 outputs disagree with FP32 beyond the thresholds; carries the report."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(report["message"])
        self.report = report


@dataclass(frozen=True)
class Fp16Thresholds:
    """Minimum agreement of FP16 with FP32 for the variant to pass."""

    min_top1: float = MIN_TOP1_AGREEMENT
    min_mask: float = MIN_MASK_AGREEMENT

    def __post_init__(self) -> None:
        for name in ("min_top1", "min_mask"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")


def fp16_from_onnx(
    model: onnx.ModelProto, keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS
) -> onnx.ModelProto:
    """The FP16 version of ``model`` (float32 inputs/outputs kept; ``keep_fp32_ops`` in fp32)."""
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops)),
    )
    _sort_topologically(converted.graph)
    onnx.checker.check_model(converted)
    kept = sum(1 for node in converted.graph.node if node.op_type in keep_fp32_ops)
    logger.info(
        "FP16 conversion: %d nodes, %d kept in float32 (%s)",
        len(converted.graph.node),
        kept,
        ", ".join(keep_fp32_ops),
    )
    return converted


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so producers come first (the converter appends its casts;
    ONNX and TensorRT's parser need topological order). Stable for already-ordered nodes."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    order: list[int] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 done
    for root in range(len(graph.node)):
        stack = [(root, False)]
        while stack:
            index, expanded = stack.pop()
            if expanded:
                state[index] = 2
                order.append(index)
                continue
            if state[index]:
                continue
            state[index] = 1
            stack.append((index, True))
            for name in reversed(graph.node[index].input):
                dep = produced_by.get(name)
                if dep is not None and state[dep] == 0:
                    stack.append((dep, False))
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def write_fp16_onnx(version_dir: Path, keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS) -> Path:
    """``version_dir/model.onnx`` -> ``version_dir/model.fp16.onnx``; returns its path."""
    source = Path(version_dir) / FP32_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no FP32 model at {source}: export the model first")
    converted = fp16_from_onnx(onnx.load(str(source)), keep_fp32_ops)
    target = source.with_name(FP16_FILE)
    external = converted.ByteSize() > _EXTERNAL_DATA_LIMIT
    onnx.save(
        converted,
        str(target),
        save_as_external_data=external,
        location=FP16_FILE + ".data" if external else None,
    )
    logger.info(
        "wrote %s (%.1f MB, from %.1f MB)",
        target,
        target.stat().st_size / 1e6,
        source.stat().st_size / 1e6,
    )
    return target


def ort_runner(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session's ``run`` as ``feeds -> {output name: array}``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def validate_fp16(
    version_dir: Path,
    config: ModelConfig,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    thresholds: Fp16Thresholds | None = None,
    threads: int = 0,
    batch: int = 16,
) -> dict[str, Any]:
    """Compare ``model.fp16.onnx`` with ``model.onnx``; merge the report into validation.json.

    Raises :class:`Fp16ValidationError` (after recording the report) when below threshold.
    """
    version_dir = Path(version_dir)
    thresholds = thresholds or Fp16Thresholds()
    images = validation_images(config, samples, seed)
    start = time.perf_counter()
    reference = run_batched(
        ort_runner(version_dir / FP32_FILE, threads), config.input.name, images, batch
    )
    candidate = run_batched(
        ort_runner(version_dir / FP16_FILE, threads), config.input.name, images, batch
    )
    result = agreement(config, reference, candidate)
    ok, threshold = passes(result, thresholds.min_top1, thresholds.min_mask)
    report = {
        "passed": ok,
        "file": FP16_FILE,
        "reference": FP32_FILE,
        **result,
        "threshold": threshold,
        "inputs": {
            "source": "visionserve.export.datasets.sample",
            "count": samples,
            "seed": seed,
            "shape": list(images.shape),
        },
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "keep_fp32_ops": list(KEEP_FP32_OPS),
        "seconds": round(time.perf_counter() - start, 2),
        "note": "CPU provider: fp16 rounding of weights and activations between ops; "
        "kernels without fp16 support run in fp32 behind inserted casts",
    }
    metric = result["metric"]
    report["message"] = (
        f"FP16 vs FP32 {metric.replace('_', ' ')} {result[metric]:.4%} on {samples} samples "
        f"({'>=' if ok else 'below'} the {threshold:.2%} threshold)"
    )
    merge_validation(version_dir / VALIDATION_FILE, VALIDATION_KEY, report)
    logger.info("%s: %s", version_dir, report["message"])
    if not ok:
        raise Fp16ValidationError(report)
    return report


def fp16_variant(version_dir: Path, config: ModelConfig, **validate_kwargs: Any) -> dict[str, Any]:
    """Write ``model.fp16.onnx`` and validate it (see :func:`validate_fp16`)."""
    write_fp16_onnx(version_dir)
    return validate_fp16(version_dir, config, **validate_kwargs)
