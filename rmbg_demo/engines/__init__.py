"""Engines: where the network runs. `build_engine` picks one from a registered model and its
weights (an `.onnx` file runs on ONNX Runtime whatever the model); see `base.Engine` for the seam."""
from __future__ import annotations

import os

from ..models import ModelSpec, Runtime, get_spec
from .base import Engine
from .ort import OnnxEngine, OnnxModelError
from .pytorch import TorchEngine, configure_torch, pick_device, pick_dtype
from .wrappers import RequestBatcher, ZeroGpuEngine, zerogpu_decorator

__all__ = ["Engine", "OnnxEngine", "OnnxModelError", "RequestBatcher", "TorchEngine", "ZeroGpuEngine",
           "build_engine", "configure_torch", "pick_device", "pick_dtype", "zerogpu_decorator"]


def build_engine(model: str | ModelSpec, weights: str | os.PathLike | None = None, device="auto", dtype="auto", *,
                 network=None, input_size: tuple[int, int] | None = None, compile: str | None = None,
                 max_batch: int = 1) -> Engine:
    """The engine for `model` with `weights` (found as `rmbg_demo.weights` says when None).

    `network`: a PyTorch network already built (tests, benchmarks). `compile`: a torch.compile
    backend, warmed up at `input_size` for batches up to `max_batch`."""
    from ..weights import load_model, resolve_weights

    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    exported = os.fspath(weights or "").endswith(".onnx")
    if network is None and (spec.runtime is Runtime.ONNX or exported):
        if compile:
            what = os.fspath(weights) if exported else spec.name
            raise ValueError(f"compiling needs a PyTorch network; {what} runs as an ONNX graph on onnxruntime")
        path = resolve_weights(spec.name, weights)
        on_gpu = pick_device(device).type == "cuda"
        if exported:  # our export's metadata says the activation and size; one output, the final map
            return OnnxEngine(path, device="cuda" if on_gpu else "cpu", input_size=input_size)
        return OnnxEngine(path, output_index=spec.output_index, activation=spec.activation,
                          device="cuda" if on_gpu else "cpu")
    if network is None:
        network = load_model(spec.name, weights)
    engine = TorchEngine(network, output_index=spec.output_index, activation=spec.activation, device=device,
                         dtype=dtype)
    if compile:
        engine.compile(compile, tuple(input_size or spec.input_size), max_batch)
    return engine
