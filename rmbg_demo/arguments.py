"""Command-line arguments shared by `rmbg` and `app.py`: which model, which weights, where and how it
runs. Choices come from the model registry; values are parsed by `rmbg_demo.request`."""
from __future__ import annotations

import argparse

from .engines import DTYPE_CHOICES, OPENVINO_MEASURED_ERRORS, RUNTIME_CHOICES
from .models import get_spec, model_names
from .request import parse_network_size


def add_model_arguments(parser: argparse.ArgumentParser, *, repeatable: bool = False) -> None:
    """--model, --weights, --device, --dtype, --runtime. With `repeatable`, --model may be given several times."""
    if repeatable:
        parser.add_argument("--model", action="append", required=True, choices=model_names(),
                            help="repeat to compare models")
    else:
        parser.add_argument("--model", default="auto", choices=["auto", *model_names()],
                            help="auto: rmbg-2.0 when its weights are on this machine, else the embedded u2netp")
    parser.add_argument("--weights", metavar="FILE",
                        help="weights: a .safetensors/.pth/.bin file or a folder (PyTorch), or an .onnx file "
                             "(ONNX Runtime)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                        help="auto: float16 on CUDA, bfloat16 on CPUs with native bf16, else float32; int8: the "
                             "Linear layers in int8 on the CPU (faster, masks within a few 255ths: see the README)")
    parser.add_argument("--runtime", default="auto", choices=["auto", *RUNTIME_CHOICES],
                        help="what runs the network. auto: OpenVINO bf16 for RMBG-2.0 and BiRefNet lite at their "
                             "own size where the openvino extra is installed and the CPU has native bf16 (masks "
                             "measured within 2/255 of float32), else the model's own (PyTorch networks: PyTorch; "
                             "ONNX graphs: ONNX Runtime). openvino (CPU; pip install 'rmbg-demo[openvino]'; the first "
                             "start converts and compiles, minutes for "
                             "RMBG-2.0, then cached): --dtype float32 is exact; bfloat16 and int8 (NNCF) move masks, "
                             "measured vs float32: "
                             + "; ".join(measured_error(*key, error) for key, error in OPENVINO_MEASURED_ERRORS.items())
                             + " (bench/RESULTS.md)")


def measured_error(model: str, precision: str, source: str, error: int) -> str:
    export = " from an rmbg export file" if source == "onnx" and get_spec(model).builder is not None else ""
    return f"{model} {precision}{export} up to {error}/255"


def size_argument(text: str):
    """argparse's type for --size: a NetworkSize, or None for 'auto'."""
    try:
        return parse_network_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_text(text: str) -> str:
    """`text` itself once it parses as a size ("auto" too): for settings kept as text, like the page's."""
    size_argument(text)
    return text


def add_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=size_argument, metavar="N|WxH",
                        help="the network's input resolution (default: the model's own, 1024 for RMBG-2.0); "
                             "smaller is faster and coarser")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile the network (default backend: inductor), warmed up before the first "
                             "image; pays off on a GPU, not on the CPU")


def memory_argument(text: str) -> int:
    from .budget import parse_memory

    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", type=memory_argument, metavar="SIZE",
                        help="memory budget for images being processed at once, e.g. 6G (default: a quarter of "
                             "RAM; 0: none): large requests wait their turn (or get 503) instead of adding up")
