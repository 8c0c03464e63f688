"""CPU runtimes for RMBG-2.0 side by side: PyTorch float32 / bfloat16 / int8, ONNX Runtime float32 / int8,
OpenVINO f32 / bf16 / int8, sizes.

    python bench/runtimes.py [--images A.jpg B.jpg ...] [--weights model.safetensors] [--runs 1]
                             [--sizes 1024 768 512] [--only NAME ...] [--no-append]

Every configuration turns the same decoded photos into masks (preprocess, network, activation,
the mask resized to the photo), timed per photo; the figure is the median over photos x runs.
Masks are compared with PyTorch float32 at --size (the reference; ONNX Runtime float32 for u2netp, an ONNX
graph: `--model u2netp` runs ONNX Runtime and OpenVINO's precisions), 8-bit, at the photo's size, in 1/255 steps.
The model card's snippet (float32, torchvision transforms) is timed too, so that speed-ups are
against what a user of the card runs. Without --weights the network gets the parity fixture's
deterministic weights: speed does not depend on weight values; mask differences do a little.
--model birefnet-lite --size 256 --sizes 256 makes a quick trial run.
ONNX files are exported (and checked) into bench/out/ first; export time and size are reported.
OpenVINO rows convert the PyTorch network (cached under ~/.cache/rmbg-demo/openvino; conversion,
quantization and compile times are reported, and are not in the per-photo times).
Results are printed and appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rmbg2"))

DEFAULT_IMAGES = [ROOT / "assets" / n for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
OUT = ROOT / "bench" / "out"


def fixture_network(model_name: str, weights) -> nn.Module | None:
    """The PyTorch network (None for an ONNX graph such as u2netp)."""
    from rmbg_demo import build_model, load_model
    from rmbg_demo.models import Runtime, get_spec

    if get_spec(model_name).runtime is Runtime.ONNX:
        return None
    if weights:
        return load_model(model_name, weights)
    import parity

    model = build_model(model_name)
    model.load_state_dict(parity.deterministic_state_dict(model), strict=False)
    return model.eval()


class Float32Island(nn.Module):
    """A dynamically quantized Linear inside a bfloat16 network: its kernel takes float32 only."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.float()).to(x.dtype)

    def _apply(self, fn, recurse=True):  # `.to(bfloat16)` must leave the packed int8 weights alone
        return self


def int8_linear(network: nn.Module, rest_dtype: torch.dtype) -> nn.Module:
    """Linear layers in int8 dynamic quantization (activations quantized per call); the rest in `rest_dtype`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(network), {nn.Linear}, dtype=torch.qint8)
    if rest_dtype == torch.float32:
        return quantized

    def wrap(module):
        for name, child in module.named_children():
            if isinstance(child, torch.ao.nn.quantized.dynamic.Linear):
                setattr(module, name, Float32Island(child))
            else:
                wrap(child)
    wrap(quantized)
    return quantized.to(rest_dtype)


def torch_runner(network: nn.Module, dtype: torch.dtype):
    """As the engine runs it: bfloat16 without native support computes in float32 arithmetic."""
    from rmbg_demo.engines.pytorch import Float32Arithmetic, cpu_has_fast_bfloat16

    widen = dtype == torch.bfloat16 and not cpu_has_fast_bfloat16()

    def run(x):
        with torch.inference_mode(), Float32Arithmetic() if widen else contextlib.nullcontext():
            return network(x.to(dtype))[-1].float().sigmoid()
    return run


def onnx_file(model_name, network, size: int, label: str, exports: dict) -> Path:
    from rmbg_demo.export import export_onnx

    path = OUT / f"{model_name}-{size}.onnx"
    started = time.perf_counter()
    report = export_onnx(model_name, path, network=network, size=size, overwrite=True)
    exports[label] = (f"export {report.seconds:.0f} s including the check ({report.check.worst:.2g} of the "
                      f"logits' std); {path.stat().st_size / 2**20:.0f} MiB")
    print(f"exported {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def ort_int8_file(fp32_path: Path, exports: dict) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = fp32_path.with_name(fp32_path.stem + "-int8.onnx")
    started = time.perf_counter()
    # MatMul only: the Linear layers, as torch's dynamic quantization does; ConvInteger is slow on CPUs.
    quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    exports["onnxruntime int8"] = (f"quantize_dynamic {time.perf_counter() - started:.0f} s; "
                                   f"{path.stat().st_size / 2**20:.0f} MiB")
    return path


def openvino_engine(name, network, precision: str, size: int, label: str, exports: dict):
    """The OpenVINO engine as `--runtime openvino` builds it from a PyTorch network; its set-up time reported."""
    from rmbg_demo.engines.ov import openvino_from_torch
    from rmbg_demo.models import get_spec

    started = time.perf_counter()
    engine = openvino_from_torch(get_spec(name), network=network, precision=precision, input_size=(size, size))
    exports[label] = f"set-up {time.perf_counter() - started:.0f} s (convert, quantize, compile: first run only)"
    return engine


def graph_configurations(args):
    """An ONNX graph (u2netp): ONNX Runtime float32, the reference, then OpenVINO's precisions."""
    from rmbg_demo.engines import build_engine

    rows = [("onnxruntime float32", args.size, lambda: build_engine(args.model, runtime="onnxruntime"))]
    for precision, dtype in (("f32", "float32"), ("bf16", "bfloat16"), ("int8", "int8")):
        rows.append((f"OpenVINO {precision}", args.size,
                     lambda dtype=dtype: build_engine(args.model, runtime="openvino", dtype=dtype)))
    return rows


def configurations(args, network, exports):
    """(label, size, factory) in run order; factories build lazily, so a failure costs only its row."""
    from rmbg_demo.engines.ort import OnnxEngine

    if network is None:
        return [row for row in graph_configurations(args) if not args.only or any(w in row[0] for w in args.only)]
    base, name = args.size, args.model

    from rmbg_demo.engines.pytorch import cpu_has_fast_bfloat16

    fast_bf16 = cpu_has_fast_bfloat16()

    def bf16():
        return torch_runner(copy.deepcopy(network).to(torch.bfloat16), torch.bfloat16)

    def int8_bf16():
        return torch_runner(int8_linear(network, torch.bfloat16), torch.bfloat16)

    rows = [("model card snippet (float32)", base, None),
            ("PyTorch float32", base, lambda: torch_runner(network, torch.float32)),
            ("PyTorch bfloat16" + ("" if fast_bf16 else " (float32 arithmetic: no native bf16)"), base, bf16),
            ("PyTorch int8 Linear + float32", base, lambda: torch_runner(int8_linear(network, torch.float32),
                                                                         torch.float32)),
            ("PyTorch int8 Linear + bfloat16", base, int8_bf16),
            ("onnxruntime float32", base, lambda: OnnxEngine(onnx_file(name, network, base, "onnxruntime float32",
                                                                       exports))),
            ("onnxruntime int8", base, lambda: OnnxEngine(ort_int8_file(OUT / f"{name}-{base}.onnx", exports)))]
    for precision in ("f32", "bf16", "int8"):
        label = f"OpenVINO {precision}"
        rows.append((label, base, lambda precision=precision, label=label: openvino_engine(
            name, network, precision, base, label, exports)))
    for size in args.sizes:
        if size != base:
            if fast_bf16:
                rows.append((f"PyTorch bfloat16 at {size}", size, bf16))
            else:
                rows.append((f"PyTorch float32 at {size}", size, lambda: torch_runner(network, torch.float32)))
            label = f"OpenVINO f32 at {size}"
            rows.append((label, size, lambda size=size, label=label: openvino_engine(
                name, network, "f32", size, label, exports)))
            label = f"onnxruntime float32 at {size}"
            rows.append((label, size, lambda size=size, label=label: OnnxEngine(
                onnx_file(name, network, size, label, exports))))
    return [row for row in rows if not args.only or any(word in row[0] for word in args.only)]


def card_masks(network, size, images, runs):
    """The model card's snippet from a decoded photo to its mask."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    masks, times = [], []
    for _ in range(runs):
        for image in images:
            started = time.perf_counter()
            with torch.no_grad():
                preds = network(transform(image).unsqueeze(0))[-1].sigmoid().cpu()
            masks.append(transforms.ToPILImage()(preds[0].squeeze()).resize(image.size))
            times.append(time.perf_counter() - started)
    return masks, times


def pipeline_masks(model_name, network, run, size, images, runs):
    """Our pre- and post-processing (RemovalPipeline's, float32 on the CPU) around `run`: the same for every runtime."""
    from rmbg_demo.pipeline import RemovalPipeline

    pipe = RemovalPipeline(model_name, network=network, device="cpu", dtype="float32", input_size=(size, size))
    masks, times = [], []
    for _ in range(runs):
        for image in images:
            started = time.perf_counter()
            masks.append(pipe.to_mask(run(pipe.preprocess(image))[0], image.size))
            times.append(time.perf_counter() - started)
    return masks, times


def difference(masks, reference) -> tuple[int, float]:
    """(max, mean) |difference| of 8-bit masks, in 1/255 steps, over all photos."""
    diffs = [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in zip(masks, reference)]
    return max(int(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))


def measure(args, network, images) -> tuple[list[dict], dict]:
    exports: dict[str, str] = {}
    rows, reference, card_median = [], None, None
    for label, size, factory in configurations(args, network, exports):
        print(f"-- {label}", flush=True)
        try:
            if factory is None:
                masks, times = card_masks(network, size, images, args.runs)
            else:
                masks, times = pipeline_masks(args.model, network, factory(), size, images, args.runs)
        except Exception as exc:  # noqa: BLE001 - a runtime that does not run is a result too
            error = f"did not run: {type(exc).__name__}: {str(exc)[:200]}"
            rows.append({"label": label, "size": size, "error": error})
            print(f"   {error}", flush=True)
            continue
        if label in ("PyTorch float32", "onnxruntime float32") and reference is None:
            reference = masks[:len(images)]
        if label.startswith("model card"):
            card_median = statistics.median(times)
        rows.append({"label": label, "size": size, "masks": masks[:len(images)], "times": times,
                     "median": statistics.median(times)})
        print(f"   median {rows[-1]['median']:.2f} s per photo ({', '.join(f'{t:.1f}' for t in times)})", flush=True)
    for row in rows:
        if "masks" in row and reference is not None:
            row["max"], row["mean"] = difference(row.pop("masks"), reference)
        if "median" in row and card_median:
            row["speedup"] = card_median / row["median"]
    return rows, exports


def table(rows, exports, base: int) -> str:
    lines = [f"| runtime | size | s per photo (median) | runs s | vs card | masks vs float32 at {base}: max, mean |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | {row['size']} | {row['error']} | | | |")
            continue
        diff = f"{row['max']}, {row['mean']:.3f}" if "max" in row else "n/a"
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        lines.append(f"| {row['label']} | {row['size']} | {row['median']:.2f} | "
                     f"{', '.join(f'{t:.1f}' for t in row['times'])} | {speed} | {diff} |")
    lines += ["", *(f"- {label}: {text}" for label, text in exports.items())]
    return "\n".join(lines)


def verdict(rows) -> str:
    if not any("speedup" in row for row in rows):
        return ""  # no model card to compare with (an ONNX graph)
    fast = [r for r in rows if r.get("speedup", 0) >= 3 and r.get("max", 255) <= 4]
    if fast:
        return "- reaches the goal (>= 3x the card at <= 4/255): " + ", ".join(r["label"] for r in fast)
    best = max((r for r in rows if "speedup" in r and r.get("max", 255) <= 4), key=lambda r: r["speedup"],
               default=None)
    return ("- nothing reaches the goal (>= 3x the card with masks within 4/255)"
            + (f"; the fastest within 4/255: {best['label']} at {best['speedup']:.2f}x" if best else ""))


def cpu_model() -> str:
    """The CPU's model name and its bf16 support, as lscpu says."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    extras = [flag for flag in ("avx512_bf16", "amx_bf16") if f" {flag}" in flags] or ["no native bf16"]
    return f"{name} ({', '.join(extras)})"


def openvino_version() -> str:
    try:
        import openvino
    except ImportError:
        return "not installed"
    return openvino.__version__.split("-")[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--model", default="rmbg-2.0", help="a BiRefNet model (default rmbg-2.0), or u2netp")
    parser.add_argument("--weights", help="the model's weights file (default: the parity fixture's weights)")
    parser.add_argument("--size", type=int, help="the size every runtime runs at, and the reference's (default: "
                        "the model's)")
    parser.add_argument("--runs", type=int, default=1, help="passes over the photos per runtime")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 768, 512])
    parser.add_argument("--only", nargs="+", help="run only the rows whose label contains one of these words")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    from rmbg_demo.imageio import load_image
    from rmbg_demo.models import get_spec

    args.size = args.size or get_spec(args.model).input_size[0]

    OUT.mkdir(parents=True, exist_ok=True)
    images = [load_image(path) for path in args.images]
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows, exports = measure(args, fixture_network(args.model, args.weights), images)
    minutes = (time.perf_counter() - started) / 60
    report = "\n".join([
        (f"## {datetime.date.today()} CPU runtimes for {args.model} (x86_64, {os.cpu_count()} cores, "
         f"{torch.get_num_threads()} torch threads)"),
        f"- command: `python bench/runtimes.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        (f"- CPU: {cpu_model()}; torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
         f"openvino {openvino_version()}, Python "
         f"{platform.python_version()}; weights: {'file' if args.weights else 'parity fixture'}; images: "
         f"{', '.join(p.name for p in args.images)}; time per photo = preprocess + network + mask resize"),
        (f"- load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after ({minutes:.0f} min; this "
         f"benchmark alone adds about {torch.get_num_threads()}); rows ran one after another"),
        "",
        table(rows, exports, args.size),
        verdict(rows),
    ])
    print(report)
    if not args.no_append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as handle:
            handle.write("\n" + report + "\n")


if __name__ == "__main__":
    main()
