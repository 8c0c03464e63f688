"""OpenVINO engine: a (B, 3, H, W) normalised batch in, (B, 1, h, w) probabilities out, on the CPU.

Runs an ONNX file (`rmbg export`'s, whose metadata says the model, size and activation, or the
embedded u2netp.onnx) or a registered PyTorch network converted by `openvino.convert_model`, so
that no export file is needed. Two caches on disk, under `cache_root()`: the converted network
(OpenVINO IR, keyed by the weights, the size and the IR's precision), so that a second start neither
loads the PyTorch network nor converts it again; and OpenVINO's own model cache (CACHE_DIR) of
compiled models, so that it does not compile again either.

Precisions: "f32" is exact (INFERENCE_PRECISION_HINT set to f32: on CPUs with bf16 OpenVINO would
otherwise choose bf16 by itself), "bf16" only on CPUs that run it natively, "int8" the network
quantized by NNCF post-training quantization calibrated on the built-in benchmark images. Their
measured mask errors are in `MEASURED_ERRORS`. For bf16 and int8 a PyTorch network is converted
as its spec's `for_conversion` gives it, so that OpenVINO gets its own ops (BiRefNet's deformable
convolutions as DeformableConvolution, which keeps bf16 within 1/255 where the sampled form moved masks by
8/255 at the network's size).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..models import Activation, get_spec
from ..processing import activate
from .ort import OnnxModelError, guess_activation, metadata_numbers, network_sizes, what_it_is

log = logging.getLogger(__name__)

CACHE_VARIABLE = "RMBG_OPENVINO_CACHE"
PRECISIONS = ("f32", "bf16", "int8")
# --dtype -> OpenVINO precision ("auto": `auto_precision`).
DTYPE_PRECISIONS = {"auto": "f32", "float32": "f32", "bfloat16": "bf16", "int8": "int8"}
AUTO_BUDGET = 2  # the largest mask difference from float32 (1/255 steps) `auto` may choose, as on PyTorch
# Largest 8-bit mask difference vs float32, in 1/255 steps, by (model, precision, source): "pytorch", converted
# by `openvino_from_torch`, or "onnx", an ONNX file (`rmbg export`'s, whose deformable convolutions are the
# sampled form, or the embedded u2netp.onnx). u2netp: the 8 built-in benchmark photos at 320 (engine runs
# against ONNX Runtime float32); RMBG-2.0: parity-fixture weights, the 3 bench photos at 1024, masks at the
# photo's size (`python bench/bench.py --cli --runtimes openvino:bfloat16`); see bench/RESULTS.md. Shown in
# the model line, --help and the README. f32 is exact for every model (at most 1/255, a rounding step).
# BiRefNet lite: the same photos at 1024 and 512 (`python bench/runtimes.py --model birefnet-lite ...`), the
# larger of the two.
MEASURED_ERRORS = {("rmbg-2.0", "bf16", "pytorch"): 2, ("rmbg-2.0", "bf16", "onnx"): 7,
                   ("birefnet-lite", "bf16", "pytorch"): 2, ("birefnet-lite", "int8", "pytorch"): 15,
                   ("u2netp", "bf16", "onnx"): 222, ("u2netp", "int8", "onnx"): 255}
# Changes when a conversion from PyTorch changes what it produces, so that cached IRs are made again
# (3: BiRefNet's deformable convolutions as OpenVINO's DeformableConvolution for bf16 and int8).
CONVERSION_REVISION = 3
# Choices refused with the measurement: the masks are not the model's any more.
UNUSABLE = {("u2netp", "int8"): "int8 ruins u2netp's masks (worst built-in benchmark photo: IoU 0.00 with float32's)"}
# Swin-backboned networks, which NNCF quantizes as transformers (the others are plain CNNs).
TRANSFORMERS = ("rmbg-2.0", "birefnet-general", "birefnet-lite")
INSTALL_HINT = "pip install 'rmbg-demo[openvino]' (or pip install openvino)"


class OpenVinoUnavailable(ValueError):
    """The openvino package is not installed (or cannot be imported)."""


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise OpenVinoUnavailable(f"--runtime openvino needs the openvino package, which is not installed here "
                                  f"({exc}): {INSTALL_HINT}") from None
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except OpenVinoUnavailable:
        return False
    return True


def cache_root() -> Path:
    """$RMBG_OPENVINO_CACHE, else rmbg-demo/openvino in the user's cache directory."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rmbg-demo" / "openvino"


@functools.cache
def cpu_runs_bf16() -> bool:
    """OpenVINO's own answer: the CPU plugin has native bf16 (AVX512-BF16 or AMX)."""
    core = import_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def auto_precision(spec, size: tuple[int, int] | None = None) -> str:
    """--dtype auto for a PyTorch network on OpenVINO at `size` (default the model's): bf16 where the CPU runs it
    natively and the network's bf16 masks were measured within AUTO_BUDGET of float32, which was at the model's
    own size (at 256 the fixture weights' bf16 masks moved by 35-64/255); else f32, exact."""
    error = MEASURED_ERRORS.get((spec.name, "bf16", "pytorch"))
    own_size = size is None or tuple(size) == tuple(spec.input_size)
    return "bf16" if own_size and error is not None and error <= AUTO_BUDGET and openvino_available() \
        and cpu_runs_bf16() else "f32"


def precision_label(model: str | None, precision: str, source: str) -> str:
    """What a precision costs in mask error, as measured (`source`: "pytorch" or "onnx")."""
    if precision == "f32":
        return "f32, exact"
    error = MEASURED_ERRORS.get((model, precision, source))
    measured = f"masks up to {error}/255 from float32, measured" if error is not None else \
        "mask error vs float32 not measured for this model"
    return f"{precision}, {measured}"


def check_precision(precision: str, model: str | None = None) -> str:
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if (model, precision) in UNUSABLE:
        raise ValueError(f"{UNUSABLE[model, precision]}: use --dtype float32 (exact)")
    if precision == "bf16" and not cpu_runs_bf16():
        raise ValueError("bfloat16 on OpenVINO needs a CPU with native bf16 (AVX512-BF16 or AMX); this one has "
                         "neither: use --dtype float32 (exact) or int8")
    return precision


class OpenVinoEngine:
    """A network compiled by OpenVINO for the CPU, one compiled model per input size (compiled on first
    use of a size; the size it is built for is compiled at once, so no request waits for it).

    `source(size)` gives the `openvino.Model` (or IR file) for an input of (1, 3, *size) with one output,
    the raw map; `activation` turns that into probabilities."""

    name = "openvino"
    device = "cpu"

    def __init__(self, source: Callable[[tuple[int, int]], object], *, precision: str = "f32",
                 activation: Activation | str = Activation.SIGMOID, model_name: str | None = None,
                 input_size: tuple[int, int] | None = None, fixed_size: tuple[int, int] | None = None,
                 what: str = "", warm_size: tuple[int, int] | None = None, source_kind: str = "onnx"):
        self.ov = import_openvino()
        self.precision = check_precision(precision, model_name)
        self.source, self.activation = source, Activation(activation)
        self.model_name, self.input_size, self.fixed_size = model_name, input_size, fixed_size
        self.what, self.source_kind = what, source_kind
        self.core = self.ov.Core()
        self.compiled: dict[tuple[int, int], object] = {}
        self.compile_seconds = 0.0
        self._lock = threading.Lock()
        if warm_size or input_size or fixed_size:
            self._compiled_for(tuple(warm_size or input_size or fixed_size))

    def precision_at(self, size: tuple[int, int]) -> str:
        """The precision run at `size`: the one asked, or for "auto" `auto_precision`'s at that size."""
        if self.precision != "auto":
            return self.precision
        return auto_precision(get_spec(self.model_name), size) if self.model_name else "f32"

    def _config(self, size: tuple[int, int]) -> dict:
        cache = cache_root() / "compiled"
        cache.mkdir(parents=True, exist_ok=True)
        hint = "bf16" if self.precision_at(size) == "bf16" else "f32"  # int8 layers are in the graph; the rest f32
        return {"CACHE_DIR": str(cache), "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}

    def _compiled_for(self, size: tuple[int, int]):
        with self._lock:
            if size not in self.compiled:
                started = time.perf_counter()
                model = self.source(size)
                self.compiled[size] = self.core.compile_model(model, "CPU", self._config(size))
                self.compile_seconds += time.perf_counter() - started
                log.info("OpenVINO %s ready for %dx%d in %.1f s", self.precision_at(size), size[1], size[0],
                         time.perf_counter() - started)
            return self.compiled[size]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 normalised input -> (B, 1, h, w) float32 CPU probabilities, one image at a time
        (on the CPU a batch takes as long as its images one by one)."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(batch.shape)}")
        size = tuple(int(s) for s in batch.shape[-2:])
        if self.fixed_size and size != tuple(self.fixed_size):
            raise ValueError(f"{self.what} takes {self.fixed_size[1]}x{self.fixed_size[0]} (WxH) input, "
                             f"got {size[1]}x{size[0]}")
        compiled = self._compiled_for(size)
        array = batch.detach().to("cpu", torch.float32).numpy()
        with self._lock:  # one infer request: not to be shared by threads at once
            raw = [np.array(compiled(array[i:i + 1])[0], dtype=np.float32) for i in range(len(array))]
        raw = torch.from_numpy(np.concatenate(raw))
        if raw.ndim == 3:
            raw = raw[:, None]
        if raw.ndim != 4 or raw.shape[1] != 1:
            raise OnnxModelError(f"{self.what}: the output has shape {tuple(raw.shape)}; expected (B, 1, h, w)")
        return activate(raw, self.activation)

    def describe(self) -> str:
        own = tuple(self.fixed_size or (get_spec(self.model_name).input_size if self.model_name else (0, 0)))
        precision = precision_label(self.model_name, self.precision_at(own), self.source_kind)
        if self.precision == "auto" and self.precision_at(own) != "f32":
            precision += f", at {own[1]}x{own[0]}; f32, exact, at other sizes"
        return f"{self.what} on cpu, openvino {self.ov.__version__.split('-')[0]} ({precision})"


# -- sources: an ONNX file, or a registered PyTorch network -----------------------------------------
def onnx_metadata(model) -> dict[str, str]:
    """Our export's metadata (ONNX metadata_props), as OpenVINO's ONNX reader keeps it."""
    if not model.has_rt_info(["framework"]):
        return {}
    return {key: value.astype(str) for key, value in model.get_rt_info(["framework"]).astype(dict).items()}


def openvino_from_onnx(path, *, precision: str = "f32", output_index: int = 0,
                       activation: Activation | str | None = None, input_size: tuple[int, int] | None = None,
                       model_name: str | None = None) -> OpenVinoEngine:
    """An ONNX file on OpenVINO: our export (its metadata says the model, size, activation, mean and std, as
    for `OnnxEngine`) or another single-image graph such as u2netp.onnx (`output_index`, `activation`)."""
    ov = import_openvino()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    with open(path, "rb") as handle:  # an ONNX ModelProto starts with its ir_version field
        starts_like_onnx = handle.read(1) == b"\x08"
    if not starts_like_onnx:  # said before OpenVINO tries its other readers (TensorFlow's, ...) on it
        raise OnnxModelError(f"cannot load {path}: {what_it_is(path)}")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise OnnxModelError(f"cannot load {path}: {what_it_is(path)}") from exc
    metadata = onnx_metadata(model)
    if len(model.inputs) != 1 or model.inputs[0].get_partial_shape().rank.get_length() != 4:
        raise OnnxModelError(f"{path}: an image model takes one (B, 3, H, W) input")
    if not -len(model.outputs) <= output_index < len(model.outputs):
        raise OnnxModelError(f"{path} has {len(model.outputs)} output(s); output_index {output_index} is out of range")
    shape = model.inputs[0].get_partial_shape()
    graph_size = tuple(shape[i].get_length() if shape[i].is_static else None for i in (2, 3))
    input_size, fixed_size = network_sizes(path, metadata, graph_size, input_size)
    output = model.outputs[output_index]
    activation = activation or metadata.get("activation") or guess_activation(path, output.get_any_name())
    name = metadata.get("model") or model_name
    what = f"{name} ({path.name})" if metadata.get("model") else path.name
    if len(model.outputs) > 1:  # the chosen map only: the others are not computed
        model = ov.Model([output], model.get_parameters(), model.get_friendly_name())
    mean, std = (metadata_numbers(path, metadata, key) for key in ("mean", "std"))

    def source(size):
        sized = model.clone()
        sized.reshape({sized.inputs[0]: [1, 3, *size]})
        if precision == "int8":
            if name is None:
                raise ValueError(f"int8 calibrates on photos preprocessed for a known model; {path.name} does not "
                                 "say which model it is: pass --model")
            stat = path.stat()
            key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
            return quantized(sized, get_spec(name), size, key)
        return sized

    engine = OpenVinoEngine(source, precision=precision, activation=activation, model_name=name,
                            input_size=input_size, fixed_size=fixed_size, what=what)
    engine.mean, engine.std = mean, std  # as OnnxEngine has them (None: the model's own)
    return engine


class ChosenOutput(torch.nn.Module):
    """The network with only the output that is the mask, so that the converted graph computes just that."""

    def __init__(self, network: torch.nn.Module, output_index: int):
        super().__init__()
        self.network, self.output_index = network, output_index

    def forward(self, x):
        return self.network(x)[self.output_index]


def network_key(spec, weights=None, network: torch.nn.Module | None = None) -> str:
    """What a converted network depends on: the converters, the output taken, and the weights: a network's own
    class and tensors (two models with the same network and tensors share one IR), or else the model and its
    weights file's path, size and modification time, so that a second start need not load the file."""
    ov = import_openvino()
    digest = hashlib.sha256(f"openvino {ov.__version__}|torch {torch.__version__}|{spec.output_index}|"
                            f"{CONVERSION_REVISION}".encode())
    if network is not None:
        digest.update(f"{type(network).__module__}.{type(network).__qualname__}".encode())
        for name, tensor in network.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    else:
        from ..weights import resolve_weights

        path = resolve_weights(spec.name, weights).resolve()
        stat = path.stat()
        digest.update(f"{spec.name}|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def ir_path(key: str, size: tuple[int, int], precision: str) -> Path:
    return cache_root() / "ir" / f"{key}-{size[1]}x{size[0]}-{precision}.xml"


def save_ir(model, path: Path) -> Path:
    """`model` as IR at `path` (.xml and .bin), whole or not at all: the .xml, moved last, marks it complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.xml")
    import_openvino().save_model(model, str(temporary), compress_to_fp16=False)
    os.replace(temporary.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(temporary, path)
    return path


def converted_model(module: torch.nn.Module, spec, size: tuple[int, int], native: bool):
    """`module`'s mask output as an `openvino.Model` at `size`; `native`: as its spec's `for_conversion` gives it
    (OpenVINO's own ops)."""
    import warnings

    as_converted = spec.for_conversion(module) if native and spec.for_conversion else contextlib.nullcontext()
    with warnings.catch_warnings(), as_converted:
        warnings.simplefilter("ignore")  # the tracer's notes on size-dependent Python branches: fixed size here
        return import_openvino().convert_model(ChosenOutput(module, spec.output_index).eval(),
                                               example_input=torch.zeros(1, 3, *size), input=[1, 3, *size])


def convert(module: torch.nn.Module, spec, size: tuple[int, int], path: Path, native: bool) -> Path:
    """`converted_model` saved as IR at `path`."""
    started = time.perf_counter()
    log.warning("converting %s to OpenVINO at %dx%d, once (minutes for a large network; cached in %s)", spec.name,
                size[1], size[0], cache_root())
    save_ir(converted_model(module, spec, size, native), path)
    log.info("converted to OpenVINO at %dx%d in %.0f s: %s", size[1], size[0], time.perf_counter() - started, path)
    return path


def openvino_from_torch(spec, weights=None, *, network: torch.nn.Module | None = None, precision: str = "f32",
                        input_size: tuple[int, int] | None = None) -> OpenVinoEngine:
    """A registered PyTorch network on OpenVINO, converted at each size it runs at (once: the IR is cached).
    Its weights are read only when a size is not converted yet."""
    from ..weights import load_model

    key = network_key(spec, weights, network)
    # bf16 and int8 get OpenVINO's own ops (BiRefNet's DeformableConvolution computes its sampling positions in
    # f32); f32 the sampled form, which OpenVINO runs 10 % faster (9.3 s vs 10.3 s, bench/openvino_bf16.py).

    def source(size):
        at = auto_precision(spec, size) if precision == "auto" else precision
        native = at != "f32" and spec.for_conversion is not None
        ir = ir_path(key, size, "f32-native" if native else "f32")
        if not ir.exists():
            module = network if network is not None else load_model(spec.name, weights)
            convert(module, spec, size, ir, native)
        return quantized(ir, spec, size, key) if at == "int8" else str(ir)

    return OpenVinoEngine(source, precision=precision, activation=spec.activation, model_name=spec.name,
                          what=f"{spec.name} (converted from PyTorch)", warm_size=tuple(input_size or spec.input_size),
                          source_kind="pytorch")


# -- int8: NNCF post-training quantization ---------------------------------------------------------------
# The package's built-in benchmark photos (as rmbg_demo.evaluation.BUILTIN_BENCHMARK; not imported from
# there: evaluation depends on the pipeline, which depends on the engines).
CALIBRATION_IMAGES = Path(__file__).resolve().parent.parent / "data" / "benchmark" / "images"


def calibration_inputs(spec, size: tuple[int, int]) -> list[np.ndarray]:
    """The network inputs NNCF calibrates on: the built-in benchmark photos (8: each costs a float32 pass and
    more, minutes at 1024 on two cores)."""
    from PIL import Image

    from ..processing import preprocess

    photos = [Image.open(path).convert("RGB") for path in sorted(CALIBRATION_IMAGES.glob("*.jpg"))]
    return [preprocess(photo, spec, size).numpy() for photo in photos]


def quantized(model, spec, size: tuple[int, int], key: str) -> str:
    """The IR of `model` (an IR path or an openvino.Model at `size`) quantized to int8, made once and cached."""
    path = ir_path(key, size, "int8")
    if path.exists():
        return str(path)
    try:
        import nncf
    except ImportError:
        raise ValueError("int8 on OpenVINO is quantized by NNCF, which is not installed: pip install nncf") from None
    started = time.perf_counter()
    if not hasattr(model, "inputs"):
        model = import_openvino().Core().read_model(model)
    data = calibration_inputs(spec, size)
    kind = nncf.ModelType.TRANSFORMER if spec.name in TRANSFORMERS else None
    result = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), model_type=kind)
    save_ir(result, path)
    log.info("quantized to int8 on %d images in %.0f s: %s", len(data), time.perf_counter() - started, path)
    return str(path)
