"""The Ray Serve deployment behind `rmbg serve` (imports Ray: load it through `serve.py`).

Each replica loads the models it is asked for once; concurrent requests share network batches
through `@serve.batch` (only the engine call is batched). Decoding, preprocessing, composing and
encoding run on the replica's threads, per request, so a bad upload fails alone (400) and never
reaches a shared batch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS

log = logging.getLogger(__name__)
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}


@dataclass
class ServeSettings:
    model: str = "auto"
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 8
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_private_urls: bool = False


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


@serve.deployment(name="rmbg")
class Remover:
    def __init__(self, settings: ServeSettings):
        from ..pipeline import choose_model

        self.settings = settings
        self.default_model = choose_model(settings.model, settings.weights)
        self.pipelines: dict = {}  # (model, size) -> pipeline; a model's sizes share its engine
        self._load(self.default_model)
        self._network.set_max_batch_size(max(1, settings.max_batch))

    def _load(self, model: str, size: tuple[int, int] | None = None):
        """The pipeline of `model` at network size `size` (None: the model's own), built once per replica
        (on its first request for it); every size of a model runs on the model's one engine."""
        from ..pipeline import RemovalPipeline

        if (model, None) not in self.pipelines:
            weights = self.settings.weights if model == self.default_model else None
            self.pipelines[model, None] = RemovalPipeline(model, weights, self.settings.device, self.settings.dtype,
                                                          batch_size=self.settings.max_batch,
                                                          max_pixels=self.settings.max_pixels)
        if (model, size) not in self.pipelines:
            base = self.pipelines[model, None]
            try:
                self.pipelines[model, size] = RemovalPipeline(base.model_name, batch_size=self.settings.max_batch,
                                                              max_pixels=self.settings.max_pixels, input_size=size,
                                                              engine=base.engine)
            except ValueError as exc:  # a size this model's engine cannot run at (a fixed-size ONNX file)
                raise BadRequest(f"{model}: {exc}") from None
        return self.pipelines[model, size]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _network(self, items: list[tuple[tuple, object]]) -> list:
        """One engine call per (model, size) among the queued requests' preprocessed inputs; answers in their
        order."""
        import torch

        out: list = [None] * len(items)
        for key in dict.fromkeys(k for k, _ in items):
            indices = [i for i, (k, _) in enumerate(items) if k == key]
            batch = torch.cat([items[i][1] for i in indices])
            probabilities = await asyncio.to_thread(self.pipelines[key].engine, batch)
            for i, probability in zip(indices, probabilities):
                out[i] = probability
        return out

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        try:
            if path.endswith("/healthz") and request.method == "GET":
                return JSONResponse({"status": "ok", "model": self.default_model})
            if path.endswith("/models") and request.method == "GET":
                return JSONResponse(self._models())
            if path.endswith("/remove") and request.method == "POST":
                return await self._remove(request)
            return _error(f"no route {request.method} {path}; use POST /remove, GET /models, GET /healthz", 404)
        except BadRequest as exc:
            return _error(str(exc), exc.status)
        except RuntimeError as exc:  # the network failed (out of memory...): this request only
            return _error(f"the model failed: {exc}", 500)
        except Exception as exc:  # noqa: BLE001 - a bug answers JSON like every other error; the replica lives on
            log.exception("%s %s failed", request.method, path)
            return _error(f"internal error: {exc.__class__.__name__}: {exc}", 500)

    def _models(self) -> dict:
        from ..models import REGISTRY

        return {"default": self.default_model, "batch": self.settings.max_batch,
                "models": [{"name": name, "title": spec.title, "licence": spec.licence,
                            "available": self._available(name)} for name, spec in REGISTRY.items()]}

    def _available(self, name: str) -> bool:
        """Loaded, or loadable from this replica's disk: a request never waits for a download."""
        from ..weights import weights_available

        return (name, None) in self.pipelines or weights_available(name)

    async def _remove(self, request: Request) -> Response:
        from ..imageio import ImageDecodeError, encode_image, load_image
        from ..pipeline import RemovalResult

        started = time.perf_counter()
        query = request.query_params
        model, fmt = self._model(query.get("model")), (query.get("format") or "png").lower()
        if fmt not in FORMAT_EXTENSIONS:
            raise BadRequest(f"format must be one of {', '.join(FORMAT_EXTENSIONS)}, not {fmt!r}")
        background = self._background(query.get("background"))
        size = self._size(query.get("size"))
        data = await self._body(request)
        pipeline = self._load(model, size)

        def decode():  # this request's own thread: a bad file fails here, alone
            image = load_image(data, max_pixels=self.settings.max_pixels)
            return image, pipeline.preprocess(image)

        try:
            image, network_input = await asyncio.to_thread(decode)
        except ImageDecodeError as exc:
            raise BadRequest(str(exc)) from None
        decoded = time.perf_counter()
        probability = await self._network(((model, size), network_input))
        networked = time.perf_counter()

        def finish() -> bytes:
            mask = pipeline.to_mask(probability, image.size)
            if _flag(query.get("mask")):
                return encode_image(mask, fmt)
            result = RemovalResult(image, mask, model)
            return encode_image(result.composite(background, refine=_flag(query.get("refine"))), fmt)

        try:
            body = await asyncio.to_thread(finish)
        except ValueError as exc:  # a background that cannot be applied
            raise BadRequest(str(exc)) from None
        done = time.perf_counter()
        timing = {"decode": decoded - started, "network": networked - decoded, "compose": done - networked}
        headers = {"X-Model": model, "X-Seconds": f"{done - started:.4f}",
                   "X-Image-Size": f"{image.width}x{image.height}",
                   "X-Network-Size": f"{pipeline.input_size[1]}x{pipeline.input_size[0]}",
                   "Server-Timing": ", ".join(f"{k};dur={1000 * v:.1f}" for k, v in timing.items())}
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)

    def _model(self, name: str | None) -> str:
        from ..models import REGISTRY

        if not name or name in ("auto", self.default_model):
            return self.default_model
        if name not in REGISTRY:
            raise BadRequest(f"unknown model {name!r}; GET /models lists them")
        if not self._available(name):
            raise BadRequest(f"model {name!r} has no weights on this server; GET /models lists the available ones")
        return name

    @staticmethod
    def _size(text: str | None) -> tuple[int, int] | None:
        from ..options import parse_size

        try:
            return parse_size(text)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    @staticmethod
    def _background(spec: str | None):
        if not spec or spec in ("transparent", "none"):
            return None
        if spec == "blur":
            return spec
        from ..compose import parse_color

        try:
            return parse_color(spec)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    async def _body(self, request: Request) -> bytes:
        """The image's bytes: the raw body, a multipart field `image`, or JSON {"url": ...} fetched safely."""
        limit = self.settings.max_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"the request is {int(declared)} bytes, over the {limit} byte limit", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the request is over the {limit} byte limit", 413)
            chunks.append(chunk)
        data = b"".join(chunks)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            return await _multipart_image(request, data)
        if kind == "application/json":
            return await self._fetch(data)
        if not data:
            raise BadRequest("empty body: send the image's bytes, a multipart field 'image', or JSON {\"url\": ...}")
        return data

    async def _fetch(self, data: bytes) -> bytes:
        from ..fetch import URLFetchError, fetch_url

        try:
            url = json.loads(data)["url"]
        except (ValueError, KeyError, TypeError):
            raise BadRequest('a JSON body must be {"url": "https://..."}') from None
        try:
            return await asyncio.to_thread(fetch_url, str(url), allow_private=self.settings.allow_private_urls,
                                           max_bytes=self.settings.max_bytes)
        except URLFetchError as exc:
            raise BadRequest(str(exc)) from None


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The `image` field of a multipart body (already read, so the size cap held)."""
    from starlette.datastructures import UploadFile

    async def replay():
        yield body

    form = await Request(request.scope, receive=_receiver(replay())).form()
    field = form.get("image")
    if field is None:
        raise BadRequest("multipart body without an 'image' field")
    return await field.read() if isinstance(field, UploadFile) else str(field).encode()


def _receiver(chunks):
    async def receive():
        try:
            chunk = await chunks.__anext__()
            return {"type": "http.request", "body": chunk, "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
    return receive
