"""Command-line options shared by `rmbg` and `app.py`: which model, which weights, where and
how it runs. Choices come from the model registry."""
from __future__ import annotations

import argparse

from .engines.pytorch import DTYPES
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
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile the network (default backend: inductor), warmed up before the first "
                             "image; pays off on a GPU, not on the CPU")
