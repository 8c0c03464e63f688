"""The Ray Serve deployment behind `rmbg serve --ray` (imports Ray: load it through `serve.py`): the same
FastAPI app as the plain server (`rmbg_demo.service.app`), mounted with `@serve.ingress`.

Each replica holds a `Service` (models loaded once); concurrent requests share network batches through
`@serve.batch` (only the engine call is batched). Decoding, preprocessing, composing and encoding run on
the replica's threads, per request, so a bad upload fails alone (400) and never reaches a shared batch.
"""
from __future__ import annotations

import torch
from ray import serve

from ..service.app import create_app
from ..service.core import Service
from ..service.settings import ServeSettings


@serve.deployment(name="rmbg")
@serve.ingress()
class Remover:
    def __init__(self, settings: ServeSettings):
        # request_batch=1: the replica's batching is @serve.batch's, across its requests
        self.service = Service(settings, request_batch=1)
        self.service.network = self._run
        self._network.set_max_batch_size(max(1, settings.max_batch))

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    async def _run(self, model: str, batch: torch.Tensor) -> torch.Tensor:
        return await self._network((model, batch))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _network(self, items: list[tuple[str, torch.Tensor]]) -> list:
        """One engine call per (model, input shape) among the queued requests' preprocessed inputs;
        answers in their order."""
        out: list = [None] * len(items)
        for key in dict.fromkeys((model, tuple(batch.shape[1:])) for model, batch in items):
            indices = [i for i, (model, batch) in enumerate(items) if (model, tuple(batch.shape[1:])) == key]
            batch = torch.cat([items[i][1] for i in indices])
            probabilities = await self.service.run(self.service.pool.engine(key[0]), batch)
            start = 0
            for i in indices:
                count = len(items[i][1])
                out[i] = probabilities[start:start + count]
                start += count
        return out
