"""Encoding the results: alpha video (VP9 WebM, ProRes 4444 MOV), H.264 MP4, PNG frames; audio carried over.

Quality choices (documented in the README and checked for size in bench/video.py):
- VP9: constant quality, `crf 30` with `b:v 0` (libvpx's "constant quality" mode), `cpu-used 4` and
  row multithreading: about 3x faster than libvpx's default speed for a few per cent larger files.
- H.264: `crf 20`, `preset fast`, yuv420p (plays everywhere); frames padded to even sizes.
- ProRes 4444 (`prores_ks`, yuva444p10le): the editing format; large by design.
Colours are converted with the BT.709 matrix at limited range and the streams tagged as such, so
players do not guess. Audio is re-encoded to what the container takes (Opus in WebM, AAC in MP4/MOV).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..imageio import encode_image
from .probe import VideoError, VideoInfo, open_input


@dataclass(frozen=True)
class Encoding:
    extension: str
    container: str
    codec: str
    pix_fmt: str
    audio_codec: str | None
    alpha: bool
    options: dict = field(default_factory=dict)
    container_options: dict = field(default_factory=dict)


ENCODINGS = {
    "webm": Encoding(".webm", "webm", "libvpx-vp9", "yuva420p", "libopus", True,
                     {"crf": "30", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}),
    "mov": Encoding(".mov", "mov", "prores_ks", "yuva444p10le", "aac", True, {"profile": "4444"}),
    "mp4": Encoding(".mp4", "mp4", "libx264", "yuv420p", "aac", False, {"crf": "20", "preset": "fast"},
                    {"movflags": "+faststart"}),
}
BT709 = 1  # AVCOL_SPC_BT709 = AVCOL_PRI_BT709 = AVCOL_TRC_BT709
LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG


class AudioTrack:
    """The input's first audio track, decoded from a second reader of the same file and re-encoded,
    written up to the video's current time so the output stays interleaved (and memory stays small)."""

    def __init__(self, source: Path, output, codec: str):
        self.input = open_input(source)
        self.source_stream = self.input.streams.audio[0]
        channels = self.source_stream.codec_context.channels or 2
        layout = "mono" if channels == 1 else "stereo"
        rate = 48000 if codec == "libopus" else (self.source_stream.codec_context.sample_rate or 48000)
        self.stream = output.add_stream(codec, rate=rate)
        self.stream.layout = layout
        self.stream.bit_rate = 96_000 if codec == "libopus" else 160_000
        self.stream.time_base = Fraction(1, rate)
        sample_format = "flt" if codec == "libopus" else "fltp"
        self.resampler = av.AudioResampler(format=sample_format, layout=layout, rate=rate,
                                           frame_size=960 if codec == "libopus" else 1024)
        self.output = output
        self.packets = self.input.demux(self.source_stream)
        self.seconds = 0.0  # how far the audio has been written
        self.finished = False

    def _encode(self, frame) -> None:
        for out in self.resampler.resample(frame):
            if out.pts is not None:
                self.seconds = float((out.pts + out.samples) * out.time_base)
            self.output.mux(self.stream.encode(out))

    def write_until(self, seconds: float | None = None) -> None:
        """Encodes audio until it reaches `seconds` (all of it when None)."""
        while not self.finished and (seconds is None or self.seconds < seconds):
            try:
                packet = next(self.packets)
            except StopIteration:
                packet = None
            if packet is None:
                self.finished = True
                break
            try:
                for frame in self.source_stream.decode(packet):
                    self._encode(frame)
            except av.error.FFmpegError as exc:
                raise VideoError(f"{self.input.name}: the audio track is corrupt (FFmpeg: {exc.strerror or exc})") \
                    from None

    def finish(self) -> None:
        self.write_until(None)
        self._encode(None)
        self.output.mux(self.stream.encode(None))

    def close(self) -> None:
        self.input.close()


def _even(value: int) -> int:
    return value + value % 2


class VideoWriter:
    """One output video file: frames (PIL) with their source timestamps in, encoded packets muxed."""

    def __init__(self, path: Path, encoding: Encoding, info: VideoInfo, *, audio: bool):
        self.path, self.encoding, self.info = path, encoding, info
        self.container = av.open(os.fspath(path), "w", format=encoding.container,
                                 options=dict(encoding.container_options))
        try:
            self.stream = self.container.add_stream(encoding.codec, rate=info.fps, options=dict(encoding.options))
            four_two_zero = "420" in encoding.pix_fmt  # chroma subsampled both ways: even sizes only for x264
            self.size = (_even(info.width), _even(info.height)) if four_two_zero and encoding.codec == "libx264" \
                else (info.width, info.height)
            self.stream.width, self.stream.height = self.size
            self.stream.pix_fmt = encoding.pix_fmt
            self.stream.time_base = info.time_base
            self.stream.codec_context.time_base = info.time_base
            context = self.stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = BT709
            context.color_range = LIMITED_RANGE
            if info.rotation:
                self.stream.set_display_rotation(info.rotation)
            self.audio = AudioTrack(info.path, self.container, encoding.audio_codec) \
                if audio and info.has_audio and encoding.audio_codec else None
        except BaseException:
            self.container.close()
            raise
        self.last_pts: int | None = None

    def _frame(self, image: Image.Image) -> av.VideoFrame:
        if image.size != self.size:  # pad odd sizes by repeating the last row / column
            pixels = np.asarray(image)
            pad = [(0, self.size[1] - image.height), (0, self.size[0] - image.width)] + [(0, 0)] * (pixels.ndim - 2)
            image = Image.fromarray(np.pad(pixels, pad, mode="edge"), image.mode)
        source_format = {"RGBA": "rgba", "RGB": "rgb24", "L": "gray"}[image.mode]
        frame = av.VideoFrame.from_ndarray(np.asarray(image), format=source_format)
        return frame.reformat(format=self.encoding.pix_fmt, src_colorspace="ITU709", dst_colorspace="ITU709",
                              dst_color_range="MPEG")

    def write(self, image: Image.Image, pts: int) -> None:
        """`pts` in the source stream's time base; kept so timing (variable rates too) survives."""
        if self.last_pts is not None and pts <= self.last_pts:
            pts = self.last_pts + 1  # encoders refuse repeated timestamps, which broken files have
        self.last_pts = pts
        frame = self._frame(image)
        frame.pts, frame.time_base = pts, self.info.time_base
        if self.audio is not None:
            self.audio.write_until(float(pts * self.info.time_base))
        self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        self.container.mux(self.stream.encode(None))
        if self.audio is not None:
            self.audio.finish()
        self.close()

    def close(self) -> None:
        if self.audio is not None:
            self.audio.close()
        self.container.close()


class FrameFolderWriter:
    """RGBA PNG frames, 000001.png, 000002.png, ... in a folder; upright (a PNG has no display matrix)."""

    def __init__(self, folder: Path, info: VideoInfo):
        self.folder, self.info, self.count = folder, info, 0
        folder.mkdir()

    def write(self, image: Image.Image, pts: int) -> None:
        self.count += 1
        upright = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                   270: Image.Transpose.ROTATE_270}.get(self.info.rotation)
        image = image.transpose(upright) if upright is not None else image
        (self.folder / f"{self.count:06d}.png").write_bytes(encode_image(image, "png"))

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass
