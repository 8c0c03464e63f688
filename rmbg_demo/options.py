"""Command-line options shared by `rmbg` and `app.py`: which model, which weights, where and
how it runs. Choices come from the model registry."""
from __future__ import annotations

import argparse

from .engines.pytorch import DTYPE_CHOICES
from .models import model_names


def add_model_arguments(parser: argparse.ArgumentParser, *, repeatable: bool = False) -> None:
    """--model, --weights, --device, --dtype. With `repeatable`, --model may be given several times."""
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


SIZE_RANGE = (256, 2048)


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """'1024' or '768x1024' (WIDTHxHEIGHT) -> (height, width); multiples of 32 from 256 to 2048."""
    if text in (None, "", "auto"):
        return None
    parts = str(text).lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise ValueError(f"size {text!r}: give N or WIDTHxHEIGHT, e.g. 1024 or 768x1024") from None
    low, high = SIZE_RANGE
    for side in (width, height):
        if side % 32 or not low <= side <= high:
            raise ValueError(f"size {text!r}: each side must be a multiple of 32 from {low} to {high}")
    return height, width


def size_argument(text: str) -> tuple[int, int] | None:
    try:
        return parse_size(text)
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
