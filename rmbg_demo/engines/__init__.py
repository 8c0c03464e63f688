"""Engines: where the network runs. `build_engine` picks one by runtime (`runtime_for`): the one asked
(`--runtime torch|onnxruntime|openvino`), a service URL's `RemoteEngine`, or for `auto` the fastest that
keeps masks within 2/255 of float32 (`auto_runtime`). See `base.Engine` for the seam; a new runtime is
one class and one `ENGINE_BUILDERS` entry."""
from __future__ import annotations

import os
from collections.abc import Callable

from ..models import ModelSpec, Runtime, get_spec
from .base import Engine
from .ort import OnnxEngine, OnnxModelError
from .ov import MEASURED_ERRORS as OPENVINO_MEASURED_ERRORS
from .ov import OpenVinoUnavailable, auto_precision, openvino_available
from .pytorch import DTYPE_CHOICES, TorchEngine, configure_torch, cpu_has_amx, pick_device, pick_dtype
from .remote import RemoteEngine
from .wrappers import RequestBatcher, ZeroGpuEngine, zerogpu_decorator

__all__ = ["DTYPE_CHOICES", "ENGINE_BUILDERS", "Engine", "OPENVINO_MEASURED_ERRORS", "OnnxEngine", "OnnxModelError",
           "OpenVinoUnavailable", "RUNTIME_CHOICES", "RemoteEngine", "RequestBatcher", "TorchEngine", "ZeroGpuEngine",
           "auto_runtime", "build_engine", "configure_torch", "cpu_has_amx", "is_exported_file", "pick_device",
           "pick_dtype", "runtime_for", "zerogpu_decorator"]

RUNTIME_CHOICES = ("torch", "onnxruntime", "openvino")


def is_exported_file(weights) -> bool:
    """An ONNX file given as weights (`rmbg export`'s, or another single-input image model's)."""
    return os.fspath(weights or "").lower().endswith(".onnx")


def auto_runtime(spec: ModelSpec, weights=None, device="auto", dtype="auto", size=None) -> str:
    """The runtime `auto` runs: the fastest measured whose masks stay within 2/255 of float32. That is OpenVINO
    bf16 for a PyTorch network measured within that budget (RMBG-2.0 at 1024: 3.55x the model card end to end on
    an AMX Xeon, bench/RESULTS.md), where the openvino extra is installed and the CPU has native bf16, asked at
    --dtype auto or bfloat16 (`ov.auto_precision`); otherwise the model's own (PyTorch networks on PyTorch, ONNX
    graphs and exports on ONNX Runtime). Only at the model's own size (`size`, default that), where it was
    measured; the OpenVINO engine `auto` builds runs f32 (exact) at other sizes. OpenVINO's first start converts
    the network, once: about two minutes for RMBG-2.0 there, announced, then cached under
    ~/.cache/rmbg-demo/openvino."""
    if is_exported_file(weights) or spec.runtime is Runtime.ONNX:
        return "onnxruntime"
    if dtype in (None, "auto", "bfloat16") and pick_device(device).type == "cpu" \
            and auto_precision(spec, size) == "bf16":
        return "openvino"
    return "torch"


def runtime_for(spec: ModelSpec, weights=None, backend: str | None = None, runtime: str = "auto", device="auto",
                dtype="auto", size=None) -> str:
    """Which runtime runs `spec`: "remote" with a `backend`, the one asked (when it can run this model), or
    for "auto" `auto_runtime`'s pick."""
    if backend:
        return "remote"
    if runtime in (None, "auto"):
        return auto_runtime(spec, weights, device, dtype, size)
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of: auto, {', '.join(RUNTIME_CHOICES)}")
    exported = is_exported_file(weights)
    if runtime == "torch" and (exported or spec.builder is None):
        what = os.fspath(weights) if exported else f"{spec.name} (an ONNX graph)"
        raise ValueError(f"--runtime torch needs a PyTorch network; {what} has none: use --runtime onnxruntime or "
                         "openvino")
    if runtime == "onnxruntime" and not exported and spec.runtime is not Runtime.ONNX:
        raise ValueError(f"--runtime onnxruntime runs an ONNX file; {spec.name} is a PyTorch network: write one with "
                         f"`rmbg export --model {spec.name}` and pass it as --weights, or use --runtime openvino")
    if runtime == "openvino" and not openvino_available():  # said where the run is planned (a Ray driver too)
        from .ov import import_openvino

        import_openvino()
    return runtime


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


def _openvino_engine(spec: ModelSpec, weights, device, dtype, *, network, input_size, compile, max_batch,
                     backend):
    from .ov import DTYPE_PRECISIONS, import_openvino, openvino_from_onnx, openvino_from_torch

    import_openvino()  # not installed: say how to install it before anything else
    if device not in (None, "auto", "cpu"):
        raise ValueError(f"--runtime openvino runs on the CPU, not {device}: drop --device, or use --runtime torch")
    if compile:
        raise ValueError("--compile is torch.compile's; OpenVINO compiles the network itself: drop --compile")
    if dtype not in DTYPE_PRECISIONS:
        raise ValueError(f"--dtype {dtype} does not run on OpenVINO; choose one of {', '.join(DTYPE_PRECISIONS)}")
    precision = DTYPE_PRECISIONS[dtype]
    if dtype == "auto" and not is_exported_file(weights) and spec.runtime is Runtime.TORCH:
        precision = "auto"  # per size: bf16 where measured within auto's budget, else f32 (ov.auto_precision)
    if is_exported_file(weights) or (network is None and spec.runtime is Runtime.ONNX):
        from ..weights import resolve_weights

        path = resolve_weights(spec.name, weights)
        if is_exported_file(weights):  # our export's metadata says the model, activation and size
            return openvino_from_onnx(path, precision=precision, input_size=input_size)
        return openvino_from_onnx(path, precision=precision, output_index=spec.output_index,
                                  activation=spec.activation, model_name=spec.name)
    return openvino_from_torch(spec, weights, network=network, precision=precision, input_size=input_size)


def _remote_engine(spec: ModelSpec, weights, device, dtype, *, network, input_size, compile, max_batch, backend):
    return RemoteEngine(backend, spec.name)


ENGINE_BUILDERS: dict[str, Callable[..., Engine]] = {
    "torch": _torch_engine, "onnxruntime": _onnx_engine, "openvino": _openvino_engine, "remote": _remote_engine}


def build_engine(model: str | ModelSpec, weights: str | os.PathLike | None = None, device="auto", dtype="auto", *,
                 network=None, input_size: tuple[int, int] | None = None, compile: str | None = None,
                 max_batch: int = 1, backend: str | None = None, runtime: str = "auto") -> Engine:
    """The engine for `model` with `weights` (found as `rmbg_demo.weights` says when None).

    `network`: a PyTorch network already built (tests, benchmarks). `compile`: a torch.compile
    backend, warmed up at `input_size` for batches up to `max_batch`. `backend`: the URL of a running
    `rmbg serve` that runs the network (`RemoteEngine`). `runtime`: torch, onnxruntime, openvino or auto
    (`runtime_for`); a `network` runs on torch unless openvino is asked."""
    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    if (network is not None or compile) and runtime in (None, "auto") and spec.runtime is Runtime.TORCH \
            and not is_exported_file(weights):
        runtime = "torch"  # a network built here, or torch.compile asked: PyTorch unless OpenVINO is named
    runtime = runtime_for(spec, weights, backend, runtime, device, dtype, input_size)
    return ENGINE_BUILDERS[runtime](spec, weights, device, dtype, network=network, input_size=input_size,
                                    compile=compile, max_batch=max_batch, backend=backend)
