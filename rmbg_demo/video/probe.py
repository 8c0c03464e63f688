"""Is this file a video we can work on? Everything is checked from the container before any frame is processed.

Files are recognised by their content (FFmpeg's container probing through PyAV), never by their
name: a JPEG renamed .mp4 opens as FFmpeg's `jpeg_pipe` image demuxer and is refused as an image.
`classify_media`, which sends each input to the video or the image path, leaves names with an image
extension to the image decoder and says why a file that looks like a video cannot be used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av

from ..imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

# A real file has one video stream, a few audio tracks, subtitles, chapters' cover art: a few dozen
# at most. Thousands of streams is a crafted file that makes every later step slow.
MAX_STREAMS = 64
# FFmpeg opens still images as one-frame "videos" through these demuxers; we leave them to the image path.
IMAGE_DEMUXERS = ("image2", "gif", "apng", "tty", "webp", "ico", "bmp", "tiff")


# Names that folders and globs are searched for; a file named on its own is judged by its content.
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts"}


class VideoError(ValueError):
    """The input is not a video we can process (or would be too big to); the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, checked: at least one frame, sizes within limits."""

    path: Path
    width: int  # as stored, before rotation
    height: int
    fps: Fraction  # average frame rate
    time_base: Fraction  # of the video stream
    frames: int  # counted packets of the video stream
    duration: float  # seconds, first frame's start to last frame's end
    rotation: int  # counter-clockwise degrees to display the stored frames upright: 0, 90, 180 or 270
    has_audio: bool
    codec: str  # video codec, e.g. "h264"
    container: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    audio_codec: str | None = None
    variable_rate: bool = False  # frame durations differ

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown, after the rotation."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def _name(path) -> str:
    return Path(path).name


# How far into a file the container signatures and a YUV4MPEG2 header line are looked for.
_HEAD_BYTES = 512
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(_HEAD_BYTES)
    except OSError as exc:
        raise VideoError(f"{path.name}: cannot read the file ({exc.strerror or exc})") from None


def _container_kind(head: bytes) -> str | None:
    """The video container whose signature the file starts with, or None: how a file FFmpeg cannot
    open is told apart from one that is no video at all."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat"):
        return "MP4/MOV"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:9] == b"YUV4MPEG2":
        return "YUV4MPEG2"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG program stream"
    if head[:1] == b"G" and head[188:189] == b"G":
        return "MPEG transport stream"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:16] == _ASF_GUID:
        return "ASF/WMV"
    return None


def _y4m_frame_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) a YUV4MPEG2 stream states in its first line, or None."""
    if not head.startswith(b"YUV4MPEG2 "):
        return None
    params = {token[:1]: token[1:] for token in head.split(b"\n", 1)[0].split()[1:]}
    try:
        return int(params[b"W"]), int(params[b"H"])
    except (KeyError, ValueError):
        return None


def _check_frame_size(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels and width * height > max_pixels:
        raise VideoError(f"{name}: frames are {width}x{height} ({width * height / 1e6:.1f} MP), over the "
                         f"{max_pixels / 1e6:.1f} MP limit per frame")


def open_input(path, *, max_pixels: int | None = None) -> av.container.InputContainer:
    """The container, or a VideoError saying why FFmpeg could not read it. With `max_pixels`, a raw
    YUV4MPEG2 stream whose header states bigger frames is refused before FFmpeg reads it."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise VideoError(f"{path.name}: the file is empty (0 bytes)")
    head = _head(path)
    stated = _y4m_frame_size(head)
    if stated:
        _check_frame_size(path.name, *stated, max_pixels)
    try:
        return av.open(os.fspath(path), "r", metadata_errors="replace")
    except av.error.EOFError:
        raise VideoError(f"{path.name}: the container ends before its first frame (truncated, or no frames)") from None
    except (av.error.InvalidDataError, av.error.FFmpegError) as exc:
        said = exc.strerror or exc
        if head[4:8] == b"ftyp":
            raise VideoError(f"{path.name}: an MP4/MOV file without its index (moov atom): the file is truncated, "
                             "e.g. an unfinished recording or download") from None
        if stated:  # FFmpeg refuses frames it cannot allocate (about 16000x16000 and up)
            raise VideoError(f"{path.name}: FFmpeg cannot read YUV4MPEG2 frames of {stated[0]}x{stated[1]} "
                             f"(FFmpeg: {said})") from None
        kind = _container_kind(head)
        if kind:
            raise VideoError(f"{path.name}: FFmpeg cannot read this {kind} file (FFmpeg: {said}); it is "
                             "truncated or corrupt") from None
        raise VideoError(f"{path.name}: not a readable video (FFmpeg: {said}); the file is truncated, "
                         "corrupt or not a video") from None


def is_image_container(container) -> bool:
    names = container.format.name.split(",")
    return any(n.endswith("_pipe") or n in IMAGE_DEMUXERS for n in names)


def video_stream(container):
    """The main video stream: the first that is not a cover picture, or None."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def is_video(path) -> bool:
    """True when the file's content is a container with a video stream (not a still image), whatever its
    name. False for anything else, saying nothing of why: `classify_media` says why a video cannot be used."""
    try:
        with open_input(path) as container:
            return not is_image_container(container) and video_stream(container) is not None
    except (VideoError, OSError):
        return False


def classify_media(path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Literal["video", "image"]:
    """Whether an input file goes to the video path (`remove_video`) or the image path (`load_image`), or a
    VideoError saying why a file that looks like a video cannot be used.

    - "image" for a name with an image extension (imageio.IMAGE_EXTENSIONS), without opening it: the image
      decoder says what is wrong with it, if anything.
    - Otherwise the content decides (a clip without an extension is a video). "image" only when it is not a
      video container at all: a still image FFmpeg would open as one (a JPEG renamed .mp4), an empty file
      without a video extension, or data that FFmpeg cannot open and that carries no video container's
      signature (a text file named .webm); the image decoder then says "not an image".
    - "video" for a container with a video stream that passes the header checks: at most MAX_STREAMS
      streams, frames within `max_pixels`. The frames are checked later, by `probe_video` in `remove_video`
      (zero frames, a WebM cut short, a length limit).
    - VideoError (a ValueError), the message starting with the file name, otherwise: no such file; an empty
      file with a video extension; a container FFmpeg cannot open that starts with a video container's
      signature (an MP4 cut before its moov index: truncated); no video stream (an audio file); too many
      streams; frames over `max_pixels` (for a raw YUV4MPEG2 stream, read from its header before FFmpeg
      allocates a frame).
    """
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return "image"
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    empty = path.stat().st_size == 0
    if empty and path.suffix.lower() not in VIDEO_EXTENSIONS:
        return "image"
    try:
        container = open_input(path, max_pixels=max_pixels)
    except VideoError:
        if empty or _container_kind(_head(path)):
            raise
        return "image"
    with container:
        if is_image_container(container):
            return "image"
        if not (container.streams.video or container.streams.audio or _container_kind(_head(path))):
            return "image"  # FFmpeg read something (subtitles, a data stream) from a file that is no video
        _check_header(container, path, max_pixels, None)
    return "video"


def _first_frame_rotation(container, stream, name: str) -> int:
    """Decodes the first frame (so a file whose codec we lack fails here) and returns its display rotation:
    counter-clockwise degrees from the display matrix, 0 when there is none."""
    try:
        for frame in container.decode(stream):
            return round(frame.rotation / 90) * 90 % 360 if frame.rotation else 0
    except av.error.FFmpegError as exc:
        raise VideoError(f"{name}: the first frame does not decode (FFmpeg: {exc.strerror or exc})") from None
    raise VideoError(f"{name}: the video stream has no frames")


def _count_frames(container, stream, name: str, max_seconds: float | None) -> tuple[int, float, float, bool]:
    """(video frames, seconds they cover, seconds until the last packet of any stream, variable frame rate),
    from the packets alone: no decoding, cheap even for long files."""
    frames, first, end, last_any, durations = 0, None, None, 0.0, set()
    limit = None if max_seconds is None else max_seconds / stream.time_base
    try:
        for packet in container.demux():
            if not packet.size or packet.pts is None and packet.stream is not stream:
                continue
            if packet.pts is not None and packet.time_base:
                last_any = max(last_any, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            if packet.stream is not stream:
                continue
            frames += 1
            if packet.pts is not None:
                first = packet.pts if first is None else min(first, packet.pts)
                stop = packet.pts + (packet.duration or 0)
                end = stop if end is None else max(end, stop)
                durations.add(packet.duration)
                if limit is not None and end - first > limit:
                    raise VideoError(f"{name}: longer than the {max_seconds:g} s limit")
    except av.error.FFmpegError as exc:
        raise VideoError(f"{name}: corrupt or truncated after {frames} frames "
                         f"(FFmpeg: {exc.strerror or exc})") from None
    seconds = float((end - first) * stream.time_base) if first is not None else 0.0
    return frames, seconds, last_any, len(durations - {0, None}) > 1


def _stated_seconds(container, stream) -> float | None:
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _check_header(container, path: Path, max_pixels: int | None, max_seconds: float | None):
    name = path.name
    if is_image_container(container):
        kind = container.format.name.split(",")[0].replace("_pipe", "").upper()
        raise VideoError(f"{name}: this is an image ({kind}), not a video; process it as an image")
    if len(container.streams) > MAX_STREAMS:
        raise VideoError(f"{name}: {len(container.streams)} streams, over the limit of {MAX_STREAMS}; refused")
    stream = video_stream(container)
    if stream is None:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise VideoError(f"{name}: no video stream (the file holds {', '.join(kinds)})")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoError(f"{name}: the video stream has no frame size")
    _check_frame_size(name, width, height, max_pixels)
    stated = _stated_seconds(container, stream)
    if max_seconds is not None and stated is not None and stated > max_seconds:
        raise VideoError(f"{name}: {stated:.1f} s long, over the {max_seconds:g} s limit")
    return stream, stated


def probe_video(path, *, max_seconds: float | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Checks a video before any work: readable, a video stream, frames, sizes and length within the limits.

    Raises VideoError naming the problem: truncated or corrupt files, no video stream (an audio file),
    zero frames, frames over `max_pixels`, too many streams, longer than `max_seconds`, an image."""
    path = Path(path)
    with open_input(path, max_pixels=max_pixels) as container:
        stream, _ = _check_header(container, path, max_pixels, max_seconds)
        rotation = _first_frame_rotation(container, stream, path.name)
    # Again from the start: seeking back is not possible in every container.
    with open_input(path, max_pixels=max_pixels) as container:
        stream, stated = _check_header(container, path, max_pixels, max_seconds)
        frames, seconds, last_packet, variable = _count_frames(container, stream, path.name, max_seconds)
        if frames == 0:
            raise VideoError(f"{path.name}: the video stream has no frames")
        if stream.frames and frames < stream.frames:
            raise VideoError(f"{path.name}: truncated: the index lists {stream.frames} frames, only {frames} are there")
        if stated and last_packet < stated - max(0.5, 0.05 * stated):
            raise VideoError(f"{path.name}: truncated: the header says {stated:.2f} s, the data stops at "
                             f"{last_packet:.2f} s")
        fps = stream.average_rate or stream.guessed_rate or (Fraction(frames) / Fraction(seconds) if seconds else None)
        if not fps:
            raise VideoError(f"{path.name}: the video stream states no frame rate")
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(path=path, width=stream.codec_context.width, height=stream.codec_context.height,
                         fps=Fraction(fps), time_base=Fraction(stream.time_base), frames=frames,
                         duration=seconds or frames / float(fps), rotation=rotation, has_audio=audio is not None,
                         codec=stream.codec_context.name, container=container.format.name,
                         audio_codec=audio.codec_context.name if audio else None, variable_rate=variable)
