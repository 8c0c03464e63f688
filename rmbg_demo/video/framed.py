"""Framing for clips (crop, margin, canvas, scale, position, shadow), through the photos' own code
(`rmbg_demo.framing`), with one geometry for the whole clip so the frame size never changes mid-clip.

The clip's box is the union of its frames' subject boxes, known only once every frame has been through
the network; so a framed clip takes two passes:
  1. decode + network (the usual threads): each frame's matte and subject box; the mattes are kept,
  2. decode again, frame each picture with its kept matte and the clip's geometry, encode.
Decoding twice is cheap next to the network (which runs once); the mattes are the only state carried
between the passes. They are spilled to an anonymous temporary file, zlib-compressed (level 1), rather
than held in memory or in a raw np.memmap: a 1080p matte is 2 MB raw but ~0.1 MB compressed (a matte is
mostly flat 0 and 255; measured 22x on a soft-edged 1920x1080 one, 5 ms to compress, 4 ms to read back),
so a minute of 1080p at 30 fps needs ~0.2 GB of temporary disk instead of 3.7 GB, and memory stays flat
whatever the clip's length.
"""
from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Iterable, Iterator

from PIL import Image

from ..framing import Box, frame_region, framing_geometry, subject_box
from ..pipeline import RemovalResult
from ..request import OptionError

log = logging.getLogger(__name__)


class SpilledMattes:
    """A clip's mattes (L images), compressed one after another into a temporary file, read back in order."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="rmbg-mattes-")
        self.entries: list[tuple[int, tuple[int, int]]] = []  # (compressed length, size) per frame

    def append(self, matte: Image.Image) -> None:
        data = zlib.compress(matte.tobytes(), 1)
        self.file.write(data)
        self.entries.append((len(data), matte.size))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Image.Image]:
        self.file.seek(0)
        for length, size in self.entries:
            yield Image.frombytes("L", size, zlib.decompress(self.file.read(length)))

    def close(self) -> None:
        self.file.close()


def union(boxes: Iterable[Box | None]) -> Box | None:
    """The smallest box holding every box; frames without a subject (None) do not count. None: no subject."""
    found = [box for box in boxes if box is not None]
    if not found:
        return None
    return Box(min(b.left for b in found), min(b.top for b in found),
               max(b.right for b in found), max(b.bottom for b in found))


def clip_geometry(box: Box | None, size: tuple[int, int], options) -> tuple[Box, Box]:
    """(region, content) for every frame of a clip whose frames' boxes unite in `box` (`framing_geometry`).
    A cropped region grows by a pixel right or bottom when a side is odd: H.264 (yuv420, the MP4 and the
    mask video) takes only even sizes, and the picture and its mask video keep one size."""
    region, content = framing_geometry(box, size, options)
    if options.crop and options.canvas is None and box is not None:
        region = Box(region.left, region.top, region.right + region.width % 2, region.bottom + region.height % 2)
    return region, content


def framed_size(region: Box, options) -> tuple[int, int]:
    return tuple(options.canvas) if options.canvas is not None else (region.width, region.height)


def check_clip_framing(options, fmt: str, mask: bool) -> None:
    """Before any frame: a canvas with an odd side cannot be encoded as H.264 (yuv420 halves both sides
    for colour), which the MP4 output and the mask video are. VP9 and ProRes take any size."""
    canvas = options.canvas
    if canvas is not None and (canvas.width % 2 or canvas.height % 2) and (fmt == "mp4" or mask):
        raise OptionError("canvas", f"{canvas.width}x{canvas.height}",
                          "a clip's H.264 video (MP4 output, mask video) needs even sides, e.g. "
                          f"{canvas.width + canvas.width % 2}x{canvas.height + canvas.height % 2}")


def first_pass(results, pipeline, upright, progress, total: int) -> tuple[list[Box | None], SpilledMattes]:
    """Pass 1: (each frame's subject box, the mattes spilled), upright. `results`: (image, pts, probability)."""
    boxes, mattes = [], SpilledMattes()
    try:
        for done, (image, _pts, probability) in enumerate(results, start=1):
            matte = pipeline.to_mask(probability, image.size)  # a video frame has no alpha: the matte is it
            matte = matte.transpose(upright) if upright is not None else matte
            boxes.append(subject_box(matte))
            mattes.append(matte)
            if progress is not None:
                progress(done, total)
    except BaseException:
        mattes.close()
        raise
    return boxes, mattes


def clip_framing(boxes: list[Box | None], size: tuple[int, int], options, name: str) -> tuple[Box, Box]:
    """(region, content) for the clip: `clip_geometry` around the union of its frames' boxes (upright
    frames of `size`); a clip with no subject in any frame keeps the full frame, and says so once."""
    clip_box = union(boxes)
    if clip_box is None:
        log.warning("%s: no subject in any frame; the full frame is kept", name)
    return clip_geometry(clip_box, size, options)


def framed_frames(frames, mattes: SpilledMattes, boxes: list[Box | None], options, geometry: tuple[Box, Box],
                  model_name: str, upright) -> Iterator[tuple[Image.Image, Image.Image, int]]:
    """Pass 2: (picture, mask, pts) per frame, framed with the clip's `geometry` (region, content). `frames`:
    (image, pts), decoded again in the stored orientation and turned upright, as the mattes were, so a
    canvas's WxH and position mean what the viewer sees."""
    region, content = geometry
    for (image, pts), matte, own in zip(frames, mattes, boxes):
        image = image.transpose(upright) if upright is not None else image
        picture, mask = frame_region(RemovalResult(image, matte, model_name), matte, options, region, content,
                                     own=own)
        yield picture, mask, pts
