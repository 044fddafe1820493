"""Number-by-number validation of an exported ONNX model: ONNX Runtime (CPU) vs PyTorch.

For each sample batch (batch 1, batch 4, and for segmenters a second image size) the report
holds the max absolute / relative error of every float output, the top-1 agreement
(classifiers) and the mask pixel agreement (segmenters). Segmenters' logits are compared too:
the tensor feeding ArgMax is exposed as an extra output of a validation copy of the graph.

Agreement of argmax results is judged where the decision is clear: a pixel (or image) whose
top-2 PyTorch logits are closer than the tolerance may legitimately flip, so it counts as
ambiguous; raw agreement is reported as well.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from visionserve.export.datasets import read_image, sample

logger = logging.getLogger(__name__)

SAMPLE_SEED = 1234
_LOGITS_OUTPUT = "validation_logits"


class ExportValidationError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerances; ``report`` says where."""

    def __init__(self, report: dict[str, Any]) -> None:
        failed = [c["name"] for c in report["checks"] if not c["passed"]]
        super().__init__(f"ONNX Runtime output differs from PyTorch beyond atol={report['tolerances']['atol']}"
                         f" rtol={report['tolerances']['rtol']} in checks {failed}")
        self.report = report


def _load_samples(samples: Path | None, count: int) -> list[np.ndarray]:
    if samples is None:
        rng = np.random.default_rng(SAMPLE_SEED)
        return [sample(rng, 96)[0] for _ in range(count)]
    files = sorted(p for p in Path(samples).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images under {samples} to validate on")
    return [read_image(files[i % len(files)]) for i in range(count)]


def preprocess(images: list[np.ndarray], height: int, width: int, mean: list[float],
               std: list[float]) -> np.ndarray:
    """RGB uint8 images -> resized, normalised NCHW float32 (pixel / 255 - mean) / std."""
    resized = [cv2.resize(im, (width, height), interpolation=cv2.INTER_LINEAR) for im in images]
    x = np.stack(resized).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def sample_inputs(metadata: dict[str, Any], samples: Path | None = None) -> dict[str, np.ndarray]:
    """Named input batches to validate on: batch 1 and 4 at the model's size, and for segmenters
    batch 2 at another size (dynamic H, W)."""
    spec = metadata["input"]
    h, w = int(spec["height"]), int(spec["width"])
    images = _load_samples(samples, 6)
    batches = {f"batch1_{h}x{w}": preprocess(images[:1], h, w, spec["mean"], spec["std"]),
               f"batch4_{h}x{w}": preprocess(images[1:5], h, w, spec["mean"], spec["std"])}
    if metadata["task"] == "segmentation":
        oh, ow = max(32, (h // 2 + 31) // 32 * 32), (w + 32 + 31) // 32 * 32
        batches[f"batch2_{oh}x{ow}"] = preprocess(images[4:6], oh, ow, spec["mean"], spec["std"])
    return batches


def expose_argmax_input(model_bytes: bytes) -> bytes:
    """A copy of the graph with the tensor that feeds ArgMax added as output ``validation_logits``."""
    proto = onnx.load_from_string(model_bytes)
    argmax = [n for n in proto.graph.node if n.op_type == "ArgMax"]
    if len(argmax) != 1:
        raise ValueError(f"expected one ArgMax node in a segmentation graph, found {len(argmax)}")
    proto.graph.node.append(onnx.helper.make_node("Identity", [argmax[0].input[0]], [_LOGITS_OUTPUT]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(_LOGITS_OUTPUT, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString()


def _float_error(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    if actual.shape != expected.shape:
        return {"passed": False, "error": f"shape {list(actual.shape)} != PyTorch {list(expected.shape)}"}
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    rel = diff / np.maximum(np.abs(expected), 1e-12)
    return {"max_abs_error": float(diff.max()), "max_rel_error": float(rel.max()),
            "mean_abs_error": float(diff.mean()),
            "passed": bool(np.all(diff <= atol + rtol * np.abs(expected)))}


def _agreement(ours: np.ndarray, reference: np.ndarray, logits: np.ndarray, atol: float) -> dict[str, Any]:
    """Argmax agreement; ambiguous = top-2 reference logits within 2 * atol of each other."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * atol
    same = ours == reference
    clear_agree = float(same[clear].mean()) if clear.any() else 1.0
    return {"agreement": float(same.mean()), "agreement_unambiguous": clear_agree,
            "ambiguous": int((~clear).sum()), "total": int(same.size), "passed": clear_agree == 1.0}


def _check_batch(session: ort.InferenceSession, model: nn.Module, task: str, x: np.ndarray,
                 atol: float, rtol: float) -> dict[str, Any]:
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x})))
    check: dict[str, Any] = {"input_shape": list(x.shape), "outputs": {}}
    if task == "classification":
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        check["outputs"]["logits"] = _float_error(got["logits"], logits, atol, rtol)
        check["outputs"]["probabilities"] = _float_error(got["probabilities"], probs, atol, rtol)
        top1 = _agreement(got["logits"].argmax(1), logits.argmax(1), logits, atol)
        check["top1"] = top1
        parts = [top1["passed"]]
    else:
        check["outputs"]["logits (ArgMax input)"] = _float_error(got[_LOGITS_OUTPUT], logits, atol, rtol)
        mask, ref = got["mask"], logits.argmax(1).astype(np.uint8)
        shape_ok = mask.dtype == np.uint8 and mask.shape == ref.shape
        check["mask"] = (_agreement(mask, ref, logits, atol) if shape_ok else
                         {"passed": False, "error": f"mask {mask.dtype} {list(mask.shape)}, "
                                                    f"expected uint8 {list(ref.shape)}"})
        parts = [check["mask"]["passed"]]
    check["passed"] = all(parts) and all(o["passed"] for o in check["outputs"].values())
    return check


def versions() -> dict[str, str]:
    """Versions of the tools that made and checked the model."""
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def validate_onnx(model_bytes: bytes, model: nn.Module, task: str, inputs: dict[str, np.ndarray], *,
                  atol: float = 1e-4, rtol: float = 1e-4) -> dict[str, Any]:
    """Run ``model_bytes`` on ONNX Runtime (CPU) and ``model`` on PyTorch; the validation report."""
    model = model.eval()
    runnable = expose_argmax_input(model_bytes) if task == "segmentation" else model_bytes
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(runnable, options, providers=["CPUExecutionProvider"])
    checks = []
    for name, x in inputs.items():
        check = _check_batch(session, model, task, x, atol, rtol)
        checks.append({"name": name, **check})
        logger.info("validated %s: %s", name, "ok" if check["passed"] else "FAILED")
    proto = onnx.load_from_string(model_bytes)
    return {
        "passed": all(c["passed"] for c in checks),
        "task": task,
        "tolerances": {"atol": atol, "rtol": rtol, "argmax_ambiguity_margin": 2 * atol},
        "runtime": {"onnxruntime_providers": session.get_providers()},
        "versions": versions(),
        "graph": {"inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
                  "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                  "nodes": len(proto.graph.node),
                  "op_types": sorted({n.op_type for n in proto.graph.node})},
        "checks": checks,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short text table of a validation report."""
    rows = [("check", "output", "max abs err", "agreement", "result")]
    for check in report["checks"]:
        for out, err in check["outputs"].items():
            rows.append((check["name"], out, f"{err.get('max_abs_error', float('nan')):.2e}", "",
                         "ok" if err["passed"] else "FAIL"))
        for key in ("top1", "mask"):
            if key in check:
                agree = check[key]
                text = f"{agree.get('agreement', 0):.4%}" if "agreement" in agree else agree.get("error", "")
                rows.append((check["name"], key, "", text, "ok" if agree["passed"] else "FAIL"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(f"{verdict} (atol={report['tolerances']['atol']}, rtol={report['tolerances']['rtol']})")
    return "\n".join(lines)
