"""Decoding inputs and encoding outputs.

Every input kind (path, bytes, file object, PIL image, numpy array) becomes a fully loaded
RGB image, or RGBA when it carries real transparency. Size limits are checked from the
header, before any pixels are decoded; bad data gets an `ImageDecodeError` saying what is wrong.
"""
from __future__ import annotations

import glob
import io
import os
import re
import struct
import traceback
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .colour import cmyk_to_rgb

DEFAULT_MAX_PIXELS = 50_000_000
FORMAT_EXTENSIONS = {"png": ".png", "webp": ".webp"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a half file must fail, not come back half grey
_heif_registered = False


class ImageDecodeError(ValueError):
    """The input is not an image we can use; the message says why."""


def _register_heif() -> None:
    global _heif_registered
    if not _heif_registered:
        _heif_registered = True
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:  # HEIC stays unreadable; everything else works
            pass


def _describe(source) -> str:
    """" (name)" for a path or a file object opened from one, "" for bytes and in-memory buffers."""
    if isinstance(source, (str, os.PathLike)):
        return f" ({Path(source).name})"
    name = getattr(source, "name", None)  # an open file; a BytesIO has no name
    return f" ({Path(name).name})" if isinstance(name, str) and name else ""


def _check_pixels(size: tuple[int, int], max_pixels: int | None, where: str) -> None:
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ImageDecodeError(
            f"image{where} is {width}x{height} ({width * height / 1e6:.1f} MP), over the "
            f"{max_pixels / 1e6:.1f} MP limit; raise max_pixels to allow it")


def _read(source, where: str) -> bytes:
    """The bytes of a path, bytes-like or file object: read once; a path's file is never touched again."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"no such file: {path}")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageDecodeError(f"not an image{where}: the file object gives {type(data).__name__}, not bytes "
                                   "(open it in binary mode, 'rb')")
        data = bytes(data)
    else:
        raise ImageDecodeError(f"cannot read an image from a {type(source).__name__}")
    if not data:
        raise ImageDecodeError(f"not an image{where}: the data is empty")
    return data


# Pillow's names for formats, as people write them.
_FORMAT_NAMES = {"WEBP": "WebP", "JPEG2000": "JPEG 2000", "MPO": "JPEG"}
# Plugins that read the whole file when they open it: how far they read says nothing.
_READS_WHOLE_FILE = {"WEBP", "HEIF", "AVIF"}
# The PNG chunks whose compressed content Pillow inflates at most PngImagePlugin.MAX_TEXT_CHUNK of.
_PNG_INFLATED_CHUNKS = {"chunk_zTXt": "its zTXt text chunk", "chunk_iTXt": "its iTXt text chunk",
                        "chunk_iCCP": "its ICC colour profile (iCCP chunk)"}
_TRUNCATED = "the file ends early"


def _claimants(data: bytes):
    """(format, plugin factory) of each plugin whose signature check claims these bytes, in Pillow's order."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            claimed = accept(prefix) if accept else False
        except Exception:  # a signature check that fails has not claimed the data
            continue
        if claimed and not isinstance(claimed, str):  # a string says "support not installed": no claim
            yield fmt, factory


def _hidden_open_error(data: bytes) -> tuple[str | None, BaseException | None, int | None]:
    """(format, the error its plugin raised, how far it had read) for data Image.open found no plugin for.

    Image.open moves on to the next plugin when one raises SyntaxError, IndexError, TypeError or
    struct.error (a PNG with a bad chunk checksum, a PNG or JPEG cut in its header), then reports
    only that nothing recognised the data; the plugin whose signature matched tells the real error."""
    for fmt, factory in _claimants(data):
        buffer = io.BytesIO(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(buffer, "").close()
        except Exception as exc:  # whatever it is, it is the reason
            return fmt, exc, buffer.tell()
    return None, None, None


def _reason(exc: BaseException, fmt: str | None, data: bytes | None, at_open: bool,
            read_to: int | None) -> tuple[str, str]:
    """(what the file is: "refused", "corrupt" or "truncated or corrupt"; why, in plain words).

    A file that ends early may as well carry a damaged length or offset: that stays "truncated or corrupt"."""
    from PIL import PngImagePlugin

    text = " ".join(str(exc).split())  # libheif ends its messages with a newline
    lower = text.lower()
    ended = f"{_TRUNCATED} (inside its header)" if at_open else _TRUNCATED
    if isinstance(exc, ValueError) and "decompressed data too large" in lower:
        frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
        chunk = next((what for name, what in _PNG_INFLATED_CHUNKS.items() if name in frames), "a compressed chunk")
        return "refused", (f"{chunk} inflates past Pillow's {PngImagePlugin.MAX_TEXT_CHUNK / 2**20:g} MB limit "
                           "for text (a decompression bomb)")
    if isinstance(exc, ValueError) and "too much memory used in text chunks" in lower:
        return "refused", (f"its text chunks together inflate past Pillow's {PngImagePlugin.MAX_TEXT_MEMORY / 2**20:g}"
                           " MB limit (a decompression bomb)")
    if isinstance(exc, MemoryError):
        return "refused", "decoding it needs more memory than is free"
    checksum = re.search(r"bad header checksum in b'(\w+)'", text)
    if checksum:
        return "corrupt", f"a chunk's checksum is wrong ({checksum.group(1)})"
    stated = struct.unpack("<I", data[4:8])[0] + 8 if data and data[:4] == b"RIFF" and len(data) >= 8 else None
    if stated and stated > len(data):  # a RIFF container (WebP) states its length
        return "truncated or corrupt", f"{_TRUNCATED} (its header states {stated} bytes, there are {len(data)})"
    if (isinstance(exc, EOFError) or isinstance(exc, struct.error) and "requires a buffer" in lower
            or any(words in lower for words in ("truncated", "incomplete", "end of file", "file size too small"))):
        return "truncated or corrupt", ended
    if isinstance(exc, zlib.error) or "data stream" in lower or "decoder error" in lower:
        return "corrupt", f"the compressed {'data in its header' if at_open else 'pixel data'} is damaged"
    if at_open and data and read_to is not None and read_to >= len(data) and fmt not in _READS_WHOLE_FILE:
        # The header reader got to the end of the data (or was sent past it) before it failed.
        return "truncated or corrupt", ended
    if fmt == "WEBP" and "decoder object" in lower:
        return "corrupt", "libwebp cannot decode it"
    detail = text or type(exc).__name__
    if isinstance(exc, (IndexError, TypeError, KeyError, AttributeError, struct.error)):
        detail = f"malformed data broke Pillow's {_FORMAT_NAMES.get(fmt, fmt) or 'image'} reader ({detail})"
    if detail[1:2].islower():  # "Unsupported BMP ..." -> "unsupported BMP ...", "EXIF ..." stays
        detail = detail[0].lower() + detail[1:]
    return "corrupt", detail


def _decode_error(exc: BaseException, where: str, data: bytes | None, fmt: str | None, max_pixels: int | None,
                  *, at_open: bool, read_to: int | None = None) -> ImageDecodeError:
    """The one place where every error that decoding raises, in Image.open (`at_open`, having read
    `read_to` bytes) or in the pixel decoding after it, becomes an ImageDecodeError that names the
    file (`where`), the format Pillow identified and the reason."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow's own guard fired while reading the header; report it against our limit.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)) / 1e6:.1f} MP" if claimed else "too many pixels"
        limit = f"the {max_pixels / 1e6:.1f} MP limit" if max_pixels else "Pillow's limit"
        return ImageDecodeError(f"image{where} claims {size}, over {limit}; refused as a decompression bomb "
                                "before decoding")
    if isinstance(exc, UnidentifiedImageError) and data is not None:
        fmt, hidden, read_to = _hidden_open_error(data)
        if hidden is None:
            return ImageDecodeError(f"not an image{where}: no decoder recognises this data "
                                    f"({len(data)} bytes starting {data[:16]!r})")
        exc = hidden
    elif fmt is None and data is not None:
        fmt = next((claimed for claimed, _ in _claimants(data)), None)
    state, why = _reason(exc, fmt, data, at_open, read_to)
    name = f"{_FORMAT_NAMES.get(fmt, fmt)} image" if fmt else "image"
    return ImageDecodeError(f"{name}{where} is {state}: {why}")


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """RGB, or RGBA with real transparency; an RGB colour profile stays in `.info["icc_profile"]` (the
    outputs carry it), a CMYK image is converted through its own profile (`colour.cmyk_to_rgb`)."""
    mode = image.mode
    if mode == "CMYK":
        return cmyk_to_rgb(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit) greyscale: scale into 8 bits rather than clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            return rgba
        return rgba.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageDecodeError(f"unsupported array shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    _check_pixels((a.shape[1], a.shape[0]), max_pixels, "")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported array dtype {a.dtype}; use uint8, uint16, bool or float in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[2] if a.ndim == 3 else 2]
    return _to_rgb_or_rgba(Image.fromarray(np.ascontiguousarray(a), mode))


def _opened(data: bytes, where: str, max_pixels: int | None) -> Image.Image:
    """Image.open (the header only) through the decode boundary."""
    if max_pixels and max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels  # a caller asked for more than Pillow's guard allows
    _register_heif()
    buffer = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(buffer)
    except Exception as exc:
        read_to = None if buffer.closed else buffer.tell()
        raise _decode_error(exc, where, data, None, max_pixels, at_open=True, read_to=read_to) from exc


def image_size(source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, no pixels decoded: what admission against a memory budget
    needs. The same errors as `load_image` for what the header shows."""
    if isinstance(source, np.ndarray):
        return source.shape[1], source.shape[0]
    if isinstance(source, Image.Image):
        return source.size
    where = _describe(source)
    image = _opened(_read(source, where), where, max_pixels)
    _check_pixels(image.size, max_pixels, where)
    return image.size


def load_image(source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A fully decoded RGB (or RGBA, if transparent) image, EXIF orientation applied, first frame only.

    Raises ImageDecodeError (a ValueError) for anything that is not a usable image: a missing file,
    empty data, data no decoder recognises, sizes over `max_pixels`, and every failure of the decoder
    itself, whether Image.open meets it or the pixel decoding that follows (truncated files, broken
    checksums, damaged pixel data, PNG text chunks that inflate past Pillow's limit). The message
    names the file (for a path or an open file), the format and the reason."""
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    where = _describe(source)
    # Reading is not decoding: a missing file is "no such file", an unreadable one its OSError.
    data = None if isinstance(source, Image.Image) else _read(source, where)
    image = source if data is None else None
    try:
        if image is None:
            image = _opened(data, where, max_pixels)
        _check_pixels(image.size, max_pixels, where)
        # Pixels are decoded lazily: counting frames (GIF), load() and the conversions all decode.
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb_or_rgba(image)
    except ImageDecodeError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error...
        raise _decode_error(exc, where, data, image.format, max_pixels, at_open=False) from exc


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
_deflate_pool: ThreadPoolExecutor | None = None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _deflate_in_parallel(raw: memoryview, level: int) -> bytes:
    """One zlib stream, compressed as independent slices on several threads (zlib releases the GIL).

    Every slice but the last ends with a full flush, so the raw deflate pieces concatenate into a
    valid stream; the Adler-32 trailer covers the whole input."""
    global _deflate_pool
    workers = max(1, min(4, os.cpu_count() or 1))
    if _deflate_pool is None:
        _deflate_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png-deflate")
    step = max(1 << 20, -(-len(raw) // workers))
    slices = [raw[start:start + step] for start in range(0, len(raw), step)] or [raw]

    def deflate(index: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
        last = index == len(slices) - 1
        return compressor.compress(slices[index]) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)

    body = b"".join(_deflate_pool.map(deflate, range(len(slices))))
    return b"\x78\x01" + body + struct.pack(">I", zlib.adler32(raw))


def encode_png_fast(image: Image.Image, compress_level: int = 1, icc_profile: bytes | None = None) -> bytes:
    """A standard 8-bit PNG of an L, RGB or RGBA image, about 3x faster than Pillow's encoder.

    Every row uses the "Up" filter (computed for the whole image in one numpy call) and the
    deflate runs on all cores: for a 12 MP cut-out, 0.14 s and 10.5 MiB here, against 0.45 s
    and 7.9 MiB from Pillow at level 1 (bench/overhead.py prints both)."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the byte above it, mod 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:], casting="unsafe")
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPES[image.mode], 0, 0, 0)
    data = _deflate_in_parallel(memoryview(filtered).cast("B"), compress_level)
    # iCCP: a name, a null, compression method 0, the zlib-compressed profile (before the pixels, as PNG asks)
    colour = _png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)) if icc_profile else b""
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + colour + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def encode_image(image: Image.Image, fmt: str = "png", *, compress_level: int = 1,
                 icc_profile: bytes | None = None) -> bytes:
    """PNG (our fast encoder for L/RGB/RGBA, Pillow's for other modes) lossless WebP or JPEG (quality 95), carrying
    `icc_profile` when given. No EXIF: the pixels are already upright."""
    fmt = fmt.lower()
    buffer = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "png" and image.mode in _PNG_COLOUR_TYPES:
        return encode_png_fast(image, compress_level, icc_profile)
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=compress_level, compress_type=zlib.Z_RLE, **extra)
    elif fmt == "webp":
        image.save(buffer, "WEBP", lossless=True, method=4, exact=False, **extra)
    elif fmt in ("jpg", "jpeg"):  # no alpha: callers flatten first (remove.bg's jpg and zip answers)
        image.convert("L" if image.mode == "L" else "RGB").save(buffer, "JPEG", quality=95, **extra)
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of: {', '.join(FORMAT_EXTENSIONS)}")
    return buffer.getvalue()


def image_files(inputs, *, recursive: bool = False, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """Files, folders and glob patterns -> a sorted, de-duplicated list of files; in folders and
    globs, those with one of `extensions` (a file named on its own is always taken)."""
    found: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            matches = sorted(p for p in walk if p.is_file() and p.suffix.lower() in extensions)
        else:
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True)
                             if Path(p).is_file() and Path(p).suffix.lower() in extensions)
            if not matches:
                raise FileNotFoundError(f"no {'image' if extensions == IMAGE_EXTENSIONS else 'image or video'} "
                                        f"file matches {text}")
        for match in matches:
            if match not in found:
                found.append(match)
    return found
