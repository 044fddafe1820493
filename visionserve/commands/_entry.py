"""What ``export`` and ``import`` print and return once a repository entry is attempted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def serving_line(report: dict[str, Any]) -> str:
    """How the model will be served, and why (pad vs resize, batch limit)."""
    serving = report.get("serving", {})
    text = f"serving: input mode {serving.get('mode')}"
    if serving.get("measured"):
        text += f" ({serving['why']})"
    if serving.get("max_batch_size") == 1:
        text += "; max_batch_size 1"
    field = report.get("receptive_field") or {}
    if field.get("computed"):
        text += (f"; receptive field {field['size']} px (radius {field['radius']}, "
                 f"output stride {field['stride']})")
    elif field:
        text += f"; receptive field not computed ({field['why']})"
    return text


def write_entry(attempt: Callable[[], dict[str, Any]], repository: Path, name: str) -> int:
    """Run ``attempt`` (export or import); print the report; the exit status (see the commands)."""
    from visionserve.export.onnx_export import ExportAuditError, audit_summary
    from visionserve.export.validate import ExportValidationError, format_report

    try:
        report = attempt()
    except ExportAuditError as exc:
        print(audit_summary(exc.report))
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except ExportValidationError as exc:
        print(format_report(exc.report))
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(report["audit_summary"])
    for note in report.get("notes", []):
        print(f"note: {note}")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if report["audit"]["allowed_unsupported"]:
        print("warning: TensorRT would not build this model (--allow-unsupported): "
              + "; ".join(report["audit"]["problems"][:5]), file=sys.stderr)
    print(serving_line(report))
    print(f"wrote {report['version_dir']} (model.onnx, validation.json) and "
          f"{Path(repository) / name / 'model.yaml'}")
    return 0
