"""Engines: where the network runs. `build_engine` picks one by runtime: an `.onnx` weights file runs
on ONNX Runtime whatever the model, a service URL is a `RemoteEngine`, anything else the model's own
runtime. See `base.Engine` for the seam; a new runtime is one class and one `ENGINE_BUILDERS` entry."""
from __future__ import annotations

import os
from collections.abc import Callable

from ..models import ModelSpec, Runtime, get_spec
from .base import Engine
from .ort import OnnxEngine, OnnxModelError
from .pytorch import DTYPE_CHOICES, TorchEngine, configure_torch, pick_device, pick_dtype
from .remote import RemoteEngine
from .wrappers import RequestBatcher, ZeroGpuEngine, zerogpu_decorator

__all__ = ["DTYPE_CHOICES", "ENGINE_BUILDERS", "Engine", "OnnxEngine", "OnnxModelError", "RemoteEngine",
           "RequestBatcher", "TorchEngine", "ZeroGpuEngine", "build_engine", "configure_torch", "is_exported_file",
           "pick_device", "pick_dtype", "runtime_for", "zerogpu_decorator"]


def is_exported_file(weights) -> bool:
    """An ONNX file given as weights (`rmbg export`'s, or another single-input image model's)."""
    return os.fspath(weights or "").lower().endswith(".onnx")


def runtime_for(spec: ModelSpec, weights=None, backend: str | None = None) -> str:
    if backend:
        return "remote"
    if is_exported_file(weights) or spec.runtime is Runtime.ONNX:
        return "onnxruntime"
    return "torch"


def _torch_engine(spec: ModelSpec, weights, device, dtype, *, network, input_size, compile, max_batch, backend):
    from ..weights import load_model

    if network is None:
        network = load_model(spec.name, weights)
    engine = TorchEngine(network, output_index=spec.output_index, activation=spec.activation, device=device,
                         dtype=dtype, model_name=spec.name)
    if compile:
        engine.compile(compile, tuple(input_size or spec.input_size), max_batch)
    return engine


def _onnx_engine(spec: ModelSpec, weights, device, dtype, *, network, input_size, compile, max_batch, backend):
    from ..weights import resolve_weights

    exported = is_exported_file(weights)
    if compile:
        what = os.fspath(weights) if exported else spec.name
        raise ValueError(f"compiling needs a PyTorch network; {what} runs as an ONNX graph on onnxruntime")
    path = resolve_weights(spec.name, weights)
    where = "cuda" if pick_device(device).type == "cuda" else "cpu"
    if exported:  # our export's metadata says the model, activation and size; one output, the final map
        return OnnxEngine(path, device=where, input_size=input_size)
    return OnnxEngine(path, output_index=spec.output_index, activation=spec.activation, device=where,
                      model_name=spec.name)


def _remote_engine(spec: ModelSpec, weights, device, dtype, *, network, input_size, compile, max_batch, backend):
    return RemoteEngine(backend, spec.name)


ENGINE_BUILDERS: dict[str, Callable[..., Engine]] = {
    "torch": _torch_engine, "onnxruntime": _onnx_engine, "remote": _remote_engine}


def build_engine(model: str | ModelSpec, weights: str | os.PathLike | None = None, device="auto", dtype="auto", *,
                 network=None, input_size: tuple[int, int] | None = None, compile: str | None = None,
                 max_batch: int = 1, backend: str | None = None) -> Engine:
    """The engine for `model` with `weights` (found as `rmbg_demo.weights` says when None).

    `network`: a PyTorch network already built (tests, benchmarks). `compile`: a torch.compile
    backend, warmed up at `input_size` for batches up to `max_batch`. `backend`: the URL of a running
    `rmbg serve` that runs the network (`RemoteEngine`)."""
    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    runtime = "torch" if network is not None else runtime_for(spec, weights, backend)
    return ENGINE_BUILDERS[runtime](spec, weights, device, dtype, network=network, input_size=input_size,
                                    compile=compile, max_batch=max_batch, backend=backend)
