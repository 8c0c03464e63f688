"""The service's one FastAPI app: every route, declared (OpenAPI at /openapi.json, /docs), the same whether
the plain server (`rmbg serve`, uvicorn here) or Ray Serve (`rmbg serve --ray`) runs it.

POST /remove: the image as the raw body, a multipart field `image` (with an optional `background_image`)
or JSON {"url": ...}; the request's settings are `RemovalOptions`' query names (`QUERY_FIELDS`). POST
/predict: the network alone (.npy in and out: what `RemoteEngine` sends). GET /models, GET /healthz.
POST /v1.0/removebg and GET /v1.0/account: remove.bg's API (`removebg.py`).
Bad input is a 400 JSON error, an oversized body 413, a full queue 503; the service stays up.
"""
from __future__ import annotations

import inspect
import io

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..request import NETWORK_SIDE_RANGE, QUERY_FIELDS, RemovalOptions, encoded_outputs, network_size, parse_model
from . import removebg
from .access import AccessMiddleware, ApiKeys, RateLimiter, error_body
from .core import Service, ServiceError, json_object, multipart_fields

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg", "zip": "application/zip"}
# /predict's body: one normalised image at the largest network size, as .npy
MAX_TENSOR_BYTES = 4 * 3 * NETWORK_SIDE_RANGE[1] ** 2 + 4096
_IMAGE_BODY = {"type": "string", "format": "binary"}
REMOVE_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": _IMAGE_BODY},
    "image/*": {"schema": _IMAGE_BODY},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {**_IMAGE_BODY, "description": "the photo"},
        "background_image": {**_IMAGE_BODY, "description": "an image to put behind the subject"}}}},
    "application/json": {"schema": {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string", "format": "uri", "description": "an image the server fetches (public "
                                                                 "addresses only, unless it allows private ones)"}}}},
}}}
IMAGE_ANSWERS = {200: {"description": "the cut-out (or mask)", "content": {"image/png": {}, "image/webp": {}}},
                 400: {"description": "bad input: {\"error\": message}"}, 401: {"description": "no API key"},
                 403: {"description": "wrong API key"}, 413: {"description": "too large"},
                 429: {"description": "over the rate limit"}, 503: {"description": "busy: retry later"}}


def _query_settings():
    """A dependency whose parameters are `QUERY_FIELDS`: each is declared (and documented) in OpenAPI, and
    checked by `RemovalOptions`' own parser."""
    def settings(**values):
        return {name: value for name, value in values.items() if value is not None}

    settings.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=Query(None, description=description))
        for name, description in QUERY_FIELDS.items()])
    return settings


query_settings = _query_settings()


def create_app(service: Service) -> FastAPI:
    """The app for `service` (its settings say the keys and rate limit)."""
    settings = service.settings
    app = FastAPI(title="rmbg-demo", version=__version__,
                  summary="Background removal with BRIA RMBG-2.0 (and smaller models), self-hosted",
                  description="Send `X-Api-Key: KEY` (or `Authorization: Bearer KEY`) when the server has keys. "
                              "Every answer carries `X-Request-Id`.")
    app.state.service = service
    app.add_middleware(AccessMiddleware, keys=ApiKeys(settings.api_keys),
                       limiter=RateLimiter(settings.rate_limit) if settings.rate_limit else None)
    _add_error_handlers(app)
    _add_routes(app)
    app.include_router(removebg.router)
    _declare_security(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, status: int, message: str, code: str, headers=None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, message, code), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError):
        return answer(request, exc.status, str(exc), exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404 no route, 405 wrong method
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.url.path} takes {allowed or 'another method'}, not {request.method}"
        elif exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}; use POST /remove, POST /v1.0/removebg, "
                       "GET /models, GET /healthz (GET /docs describes them)")
        else:
            message = str(exc.detail)
        return answer(request, exc.status_code, message, "invalid_request", exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return answer(request, 400, f"{where}: {first.get('msg', 'invalid')}", "invalid_parameter")

    @app.exception_handler(RuntimeError)
    async def model_failed(request: Request, exc: RuntimeError):  # the network failed (out of memory...)
        return answer(request, 500, f"the model failed: {exc}", "model_failed")


def _add_routes(app: FastAPI) -> None:
    @app.get("/healthz", summary="Liveness: the default model is loaded")
    async def healthz(request: Request) -> dict:
        return {"status": "ok", "model": request.app.state.service.default_model}

    @app.get("/models", summary="The models and which have weights on this server")
    async def models(request: Request) -> dict:
        return request.app.state.service.models()

    @app.post("/remove", summary="Remove the background of one image", openapi_extra=REMOVE_BODY,
              responses=IMAGE_ANSWERS, response_class=Response)
    async def remove(request: Request, _declared: dict = Depends(query_settings)) -> Response:
        service: Service = request.app.state.service
        service.admit()
        try:  # the whole query, not only the declared names: an unknown one is refused, not dropped
            return await _remove(service, request, dict(request.query_params))
        finally:
            service.leave()

    @app.post("/predict", summary="The network alone: a (B, 3, H, W) float32 .npy in, probabilities out",
              openapi_extra={"requestBody": {"required": True, "content": {"application/x-npy": {
                  "schema": _IMAGE_BODY}}}}, response_class=Response,
              responses={200: {"content": {"application/x-npy": {}}}})
    async def predict(request: Request, model: str | None = Query(None, description="a registered model")):
        service: Service = request.app.state.service
        service.admit()
        try:
            return await _predict(service, request, model)
        finally:
            service.leave()


async def _remove(service: Service, request: Request, query: dict) -> Response:
    data, background_image = await _image_body(service, request)
    try:
        options = RemovalOptions.from_query(query, background_image)
    except ValueError as exc:  # OptionError: names the setting and its value
        raise ServiceError(str(exc)) from None
    model = service.model(options.model)
    kind = "mask" if options.mask else "image"
    request.state.access.update(model=model)

    def finish(result):
        return encoded_outputs(result, options, kinds=[kind])[kind]

    removal = await service.remove(data, model, options.size, finish)
    width, height = removal.image_size
    request.state.access.update(size=f"{width}x{height}")
    timing = removal.timing
    seconds = sum(timing.values())
    headers = {"X-Model": model, "X-Seconds": f"{seconds:.4f}", "X-Confidence": f"{removal.confidence:.4f}",
               "X-Image-Size": f"{width}x{height}", "X-Network-Size": str(removal.network_size),
               "Server-Timing": ", ".join(f"{k};dur={1000 * v:.1f}" for k, v in timing.items())}
    return Response(removal.answer, media_type=MEDIA_TYPES[options.format], headers=headers)


async def _image_body(service: Service, request: Request) -> tuple[bytes, bytes | None]:
    """The image's bytes (the raw body, a multipart field `image`, or JSON {"url": ...} fetched safely), and a
    multipart `background_image`'s, if any."""
    data = await service.read(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        fields = await multipart_fields(request, data)
        unknown = sorted(set(fields) - {"image", "background_image"})
        if unknown:
            raise ServiceError(f"multipart field {unknown[0]!r}: no such field; send 'image' and optionally "
                               "'background_image' (settings go in the query)")
        if not isinstance(fields.get("image"), bytes):
            raise ServiceError("multipart body without an 'image' file field")
        background = fields.get("background_image")
        return fields["image"], background if isinstance(background, bytes) and background else None
    if kind == "application/json":
        body = json_object(data)
        if set(body) != {"url"}:
            raise ServiceError('a JSON body must be {"url": "https://..."}')
        return await service.fetch(body["url"]), None
    if not data:
        raise ServiceError("empty body: send the image's bytes, a multipart field 'image', or JSON {\"url\": ...}")
    return data, None


async def _predict(service: Service, request: Request, model: str | None) -> Response:
    try:
        model = service.model(parse_model(model))
    except ValueError as exc:
        raise ServiceError(str(exc)) from None
    data = await service.read(request, max(service.settings.max_bytes, MAX_TENSOR_BYTES))
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ServiceError(f"the body is not a .npy array: {exc}") from None
    if array.ndim != 4 or array.shape[1] != 3 or array.dtype != np.float32:
        raise ServiceError(f"expected a (B, 3, H, W) float32 array, got {array.dtype} {array.shape}")
    try:
        size = network_size(*array.shape[2:])
    except ValueError as exc:
        raise ServiceError(str(exc)) from None
    service.pipeline(model, size)  # refuses a size this model's engine cannot run at
    request.state.access.update(model=model, size=str(size))
    probabilities = await service.network(model, torch.from_numpy(array))
    buffer = io.BytesIO()
    np.save(buffer, probabilities.numpy().astype(np.float32, copy=False), allow_pickle=False)
    return Response(buffer.getvalue(), media_type="application/x-npy", headers={"X-Model": model})


def _declare_security(app: FastAPI) -> None:
    """The key schemes in OpenAPI (so /docs's Authorize button sends them), on every route but the open one."""
    base = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        schema.setdefault("components", {})["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"}}
        if app.state.service.settings.api_keys:
            for path, operations in schema["paths"].items():
                if path != "/healthz":
                    for operation in operations.values():
                        operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
        return schema

    app.openapi = openapi
