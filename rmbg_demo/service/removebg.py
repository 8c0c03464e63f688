"""remove.bg's API, self-hosted: `POST /v1.0/removebg` and `GET /v1.0/account`, so scripts and plug-ins that
speak it switch by changing their base URL.

Its fields map onto one `RemovalOptions` (crop, crop_margin, scale, position, add_shadow, bg_color,
bg_image_*) plus what only this API has: `size` (an output-resolution tier), `channels`, `format` (auto,
png, jpg, webp, zip = color.jpg + alpha.png), `roi` and `type`. Answers carry remove.bg's headers
(X-Width, X-Height, X-Type, X-Foreground-*, X-Credits-Charged: 0); errors its {"errors": [{"title", "code"}]}.
An unsupported value or an unknown field is a 400, never silently ignored.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import zipfile
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from ..framing import subject_box
from ..imageio import encode_image
from ..request import (
    OptionError,
    RemovalOptions,
    parse_background,
    parse_flag,
    parse_margin,
    parse_position,
    parse_scale,
    rendered,
)
from .core import Service, ServiceError, json_object, multipart_fields

router = APIRouter(prefix="/v1.0", tags=["remove.bg compatible"])
SOURCES = ("image_file", "image_file_b64", "image_url")
# The most pixels each `size` answers with (None: the original's); remove.bg's default is preview.
SIZES = {"preview": 250_000, "small": 250_000, "regular": 250_000, "medium": 1_500_000, "hd": 4_000_000,
         "full": None, "4k": None, "50mp": None, "auto": None}
TYPES = ("auto", "person", "product", "animal", "car", "car_interior", "car_part", "transportation", "graphic",
         "graphics", "other")
TYPE_LEVELS = ("none", "1", "2", "latest")
FORMATS = ("auto", "png", "jpg", "jpeg", "webp", "zip")
FIELDS = {
    "image_file": "the photo (an upload)", "image_file_b64": "the photo, base64-encoded",
    "image_url": "a photo the server fetches (public addresses only, unless it allows private ones)",
    "size": "preview (default), small, regular (0.25 MP); medium (1.5 MP); hd (4 MP); full, 4k, 50MP, auto "
            "(the original's size)",
    "type": "auto, person, product, animal, car, transportation, graphic, other: accepted and echoed in X-Type "
            "(one model serves every type)",
    "type_level": "none, 1, 2, latest: none leaves X-Type out",
    "format": "auto (png with transparency, else jpg), png, jpg, webp, zip (color.jpg + alpha.png)",
    "channels": "rgba (default) or alpha (the alpha matte alone)",
    "bg_color": "a colour behind the subject: 81d4fa, fff, #81d4fa or a name", "bg_image_url": "an image behind "
    "the subject, fetched", "bg_image_file": "an image behind the subject (an upload)",
    "crop": "true: crop to the subject", "crop_margin": "with crop: N px or N% of the subject's box (one value)",
    "scale": "original (default) or 10%-100%: the subject's box fills that share of the image",
    "position": "original (default; center when scaled), center, X% or 'X% Y%'",
    "add_shadow": "true: a soft drop shadow", "roi": "x1 y1 x2 y2 in px or %: only a subject inside it is kept",
}
ROI_VALUE = re.compile(r"^(\d+(?:\.\d+)?)(px|%)?$")
_MEDIA = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "zip": "application/zip"}


@dataclass
class Ask:
    """One remove.bg request, checked: where its image comes from, and what to answer."""

    source: str
    value: bytes | str
    options: RemovalOptions
    max_pixels: int | None
    type: str
    type_level: str
    format: str
    channels: str
    roi: tuple | None


@router.get("/account", summary="remove.bg's account call: nothing is counted or charged here")
async def account() -> dict:
    return {"data": {"attributes": {"credits": {"total": 0, "subscription": 0, "payg": 0, "enterprise": 0},
                                    "api": {"free_calls": 0, "sizes": "all"}}}}


@router.post("/removebg", summary="Remove the background (remove.bg's API)", response_class=Response, openapi_extra={
    "requestBody": {"required": True, "content": {
        kind: {"schema": {"type": "object", "properties": {
            name: ({"type": "string", "format": "binary", "description": text} if name.endswith("_file") and
                   kind == "multipart/form-data" else {"type": "string", "description": text})
            for name, text in FIELDS.items() if kind == "multipart/form-data" or not name.endswith("_file")}}}
        for kind in ("multipart/form-data", "application/x-www-form-urlencoded", "application/json")}}},
    responses={200: {"description": "the result; with Accept: application/json, {\"data\": {\"result_b64\", "
                                    "\"foreground_top\", ...}}", "content": {k: {} for k in _MEDIA.values()}},
               400: {"description": '{"errors": [{"title", "code"}]}'}, 403: {"description": "no or wrong key"},
               413: {"description": "too large"}, 429: {"description": "over the rate limit"}})
async def removebg(request: Request) -> Response:
    service: Service = request.app.state.service
    service.admit()
    try:
        return await _removebg(service, request)
    finally:
        service.leave()


async def _removebg(service: Service, request: Request) -> Response:
    fields = await _fields(service, request)
    ask = await _ask(service, fields)
    data = await _image(service, ask)
    model = service.default_model
    request.state.access.update(model=model)
    downscale = Downscale(ask.max_pixels)
    removal = await service.remove(data, model, None, lambda result: _answer(result, ask), prepare=downscale,
                                   adjust=(lambda result: _keep_inside(result, ask.roi, downscale.original))
                                   if ask.roi else None)
    body, fmt, (width, height), box = removal.answer
    request.state.access.update(size=f"{width}x{height}")
    headers = {"X-Width": str(width), "X-Height": str(height), "X-Credits-Charged": "0", "X-Model": model,
               "X-Confidence": f"{removal.confidence:.4f}", "X-Foreground-Top": str(box[1]),
               "X-Foreground-Left": str(box[0]), "X-Foreground-Width": str(box[2]),
               "X-Foreground-Height": str(box[3])}
    if ask.type_level != "none":
        headers["X-Type"] = ask.type if ask.type != "auto" else "other"
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"data": {"result_b64": base64.b64encode(body).decode(), "foreground_top": box[1],
                                      "foreground_left": box[0], "foreground_width": box[2],
                                      "foreground_height": box[3]}}, headers=headers)
    return Response(body, media_type=_MEDIA[fmt], headers=headers)


# -- reading the request --------------------------------------------------------------------------------------
async def _fields(service: Service, request: Request) -> dict:
    """The body's fields, whatever its form (multipart, urlencoded, JSON); unknown ones refused."""
    body = await service.read(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        fields = await multipart_fields(request, body, max_fields=len(FIELDS) + 4)
    elif kind == "application/x-www-form-urlencoded":
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                                           max_num_fields=len(FIELDS) + 4)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ServiceError(f"malformed form body: {exc}") from None
        fields = dict(pairs)
    elif kind == "application/json":
        fields = json_object(body)
    else:
        raise ServiceError("send the fields as multipart/form-data, application/x-www-form-urlencoded or "
                           f"application/json, not {kind or 'a body without a Content-Type'}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ServiceError(f"{unknown[0]}: no such field; the fields are {', '.join(FIELDS)}", 400, "unknown_field")
    return {name: value for name, value in fields.items() if value not in (None, "")}


def _text(fields: dict, name: str, default: str) -> str:
    value = fields.get(name, default)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, dict, list)):
        raise ServiceError(f"{name}: give a text value")
    return str(value).strip().lower()


def _choice(fields: dict, name: str, choices, default: str) -> str:
    value = _text(fields, name, default)
    if value not in choices:
        raise ServiceError(f"{name} {value!r}: choose one of {', '.join(choices)}")
    return value


async def _ask(service: Service, fields: dict) -> Ask:
    sources = [name for name in SOURCES if name in fields]
    if len(sources) != 1:
        raise ServiceError("give exactly one of image_file, image_file_b64, image_url" +
                           (f" (got {', '.join(sources)})" if sources else ""), 400, "missing_source")
    source = sources[0]
    if source == "image_file" and not isinstance(fields[source], bytes):
        raise ServiceError("image_file: send it as a file upload (multipart/form-data)")
    size = _choice(fields, "size", SIZES, "preview")
    fmt = _choice(fields, "format", FORMATS, "auto").replace("jpeg", "jpg")
    channels = _choice(fields, "channels", ("rgba", "alpha"), "rgba")
    if channels == "alpha" and fmt == "zip":
        raise ServiceError("channels 'alpha' with format 'zip': the zip already holds alpha.png; ask for one")
    try:
        options = RemovalOptions(background=await _background(service, fields), **_framing(fields))
    except OptionError as exc:
        raise ServiceError(str(exc)) from None
    return Ask(source, fields[source], options, SIZES[size], _choice(fields, "type", TYPES, "auto"),
               _choice(fields, "type_level", TYPE_LEVELS, "1"), fmt, channels, _roi(_text(fields, "roi", "")))


def _framing(fields: dict) -> dict:
    """remove.bg's crop, crop_margin, scale, position, add_shadow as RemovalOptions' framing fields, each
    checked under its remove.bg name."""
    crop = parse_flag(_text(fields, "crop", "false"), "crop")
    margin_text = _text(fields, "crop_margin", "0")
    if len(margin_text.split()) > 1:
        raise ServiceError(f"crop_margin {margin_text!r}: give one value (N px or N%) for every side")
    if margin_text != "0" and not crop:
        raise ServiceError("crop_margin: it applies to a crop; add crop=true")
    margin = parse_margin(margin_text.removesuffix("px"), "crop_margin")
    if (margin[1] and margin[0] > 50) or (not margin[1] and margin[0] > 500):
        raise ServiceError(f"crop_margin {margin_text!r}: at most 50% or 500px, as remove.bg allows")
    scale_text = _text(fields, "scale", "original")
    scale = None if scale_text == "original" else parse_scale(scale_text, "scale")
    if scale is not None and scale < 0.1:
        raise ServiceError(f"scale {scale_text!r}: from 10% to 100%, or original")
    position_text = _text(fields, "position", "original")
    parts = position_text.split()
    if len(parts) == 1 and parts[0].endswith("%"):
        parts *= 2  # one value: horizontal and vertical
    position = parse_position(",".join(parts) if len(parts) == 2 else position_text, "position")
    shadow = "drop" if parse_flag(_text(fields, "add_shadow", "false"), "add_shadow") else None
    return {"crop": crop, "margin": margin, "scale": scale, "position": position, "shadow": shadow}


async def _background(service: Service, fields: dict):
    given = [name for name in ("bg_color", "bg_image_url", "bg_image_file") if name in fields]
    if len(given) > 1:
        raise ServiceError(f"give one background, not {' and '.join(given)}")
    if not given:
        return None
    if given[0] == "bg_color":
        return parse_background(_text(fields, "bg_color", ""), "bg_color", files=False)
    data = fields["bg_image_file"] if given[0] == "bg_image_file" else \
        await service.fetch(_text(fields, "bg_image_url", ""), "bg_image_url")
    if not isinstance(data, bytes):
        raise ServiceError("bg_image_file: send it as a file upload (multipart/form-data)")
    return parse_background(data, given[0], files=False)


def _roi(text: str) -> tuple | None:
    """'x1 y1 x2 y2', each N px (or N) or N%: ((value, is_percent) x 4), or None for the whole image."""
    if not text:
        return None
    parts = text.split()
    matches = [ROI_VALUE.match(part) for part in parts]
    if len(parts) != 4 or not all(matches):
        raise ServiceError(f"roi {text!r}: give x1 y1 x2 y2, each in px or %, e.g. '0% 0% 100% 100%'")
    values = tuple((float(m.group(1)), m.group(2) == "%") for m in matches)
    if any(percent and value > 100 for value, percent in values):
        raise ServiceError(f"roi {text!r}: percentages go up to 100%")
    return values


async def _image(service: Service, ask: Ask) -> bytes:
    if ask.source == "image_file":
        return ask.value
    if ask.source == "image_url":
        return await service.fetch(str(ask.value), "image_url")
    text = re.sub(r"^data:[^,]*,", "", str(ask.value).strip())  # a data: URL's prefix is fine too
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError("image_file_b64: not valid base64") from None


# -- making the answer ----------------------------------------------------------------------------------------
class Downscale:
    """The `size` tier: a photo over `max_pixels` is resized down (aspect kept) before anything else;
    `original` remembers its size (roi's pixel values are the original's)."""

    def __init__(self, max_pixels: int | None):
        self.max_pixels = max_pixels
        self.original: tuple[int, int] | None = None

    def __call__(self, image: Image.Image) -> Image.Image:
        self.original = image.size
        if not self.max_pixels or image.width * image.height <= self.max_pixels:
            return image
        factor = (self.max_pixels / (image.width * image.height)) ** 0.5
        smaller = image.resize((max(1, int(image.width * factor)), max(1, int(image.height * factor))),
                               Image.Resampling.LANCZOS, reducing_gap=3.0)
        smaller.info = dict(image.info)  # the colour profile stays with it
        return smaller


def _keep_inside(result, roi: tuple, original: tuple[int, int]) -> None:
    """Only a subject inside the region of interest is kept: the mask is cleared outside it."""
    width, height = result.image.size
    corners = []
    for index, (value, percent) in enumerate(roi):
        side, scale = (width, width / original[0]) if index % 2 == 0 else (height, height / original[1])
        corners.append(round(side * value / 100) if percent else round(value * scale))
    left, top, right, bottom = (max(0, min(v, s)) for v, s in zip(corners, (width, height, width, height)))
    if right <= left or bottom <= top:
        raise ServiceError(f"roi: needs x1 < x2 and y1 < y2 inside the image, got {left} {top} {right} {bottom} "
                           f"on {width}x{height}")
    kept = Image.new("L", result.mask.size, 0)
    kept.paste(result.mask.crop((left, top, right, bottom)), (left, top))
    result.mask = kept


def _answer(result, ask: Ask) -> tuple[bytes, str, tuple[int, int], tuple[int, int, int, int]]:
    """(body, format, result size, foreground box as left, top, width, height) as `ask` wants them."""
    picture, mask = rendered(result, ask.options)
    box = subject_box(mask)
    if box is None:
        raise ServiceError("could not find a foreground in the image", 400, "unknown_foreground")
    icc = result.image.info.get("icc_profile")
    if ask.channels == "alpha":
        picture = picture.getchannel("A") if picture.mode == "RGBA" else mask
    fmt = ask.format
    if fmt == "auto":
        fmt = "png" if picture.mode in ("RGBA", "L") else "jpg"
    if fmt == "zip":
        alpha = picture.getchannel("A") if picture.mode == "RGBA" else mask
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("color.jpg", encode_image(picture.convert("RGB"), "jpg", icc_profile=icc))
            archive.writestr("alpha.png", encode_image(alpha, "png"))
        body = buffer.getvalue()
    else:
        if fmt == "jpg" and picture.mode == "RGBA":  # no transparency in a JPEG: white behind the subject
            white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
            picture = Image.alpha_composite(white, picture).convert("RGB")
        body = encode_image(picture, fmt, icc_profile=None if picture.mode == "L" else icc)
    return body, fmt, picture.size, (box.left, box.top, box.width, box.height)
