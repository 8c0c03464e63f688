"""The engine seam: what turns a CPU batch of network inputs into probabilities.

Everything before (decoding, preprocessing) and after (masks, compositing, encoding) is
shared and written once; an engine only runs the network somewhere: PyTorch on a device,
ONNX Runtime, a remote service. A new engine is one class with this shape and one entry in
`engines.ENGINE_BUILDERS`; the CLI, the page and pre/post-processing do not change.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Engine(Protocol):
    name: str  # the runtime: "torch", "onnxruntime", ...
    device: str  # where the network runs: "cpu", "cuda:0", ...
    # The registered model it runs, when the engine knows (an exported file's metadata, a service's answer)
    model_name: str | None
    # (H, W) it prefers (an exported file's own size), or None: the model's own
    input_size: tuple[int, int] | None
    # (H, W) the engine can only run at, or None when it takes any size (in multiples of 32)
    fixed_size: tuple[int, int] | None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 CPU normalised input -> (B, 1, h, w) float32 CPU probabilities."""
        ...

    def describe(self) -> str:
        """One line for people: runtime, device, precision."""
        ...
