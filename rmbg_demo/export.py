"""Export a registered PyTorch network to ONNX, checked against the network before the file is kept.

The file has one input, `input`: the normalised image as the model's card prepares it,
(B, 3, H, W) float32 (float16 for a float16 export), and one output, `logits`: the network's
final map (B, 1, H, W), before the activation named in the file's metadata ("sigmoid" for
BiRefNet logits; "minmax" for RMBG-1.4, whose map is already a probability). The batch is
dynamic; height and width too where the traced graph allows it (RMBG-1.4). BiRefNet's Swin
backbone takes Python branches on the feature sizes (window padding, odd-size merging, the
shift masks), which tracing freezes: its files are fixed to the size they were exported at.
The network reads its heights and widths as plain ints (`models.swin.fixed_sizes`), so its
paddings and sampling grids are constants in the file, not rebuilt at every run; the shift
masks are compared from small constant region labels at each run (`swin.shifted_window_mask`).

Metadata (ONNX `metadata_props`, all strings) says how to feed the file and what came out of
it; see `METADATA_KEYS`. `rmbg_demo.engines.ort.OnnxEngine` reads it.

A graph above protobuf's 2 GB limit keeps its tensors in ONNX external data: one file beside
it named after it (`model.onnx.data`), which ONNX Runtime finds from the model's path.
"""
from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import processing
from .atomic import commit_together, discard, temporary_beside
from .models import ModelSpec, get_spec
from .request import NETWORK_SIDE_RANGE, NETWORK_SIDE_STEP, parse_network_size

(MIN_SIDE, MAX_SIDE), SIDE_STEP = NETWORK_SIDE_RANGE, NETWORK_SIDE_STEP
MIN_OPSET = 16  # GridSample (the deformable convolutions) needs opset 16
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# float32: max |logit difference| as a share of the logits' standard deviation;
# float16: max probability difference, in 8-bit mask steps.
FLOAT32_TOLERANCE = 1e-3
FLOAT16_TOLERANCE = 3 / 255
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEYS = ("model", "title", "licence", "licence_url", "input_height", "input_width", "dynamic_axes",
                 "mean", "std", "activation", "output_index", "resize_antialias", "mask_resize", "opset", "dtype",
                 "exporter", "producer")


class ExportError(RuntimeError):
    """The network could not be exported; the message says why."""


class ExportCheckError(ExportError):
    """The exported file disagrees with the PyTorch network beyond the tolerance; it was not kept."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    model: str
    size: tuple[int, int]  # (height, width) the file was traced at
    dtype: str
    opset: int
    dynamic_axes: tuple[str, ...]  # "batch", and "height", "width" where the graph allows
    seconds: float  # export and check together
    file_bytes: int
    check: CheckReport | None  # None when exported with check=False
    metadata: dict[str, str] = field(default_factory=dict)
    data_path: Path | None = None  # the external data file, for a graph above 2 GB; file_bytes counts it too


@dataclass(frozen=True)
class CheckReport:
    """How far the file's output is from the PyTorch network's, at each checked input shape."""

    dtype: str
    measure: str  # what `errors` are: "max |dlogit| / std(logits)" or "max |dprobability|"
    tolerance: float
    errors: dict[str, float]  # "BxHxW" -> error

    @property
    def worst(self) -> float:
        return max(self.errors.values())


# -- sizes ----------------------------------------------------------------------------------
def check_size(size) -> tuple[int, int]:
    """`size` as (height, width): an int N means NxN; each side a multiple of 32 in 256..2048 (the one
    size rule of `rmbg_demo.request`)."""
    parsed = parse_network_size(size)
    if parsed is None:
        raise ValueError(f"size must be N or (height, width), got {size!r}")
    return parsed


# -- the network as exported ------------------------------------------------------------------
class _FinalMap(nn.Module):
    """The network with one output: the map the model's card reads."""

    def __init__(self, network: nn.Module, output_index: int):
        super().__init__()
        self.network = network
        self.output_index = output_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[self.output_index]


def _on_cpu_in(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`network` in eval mode on the CPU in `dtype`; a copy when it is not so already (never changed in place).

    Exporting on the CPU also picks the deformable convolutions' grid_sample + matmul path
    (models/birefnet.py), not torchvision's CUDA kernel, which ONNX has no GridSample form of."""
    tensors = [*network.parameters(), *network.buffers()]
    ready = not network.training and all(t.device.type == "cpu" for t in tensors) and all(
        p.dtype == dtype for p in network.parameters())
    return network if ready else copy.deepcopy(network).to(device="cpu", dtype=dtype).eval()


def check_images(size: tuple[int, int], count: int) -> torch.Tensor:
    """`count` different smooth (count, 3, H, W) images in [0, 1] with a subject-like disc: the check's input."""
    height, width = size
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    images = []
    for i in range(count):
        cx, cy, radius = 0.5 + 0.15 * math.sin(i), 0.45 + 0.1 * math.cos(2 * i), 0.22 + 0.05 * i
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2).astype(np.float64)
        background = [0.5 + 0.4 * np.sin((5 + i) * xx + 3 * yy), 0.5 + 0.4 * np.cos(4 * yy - (2 + i) * xx * yy),
                      0.3 + 0.3 * xx * yy]
        subject = [(0.8 + 0.3 * i) % 1, 0.35, (0.2 + 0.45 * i) % 1]
        images.append([disc * s + (1 - disc) * b for s, b in zip(subject, background)])
    return torch.from_numpy(np.clip(np.array(images), 0, 1).astype(np.float32))


def normalise(images: torch.Tensor, spec_or_mean, std=None) -> torch.Tensor:
    """`processing.normalise` with a spec's (or given) mean and std."""
    mean = spec_or_mean.mean if isinstance(spec_or_mean, ModelSpec) else spec_or_mean
    std = spec_or_mean.std if isinstance(spec_or_mean, ModelSpec) else std
    return processing.normalise(images, mean, std)


def export_metadata(spec: ModelSpec, size: tuple[int, int], dtype: str, opset: int,
                    dynamic_axes: tuple[str, ...]) -> dict[str, str]:
    from . import __version__

    def numbers(values) -> str:
        return ",".join(repr(float(v)) for v in values)

    return {
        "model": spec.name, "title": spec.title, "licence": spec.licence, "licence_url": spec.licence_url,
        "input_height": str(size[0]), "input_width": str(size[1]), "dynamic_axes": ",".join(dynamic_axes),
        "mean": numbers(spec.mean), "std": numbers(spec.std), "activation": spec.activation,
        "output_index": str(spec.output_index), "resize_antialias": str(spec.resize_antialias).lower(),
        "mask_resize": spec.mask_resize, "opset": str(opset), "dtype": dtype,
        "exporter": f"torch {torch.__version__}, torch.onnx TorchScript exporter (dynamo=False)",
        "producer": f"rmbg-demo {__version__}",
    }


def _convolution_in_float32(x, weight, kernel_size, bias, stride, padding):
    """`aten::_slow_conv2d_forward` (the CPU's reference convolution) computed in float32 and rounded back."""
    cols = F.unfold(x.float(), kernel_size, padding=padding, stride=stride)  # (N, C*kh*kw, positions)
    out = weight.float().reshape(weight.shape[0], -1) @ cols
    if bias is not None:
        out = out + bias.float()[None, :, None]
    height, width = ((size + 2 * pad - kernel) // step + 1
                     for size, pad, kernel, step in zip(x.shape[-2:], padding, kernel_size, stride))
    return out.view(x.shape[0], -1, height, width).to(x.dtype)


@contextlib.contextmanager
def _fast_float16_convolutions():
    """While a float16 network is traced on the CPU, its convolutions compute in float32.

    Most CPUs have no float16 matrix unit, and PyTorch sends float16 convolutions to its
    reference kernel, which ran a conv 40x slower than float32 here: 95 % of BiRefNet lite's
    float16 trace (bench/onnx_graph.py: that export now takes 8 s instead of 44 s). The tracer
    records `aten::_convolution` above the kernel, so the file is unchanged; only the example
    pass's values differ, by rounding, and the check then runs the file itself. The kernel is
    replaced process-wide (PyTorch has no per-thread kernel registration) and restored on leaving;
    a convolution another thread runs meanwhile on the CPU's reference path gets the same result
    up to float16 rounding.
    """
    with torch.library._scoped_library("aten", "IMPL") as library:  # (restores the kernel on exit)
        library.impl("_slow_conv2d_forward", _convolution_in_float32, "CPU")
        yield


def _trace(network: nn.Module, output_index: int, example: torch.Tensor, path: Path, opset: int,
           dynamic_axes: tuple[str, ...]) -> None:
    axes = {name: {0: "batch", **({2: "height", 3: "width"} if "height" in dynamic_axes else {})}
            for name in (INPUT_NAME, OUTPUT_NAME)}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns at every Python branch on a size; `_has_dynamic_size` already accounts for them.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        # A strided slice of constants is left for ONNX Runtime to fold; nothing for a user to do.
        warnings.filterwarnings("ignore", message=r".*Only steps=1 can be constant folded.*")
        with _fast_float16_convolutions() if example.dtype == torch.float16 else contextlib.nullcontext():
            torch.onnx.export(_FinalMap(network, output_index).eval(), (example,), str(path), dynamo=False,
                              opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, do_constant_folding=True)


def data_path(path: Path) -> Path:
    """Where `path`'s external data goes: `model.onnx.data` beside `model.onnx`."""
    return path.with_name(path.name + ".data")


def _gather_external_data(path: Path) -> None:
    """Put the tensors the exporter wrote beside `path` into one `data_path(path)` file.

    Above protobuf's 2 GB limit the TorchScript exporter writes every tensor to a file of its
    own next to the model (RMBG-2.0 once left 291 there). `path` is alone in its folder
    otherwise, so any other file there is one of those.
    """
    if not any(other != path for other in path.parent.iterdir()):
        return
    import onnx

    model = onnx.load(str(path))  # reads the loose files' tensors back in
    for other in path.parent.iterdir():
        other.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_path(path).name)
    if data_path(path).exists():  # (not when every tensor is under ONNX's 1 kB threshold)
        shutil.copymode(path, data_path(path))  # ONNX makes it owner-only: readable wherever the model is


def _write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add the metadata to the file the exporter wrote, without rewriting the file.

    Concatenated protobuf messages parse as one merged message (repeated fields append, the
    last singular value wins), so appending a ModelProto that holds only these fields adds
    them: loading and saving RMBG-2.0's 887 MB file again took 7 of an export's 30 s. With
    external data, `path` is the small graph file and the appended fields land there too.
    """
    import onnx

    extra = onnx.ModelProto(producer_name="rmbg-demo", producer_version=metadata["producer"].split()[-1],
                            doc_string=f"{metadata['title']}: input {INPUT_NAME} (B, 3, H, W) normalised, "
                                       f"output {OUTPUT_NAME}")
    extra.metadata_props.extend(onnx.StringStringEntryProto(key=key, value=value) for key, value in metadata.items())
    with open(path, "ab") as handle:
        handle.write(extra.SerializeToString())
    onnx.checker.check_model(str(path))


def export_onnx(model_name: str, out_path, *, weights=None, network: nn.Module | None = None, size=None,
                dtype: str = "float32", opset: int = 17, check: bool = True, overwrite: bool = False) -> ExportReport:
    """Export `model_name`'s network (loaded from `weights`, or `network` as given) to an ONNX file.

    `size`: N or (height, width), multiples of 32 in 256..2048 (default: the model's input
    size). With `check`, the file is run by ONNX Runtime at batch 1 and 2 (and another size
    when the height and width are dynamic) and refused (deleted; ExportCheckError) if it
    disagrees with the network beyond the tolerance. Written in a temporary folder beside
    `out_path` and moved into place only when complete, with its `.data` file if it has one
    (above 2 GB); an existing file is kept unless `overwrite`. Nothing is left behind on failure.
    """
    started = time.perf_counter()
    spec = get_spec(model_name)
    if spec.runtime != "torch":
        raise ValueError(f"{spec.name} is already an ONNX model ({spec.runtime}); only PyTorch networks export")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: GridSample (the deformable convolutions) needs opset {MIN_OPSET} or later")
    size = check_size(spec.input_size if size is None else size)
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to replace it")
    if network is None:
        from .weights import load_model

        network = load_model(spec.name, weights)
    reference = _on_cpu_in(network, torch.float32)
    dynamic_axes = ("batch", "height", "width") if spec.traced_size_is_dynamic else ("batch",)
    metadata = export_metadata(spec, size, dtype, opset, dynamic_axes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _written_into_place(out_path, overwrite) as tmp:
        example = normalise(check_images(size, 1), spec).to(EXPORT_DTYPES[dtype])
        _trace(_on_cpu_in(reference, EXPORT_DTYPES[dtype]), spec.output_index, example, tmp, opset, dynamic_axes)
        _gather_external_data(tmp)
        data = data_path(out_path) if data_path(tmp).exists() else None
        _write_metadata(tmp, metadata)
        try:
            report = verify_onnx(tmp, reference) if check else None
        except ExportCheckError as exc:
            raise ExportCheckError(f"{exc}; {out_path} was not written") from None
    return ExportReport(out_path, spec.name, size, dtype, opset, dynamic_axes, time.perf_counter() - started,
                        sum(p.stat().st_size for p in (out_path, data) if p), report, metadata, data)


@contextlib.contextmanager
def _written_into_place(path: Path, overwrite: bool):
    """Yield a path named like `path` in a new folder beside it; when the block completes, move it and
    its `.data` file, if any, to `path` together (`atomic.commit_together`: the data first, so the model
    never appears before it; without `overwrite` nothing another writer made meanwhile is replaced).
    With `overwrite`, an older export's data file that the new model does not read is removed. The
    folder and all in it are removed in any case."""
    folder = temporary_beside(path, folder=True)
    try:
        staged = folder / path.name
        yield staged
        moves = [(staged, path)]
        if data_path(staged).exists():
            moves.insert(0, (data_path(staged), data_path(path)))
        commit_together(moves, overwrite=overwrite)
        if overwrite and len(moves) == 1:
            data_path(path).unlink(missing_ok=True)
    finally:
        discard(folder)


# -- the check --------------------------------------------------------------------------------
def check_shapes(size: tuple[int, int], dynamic_axes) -> list[tuple[int, int, int]]:
    """(batch, height, width) to run: batch 1 and 2, and for a dynamic size batch 1 at another size."""
    height, width = size
    shapes = [(1, height, width), (2, height, width)]
    if "height" in dynamic_axes:
        shapes.append((1, height + 64, width - 32 if width > MIN_SIDE else width + 32))
    return shapes


def _probabilities(raw: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return raw.sigmoid()
    low, high = raw.amin(dim=(1, 2, 3), keepdim=True), raw.amax(dim=(1, 2, 3), keepdim=True)
    return (raw - low) / (high - low).clamp_min(1e-8)


def verify_onnx(path, network: nn.Module, *, batch_sizes=None) -> CheckReport:
    """Run the ONNX file (with our metadata) and `network` on the same inputs; ExportCheckError if they disagree.

    float32 files: max |logit difference| <= 1e-3 x std of the network's logits, per shape.
    float16 files: probabilities (the masks before rounding) within 3/255 of the float32 network's.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in ("input_height", "input_width", "mean", "std", "activation", "output_index", "dtype")
               if key not in meta]
    if missing:
        raise ExportError(f"{path} lacks rmbg-demo export metadata ({', '.join(missing)}); cannot check it")
    mean, std = ([float(v) for v in meta[key].split(",")] for key in ("mean", "std"))
    size = int(meta["input_height"]), int(meta["input_width"])
    network = _on_cpu_in(network, torch.float32)
    half = meta["dtype"] == "float16"
    shapes = check_shapes(size, meta.get("dynamic_axes", "batch").split(","))
    if batch_sizes is not None:
        shapes = [(b, *size) for b in batch_sizes]
    errors = {}
    for batch, height, width in shapes:
        x = normalise(check_images((height, width), batch), mean, std)
        with torch.no_grad():
            expected = network(x)[int(meta["output_index"])].float()
        feed = x.numpy().astype(np.float16 if half else np.float32)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: feed})[0].astype(np.float32))
        if got.shape != expected.shape:
            raise ExportCheckError(f"{path}: output {tuple(got.shape)} for input {tuple(x.shape)}, "
                                   f"the network gives {tuple(expected.shape)}")
        if half:
            error = (_probabilities(got, meta["activation"]) - _probabilities(expected, meta["activation"])).abs()
            errors[f"{batch}x{height}x{width}"] = float(error.max())
        else:
            errors[f"{batch}x{height}x{width}"] = float((got - expected).abs().max() / expected.std().clamp_min(1e-12))
    report = CheckReport(meta["dtype"], "max |dprobability|" if half else "max |dlogit| / std(logits)",
                         FLOAT16_TOLERANCE if half else FLOAT32_TOLERANCE, errors)
    if not all(math.isfinite(e) and e <= report.tolerance for e in errors.values()):
        raise ExportCheckError(f"{path} disagrees with the PyTorch network: {report.measure} = "
                               + ", ".join(f"{e:.3g} at {shape}" for shape, e in errors.items())
                               + f" (tolerance {report.tolerance:.3g})")
    return report
