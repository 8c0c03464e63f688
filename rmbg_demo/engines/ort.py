"""ONNX Runtime engine: a (B, 3, H, W) normalised batch in, (B, 1, h, w) probabilities out.

Runs files written by `rmbg_demo.export` (their metadata says the input size, normalisation
and activation) and other single-image-input ONNX files such as the embedded u2netp.onnx
(batch fixed at 1: run one image at a time). `device="cuda"` asks for TensorRT (when
installed), then CUDA, then the CPU, and says loudly when ONNX Runtime ended up on the CPU.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..models import Activation
from ..processing import activate

log = logging.getLogger(__name__)

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# What a file that is not ONNX starts with, for the error message.
_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip archive "
               "(a PyTorch checkpoint?)", b"\x80\x02": "a pickle (a PyTorch checkpoint?)", b"GIF8": "a GIF image"}


class OnnxModelError(ValueError):
    """The file is not a usable ONNX model for this engine; the message says why."""


def what_it_is(path: Path) -> str:
    """Why ONNX Runtime could not parse `path`, as well as the first bytes can tell."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return "the file is empty"
    for signature, kind in _SIGNATURES.items():
        if head.startswith(signature):
            return f"it is {kind}, not an ONNX model"
    if head.startswith(b"\x08"):  # an ONNX ModelProto starts with its ir_version field
        return "it starts like an ONNX model but does not parse: truncated or corrupt (download or export it again)"
    if head[:8].lstrip().startswith((b"{", b"<", b"#")) or head.isascii():
        return "it is a text file, not an ONNX model"
    return "it is not an ONNX model (unrecognised content)"


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    return [p for p in _GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


# -- what an ONNX file's metadata and input shape say (shared with the OpenVINO engine) -------------------
def network_sizes(path: Path, metadata: dict, graph_size: tuple, asked) -> tuple:
    """(input_size, fixed_size) of a graph whose input is (B, 3, *graph_size) (None: a dynamic side):
    the size asked, else our export's metadata, else the graph's own fixed size; fixed_size is the
    (H, W) the graph can only run at, or None. A size the graph cannot take is refused."""
    fixed_size = None if None in graph_size else tuple(graph_size)
    from_metadata = tuple(int(metadata[k]) for k in ("input_height", "input_width")) \
        if "input_height" in metadata and "input_width" in metadata else None
    size = tuple(asked) if asked is not None else from_metadata
    if size is None and fixed_size:
        size = fixed_size
    for side, fixed in zip(size or (), graph_size):
        if fixed is not None and side != fixed:
            raise OnnxModelError(f"{path} takes a fixed {graph_size[1]}x{graph_size[0]} (WxH) "
                                 f"input; {size[1]}x{size[0]} was asked for (export it again at that size)")
    return (tuple(int(s) for s in size) if size is not None else None), fixed_size


def metadata_numbers(path: Path, metadata: dict, key: str) -> tuple[float, ...] | None:
    if key not in metadata:
        return None
    try:
        values = tuple(float(v) for v in metadata[key].split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise OnnxModelError(f"{path}: metadata {key}={metadata[key]!r} is not three numbers")
    return values


def guess_activation(path: Path, output_name: str) -> str:
    """No metadata: a map made by a Sigmoid node is already a probability ("minmax", as rembg
    treats U\u00b2-Net files); anything else is taken for logits. Needs the `onnx` package to see."""
    try:
        import onnx
    except ImportError:
        log.warning("%s has no activation metadata and onnx is not installed to inspect it: assuming "
                    "probabilities ('minmax'); pass activation= to be sure", path.name)
        return "minmax"
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = next((node.op_type for node in graph.node if output_name in node.output), None)
    return "minmax" if producer == "Sigmoid" else "sigmoid"


class OnnxEngine:
    """An ONNX file run by ONNX Runtime, with the engine contract of `rmbg_demo.engines`.

    Attributes read from our export metadata when present (None otherwise, so the caller uses
    the model's own spec): `model_name`, `input_size` (H, W), `mean`, `std`; `activation`
    always has a value (the argument, the metadata, else guessed from the graph).
    """

    name = "onnxruntime"

    def __init__(self, path, *, device: str = "cpu", output_index: int = 0,
                 activation: Activation | str | None = None, input_size: tuple[int, int] | None = None,
                 threads: int | None = None, model_name: str | None = None):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: OnnxEngine runs on 'cpu' or 'cuda'")
        if activation is not None and activation not in {a.value for a in Activation}:
            raise ValueError(f"activation {activation!r}: choose one of {', '.join(a.value for a in Activation)}")
        self.path = Path(path)
        self.requested_device = device
        self.session = self._open(threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._check_outputs(output_index)
        self._check_input(input_size)
        self.activation = Activation(activation or self.metadata.get("activation") or self._guess_activation())
        self.mean, self.std = (metadata_numbers(self.path, self.metadata, key) for key in ("mean", "std"))
        self.exported_as = self.metadata.get("model")  # our export's metadata names its model
        self.model_name = self.exported_as or model_name
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] in _GPU_PROVIDERS else "cpu"
        self.fallback = device == "cuda" and self.device == "cpu"
        if self.fallback:
            log.warning("ONNX Runtime runs %s on the CPU although CUDA was asked for: %s", self.path.name,
                        self._fallback_reason())

    # -- opening and checking the file ----------------------------------------------------
    def _open(self, threads: int | None):
        import onnxruntime as ort

        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(str(self.path), options, providers=_providers(self.requested_device))
        except Exception as exc:  # onnxruntime raises its own exception types for every load failure
            reason = what_it_is(self.path) if "Protobuf parsing failed" in str(exc) or not self.path.stat().st_size \
                else str(exc).split(" failed:")[-1].strip()
            raise OnnxModelError(f"cannot load {self.path}: {reason}") from exc

    def _check_outputs(self, output_index: int) -> None:
        outputs = self.session.get_outputs()
        if not outputs:
            raise OnnxModelError(f"{self.path} has no outputs: nothing to read a mask from")
        if not -len(outputs) <= output_index < len(outputs):
            raise OnnxModelError(f"{self.path} has {len(outputs)} output(s); output_index {output_index} "
                                 "is out of range")
        self.output_index = output_index
        self.output_name = outputs[output_index].name

    def _check_input(self, input_size) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxModelError(f"{self.path} takes {len(inputs)} inputs; an image model takes one (B, 3, H, W)")
        spec = inputs[0]
        if spec.type not in _ELEMENT_TYPES:
            raise OnnxModelError(f"{self.path}: input {spec.name!r} is {spec.type}; expected float or float16")
        if len(spec.shape) != 4 or _dim(spec.shape[1]) not in (None, 3):
            raise OnnxModelError(f"{self.path}: input {spec.name!r} has shape {spec.shape}; expected (B, 3, H, W)")
        self.input_name, self.input_dtype = spec.name, _ELEMENT_TYPES[spec.type]
        self.dtype = "float16" if self.input_dtype is np.float16 else "float32"
        self.fixed_batch = _dim(spec.shape[0])
        self.graph_size = (_dim(spec.shape[2]), _dim(spec.shape[3]))
        self.input_size, self.fixed_size = network_sizes(self.path, self.metadata, self.graph_size, input_size)

    def _guess_activation(self) -> str:
        return guess_activation(self.path, self.output_name)

    def _fallback_reason(self) -> str:
        import onnxruntime as ort

        if not any(p in ort.get_available_providers() for p in _GPU_PROVIDERS):
            return ("this onnxruntime has no CUDA or TensorRT provider (pip install onnxruntime-gpu in place of "
                    "onnxruntime)")
        return "the CUDA provider failed to start (CUDA/cuDNN libraries missing or no GPU visible?)"

    # -- the engine contract ------------------------------------------------------------------
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 normalised input -> (B, 1, h, w) float32 CPU probabilities."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(batch.shape)}")
        for side, fixed in zip(batch.shape[-2:], self.graph_size):
            if fixed is not None and side != fixed:
                raise ValueError(f"{self.path.name} takes {self.graph_size[1]}x{self.graph_size[0]} (WxH) input, "
                                 f"got {batch.shape[-1]}x{batch.shape[-2]}")
        array = batch.detach().to("cpu", torch.float32).numpy().astype(self.input_dtype, copy=False)
        step = self.fixed_batch or len(array)  # a file with a fixed batch of 1 runs one image at a time
        try:
            raw = np.concatenate([self.session.run([self.output_name], {self.input_name: array[i:i + step]})[0]
                                  for i in range(0, len(array), step)])
        except Exception as exc:  # onnxruntime's own types, not RuntimeError: a failed batch, as engines report it
            raise RuntimeError(f"onnxruntime could not run {self.path.name}: {exc}") from exc
        raw = torch.from_numpy(raw.astype(np.float32, copy=False))
        if raw.ndim == 3:
            raw = raw[:, None]
        if raw.ndim != 4 or raw.shape[1] != 1 or raw.shape[0] != len(batch):
            raise OnnxModelError(f"{self.path.name}: output {self.output_name!r} has shape {tuple(raw.shape)} "
                                 f"for a batch of {len(batch)}; expected (B, 1, h, w)")
        return activate(raw, self.activation)

    def describe(self) -> str:
        import onnxruntime as ort

        what = f"{self.exported_as} ({self.path.name}, {self.dtype})" if self.exported_as else \
            f"{self.path.name} ({self.dtype})"
        text = f"{what} on {self.device}, onnxruntime {ort.__version__} {self.providers[0]}"
        if self.fallback:
            text += " -- WARNING: CUDA was asked for but ONNX Runtime runs on the CPU: " + self._fallback_reason()
        return text
