"""Number-by-number validation of an exported ONNX model: ONNX Runtime (CPU) vs PyTorch.

Inputs (:func:`sample_inputs`): generated shapes images at batch sizes 1, 3 and 8, and
*tie-heavy* images (constant images and large flat regions, where max-pool windows and
neighbouring pixels tie) at the model's size; segmenters also at other sizes, odd ones
included (96x96, 75x131, 33x47 by default), both kinds.

For each batch the report holds the max absolute / relative error of every float output,
the top-1 agreement (classifiers), and the mask pixel agreement and per-class IoU between
the PyTorch and the ONNX Runtime masks (segmenters). Segmenters' logits are compared too: the
tensor feeding ArgMax is exposed as an extra output of a validation copy of the graph.

The verdict is judged first by the task: the top-1 class (classifiers) or the mask pixels
(segmenters) must agree (``min_agreement``, CLI ``--min-agreement``). Float outputs must then
agree within a tolerance relative to the outputs' scale: ``|got - ref| <= atol * scale +
rtol * |ref|`` with ``scale = max(1, max |ref|)`` of the batch (CLI ``--atol``/``--rtol``), so
logits in the tens are not held to the absolute error of probabilities. Agreement is judged
where the decision is clear: a pixel (or image) whose top-2 reference scores are closer than
2 * atol * scale may legitimately flip, so it counts as ambiguous; raw agreement is reported
as well. A failure names the check and the flag that relaxes it.

The reference is a PyTorch module (export) or any function from the image batch to the
scores the graph post-processes (import: ONNX Runtime on the original file).
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from visionserve.export.datasets import read_image, sample
from visionserve.server.iou import compute_iou
from visionserve.server.model_config import InputSpec
from visionserve.server.preprocess import preprocess_batch

logger = logging.getLogger(__name__)

SAMPLE_SEED = 1234
BATCH_SIZES = (1, 3, 8)
SEGMENTATION_SIZES = ((96, 96), (75, 131), (33, 47))  # (H, W): even, odd, small and odd
OTHER_SIZE_BATCH = 2
_LOGITS_OUTPUT = "validation_logits"

Reference = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria. Floats: ``|onnx - torch| <= atol + rtol * |torch|`` element-wise.
    Argmax results (top-1, mask pixels): the share of unambiguous images/pixels that agree must
    be at least ``min_agreement``."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_agreement: float = 1.0

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"atol and rtol must be >= 0, got atol={self.atol} rtol={self.rtol}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be a share in [0, 1], got {self.min_agreement}")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "argmax_ambiguity_margin": 2 * self.atol}


class ExportValidationError(RuntimeError):
    """The exported graph and its reference disagree beyond the tolerances; ``report`` says
    where. The message names the failed checks and the flags that relax them."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("validation failed: " + "; ".join(failure_reasons(report)))
        self.report = report


def failure_reasons(report: dict[str, Any]) -> list[str]:
    """One line per failed check: what was measured, the limit, and the flag that relaxes it."""
    tol, reasons = report["tolerances"], []
    for check in (c for c in report["checks"] if not c["passed"]):
        name = check["name"]
        if "error" in check:
            reasons.append(f"{name}: {check['error']}")
        for key, what in (("top1", "top-1 agreement"), ("mask", "mask pixel agreement")):
            agree = check.get(key)
            if agree and not agree["passed"]:
                got = agree.get("agreement_unambiguous")
                reasons.append(f"{name}: {what} {got:.4%} of unambiguous "
                               f"{'images' if key == 'top1' else 'pixels'} < "
                               f"{tol['min_agreement']:.4%} (relax with --min-agreement)"
                               if got is not None else f"{name}: {agree.get('error')}")
        for out, err in check["outputs"].items():
            if not err["passed"]:
                reasons.append(f"{name}: output {out!r} " + (err.get("error") or (
                    f"max abs error {err['max_abs_error']:.3g} > tolerance "
                    f"(--atol {tol['atol']} x output scale {err['scale']:.3g} + --rtol {tol['rtol']} x |ref|)"
                    "; relax with --atol/--rtol")))
    return reasons


def _load_samples(samples: Path | None, count: int) -> list[np.ndarray]:
    if samples is None:
        rng = np.random.default_rng(SAMPLE_SEED)
        return [sample(rng, 96)[0] for _ in range(count)]
    files = sorted(p for p in Path(samples).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images under {samples} to validate on")
    return [read_image(files[i % len(files)]) for i in range(count)]


def tie_heavy_images(count: int, height: int, width: int, seed: int = SAMPLE_SEED) -> list[np.ndarray]:
    """RGB uint8 images made of ties: even ones constant (black, white, then random colours),
    odd ones a few large flat rectangles of random colours (no noise, no blur)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        fixed = {0: (0, 0, 0), 2: (255, 255, 255)}
        colour = fixed.get(i, tuple(rng.integers(0, 256, 3)))
        image = np.empty((height, width, 3), np.uint8)
        image[:] = colour
        if i % 2:
            for _ in range(3):
                y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
                y1, x1 = int(rng.integers(y0 + 1, height + 1)), int(rng.integers(x0 + 1, width + 1))
                image[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        images.append(image)
    return images


def preprocess(images: list[np.ndarray], height: int, width: int, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """RGB uint8 images -> resized, normalised NCHW float32, exactly as the server prepares
    them (:func:`visionserve.server.preprocess.preprocess_batch`, resize mode)."""
    spec = InputSpec(height=height, width=width, mean=tuple(mean), std=tuple(std), mode="resize")
    return preprocess_batch(images, spec)


def sample_inputs(metadata: dict[str, Any], samples: Path | None = None, *,
                  batch_sizes: Sequence[int] = BATCH_SIZES,
                  sizes: Sequence[tuple[int, int]] = SEGMENTATION_SIZES) -> dict[str, np.ndarray]:
    """Named input batches to validate on (see the module docstring).

    Generated images at each of ``batch_sizes`` and tie-heavy ones at the largest, at the model's
    size; for segmenters also both kinds at batch 2 for each (H, W) of ``sizes``.
    """
    spec = metadata["input"]
    mean, std = spec["mean"], spec["std"]
    shapes = [(b, int(spec["height"]), int(spec["width"])) for b in batch_sizes]
    ties = [(max(batch_sizes), int(spec["height"]), int(spec["width"]))]
    if metadata["task"] == "segmentation":
        other_batch = min(OTHER_SIZE_BATCH, max(batch_sizes))
        others = [(other_batch, h, w) for h, w in sizes if (h, w) != shapes[0][1:]]
        shapes, ties = shapes + others, ties + others
    images = iter(_load_samples(samples, sum(b for b, _, _ in shapes)))
    batches = {f"generated b{b} {h}x{w}": preprocess([next(images) for _ in range(b)], h, w, mean, std)
               for b, h, w in shapes}
    for b, h, w in ties:
        batches[f"tie-heavy b{b} {h}x{w}"] = preprocess(tie_heavy_images(b, h, w), h, w, mean, std)
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


def _scale(expected: np.ndarray) -> float:
    return max(1.0, float(np.abs(expected).max())) if expected.size else 1.0


def _float_error(actual: np.ndarray, expected: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    if actual.shape != expected.shape:
        return {"passed": False, "error": f"shape {list(actual.shape)} != reference {list(expected.shape)}"}
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    rel = diff / np.maximum(np.abs(expected), 1e-12)
    scale = _scale(expected)
    return {"max_abs_error": float(diff.max()), "max_rel_error": float(rel.max()),
            "mean_abs_error": float(diff.mean()), "scale": scale,
            "passed": bool(np.all(diff <= tol.atol * scale + tol.rtol * np.abs(expected)))}


def _agreement(ours: np.ndarray, reference: np.ndarray, logits: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    """Argmax agreement; ambiguous = top-2 reference scores within 2 * atol * scale."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol.atol * _scale(logits)
    same = ours == reference
    clear_agree = float(same[clear].mean()) if clear.any() else 1.0
    return {"agreement": float(same.mean()), "agreement_unambiguous": clear_agree,
            "ambiguous": int((~clear).sum()), "total": int(same.size),
            "passed": clear_agree >= tol.min_agreement}


def mask_iou(ours: np.ndarray, reference: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Per-class IoU of two class masks (None: class in neither) and the mean over present ones
    (``server/iou.py``'s arithmetic; no pixel is ignored)."""
    result = compute_iou(ours, reference, num_classes, ignore_index=None)
    per_class = [None if math.isnan(v) else float(v) for v in result.iou]
    return {"per_class_iou": per_class, "mean_iou": result.mean_iou}


def _classification_checks(got: dict[str, np.ndarray], scores: np.ndarray, tol: Tolerances,
                           check: dict[str, Any]) -> list[bool]:
    """``scores``: the reference logits, or its probabilities when the graph has no logits."""
    if "logits" in got:
        probs = torch.softmax(torch.from_numpy(scores), dim=1).numpy()
        check["outputs"]["logits"] = _float_error(got["logits"], scores, tol)
    else:
        probs = scores
    check["outputs"]["probabilities"] = _float_error(got["probabilities"], probs, tol)
    check["top1"] = _agreement(got["probabilities"].argmax(1), scores.argmax(1), scores, tol)
    return [check["top1"]["passed"]]


def _segmentation_checks(got: dict[str, np.ndarray], logits: np.ndarray, tol: Tolerances,
                         check: dict[str, Any]) -> list[bool]:
    check["outputs"]["logits (ArgMax input)"] = _float_error(got[_LOGITS_OUTPUT], logits, tol)
    if "probability" in got:
        expected = torch.softmax(torch.from_numpy(logits), dim=1).amax(1).numpy()
        check["outputs"]["probability"] = _float_error(got["probability"], expected, tol)
    if "logits" in got:
        check["outputs"]["logits"] = _float_error(got["logits"], logits, tol)
    mask, ref = got["mask"], logits.argmax(1).astype(np.uint8)
    check["mask"] = _mask_shape_error(mask, ref) or (
        _agreement(mask, ref, logits, tol) | mask_iou(mask, ref, logits.shape[1]))
    return [check["mask"]["passed"]]


def _mask_shape_error(mask: np.ndarray, ref: np.ndarray) -> dict[str, Any] | None:
    if mask.dtype != np.uint8 or mask.shape != ref.shape:
        return {"passed": False, "error": f"mask {mask.dtype} {list(mask.shape)}, expected uint8 "
                                          f"{list(ref.shape)}"}
    return None


def _index_mask_checks(got: dict[str, np.ndarray], reference: np.ndarray, tol: Tolerances,
                       check: dict[str, Any]) -> list[bool]:
    """The reference gives a class-index mask itself (N, H, W or N, 1, H, W): no scores to
    call a pixel ambiguous, every pixel is judged."""
    ref = reference[:, 0] if reference.ndim == 4 else reference
    if ref.size and (ref.min() < 0 or ref.max() > np.iinfo(np.uint8).max):
        check["mask"] = {"passed": False, "error": f"reference class indices {int(ref.min())}.."
                                                   f"{int(ref.max())} do not fit a uint8 mask"}
        return [False]
    mask, ref = got["mask"], ref.astype(np.uint8)
    error = _mask_shape_error(mask, ref)
    if error:
        check["mask"] = error
        return [False]
    agreement = float((mask == ref).mean()) if ref.size else 1.0
    classes = max(2, int(max(mask.max(initial=0), ref.max(initial=0))) + 1)
    check["mask"] = {"agreement": agreement, "agreement_unambiguous": agreement, "ambiguous": 0,
                     "total": int(ref.size), "passed": agreement >= tol.min_agreement,
                     **mask_iou(mask, ref, classes)}
    return [check["mask"]["passed"]]


def _check_batch(session: ort.InferenceSession, reference: Reference, task: str, x: np.ndarray,
                 tol: Tolerances, mask_reference: bool = False) -> dict[str, Any]:
    check: dict[str, Any] = {"input_shape": list(x.shape), "outputs": {}}
    logits = np.asarray(reference(x))
    try:
        got = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {session.get_inputs()[0].name: x})))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        return {**check, "passed": False, "error": f"ONNX Runtime failed on {list(x.shape)}: {exc}"}
    check_outputs = (_classification_checks if task == "classification" else
                     _index_mask_checks if mask_reference else _segmentation_checks)
    parts = check_outputs(got, logits, tol, check)
    check["passed"] = all(parts) and all(o["passed"] for o in check["outputs"].values())
    return check


def torch_reference(module: nn.Module) -> Reference:
    """A PyTorch module as a validation reference (call it in eval mode)."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def versions() -> dict[str, str]:
    """Versions of the tools that made and checked the model."""
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def validate_onnx(model_bytes: bytes, reference: nn.Module | Reference, task: str,
                  inputs: dict[str, np.ndarray], *, tolerances: Tolerances | None = None,
                  mask_reference: bool = False) -> dict[str, Any]:
    """Run ``model_bytes`` on ONNX Runtime (CPU) and ``reference``; the validation report.

    ``reference`` maps the image batch to the scores the graph post-processes (for segmenters
    at the input's H, W): a PyTorch module (called as is, so put it in eval mode first) or a
    function of NumPy arrays. ``mask_reference``: the reference of a segmenter gives its
    class-index mask instead (an imported graph that ends in ArgMax); the masks are compared
    pixel by pixel, there are no logits to compare.
    """
    tol = tolerances or Tolerances()
    if isinstance(reference, nn.Module):
        reference = torch_reference(reference)
    exposed = task == "segmentation" and not mask_reference
    runnable = expose_argmax_input(model_bytes) if exposed else model_bytes
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(runnable, options, providers=["CPUExecutionProvider"])
    checks = []
    for name, x in inputs.items():
        check = _check_batch(session, reference, task, x, tol, mask_reference)
        checks.append({"name": name, **check})
        logger.info("validated %s: %s", name, "ok" if check["passed"] else "FAILED")
    proto = onnx.load_from_string(model_bytes)
    return {
        "passed": all(c["passed"] for c in checks),
        "task": task,
        "tolerances": tol.to_dict(),
        "runtime": {"onnxruntime_providers": session.get_providers()},
        "versions": versions(),
        "graph": {"inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
                  "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                  "nodes": len(proto.graph.node),
                  "op_types": sorted({n.op_type for n in proto.graph.node})},
        "checks": checks,
    }


def _rows(check: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    if "error" in check:
        rows.append((check["name"], "-", "", "", "", "", "FAIL: " + check["error"][:120]))
    for out, err in check["outputs"].items():
        rows.append((check["name"], out, f"{err.get('max_abs_error', math.nan):.2e}",
                     f"{err.get('max_rel_error', math.nan):.2e}", "", "",
                     "ok" if err["passed"] else "FAIL " + err.get("error", "")))
    for key in ("top1", "mask"):
        if key in check:
            agree = check[key]
            text = f"{agree['agreement']:.4%}" if "agreement" in agree else agree.get("error", "")
            iou = f"{agree['mean_iou']:.4f}" if "mean_iou" in agree else ""
            rows.append((check["name"], key, "", "", text, iou, "ok" if agree["passed"] else "FAIL"))
    return rows


def format_report(report: dict[str, Any]) -> str:
    """A text table of a validation report: one row per output and per argmax check."""
    rows = [("check", "output", "max abs err", "max rel err", "agreement", "mean IoU", "result")]
    for check in report["checks"]:
        rows.extend(_rows(check))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    tol = report["tolerances"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(f"{verdict} (atol={tol['atol']} x output scale, rtol={tol['rtol']}, "
                 f"min_agreement={tol.get('min_agreement', 1.0)})")
    lines.extend(f"  {reason}" for reason in failure_reasons(report))
    return "\n".join(lines)
