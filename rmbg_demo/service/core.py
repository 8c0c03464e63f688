"""What every route of the service shares: the models (a `ModelPool`), the memory budget, reading bodies
within their limits, and one removal (decode on the request's own thread, the network in a shared batch,
then mask, compose and encode). How network batches are shared is injected: the plain server's
`RequestBatcher` (through the pool) or Ray Serve's `@serve.batch`."""
from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..budget import BudgetExceeded, MemoryBudget, image_cost
from ..imageio import ImageDecodeError, image_size
from ..models import REGISTRY
from ..pipeline import RemovalPipeline, RemovalResult
from ..pool import ModelPool, PoolSettings
from .settings import ServeSettings


class ServiceError(Exception):
    """A request the service refuses: `status` (400 bad input, 413 too large, 503 busy...), the message for
    the caller, and remove.bg's error code for its endpoint."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_parameter",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


@dataclass
class Removal:
    """What one request's answer needs: `finish`'s answer (encoded bytes...), not the decoded pictures, which
    are freed before the memory budget is released (so that memory can go back to the system)."""

    answer: object
    image_size: tuple[int, int]  # the decoded photo's (W, H), after any `prepare`
    confidence: float
    network_size: object
    timing: dict = field(default_factory=dict)


NetworkRunner = Callable[[str, torch.Tensor], Awaitable[torch.Tensor]]


class Service:
    """The models and limits of one server process (or Ray replica). `request_batch`: images per shared
    network batch in this process (the plain server); 1 when Ray Serve batches (`network` replaced)."""

    def __init__(self, settings: ServeSettings, *, request_batch: int | None = None):
        self.settings = settings
        self.pool = ModelPool(PoolSettings(model=settings.model, weights=settings.weights, device=settings.device,
                                           dtype=settings.dtype, runtime=settings.runtime,
                                           batch_size=settings.max_batch,
                                           max_pixels=settings.max_pixels, request_batch=request_batch,
                                           zerogpu=False))
        self.default_model = self.pool.default
        self.budget = MemoryBudget(settings.max_memory)
        self.network: NetworkRunner = self._network_here
        self.in_flight = 0
        # Its own threads for decoding, the network and encoding: enough for a full network batch to gather
        # (asyncio's default pool has only cores + 4), without touching the process's default executor.
        self._threads = ThreadPoolExecutor(2 * max(1, settings.max_batch) + 4, thread_name_prefix="rmbg-request")

    async def run(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` on one of the service's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._threads,
                                                                functools.partial(function, *args, **kwargs))

    async def _network_here(self, model: str, batch: torch.Tensor) -> torch.Tensor:
        return await self.run(self.pool.engine(model), batch)

    # -- admission ------------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Counts a request in (503 beyond `max_in_flight`: the queue is full); `leave()` when it is done."""
        if self.in_flight >= self.settings.max_in_flight:
            raise ServiceError(f"busy: {self.in_flight} requests in progress; retry later", 503,
                               "service_unavailable", {"Retry-After": "1"})
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    # -- models ---------------------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"default": self.default_model, "batch": self.settings.max_batch,
                "models": [{"name": name, "title": spec.title, "licence": spec.licence,
                            "available": self.pool.available(name)} for name, spec in REGISTRY.items()]}

    def model(self, name: str | None) -> str:
        """A model this server can run without a download: a request never waits for one."""
        try:
            name = self.pool.name_of(name)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        if not self.pool.available(name):
            raise ServiceError(f"model {name!r} has no weights on this server; GET /models lists the available "
                               "ones", 400, "unknown_model")
        return name

    def pipeline(self, model: str, size) -> RemovalPipeline:
        try:
            return self.pool.pipeline(model, size)
        except ValueError as exc:  # a size this model's engine cannot run at (a fixed-size ONNX file)
            raise ServiceError(f"{model}: {exc}") from None

    # -- one removal ----------------------------------------------------------------------------------------
    async def remove(self, data: bytes, model: str, size, finish: Callable[[RemovalResult], object], *,
                     prepare: Callable[[Image.Image], Image.Image] | None = None,
                     adjust: Callable[[RemovalResult], None] | None = None) -> Removal:
        """`data` decoded, through the network, then `finish(result)` (render and encode) on a worker thread,
        all within the memory budget (admitted from the image's header, before any pixel is decoded).
        `prepare`: the decoded image before the network (a smaller size); `adjust`: the result before
        `finish` (a region of interest)."""
        started = time.perf_counter()
        pipeline = self.pipeline(model, size)
        try:
            width, height = await self.run(image_size, data, max_pixels=self.settings.max_pixels)
        except (ImageDecodeError, OSError) as exc:
            raise ServiceError(str(exc), 400, "unknown_format") from None
        cost = image_cost(width, height)
        try:
            await self.run(self.budget.acquire, cost)
        except BudgetExceeded as exc:  # 503: large images hold the memory now; 413: this one never fits
            raise ServiceError(str(exc), exc.status, "file_too_large" if exc.status == 413 else "service_unavailable",
                               {"Retry-After": "5"} if exc.status == 503 else None) from None
        try:
            return await self._removal(pipeline, model, data, finish, prepare, adjust, started)
        finally:
            self.budget.release(cost)

    async def _removal(self, pipeline, model, data, finish, prepare, adjust, started) -> Removal:
        held: dict = {}  # the decoded picture, dropped before the budget is released (the closures do not keep it)

        def decode():
            image = pipeline.load(data)
            held["image"] = prepare(image) if prepare else image
            return pipeline.preprocess(held["image"])

        try:
            network_input = await self.run(decode)
        except (ImageDecodeError, OSError) as exc:  # the decode boundary's words; OSError: a read the OS refused
            raise ServiceError(str(exc), 400, "unknown_format") from None
        decoded = time.perf_counter()
        probability = (await self.network(model, network_input))[0]
        networked = time.perf_counter()

        def finished():
            result = pipeline.result_of(held.pop("image"), probability)
            if adjust:
                adjust(result)
            return finish(result), result.confidence, result.image.size

        try:
            answer, confidence, size = await self.run(finished)
        except ValueError as exc:  # a background that cannot be applied
            raise ServiceError(str(exc)) from None
        finally:
            held.clear()
        timing = {"decode": decoded - started, "network": networked - decoded,
                  "compose": time.perf_counter() - networked}
        return Removal(answer, size, confidence, pipeline.input_size, timing)

    # -- bodies ---------------------------------------------------------------------------------------------
    async def read(self, request, limit: int | None = None) -> bytes:
        """The whole body, refused (413) as soon as it passes `limit` (default: the upload limit)."""
        limit = self.settings.max_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ServiceError(f"the request is {int(declared)} bytes, over the {limit} byte limit", 413,
                               "file_too_large")
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ServiceError(f"the request is over the {limit} byte limit", 413, "file_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # the caller went away mid-body: nobody to answer, nothing to log as a failure
            raise ServiceError("the body ended before its declared length (the client disconnected)") from None
        return b"".join(chunks)

    async def fetch(self, url: str, what: str = "url") -> bytes:
        """An image from a URL, through the SSRF-safe fetcher (private addresses refused unless allowed)."""
        from ..fetch import URLFetchError, fetch_url

        try:
            return await self.run(fetch_url, str(url), allow_private=self.settings.allow_private_urls,
                                           max_bytes=self.settings.max_bytes)
        except URLFetchError as exc:
            raise ServiceError(f"{what}: {exc}", 400, "invalid_url") from None


def json_object(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ServiceError("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ServiceError("a JSON body must be an object")
    return value


async def multipart_fields(request, body: bytes, *, max_fields: int = 32) -> dict[str, bytes | str]:
    """The fields of a multipart body already read (so the size cap held): uploads as bytes, the rest as text.
    A body the parser refuses (no boundary, garbage, too many fields) or one cut before its closing boundary
    is a 400 that says so."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
    if not boundary:
        raise ServiceError("malformed multipart body: the Content-Type names no boundary")
    if not body.rstrip(b"\r\n").endswith(f"--{boundary}--".encode()):
        raise ServiceError("malformed multipart body: it does not end with its closing boundary (cut short?)")
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive=replay).form(max_files=8, max_fields=max_fields)
        return {name: (await value.read() if isinstance(value, UploadFile) else str(value))
                for name, value in form.multi_items()}
    except Exception as exc:  # noqa: BLE001 - starlette's MultiPartException and the parser's own errors
        raise ServiceError(f"malformed multipart body: {exc}") from None

