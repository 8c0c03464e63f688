"""One description of a removal request, shared by every front end (CLI, page, HTTP service, Ray job).

`RemovalOptions` holds everything a user sets per request, validated once, here. Each setting has
one parser; the constructors (`from_args`, `from_query`, `from_widgets`) only map a front end's
names onto them. `render` turns a result into the picture the options ask for.

Adding a request setting: a field of `RemovalOptions`, its parser below, then one flag (cli.py),
one widget (ui.py) and one query name (`from_query`, the service's contract).
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
from .imageio import FORMAT_EXTENSIONS, ImageDecodeError, encode_image, load_image


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

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalised values are set once, here
        set_(self, "model", parse_model(self.model))
        set_(self, "size", parse_network_size(self.size))
        set_(self, "background", parse_background(self.background))
        set_(self, "refine", parse_flag(self.refine, "refine"))
        set_(self, "format", parse_format(self.format))
        set_(self, "mask", parse_flag(self.mask, "mask"))

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
                   format=args.format, mask=args.mask)

    @classmethod
    def from_query(cls, query: Mapping[str, str], background_image: bytes | None = None) -> RemovalOptions:
        """The HTTP service's query (or form) fields: model, size, background, refine, format, mask; an
        uploaded `background_image` replaces the background. Local files are never read from a query."""
        background = background_image if background_image else \
            parse_background(query.get("background"), files=False)
        return cls(model=query.get("model") or "auto", size=query.get("size"), background=background,
                   refine=query.get("refine"), format=query.get("format") or "png", mask=query.get("mask"))

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
        return query

    @classmethod
    def from_widgets(cls, model=None, background: str = "transparent", colour: str | None = "#ffffff",
                     background_image: str | None = None, refine=False, fmt: str = "png",
                     resolution: str = "auto") -> RemovalOptions:
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
        return cls(model=model or "auto", size=resolution, background=chosen, refine=refine, format=fmt)


# -- from a result to what is written -----------------------------------------------------------------------
def render(result, options: RemovalOptions) -> Image.Image:
    """The picture `options` ask for: the cut-out (RGBA), or the subject over the background (RGB)."""
    return result.composite(options.background.value, refine=options.refine)


def encoded_outputs(result, options: RemovalOptions, kinds=("image", "mask")) -> dict[str, bytes]:
    """{"image": the rendered picture, "mask": the 8-bit mask}, encoded in the options' format."""
    out = {}
    if "image" in kinds:
        out["image"] = encode_image(render(result, options), options.format)
    if "mask" in kinds:
        out["mask"] = encode_image(result.mask, options.format)
    return out


def background_bytes(background: Background) -> bytes | None:
    """An image background as PNG bytes (to send it over HTTP); None for the other kinds."""
    if background.kind != "image":
        return None
    buffer = io.BytesIO()
    background.image.save(buffer, "PNG")
    return buffer.getvalue()
