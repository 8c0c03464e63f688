"""Engines around engines: request batching for servers, and Hugging Face ZeroGPU."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from .base import Engine

log = logging.getLogger(__name__)


class RequestBatcher:
    """Runs an engine for many concurrent callers, several images at a time.

    Callers decode and preprocess on their own threads, then hand their input here and wait.
    One worker thread takes everything queued (up to `max_batch` images) and runs it as one
    batch: a lone request starts at once, so batching adds no latency, and under load the
    device sees full batches. A network failure reaches every caller of that batch; a bad
    file never gets this far (it fails its own caller's decode).
    """

    def __init__(self, engine: Engine, max_batch: int):
        self.engine = engine
        self.name, self.device, self.fixed_size = engine.name, engine.device, engine.fixed_size
        self.model_name, self.input_size = engine.model_name, engine.input_size
        self.max_batch = max(1, int(max_batch))
        self.batches = 0  # counters, for logs and tests
        self.largest = 0
        # Called with each batch's size just before it runs (tests hold a batch here).
        self.before_batch: Callable[[int], None] | None = None
        self._pending: list[tuple[torch.Tensor, Future]] = []
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None

    def describe(self) -> str:
        return f"{self.engine.describe()}, requests batched up to {self.max_batch}"

    @property
    def queued(self) -> int:
        """Images waiting for the network (not counting the batch running now)."""
        with self._wake:
            return sum(len(batch) for batch, _ in self._pending)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) network input -> (n, 1, h, w) probabilities; blocks until done."""
        future: Future = Future()
        with self._wake:
            self._pending.append((batch, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=f"batcher-{self.name}", daemon=True)
                self._worker.start()
            self._wake.notify()
        return future.result()

    def _take(self) -> list[tuple[torch.Tensor, Future]]:
        """The oldest request, then more of the same input size in arrival order while they fit
        in `max_batch` images (requests at another resolution wait for a batch of their own)."""
        with self._wake:
            while not self._pending:
                self._wake.wait()
            taken = [self._pending.pop(0)]
            shape, images, waiting = taken[0][0].shape[1:], len(taken[0][0]), []
            for index, request in enumerate(self._pending):
                if images >= self.max_batch:
                    waiting += self._pending[index:]
                    break
                if request[0].shape[1:] == shape and images + len(request[0]) <= self.max_batch:
                    taken.append(request)
                    images += len(request[0])
                else:
                    waiting.append(request)
            self._pending = waiting
            return taken

    def _serve(self) -> None:
        while True:
            taken = self._take()
            try:  # whatever fails here reaches the batch's callers; the worker must live on
                batch = torch.cat([batch for batch, _ in taken]) if len(taken) > 1 else taken[0][0]
                if self.before_batch:
                    self.before_batch(len(batch))
                out = self.engine(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the callers, who raise it
                for _, future in taken:
                    future.set_exception(exc)
                continue
            self.batches += 1
            self.largest = max(self.largest, len(out))
            if len(taken) > 1:
                log.info("%s: one batch of %d images for %d requests", self.name, len(out), len(taken))
            start = 0
            for part, future in taken:
                future.set_result(out[start:start + len(part)])
                start += len(part)


def zerogpu_decorator() -> Callable | None:
    """`spaces.GPU` on Hugging Face ZeroGPU Spaces (a GPU is attached only inside functions it
    marks), else None."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces.GPU


class ZeroGpuEngine:
    """An engine whose every call runs inside `spaces.GPU`: on ZeroGPU, the only place a GPU exists."""

    def __init__(self, engine: Engine, gpu: Callable):
        self.engine = engine
        self.name, self.device, self.fixed_size = engine.name, engine.device, engine.fixed_size
        self.model_name, self.input_size = engine.model_name, engine.input_size
        self._run = gpu(engine.__call__)

    def describe(self) -> str:
        return f"{self.engine.describe()}, ZeroGPU"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self._run(batch)
