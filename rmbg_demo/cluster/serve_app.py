"""The Ray Serve deployment behind `rmbg serve` (imports Ray: load it through `serve.py`).

Each replica holds a `ModelPool` (models loaded once, on first request); concurrent requests share network
batches through `@serve.batch` (only the engine call is batched). Decoding, preprocessing, composing and
encoding run on the replica's threads, per request, so a bad upload fails alone (400) and never reaches a
shared batch. Each request's settings are one `RemovalOptions`, read from its query.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..budget import BudgetExceeded, MemoryBudget, image_cost
from ..imageio import ImageDecodeError, image_size
from ..models import REGISTRY
from ..pool import ModelPool, PoolSettings
from ..request import NETWORK_SIDE_RANGE, RemovalOptions, encoded_outputs, network_size, parse_model
from .settings import ServeSettings

log = logging.getLogger(__name__)
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}
ROUTES = {"/healthz": "GET", "/models": "GET", "/remove": "POST", "/predict": "POST"}
# /predict's body: one normalised image at the largest network size, as .npy
MAX_TENSOR_BYTES = 4 * 3 * NETWORK_SIDE_RANGE[1] ** 2 + 4096


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="rmbg")
class Remover:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        # request_batch=1: the replica's batching is @serve.batch's, across its requests
        self.pool = ModelPool(PoolSettings(model=settings.model, weights=settings.weights, device=settings.device,
                                           dtype=settings.dtype, batch_size=settings.max_batch,
                                           max_pixels=settings.max_pixels, request_batch=1, zerogpu=False))
        self.default_model = self.pool.default
        self.budget = MemoryBudget(settings.max_memory)
        self._network.set_max_batch_size(max(1, settings.max_batch))

    def _pipeline(self, model: str, size):
        try:
            return self.pool.pipeline(model, size)
        except ValueError as exc:  # a size this model's engine cannot run at (a fixed-size ONNX file)
            raise BadRequest(f"{model}: {exc}") from None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _network(self, items: list[tuple[str, torch.Tensor]]) -> list:
        """One engine call per (model, input shape) among the queued requests' preprocessed inputs;
        answers in their order."""
        out: list = [None] * len(items)
        for key in dict.fromkeys((model, tuple(batch.shape[1:])) for model, batch in items):
            indices = [i for i, (model, batch) in enumerate(items) if (model, tuple(batch.shape[1:])) == key]
            batch = torch.cat([items[i][1] for i in indices])
            probabilities = await asyncio.to_thread(self.pool.engine(key[0]), batch)
            start = 0
            for i in indices:
                count = len(items[i][1])
                out[i] = probabilities[start:start + count]
                start += count
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
            if path.endswith("/predict") and request.method == "POST":
                return await self._predict(request)
            known = next((route for route in ROUTES if path.endswith(route)), None)
            if known:
                return JSONResponse({"error": f"{known} takes {ROUTES[known]}, not {request.method}"},
                                    status_code=405, headers={"Allow": ROUTES[known]})
            return _error(f"no route {request.method} {path}; use POST /remove, GET /models, GET /healthz", 404)
        except BadRequest as exc:
            return _error(str(exc), exc.status)
        except BudgetExceeded as exc:  # 503: large images hold the memory now; 413: this one never fits
            return _error(str(exc), exc.status)
        except RuntimeError as exc:  # the network failed (out of memory...): this request only
            return _error(f"the model failed: {exc}", 500)
        except Exception as exc:  # noqa: BLE001 - a bug answers JSON like every other error; the replica lives on
            log.exception("%s %s failed", request.method, path)
            return _error(f"internal error: {exc.__class__.__name__}: {exc}", 500)

    def _models(self) -> dict:
        return {"default": self.default_model, "batch": self.settings.max_batch,
                "models": [{"name": name, "title": spec.title, "licence": spec.licence,
                            "available": self.pool.available(name)} for name, spec in REGISTRY.items()]}

    def _model(self, name: str) -> str:
        """A model this replica can run without a download: a request never waits for one."""
        name = self.pool.name_of(name)
        if not self.pool.available(name):
            raise BadRequest(f"model {name!r} has no weights on this server; GET /models lists the available ones")
        return name

    async def _remove(self, request: Request) -> Response:
        started = time.perf_counter()
        data, background_image = await self._body(request)
        try:
            options = RemovalOptions.from_query(request.query_params, background_image)
        except ValueError as exc:  # OptionError: names the setting and its value
            raise BadRequest(str(exc)) from None
        model = self._model(options.model)
        pipeline = self._pipeline(model, options.size)
        try:  # the header says how much memory the image will need, before any pixel is decoded
            width, height = await asyncio.to_thread(image_size, data, max_pixels=self.settings.max_pixels)
        except (ImageDecodeError, OSError) as exc:
            raise BadRequest(str(exc)) from None
        cost = image_cost(width, height)
        await asyncio.to_thread(self.budget.acquire, cost)
        try:
            image, body, confidence, timing = await self._cut_out(pipeline, model, options, data)
        finally:
            self.budget.release(cost)
        done = time.perf_counter()
        timing["decode"] += timing.pop("admitted") - started  # the header, and any wait for the budget
        headers = {"X-Model": model, "X-Seconds": f"{done - started:.4f}",
                   "X-Confidence": f"{confidence:.4f}",
                   "X-Image-Size": f"{image.width}x{image.height}", "X-Network-Size": str(pipeline.input_size),
                   "Server-Timing": ", ".join(f"{k};dur={1000 * v:.1f}" for k, v in timing.items())}
        return Response(body, media_type=MEDIA_TYPES[options.format], headers=headers)

    async def _cut_out(self, pipeline, model: str, options: RemovalOptions, data: bytes):
        """Decode (on this request's own thread: a bad file fails here, alone), the network (in a shared
        batch), then mask, compose and encode: (image, encoded answer, confidence, seconds per step)."""
        admitted = time.perf_counter()

        def decode():
            image = pipeline.load(data)
            return image, pipeline.preprocess(image)

        try:
            image, network_input = await asyncio.to_thread(decode)
        except (ImageDecodeError, OSError) as exc:  # the decode boundary's words; OSError: a read the OS refused
            raise BadRequest(str(exc)) from None
        decoded = time.perf_counter()
        probability = (await self._network((model, network_input)))[0]
        networked = time.perf_counter()

        def finish() -> tuple[bytes, float]:
            result = pipeline.result_of(image, probability)
            kind = "mask" if options.mask else "image"
            return encoded_outputs(result, options, kinds=[kind])[kind], result.confidence

        try:
            body, confidence = await asyncio.to_thread(finish)
        except ValueError as exc:  # a background that cannot be applied
            raise BadRequest(str(exc)) from None
        timing = {"admitted": admitted, "decode": decoded - admitted, "network": networked - decoded,
                  "compose": time.perf_counter() - networked}
        return image, body, confidence, timing

    async def _predict(self, request: Request) -> Response:
        """The network alone: a (B, 3, H, W) float32 .npy of normalised inputs -> (B, 1, h, w) probabilities."""
        try:
            model = self._model(parse_model(request.query_params.get("model")))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        data = await self._read(request, max(self.settings.max_bytes, MAX_TENSOR_BYTES))
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BadRequest(f"the body is not a .npy array: {exc}") from None
        if array.ndim != 4 or array.shape[1] != 3 or array.dtype != np.float32:
            raise BadRequest(f"expected a (B, 3, H, W) float32 array, got {array.dtype} {array.shape}")
        try:
            size = network_size(*array.shape[2:])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        self._pipeline(model, size)  # refuses a size this model's engine cannot run at
        probabilities = await self._network((model, torch.from_numpy(array)))
        buffer = io.BytesIO()
        np.save(buffer, probabilities.numpy().astype(np.float32, copy=False), allow_pickle=False)
        return Response(buffer.getvalue(), media_type="application/x-npy", headers={"X-Model": model})

    async def _read(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"the request is {int(declared)} bytes, over the {limit} byte limit", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the request is over the {limit} byte limit", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request) -> tuple[bytes, bytes | None]:
        """The image's bytes (the raw body, a multipart field `image`, or JSON {"url": ...} fetched safely),
        and a multipart `background_image`'s, if any."""
        data = await self._read(request, self.settings.max_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            fields = await _multipart_fields(request, data)
            if "image" not in fields:
                raise BadRequest("multipart body without an 'image' field")
            return fields["image"], fields.get("background_image")
        if kind == "application/json":
            return await self._fetch(data), None
        if not data:
            raise BadRequest("empty body: send the image's bytes, a multipart field 'image', or JSON {\"url\": ...}")
        return data, None

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


async def _multipart_fields(request: Request, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart body (already read, so the size cap held), as bytes. A body the parser
    refuses (no boundary, garbage, too many fields) or one cut before its closing boundary is a 400 that
    says so, not "no 'image' field"."""
    from starlette.datastructures import UploadFile

    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
    if not boundary:
        raise BadRequest("malformed multipart body: the Content-Type names no boundary")
    if not body.rstrip(b"\r\n").endswith(f"--{boundary}--".encode()):
        raise BadRequest("malformed multipart body: it does not end with its closing boundary (cut short?)")

    async def replay():
        yield body

    try:
        form = await Request(request.scope, receive=_receiver(replay())).form(max_files=8, max_fields=32)
        return {name: (await value.read() if isinstance(value, UploadFile) else str(value).encode())
                for name, value in form.items()}
    except Exception as exc:  # noqa: BLE001 - starlette's MultiPartException and the parser's own errors
        raise BadRequest(f"malformed multipart body: {exc}") from None


def _receiver(chunks):
    async def receive():
        try:
            chunk = await chunks.__anext__()
            return {"type": "http.request", "body": chunk, "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
    return receive
