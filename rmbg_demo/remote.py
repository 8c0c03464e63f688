"""A pipeline whose network runs in a `rmbg serve` elsewhere (`python app.py --backend URL`).

Images are decoded, checked and composed here, exactly as with a local model; only each image's
mask comes from the service, which batches concurrent requests on its own GPUs. So the page can
live on a small machine while the network runs on a cluster.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .cluster.client import RemoteError, RemoteRemover
from .imageio import DEFAULT_MAX_PIXELS
from .models import get_spec
from .pipeline import RemovalPipeline


class RemotePipeline(RemovalPipeline):
    """`RemovalPipeline`'s face (`iter_results`, `__call__`, `predict_probabilities`, `to_mask`,
    `describe`) over a service: the batch loop, error handling and composing are inherited, the
    engine is the service. `size`: the network's (H, W) there (None: the model's own)."""

    def __init__(self, remote: RemoteRemover, model: str, size: tuple[int, int] | None = None,
                 batch_size: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS):
        # No super().__init__: it builds an engine, and the engine here is the service.
        self.remote, self.model_name, self.spec = remote, model, get_spec(model)
        self.batch_size, self.max_pixels = max(1, int(batch_size)), max_pixels
        self.size_query = f"{size[1]}x{size[0]}" if size else None
        self.input_size = size or self.spec.input_size
        self.load_seconds = 0.0

    def describe(self) -> str:
        size = f"{self.input_size[1]}x{self.input_size[0]}"
        return (f"{self.spec.title} [{self.model_name}] at {size}, served by {self.remote.url}; "
                f"licence: {self.spec.licence}")

    def predict_masks(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Each image's mask from the service, the images sent together so that they can share its batches.
        A refusal or an unreachable service raises `RemoteError` (a RuntimeError: the batch's error)."""
        if not images:
            return []
        with ThreadPoolExecutor(max_workers=min(len(images), 8), thread_name_prefix="rmbg-remote") as pool:
            return list(pool.map(self._mask_of, images))

    def predict_probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 1, H, W) at the images' own size (the service answers full-size masks); for video frames,
        which share one size."""
        masks = self.predict_masks(images)
        return torch.stack([torch.from_numpy(np.asarray(m, np.float32) / 255.0)[None] for m in masks])

    def to_mask(self, probability: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        if tuple(probability.shape[-2:]) == (size[1], size[0]):  # a full-size mask from the service
            return Image.fromarray((probability[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "L")
        return super().to_mask(probability, size)

    def _mask_of(self, image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)  # lossless, and quick to write
        body, _ = self.remote.remove(buffer.getvalue(), model=self.model_name, mask=True,
                                     size=self.size_query)
        mask = Image.open(io.BytesIO(body))
        mask.load()
        if mask.mode != "L" or mask.size != image.size:
            raise RemoteError(f"{self.remote.url} answered a {mask.mode} {mask.size[0]}x{mask.size[1]} mask for a "
                              f"{image.size[0]}x{image.size[1]} image", None)
        return mask
