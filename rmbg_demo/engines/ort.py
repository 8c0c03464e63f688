"""The ONNX Runtime engine: an ONNX graph (the embedded U2-Net-p, or an exported network)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..models import Activation
from ..processing import activate

log = logging.getLogger(__name__)


class OnnxModelError(ValueError):
    """The file is not an ONNX graph this project can run; the message says why."""


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: str | Path, *, output_index: int = 0, activation: Activation = Activation.SIGMOID,
                 device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise OnnxModelError(f"cannot load {self.path} with ONNX Runtime: {exc}") from exc
        self.device = "cpu"
        self.output_index = output_index
        self.activation = Activation(activation)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        batch, _, height, width = graph_input.shape
        self.fixed_batch = batch if isinstance(batch, int) else None
        self.fixed_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def describe(self) -> str:
        return f"onnxruntime on {self.device} ({self.session.get_providers()[0]})"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().float().cpu().numpy()
        step = self.fixed_batch or len(array)  # graphs exported with a fixed batch of 1 run image by image
        try:
            outputs = [self.session.run(None, {self.input_name: array[i:i + step]})[self.output_index]
                       for i in range(0, len(array), step)]
        except Exception as exc:  # onnxruntime's own types, not RuntimeError: a failed batch, as an engine says it
            raise RuntimeError(f"onnxruntime could not run {self.path.name}: {exc}") from exc
        return activate(torch.from_numpy(np.concatenate(outputs)), self.activation)
