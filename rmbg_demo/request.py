"""One description of a removal request, shared by every front end (CLI, page, HTTP service, Ray job).

`RemovalOptions` holds everything a user sets per request, validated once, here. Each setting has
one parser; the constructors (`from_args`, `from_query`, `from_widgets`) only map a front end's
names onto them. `render` turns a result into the picture the options ask for.

Adding a request setting: a field of `RemovalOptions`, its parser below, then one flag (cli.py),
one widget (ui.py) and one query name (`QUERY_FIELDS` and `from_query`, the service's contract).
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from .compose import parse_color
from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, ImageDecodeError, encode_image, load_image


class OptionError(ValueError):
    """A request setting with a value it cannot take; the message names both."""

    def __init__(self, setting: str, value, why: str):
        super().__init__(f"{setting} {value!r}: {why}")
        self.setting, self.value = setting, value


# -- sizes ----------------------------------------------------------------------------------------
class NetworkSize(NamedTuple):
    """The network's input resolution, (height, width) as tensors are laid out."""

    height: int
    width: int

    def __str__(self) -> str:  # as people and the service's query write it
        return f"{self.width}x{self.height}"


class ImageSize(NamedTuple):
    """A picture's size, (width, height) as Pillow gives it."""

    width: int
    height: int


NETWORK_SIDE_RANGE = (256, 2048)
NETWORK_SIDE_STEP = 32


def network_size(height: int, width: int, setting: str = "size", shown=None) -> NetworkSize:
    """(height, width) checked: each side a multiple of 32 from 256 to 2048. `shown`: the value as the
    user wrote it, for the message."""
    low, high = NETWORK_SIDE_RANGE
    for side in (height, width):
        if side % NETWORK_SIDE_STEP or not low <= side <= high:
            raise OptionError(setting, shown if shown is not None else f"{width}x{height}",
                              f"each side must be a multiple of {NETWORK_SIDE_STEP} from {low} to {high}")
    return NetworkSize(int(height), int(width))


def parse_network_size(text, setting: str = "size") -> NetworkSize | None:
    """'1024', '768x1024' (WIDTHxHEIGHT), an int, or a (height, width) pair -> NetworkSize;
    None, '' and 'auto' -> None (the model's own)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "auto")):
        return None
    if isinstance(text, tuple):
        return network_size(*text, setting=setting)
    parts = str(text).strip().lower().split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise OptionError(setting, text, "give N or WIDTHxHEIGHT, e.g. 1024 or 768x1024")
    width, height = (sides[0], sides[0]) if len(sides) == 1 else sides
    return network_size(height, width, setting, shown=text)


# -- background --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Background:
    """What the subject is put on: nothing (a cut-out with alpha), a colour, the photo blurred, or an image."""

    kind: str = "transparent"  # transparent | colour | blur | image
    colour: tuple[int, int, int] | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def value(self):
        """As `compose` and `RemovalResult.composite` take it: None, an RGB tuple, 'blur' or an image."""
        return {"transparent": None, "colour": self.colour, "blur": "blur", "image": self.image}[self.kind]

    @property
    def transparent(self) -> bool:
        return self.kind == "transparent"

    def describe(self) -> str:
        if self.kind == "colour":
            return "#" + "".join(f"{value:02x}" for value in self.colour)
        return self.kind


TRANSPARENT = Background()


def parse_background(spec, setting: str = "background", *, files: bool = True) -> Background:
    """None/'transparent'/'none', 'blur', a colour (#hex, a name, rgb(r, g, b)), a decoded image, image
    bytes, or (with `files`: the CLI's) the path of an image file."""
    if isinstance(spec, Background):
        return spec
    if isinstance(spec, Image.Image):
        return Background("image", image=spec)
    if isinstance(spec, (bytes, bytearray)):
        return Background("image", image=_background_image(bytes(spec), setting, "the uploaded image"))
    if isinstance(spec, tuple):
        return Background("colour", colour=parse_color(spec))
    text = "" if spec is None else str(spec).strip()
    if text.lower() in ("", "transparent", "none"):
        return TRANSPARENT
    if text.lower() == "blur":
        return Background("blur")
    if files and Path(text).is_file():
        return Background("image", image=_background_image(Path(text), setting, text))
    try:
        return Background("colour", colour=parse_color(text))
    except ValueError:
        why = "not a colour (#RRGGBB, a name like 'white', rgb(r, g, b)), 'blur', 'transparent'"
        raise OptionError(setting, spec, why + (" or an image file" if files else "")) from None


def _background_image(source, setting: str, shown: str) -> Image.Image:
    try:
        return load_image(source)
    except ImageDecodeError as exc:
        raise OptionError(setting, shown, f"cannot be read as an image: {exc}") from None


# -- format and flags --------------------------------------------------------------------------------
def parse_format(text, setting: str = "format") -> str:
    fmt = str(text or "png").strip().lower().lstrip(".")
    if fmt not in FORMAT_EXTENSIONS:
        raise OptionError(setting, text, f"choose one of {', '.join(FORMAT_EXTENSIONS)}")
    return fmt


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def parse_flag(value, setting: str) -> bool:
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise OptionError(setting, value, "give 1/true/yes or 0/false/no")


def parse_model(name, setting: str = "model") -> str:
    """A registered model's canonical name, or 'auto'."""
    from .models import REGISTRY, model_names

    text = "auto" if name in (None, "") else str(name)
    if text == "auto":
        return text
    if text not in REGISTRY:
        raise OptionError(setting, name, f"unknown model; choose one of: auto, {', '.join(model_names())}")
    return REGISTRY[text].name


# -- framing -------------------------------------------------------------------------------------------------
POSITIONS = {"center": (0.5, 0.5), "centre": (0.5, 0.5), "top": (0.5, 0.0), "bottom": (0.5, 1.0),
             "left": (0.0, 0.5), "right": (1.0, 0.5)}
SHADOWS = ("drop", "contact")


def _number(text, setting: str, why: str) -> float:
    try:
        value = float(str(text).strip().rstrip("%").strip())
    except ValueError:
        raise OptionError(setting, text, why) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise OptionError(setting, text, why)
    return value


def parse_margin(text, setting: str = "margin") -> tuple[float, bool]:
    """'20' (pixels) or '10%' (of the subject box's width left and right, height top and bottom)."""
    if isinstance(text, tuple):
        return text
    if text in (None, ""):
        return (0.0, False)
    percent = str(text).strip().endswith("%")
    value = _number(text, setting, "give pixels (20) or a percentage of the subject's box (10%)")
    if value < 0 or (percent and value > 500) or (not percent and value > 10000):
        raise OptionError(setting, text, "from 0 to 10000 pixels or 0% to 500%")
    return (value, percent)


def parse_canvas(text, setting: str = "canvas") -> ImageSize | None:
    """'WIDTHxHEIGHT' of the output canvas; within the pixel cap."""
    if text in (None, "", "none"):
        return None
    if isinstance(text, tuple):
        width, height = text
    else:
        parts = str(text).strip().lower().split("x")
        try:
            width, height = (int(part) for part in parts)
        except ValueError:
            raise OptionError(setting, text, "give WIDTHxHEIGHT, e.g. 1200x1200") from None
    if width < 1 or height < 1 or width > 20000 or height > 20000 or width * height > DEFAULT_MAX_PIXELS:
        raise OptionError(setting, text, f"each side from 1 to 20000 pixels and at most "
                                         f"{DEFAULT_MAX_PIXELS / 1e6:.0f} MP in all")
    return ImageSize(int(width), int(height))


def parse_scale(text, setting: str = "scale") -> float | None:
    """'80%' (or '80'): the subject's box fills that share of the canvas (its limiting side); None: fit the
    framed region inside the canvas."""
    if text in (None, "", "auto"):
        return None
    if isinstance(text, float) and 0 < text <= 1 and not str(text).endswith("%"):
        return text
    value = _number(text, setting, "give a percentage, e.g. 80%")
    if not 1 <= value <= 100:
        raise OptionError(setting, text, "from 1% to 100% of the canvas")
    return value / 100


def parse_position(text, setting: str = "position") -> tuple[float, float] | None:
    """center, top, bottom, left, right, or 'X%,Y%' (where the subject's box sits, as remove.bg means it);
    None ('original', the default): where it is in the photo, or centred when a canvas or scale moves it."""
    if isinstance(text, tuple):
        return text
    name = (str(text) if text is not None else "").strip().lower()
    if name in ("", "original"):
        return None
    if name in POSITIONS:
        return POSITIONS[name]
    parts = name.split(",")
    if len(parts) == 2:
        x, y = (_number(part, setting, "X%,Y%") for part in parts)
        if 0 <= x <= 100 and 0 <= y <= 100:
            return (x / 100, y / 100)
    raise OptionError(setting, text, "choose original, center, top, bottom, left, right or X%,Y% (0-100 each)")


def parse_shadow(text, setting: str = "shadow") -> str | None:
    name = (str(text) if text is not None else "").strip().lower()
    if name in ("", "none", "off", "false", "0"):
        return None
    if name not in SHADOWS:
        raise OptionError(setting, text, "choose drop, contact or none")
    return name


def parse_fraction(text, setting: str) -> float:
    value = _number(text, setting, "give a number from 0 to 1 (or a percentage)")
    value = value / 100 if str(text).strip().endswith("%") else value
    if not 0 <= value <= 1:
        raise OptionError(setting, text, "from 0 to 1 (or 0% to 100%)")
    return value


def parse_pixels(text, setting: str) -> float | None:
    if text in (None, "", "auto"):
        return None
    value = _number(text, setting, "give pixels")
    if not 0 <= value <= 1000:
        raise OptionError(setting, text, "from 0 to 1000 pixels")
    return value


def parse_offset(text, setting: str = "shadow offset") -> tuple[int, int] | None:
    if text in (None, "", "auto"):
        return None
    if isinstance(text, tuple):
        return text
    parts = str(text).split(",")
    if len(parts) != 2:
        raise OptionError(setting, text, "give X,Y in pixels, e.g. 12,18")
    x, y = (_number(part, setting, "give X,Y in pixels") for part in parts)
    if abs(x) > 1000 or abs(y) > 1000:
        raise OptionError(setting, text, "each from -1000 to 1000 pixels")
    return (round(x), round(y))


# The framing fields of RemovalOptions: the CLI's flags (--shadow-opacity ...) and the query's names.
FRAMING_FIELDS = ("crop", "margin", "canvas", "scale", "position", "shadow", "shadow_opacity", "shadow_blur",
                  "shadow_offset", "srgb")


# The HTTP service's query names (`from_query`) and what each means: the OpenAPI document is built from this.
QUERY_FIELDS = {
    "model": "auto (the server's default) or a registered model: GET /models lists those with weights here",
    "size": "the network's input resolution, N or WxH (multiples of 32, 256-2048); default: the model's own",
    "background": "transparent (default), a colour (#00ff00, 'green', '0,255,0') or blur",
    "refine": "1: re-estimate colours at soft edges (no halo of the old background)",
    "format": "png (default) or webp (lossless)",
    "mask": "1: answer the 8-bit mask instead of the cut-out",
    "crop": "1: crop to the subject's box",
    "margin": "space around the subject when cropping or on a canvas: pixels, or N% of its box",
    "canvas": "WxH: place the subject on a canvas of this size",
    "scale": "P%: the subject's box fills P% of the canvas (or of the output frame)",
    "position": "original, center, top, bottom, left, right or X%,Y%: where the subject's box sits",
    "shadow": "drop or contact: a soft shadow from the subject's alpha",
    "shadow_opacity": "0-1 (default 0.5)",
    "shadow_blur": "pixels (default 2.5% of the subject's height)",
    "shadow_offset": "X,Y pixels (default: drop 2%, 3% of the subject's box)",
    "srgb": "1: convert to sRGB (else the photo's colour profile is kept)",
}


# -- the request ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemovalOptions:
    """Everything a user sets per request. Build it with one of the constructors; every field is checked
    when the object is made, so a bad setting fails before any image is read."""

    model: str = "auto"
    size: NetworkSize | None = None  # the network's resolution; None: the model's (or exported file's) own
    background: Background = TRANSPARENT
    refine: bool = False  # re-estimate colours at soft edges
    format: str = "png"
    mask: bool = False  # a mask output too (CLI: <name>_mask; service: the mask instead of the cut-out)
    # framing (rmbg_demo.framing): crop to the subject, margins, a canvas, the subject's place and size on it
    crop: bool = False
    margin: tuple[float, bool] = (0.0, False)  # (value, is a percentage of the subject's box)
    canvas: ImageSize | None = None
    # the share of the canvas (or, without one, of the output frame) the subject's box fills; None: as it comes
    scale: float | None = None
    position: tuple[float, float] | None = None  # where the subject's box sits, (x, y) in [0, 1]; None: original
    shadow: str | None = None  # drop | contact
    shadow_opacity: float = 0.5
    shadow_blur: float | None = None  # pixels on the output; None: 2.5 % of the subject's height
    shadow_offset: tuple[int, int] | None = None  # pixels; None: drop 2 %, 3 % of the subject's box
    srgb: bool = False  # convert to sRGB (else the input's colour profile is kept in the output)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalised values are set once, here
        set_(self, "model", parse_model(self.model))
        set_(self, "size", parse_network_size(self.size))
        set_(self, "background", parse_background(self.background))
        set_(self, "refine", parse_flag(self.refine, "refine"))
        set_(self, "format", parse_format(self.format))
        set_(self, "mask", parse_flag(self.mask, "mask"))
        set_(self, "crop", parse_flag(self.crop, "crop"))
        set_(self, "margin", parse_margin(self.margin))
        set_(self, "canvas", parse_canvas(self.canvas))
        set_(self, "scale", parse_scale(self.scale))
        set_(self, "position", parse_position(self.position))
        set_(self, "shadow", parse_shadow(self.shadow))
        set_(self, "shadow_opacity", parse_fraction(self.shadow_opacity, "shadow opacity"))
        set_(self, "shadow_blur", parse_pixels(self.shadow_blur, "shadow blur"))
        set_(self, "shadow_offset", parse_offset(self.shadow_offset))
        set_(self, "srgb", parse_flag(self.srgb, "srgb"))

    @property
    def framed(self) -> bool:
        """Any framing asked for (else the picture is the photo's frame, as the cut-out always was)."""
        return (self.crop or self.canvas is not None or self.shadow is not None or self.scale is not None
                or self.position is not None)

    def replace(self, **changes) -> RemovalOptions:
        return replace(self, **changes)

    @property
    def extension(self) -> str:
        return FORMAT_EXTENSIONS[self.format]

    # -- constructors, one per front end --------------------------------------------------------------
    @classmethod
    def from_args(cls, args) -> RemovalOptions:
        """`rmbg remove`'s flags."""
        return cls(model=args.model, size=args.size, background=args.background, refine=args.refine,
                   format=args.format, mask=args.mask,
                   **{name: getattr(args, name) for name in FRAMING_FIELDS if getattr(args, name) is not None})

    @classmethod
    def from_query(cls, query: Mapping[str, str], background_image: bytes | None = None) -> RemovalOptions:
        """The HTTP service's query (or form) fields, `QUERY_FIELDS`; an uploaded `background_image` replaces
        the background. Local files are never read from a query. An unknown name is an error (a typo is
        never silently ignored)."""
        unknown = sorted(set(query) - set(QUERY_FIELDS))
        if unknown:
            raise OptionError(unknown[0], query[unknown[0]], f"no such setting; the settings are "
                                                               f"{', '.join(QUERY_FIELDS)}")
        background = background_image if background_image else \
            parse_background(query.get("background"), files=False)
        return cls(model=query.get("model") or "auto", size=query.get("size"), background=background,
                   refine=query.get("refine"), format=query.get("format") or "png", mask=query.get("mask"),
                   **{name: query[name] for name in FRAMING_FIELDS if query.get(name) not in (None, "")})

    def to_query(self) -> dict[str, str]:
        """The query `from_query` reads back (an image background travels as an upload beside it)."""
        query = {"model": self.model, "format": self.format}
        if self.size:
            query["size"] = str(self.size)
        if self.background.kind in ("colour", "blur"):
            query["background"] = self.background.describe()
        if self.refine:
            query["refine"] = "1"
        if self.mask:
            query["mask"] = "1"
        for name, text in self.framing_text().items():
            query[name] = text
        return query

    def framing_text(self) -> dict[str, str]:
        """The framing settings that differ from the defaults, written as their parsers read them."""
        text = {}
        if self.crop:
            text["crop"] = "1"
        if self.margin != (0.0, False):
            text["margin"] = f"{self.margin[0]:g}{'%' if self.margin[1] else ''}"
        if self.canvas is not None:
            text["canvas"] = f"{self.canvas.width}x{self.canvas.height}"
        if self.scale is not None:
            text["scale"] = f"{self.scale * 100:g}%"
        if self.position is not None:
            text["position"] = f"{self.position[0] * 100:g}%,{self.position[1] * 100:g}%"
        if self.shadow is not None:
            text["shadow"] = self.shadow
            text["shadow_opacity"] = f"{self.shadow_opacity:g}"
            if self.shadow_blur is not None:
                text["shadow_blur"] = f"{self.shadow_blur:g}"
            if self.shadow_offset is not None:
                text["shadow_offset"] = f"{self.shadow_offset[0]},{self.shadow_offset[1]}"
        if self.srgb:
            text["srgb"] = "1"
        return text

    @classmethod
    def from_widgets(cls, model=None, background: str = "transparent", colour: str | None = "#ffffff",
                     background_image: str | None = None, refine=False, fmt: str = "png",
                     resolution: str = "auto", crop=False, margin="", canvas="", scale="", position="original",
                     shadow="none", srgb=False) -> RemovalOptions:
        """The page's settings: the background is a choice (transparent, colour, blur, image) plus the
        colour picker and the uploaded background image."""
        choice = (background or "transparent").strip().lower()
        if choice == "colour":
            chosen = parse_background(colour or "#ffffff", "background colour", files=False)
        elif choice == "image":
            if not background_image:
                raise OptionError("background image", None, "choose a background image, or another background")
            chosen = Background("image", image=_background_image(background_image, "background image",
                                                                 os.path.basename(str(background_image))))
        elif choice in ("transparent", "blur"):
            chosen = parse_background(choice)
        else:
            raise OptionError("background", background, "choose transparent, colour, blur or image")
        return cls(model=model or "auto", size=resolution, background=chosen, refine=refine, format=fmt, crop=crop,
                   margin=margin, canvas=canvas, scale=scale, position=position, shadow=shadow, srgb=srgb)


# -- from a result to what is written -----------------------------------------------------------------------
def rendered(result, options: RemovalOptions) -> tuple[Image.Image, Image.Image]:
    """(picture, mask) as `options` ask for them: the cut-out (RGBA) or the subject over the background
    (RGB), framed when asked (`rmbg_demo.framing`: the mask through the same geometry)."""
    if options.framed:
        from .framing import frame_result

        return frame_result(result, options)
    return result.composite(options.background.value, refine=options.refine), result.mask


def render(result, options: RemovalOptions) -> Image.Image:
    """The picture `options` ask for: the cut-out (RGBA), or the subject over the background (RGB)."""
    return rendered(result, options)[0]


def encoded_outputs(result, options: RemovalOptions, kinds=("image", "mask"),
                    pictures: tuple[Image.Image, Image.Image] | None = None) -> dict[str, bytes]:
    """{"image": the rendered picture, "mask": the 8-bit mask}, encoded in the options' format (`pictures`:
    `rendered`'s answer when the caller has it already). The picture carries the photo's colour profile,
    or with `srgb` is converted to sRGB (`rmbg_demo.colour`)."""
    from .colour import profile_of, to_srgb

    if pictures is None and "image" not in kinds and not options.framed:
        pictures = (None, result.mask)  # the mask alone: no picture to compose (refine, a background...)
    picture, mask = pictures or rendered(result, options)
    out = {}
    if "image" in kinds:
        icc = profile_of(result.image)
        if options.srgb:
            picture, icc = to_srgb(picture, icc), None
        out["image"] = encode_image(picture, options.format, icc_profile=icc)
    if "mask" in kinds:
        out["mask"] = encode_image(mask, options.format)
    return out


def background_bytes(background: Background) -> bytes | None:
    """An image background as PNG bytes (to send it over HTTP); None for the other kinds."""
    if background.kind != "image":
        return None
    buffer = io.BytesIO()
    background.image.save(buffer, "PNG")
    return buffer.getvalue()
