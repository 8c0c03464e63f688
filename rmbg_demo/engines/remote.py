"""An engine whose network runs in a `rmbg serve` elsewhere (`python app.py --backend URL`).

Probabilities in, probabilities out, as every engine: the images are decoded, preprocessed, turned into
masks and composed here, exactly as with a local model, so the page can live on a small machine while
the network runs on a cluster, and its masks are the ones a local model would give."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


class RemoteEngine:
    name = "remote"
    input_size = None
    fixed_size = None  # the service says when a size cannot run (a 400, raised as RemoteError)

    def __init__(self, url: str, model: str, *, timeout: float = 120.0):
        from ..client import RemoteRemover

        self.client = url if isinstance(url, RemoteRemover) else RemoteRemover(url, timeout=timeout)
        self.device = self.client.url
        self.model_name = model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Each image its own request, all in flight together, so that the service's batcher can share
        its network batches with other callers. A refusal or an unreachable service raises RemoteError
        (a RuntimeError: the batch's error, as a device failure would be)."""
        images = [image[None].numpy() for image in batch.detach().to("cpu", torch.float32)]
        if len(images) == 1:
            answers = [self.client.predict(images[0], self.model_name)]
        else:
            with ThreadPoolExecutor(max_workers=min(len(images), 8), thread_name_prefix="rmbg-remote") as pool:
                answers = list(pool.map(lambda image: self.client.predict(image, self.model_name), images))
        return torch.from_numpy(np.concatenate(answers).astype(np.float32, copy=False))

    def describe(self) -> str:
        return f"served by {self.client.url}"
