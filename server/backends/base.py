"""The one small interface every inference backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # str/None: a dynamic dimension


class Backend(Protocol):
    """Loaded from a model file; ``infer`` may be called from several threads."""

    name: str  # e.g. "onnxruntime-cpu"

    @property
    def device(self) -> str:
        """Where it runs, as loaded: "cpu", "cuda:0" or "cuda:0 (NVIDIA H200)"."""
        ...

    @property
    def precision(self) -> str:
        """The precision of the model it runs: "fp32" or "fp16"."""
        ...

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
