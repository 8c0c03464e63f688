"""The models a long-running front end (the page, the HTTP service, the library's `remove`) serves.

One engine per model, built on first use and shared; one pipeline per (model, network size) on it,
so that every size of a model shares its network batches; one lock. The wrapping rules live here:
request batching (concurrent callers share network batches) and ZeroGPU. Which models are here is
decided from local files only: start-up never waits for the network and never downloads what nobody
asked for. With `backend`, the engines are a running `rmbg serve` (`RemoteEngine`) and the models are
the ones it offers. Errors are plain exceptions (`ModelUnavailable`, `WeightsError`, `ValueError`);
each front end words them its own way.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engines import Engine, RequestBatcher, ZeroGpuEngine, build_engine, pick_device, zerogpu_decorator
from .imageio import DEFAULT_MAX_PIXELS
from .models import REGISTRY, Runtime, get_spec, model_names
from .pipeline import RemovalPipeline, choose_model
from .request import RemovalOptions, encoded_outputs, render
from .weights import weights_available

log = logging.getLogger(__name__)


class ModelUnavailable(ValueError):
    """A model this pool cannot run (not offered by its service, or its weights cannot be had)."""


@dataclass
class PoolSettings:
    model: str | None = "auto"  # the default model
    weights: str | None = None  # for the default model
    device: str = "auto"
    dtype: str = "auto"
    runtime: str = "auto"  # torch, onnxruntime, openvino or auto (rmbg_demo.engines.runtime_for)
    compile: str | None = None  # a torch.compile backend, for torch models
    batch_size: int = 1  # images per network batch of one request (a batch of files, a clip's frames)
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Concurrent callers share network batches of up to this many images; None: 8 on a dedicated GPU
    # or a remote backend, 1 (off) on the CPU, where a batch takes as long as its images one by one,
    # and on ZeroGPU, where the GPU exists only inside each request's own call.
    request_batch: int | None = None
    backend: str | None = None  # a running `rmbg serve` that runs the networks
    zerogpu: bool = field(default_factory=lambda: zerogpu_decorator() is not None)

    def requests_per_batch(self) -> int:
        if self.request_batch is not None:
            return max(1, self.request_batch)
        if self.backend:  # requests in flight together reach the service together, and share its batches
            return 8
        return 8 if pick_device(self.device).type == "cuda" and not self.zerogpu else 1


class ModelPool:
    """`pool.pipeline(model, size)`: the pipeline for `model` (None: the default) at network size `size`
    (None: the model's own). `on_download(name)` is called before a model's weights are fetched."""

    def __init__(self, settings: PoolSettings | None = None, *, on_download: Callable[[str], None] | None = None,
                 load_default: bool = True):
        self.settings = settings or PoolSettings()
        self.on_download = on_download
        self._engines: dict[str, Engine] = {}
        self._pipelines: dict[tuple, RemovalPipeline] = {}
        self._lock = threading.Lock()
        if self.settings.backend:
            self._offered_by_backend()
        else:
            self.default = choose_model(self.settings.model, self.settings.weights)
            names = model_names()
            self.choices = [self.default, *(n for n in names if n != self.default)]
            self.local = {n for n in names if n == self.default or weights_available(n)}
        if load_default:
            self.pipeline(self.default)  # at start-up, not on the first request

    def _offered_by_backend(self) -> None:
        from .client import RemoteRemover

        self.client = RemoteRemover(self.settings.backend)
        offered = self.client.models()  # RemoteError when nothing answers: the pool would be useless
        available = [m["name"] for m in offered["models"] if m.get("available") and m["name"] in REGISTRY]
        asked = self.settings.model
        if asked not in (None, "auto") and get_spec(asked).name not in available:
            raise ModelUnavailable(f"{self.settings.backend} has no weights for {asked}; it offers "
                                   f"{', '.join(available)}")
        self.default = get_spec(asked).name if asked not in (None, "auto") else offered["default"]
        self.choices = [self.default, *(n for n in available if n != self.default)]
        self.local = set(self.choices)

    def name_of(self, model: str | None) -> str:
        return get_spec(model).name if model not in (None, "auto") else self.default

    def available(self, name: str) -> bool:
        """Loaded, or loadable from this machine's disk (or offered by the backend): no download needed."""
        name = get_spec(name).name
        return name in self._engines or name in self.local

    def engine(self, model: str | None = None) -> Engine:
        """The model's one engine (wrapped for request batching and ZeroGPU), built on first use."""
        name = self.name_of(model)
        with self._lock:
            return self._engine_locked(name)

    def _engine_locked(self, name: str) -> Engine:
        if name not in self._engines:
            if self.settings.backend and name not in self.local:
                raise ModelUnavailable(f"{name} is not available at {self.settings.backend}; choose one of "
                                       f"{', '.join(self.choices)}")
            if name not in self.local and self.on_download:
                self.on_download(name)
            self._engines[name] = self._build(name)
            self.local.add(name)
        return self._engines[name]

    def _build(self, name: str) -> Engine:
        settings = self.settings
        spec = get_spec(name)
        compile_backend = settings.compile if spec.runtime is Runtime.TORCH and not settings.backend else None
        batch = settings.requests_per_batch()
        engine = build_engine(spec, settings.weights if name == self.default else None, settings.device,
                              settings.dtype, compile=compile_backend, max_batch=max(settings.batch_size, batch),
                              backend=settings.backend, runtime=settings.runtime)
        if settings.zerogpu and not settings.backend:
            engine = ZeroGpuEngine(engine, zerogpu_decorator())
        return RequestBatcher(engine, batch) if batch > 1 else engine

    def pipeline(self, model: str | None = None, size: tuple[int, int] | None = None) -> RemovalPipeline:
        name = self.name_of(model)
        size = tuple(size) if size else None
        with self._lock:
            if (name, size) not in self._pipelines:
                engine = self._engine_locked(name)
                weights = self.settings.weights if name == self.default else None
                self._pipelines[name, size] = RemovalPipeline(name, weights, batch_size=self.settings.batch_size,
                                                              max_pixels=self.settings.max_pixels,
                                                              input_size=size, engine=engine)
            return self._pipelines[name, size]

    def pipeline_for(self, options: RemovalOptions) -> RemovalPipeline:
        return self.pipeline(options.model, options.size)


_SHARED: dict[tuple, ModelPool] = {}
_SHARED_LOCK = threading.Lock()


def get_pipeline(model: str | None = "auto", weights=None, device="auto", dtype="auto", *,
                 size: tuple[int, int] | None = None, runtime: str = "auto") -> RemovalPipeline:
    """A pipeline for (model, size) from a process-wide pool per (weights, device, dtype, runtime): built once,
    reused."""
    name = choose_model(model, weights)
    key = (str(weights) if weights else None, str(device), str(dtype), str(runtime))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = ModelPool(PoolSettings(model=name, weights=key[0], device=device, dtype=dtype,
                                                  runtime=runtime, request_batch=1, zerogpu=False), load_default=False)
    return _SHARED[key].pipeline(name, size)


def remove(data, *, model: str | None = "auto", weights=None, background=None, refine: bool = False,
           only_mask: bool = False, fmt: str = "png", size=None, device="auto", dtype="auto"):
    """One call, like rembg's: bytes in -> encoded bytes out; PIL in -> PIL out; ndarray in -> ndarray out.

    Returns the cut-out (RGBA), the subject over `background` (a colour, 'blur' or an image: RGB), or with
    `only_mask` the mask (L)."""
    options = RemovalOptions(model=model or "auto", size=size, background=background, refine=refine, format=fmt)
    result = get_pipeline(options.model, weights, device, dtype, size=options.size)(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        kind = "mask" if only_mask else "image"
        return encoded_outputs(result, options, kinds=[kind])[kind]
    out = result.mask if only_mask else render(result, options)
    if isinstance(data, np.ndarray):
        return np.asarray(out)
    return out
