"""The Python half of ``scripts/gpu-check.sh``: models to measure, then the GPU figures.

    python bench/gpu_check.py models  --out DIR [--backend onnxruntime-cuda] [--quick]
    python bench/gpu_check.py figures --out DIR [--device cuda] [--quick]

``models`` writes random-weight checkpoints (BatchNorm statistics perturbed, so nothing is
trivially zero) of ResNet-50 (224) and a UNet (base 32, depth 4, served at 512) under
DIR/checkpoints, exports each with ``visionserve export`` into DIR/repository with
``--backends`` as its *only* backend (``onnxruntime-cuda`` on the GPU: a CUDA failure then
fails loudly instead of falling back to CPU and passing as a GPU figure), and writes
``model.fp16.onnx`` beside each ``model.onnx``.

``figures`` prints (and writes to DIR/figures.json), per model: the backend actually used
for FP32 and FP16 (``precision: fp16``); images/s of ONNX Runtime FP32 and FP16 through the
server's backend (host to host, as served) against torch FP16 eager (host to host, and both
device-resident on CUDA); FP16-vs-FP32 top-1 / mask agreement; for the UNet, the first-call
cost of each new input shape and GPU memory growth across shapes, with cuDNN's HEURISTIC
(the default) and EXHAUSTIVE algorithm search.

``--device cpu --quick`` runs every step with the CPU provider on small models
(tests/test_bench_scripts.py), so the one GPU call exercises code that already ran.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["background", "circle", "square", "triangle"]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model to measure: zoo architecture, input side, the batch measured at."""

    name: str
    architecture: str
    arch_kwargs: dict[str, int]
    size: int
    batch: int
    max_batch_size: int  # model.yaml's (the server's batches)


def specs(quick: bool) -> list[Spec]:
    if quick:
        return [
            Spec("resnet50", "resnet_small", {}, 32, 4, 4),
            Spec("unet", "unet", {"base_channels": 4, "depth": 2}, 64, 2, 2),
        ]
    return [
        Spec("resnet50", "resnet50", {}, 224, 128, 32),
        Spec("unet", "unet", {"base_channels": 32, "depth": 4}, 512, 16, 16),
    ]


# -- models ----------------------------------------------------------------------------------
def write_checkpoint(spec: Spec, folder: Path) -> Path:
    """Random weights with non-trivial BatchNorm statistics; returns model.pth."""
    import torch
    from visionserve.export.checkpoint import write_metadata
    from visionserve.export.models import build_model, randomise_batchnorm

    torch.manual_seed(0)
    model = build_model(spec.architecture, num_classes=len(LABELS), **spec.arch_kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(randomise_batchnorm(model).state_dict(), folder / "model.pth")
    metadata = {"architecture": spec.architecture, "arch_kwargs": spec.arch_kwargs,
                "labels": LABELS, "input": {"height": spec.size, "width": spec.size}}
    write_metadata(folder / "model.json", metadata)
    return folder / "model.pth"


def cmd_models(args: argparse.Namespace) -> int:
    from visionserve.cli import main as cli
    from visionserve.export.fp16 import write_fp16_onnx

    repository = args.out / "repository"
    failed = []
    for spec in specs(args.quick):
        start = time.perf_counter()
        checkpoint = write_checkpoint(spec, args.out / "checkpoints" / spec.name)
        report = args.out / f"export-{spec.name}.log"
        with open(report, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            code = cli(["--log-level", "WARNING", "export", "--checkpoint", str(checkpoint),
                        "--repository", str(repository), "--name", spec.name, "--version", "1",
                        "--backends", args.backend, "--max-batch-size", str(spec.max_batch_size),
                        "--no-tensorrt-check", "--atol", "1e-3", "--rtol", "1e-3",
                        "--min-agreement", "0.999"])
        if code != 0:
            print(report.read_text(encoding="utf-8")[-3000:])
            failed.append(spec.name)
            continue
        write_fp16_onnx(repository / spec.name / "1")
        print(f"exported {spec.name} ({spec.architecture} at {spec.size}, backends "
              f"{args.backend}) + model.fp16.onnx in {time.perf_counter() - start:.1f} s")
    if failed:
        print(f"EXPORT FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


# -- figures ---------------------------------------------------------------------------------
class Device:
    """CUDA or CPU: the backend name, synchronisation, memory in use."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.backend = f"onnxruntime-{kind}"

    def sync(self) -> None:
        if self.kind == "cuda":
            import torch

            torch.cuda.synchronize()

    def used_mib(self) -> float | None:
        """Device memory in use (all processes), MiB; None on CPU."""
        if self.kind != "cuda":
            return None
        from cuda.bindings import runtime as cudart

        err, free, total = cudart.cudaMemGetInfo()
        return round((total - free) / 2**20, 1) if err == cudart.cudaError_t.cudaSuccess else None


def per_call(device: Device, fn: Callable[[], object], iters: int, warm: int = 2) -> float:
    """Seconds per call of ``fn`` after ``warm`` calls."""
    for _ in range(warm):
        fn()
    device.sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    device.sync()
    return (time.perf_counter() - start) / iters


def entry_at(entry: Any, precision: str) -> Any:
    """The repository entry as served at ``precision`` (model.yaml's ``precision``)."""
    return dataclasses.replace(entry, config=dataclasses.replace(entry.config, precision=precision))


def torch_model(args: argparse.Namespace, name: str, device: Device) -> Any:
    """The checkpoint in torch, FP16 channels-last on CUDA (FP32 on CPU: no FP16 kernels)."""
    import torch
    from visionserve.export.checkpoint import load_checkpoint

    folder = args.out / "checkpoints" / name
    model = load_checkpoint(folder / "model.pth", folder / "model.json").eval().to(device.kind)
    if device.kind == "cuda":
        model = model.half().to(memory_format=torch.channels_last)
    return model


def torch_runner(model: Any, task: str, device: Device) -> Callable[[np.ndarray], np.ndarray]:
    """Host array in, host result out (probabilities or uint8 mask), as a server would."""
    import torch

    dtype = torch.float16 if device.kind == "cuda" else torch.float32
    layout = torch.channels_last if device.kind == "cuda" else torch.contiguous_format

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            xd = torch.from_numpy(x).to(device.kind).to(dtype).contiguous(memory_format=layout)
            y = model(xd).float()
            out = y.softmax(1) if task == "classification" else y.argmax(1).to(torch.uint8)
            return out.cpu().numpy()

    return run


def speed(args: argparse.Namespace, spec: Spec, device: Device, fig: dict) -> None:
    """images/s: ORT FP32 / FP16 through the server's backend vs torch eager, host to host."""
    from visionserve.server.backends.registry import describe, load_backend
    from visionserve.server.repository import ModelRepository

    entry = ModelRepository(args.out / "repository").entry(spec.name)
    x = np.random.default_rng(0).normal(size=(spec.batch, 3, spec.size, spec.size)).astype(np.float32)
    out: dict[str, Any] = {"batch": spec.batch}
    for precision in ("fp32", "fp16"):
        backend = load_backend(entry_at(entry, precision))
        out[f"backend_{precision}"] = describe(backend)
        seconds = per_call(device, lambda b=backend: b.infer({"image": x}), args.iters)
        out[f"ort_{precision}_img_per_s"] = round(spec.batch / seconds, 1)
        backend.close()
    model = torch_model(args, spec.name, device)
    run = torch_runner(model, entry.config.task, device)
    label = "torch_fp16" if device.kind == "cuda" else "torch_fp32_cpu"
    out[f"{label}_img_per_s"] = round(spec.batch / per_call(device, lambda: run(x), args.iters), 1)
    out["ort_fp16_over_torch"] = round(out["ort_fp16_img_per_s"] / out[f"{label}_img_per_s"], 3)
    if device.kind == "cuda":
        out.update(device_resident(entry, x, model, args.iters, device))
    fig[f"{spec.name}_speed"] = out


def device_resident(entry: Any, x: np.ndarray, model: Any, iters: int, device: Device) -> dict:
    """Pure compute: input already on the GPU, outputs left there (ORT FP16 vs torch FP16)."""
    import onnxruntime as ort
    import torch
    from visionserve.server.backends.onnxruntime import provider_options

    opts = provider_options("onnxruntime-cuda", entry.config.device)
    session = ort.InferenceSession(str(entry_at(entry, "fp16").onnx_path),
                                   providers=[p for p, _ in opts], provider_options=[o for _, o in opts])
    binding, value = session.io_binding(), ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    binding.bind_ortvalue_input("image", value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)
    ort_s = per_call(device, lambda: session.run_with_iobinding(binding), iters)
    xd = torch.from_numpy(x).cuda().half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch_s = per_call(device, lambda: model(xd), iters)
    batch = len(x)
    return {"device_resident_ort_fp16_img_per_s": round(batch / ort_s, 1),
            "device_resident_torch_fp16_img_per_s": round(batch / torch_s, 1),
            "device_resident_ort_fp16_over_torch": round(torch_s / ort_s, 3)}


def agreement_figures(args: argparse.Namespace, spec: Spec, device: Device, fig: dict) -> None:
    """FP16 vs FP32 on the device, both vs FP32 on CPU (the true reference) on a subset."""
    from visionserve.export.agreement import agreement, run_batched, validation_images
    from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend
    from visionserve.server.backends.registry import load_backend
    from visionserve.server.repository import ModelRepository

    entry = ModelRepository(args.out / "repository").entry(spec.name)
    config = entry.config
    count = 4 * spec.batch if config.task == "classification" else 2 * spec.batch
    images = validation_images(config, count, seed=7)
    subset = len(images) // 4 or 1

    def outputs(backend: Any, batch: int, rows: np.ndarray) -> dict:
        try:
            return run_batched(backend.infer, config.input.name, rows, batch)
        finally:
            backend.close()

    fp32 = outputs(load_backend(entry_at(entry, "fp32")), spec.batch, images)
    fp16 = outputs(load_backend(entry_at(entry, "fp16")), spec.batch, images)
    cpu = outputs(OnnxRuntimeBackend(entry.onnx_path), 4, images[:subset])
    first = {name: value[:subset] for name, value in fp32.items()}
    key = "top1_agreement" if config.task == "classification" else "mask_agreement"
    pick = lambda r: {k: r[k] for k in (key, "samples") if k in r}  # noqa: E731
    fig[f"{spec.name}_agreement"] = {
        f"fp16_vs_fp32_on_{device.kind}": pick(agreement(config, fp32, fp16)),
        f"fp32_on_{device.kind}_vs_fp32_on_cpu": pick(agreement(config, cpu, first)),
        f"fp16_on_{device.kind}_vs_fp32_on_cpu": pick(
            agreement(config, cpu, {k: v[:subset] for k, v in fp16.items()})),
    }


def shape_figures(args: argparse.Namespace, spec: Spec, device: Device, fig: dict) -> None:
    """First call per new input shape and memory growth, cuDNN HEURISTIC vs EXHAUSTIVE."""
    from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend
    from visionserve.server.repository import ModelRepository

    entry = ModelRepository(args.out / "repository").entry(spec.name)
    buckets = [b for b in entry.config.input.buckets if b <= spec.size]  # served up to size
    low, mid, top = buckets[-3:]
    most, half = entry.config.max_batch_size, max(1, entry.config.max_batch_size // 2)
    shapes = [(1, top, top), (half, mid, top), (most, top, top), (2, low, mid), (1, mid, mid),
              (most, mid, low)]
    rng = np.random.default_rng(1)
    inputs = {s: rng.normal(size=(s[0], 3, s[1], s[2])).astype(np.float32) for s in shapes}
    out: dict[str, Any] = {"shapes": [list(s) for s in shapes]}
    for search in ("HEURISTIC", "EXHAUSTIVE"):
        before = device.used_mib()
        backend = OnnxRuntimeBackend(entry.onnx_path, name=device.backend,
                                     cudnn_conv_algo_search=search)
        loaded = device.used_mib()
        first, steady = [], []
        for s in shapes:
            start = time.perf_counter()
            backend.infer({"image": inputs[s]})
            first.append(round(time.perf_counter() - start, 4))
        for s in shapes:
            steady.append(round(per_call(device, lambda s=s: backend.infer({"image": inputs[s]}),
                                         2, warm=0), 4))
        out[search] = {"first_call_s": first, "steady_call_s": steady,
                       "extra_first_call_s": round(sum(first) - sum(steady), 3),
                       "mem_mib_before_load": before, "mem_mib_after_load": loaded,
                       "mem_mib_after_shapes": device.used_mib()}
        backend.close()
    fig[f"{spec.name}_shapes"] = out


def section(fig: dict, key: str, fn: Callable[[], None]) -> None:
    """Run one section; a failure is recorded and the next section still runs."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
        fig[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
        print(f"--- {key}: FAILED {fig[f'{key}_error']}", flush=True)
    print(f"--- {key}: {time.perf_counter() - start:.1f} s", flush=True)


def cmd_figures(args: argparse.Namespace) -> int:
    device, fig = Device(args.device), {"device": args.device}
    if args.device == "cuda":
        from visionserve.server.engine_compat import detect_gpu

        fig["gpu"] = detect_gpu(0)[0]
    resnet, unet = specs(args.quick)
    for spec in (resnet, unet):
        section(fig, f"{spec.name}_speed", lambda s=spec: speed(args, s, device, fig))
        section(fig, f"{spec.name}_agreement", lambda s=spec: agreement_figures(args, s, device, fig))
    section(fig, "unet_shapes", lambda: shape_figures(args, unet, device, fig))
    (args.out / "figures.json").write_text(json.dumps(fig, indent=2, default=str) + "\n")
    print(json.dumps(fig, indent=2, default=str))
    return 1 if any(k.endswith("_error") for k in fig) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="write checkpoints, export them, write model.fp16.onnx")
    models.add_argument("--backend", default="onnxruntime-cuda",
                        help="the only backend in model.yaml (default onnxruntime-cuda)")
    figures = sub.add_parser("figures", help="measure the exported models")
    figures.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    figures.add_argument("--iters", type=int, default=20, help="timed calls per figure")
    for each in (models, figures):
        each.add_argument("--out", type=Path, required=True,
                          help="working folder: checkpoints/, repository/, figures.json")
        each.add_argument("--quick", action="store_true", help="small models (the CPU test)")
    args = parser.parse_args(argv)
    if args.command == "figures" and args.iters < 1:
        parser.error("--iters must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    return cmd_models(args) if args.command == "models" else cmd_figures(args)


if __name__ == "__main__":
    sys.exit(main())
