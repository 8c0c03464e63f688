"""Video in -> cut-out video out: decode, the network and encode run on their own threads, joined by bounded
queues, so memory stays the same whatever the clip's length and the slowest stage sets the pace.

  decode thread:   frames (PIL, upright for the network) -> queue
  network thread:  batches of `batch_size` frames -> probabilities (-> steady edges) -> queue
  calling thread:  mask at the frame's size, composite, encode (and audio up to the same time)

Outputs are encoded into temporary files beside their final names and moved into place only when
everything succeeded; a failure anywhere removes them.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import torch
from PIL import Image

from ..atomic import atomic_outputs
from ..imageio import DEFAULT_MAX_PIXELS
from ..pipeline import RemovalResult
from .framed import check_clip_framing, clip_framing, first_pass, framed_frames, framed_size
from .probe import VideoError, VideoInfo, open_input, probe_video, video_stream
from .smooth import MotionAwareSmoother
from .writers import ENCODINGS, FrameFolderWriter, VideoWriter

# Every output format, what it is (the CLI's and the page's choices come from here); the first two keep alpha.
FORMATS = {"webm": "WebM, VP9 with alpha (plays in browsers)",
           "mov": "MOV, ProRes 4444 with alpha (for video editors)",
           "png": "a folder of RGBA PNG frames",
           "mp4": "MP4, H.264 over a background"}
ALPHA_FORMATS = ("webm", "mov")
_UPRIGHT = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
_DONE = object()


@dataclass
class VideoResult:
    outputs: dict[str, Path]  # "video" (or "frames" for PNG) and "mask" -> where they were written
    frames: int
    fps: Fraction
    seconds: float  # wall time of the whole run
    info: VideoInfo | None = None
    # busy seconds per stage (they overlap): "decode" (to RGB), "network" (with smoothing),
    # "encode" (mask resize, composite, encoding and audio)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Failure:
    error: BaseException


def output_paths(src, out_dir, *, fmt: str = "webm", background=None, mask: bool = False) -> dict[str, Path]:
    """Where `remove_video` writes: {"video": OUT/<stem>.webm|.mov|.mp4} or {"frames": OUT/<stem>/},
    plus {"mask": OUT/<stem>_mask.mp4}. A background turns the default WebM into an H.264 MP4."""
    fmt = _resolve_format(fmt, background)
    stem, out_dir = Path(src).stem, Path(out_dir)
    paths = {"frames": out_dir / stem} if fmt == "png" else {"video": out_dir / f"{stem}{ENCODINGS[fmt].extension}"}
    if mask:
        paths["mask"] = out_dir / f"{stem}_mask.mp4"
    return paths


def _resolve_format(fmt: str, background) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if background is not None and background != "transparent" and fmt == "webm":
        return "mp4"  # an opaque result: H.264 plays everywhere
    if fmt == "mp4" and (background is None or background == "transparent"):
        raise ValueError("mp4 (H.264) has no alpha channel: give a background, or choose webm, mov or png")
    return fmt


class _Stages:
    """The decode and network threads, and the queues between them and the encoder."""

    def __init__(self, pipeline, info: VideoInfo, batch_size: int, smooth: bool):
        self.pipeline, self.info, self.batch_size = pipeline, info, batch_size
        self.smoother = MotionAwareSmoother() if smooth else None
        self.frames: queue.Queue = queue.Queue(maxsize=2 * batch_size)
        self.results: queue.Queue = queue.Queue(maxsize=2 * batch_size)
        self.stop = threading.Event()
        self.timings = {"decode": 0.0, "network": 0.0, "encode": 0.0}
        self.threads = [threading.Thread(target=self._guard, args=(self._decode, self.frames), name="video-decode",
                                         daemon=True),
                        threading.Thread(target=self._guard, args=(self._network, self.results), name="video-network",
                                         daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _put(self, target: queue.Queue, item) -> None:
        while not self.stop.is_set():
            try:
                target.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, source: queue.Queue):
        while not self.stop.is_set():
            try:
                return source.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def _guard(self, work, downstream: queue.Queue) -> None:
        try:
            work()
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed downstream, raised in the caller's thread
            try:
                self._put(downstream, _Failure(exc))
            except _Stopped:
                pass

    def _decode(self) -> None:
        with contextlib.closing(decoded_frames(self.info)) as frames:
            started = time.perf_counter()
            for item in frames:
                self.timings["decode"] += time.perf_counter() - started
                self._put(self.frames, item)
                started = time.perf_counter()
        self._put(self.frames, _DONE)

    def _network(self) -> None:
        finished = False
        while not finished:
            batch = []
            while len(batch) < self.batch_size:
                item = self._get(self.frames)
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, _Failure):
                    self._put(self.results, item)
                    return
                batch.append(item)
            if batch:
                started = time.perf_counter()
                probabilities = self._probabilities([image for image, _ in batch])
                self.timings["network"] += time.perf_counter() - started
                for item in zip(batch, probabilities):
                    self._put(self.results, item)
        self._put(self.results, _DONE)

    def _probabilities(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Per frame (1, h, w), in the stored orientation; the network sees the frames upright."""
        upright = _UPRIGHT.get(self.info.rotation)
        shown = [im.transpose(upright) for im in images] if upright is not None else images
        probabilities = self.pipeline.predict_probabilities(shown)
        if upright is not None:
            probabilities = torch.rot90(probabilities, k=-self.info.rotation // 90, dims=(2, 3))
        if self.smoother is None:
            return list(probabilities)
        return [self.smoother(p, im) for p, im in zip(probabilities, images)]

    def results_in_order(self):
        """(image, pts, probability) for each frame; raises what a stage raised."""
        while True:
            item = self.results.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            (image, pts), probability = item
            yield image, pts, probability

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.ident is not None:  # started
                thread.join()


def decoded_frames(info: VideoInfo):
    """(image, pts) of every frame of the clip, as stored (not turned upright); VideoError where it is corrupt."""
    index = 0
    step = max(1, round(1 / (info.fps * info.time_base)))  # one frame in time-base units, for missing pts
    with open_input(info.path) as container:
        stream = video_stream(container)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_image(), (frame.pts if frame.pts is not None else index * step)
                index += 1
        except av.error.FFmpegError as exc:
            raise VideoError(f"{info.path.name}: corrupt at frame {index + 1} (FFmpeg: {exc.strerror or exc})") \
                from None


class _Stopped(Exception):
    """The run was called off; a stage ends quietly."""


def _check_outputs(src: Path, paths: dict[str, Path], overwrite: bool) -> None:
    for path in paths.values():
        if path.resolve() == src.resolve():
            raise VideoError(f"{src.name}: the output {path} would overwrite the input; choose another folder")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def _open_writers(temporaries: dict[str, Path], fmt: str, info: VideoInfo) -> dict:
    writers = {}
    try:
        for kind, path in temporaries.items():
            if kind == "frames":
                path.rmdir()  # made by mkdtemp to reserve the name; the writer makes it again
                writers[kind] = FrameFolderWriter(path, info)
            elif kind == "video":
                writers[kind] = VideoWriter(path, ENCODINGS[fmt], info, audio=True)
            else:
                writers[kind] = VideoWriter(path, ENCODINGS["mp4"], info, audio=False)
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    return writers


def remove_video(pipeline, src, out_dir, *, fmt: str = "webm", background=None, mask: bool = False,
                 smooth: bool = False, refine: bool = False, batch_size: int | None = None, overwrite: bool = False,
                 max_seconds: float | None = None, progress: Callable[[int, int], None] | None = None,
                 framing=None) -> VideoResult:
    """Removes the background of every frame of `src`; see `output_paths` for what is written where.

    `background`: None (alpha video), a colour, "blur" or a PIL image. `mask`: also the matte as greyscale
    H.264. `smooth`: steady edges (temporal smoothing that follows motion). `framing`: `RemovalOptions`
    whose framing settings (crop, margin, canvas, scale, position, shadow) apply to every frame with one
    geometry for the clip (`video.framed`; its background and refine are the arguments above).
    `progress(done, total)` is called after each frame (twice per frame when framed: two passes). The
    input and the settings are checked first (`probe_video`; VideoError, OptionError), existing outputs
    are kept unless `overwrite` (FileExistsError), and on any failure no partial output is left behind."""
    started = time.perf_counter()
    src, out_dir = Path(src), Path(out_dir)
    fmt = _resolve_format(fmt, background)
    check_video_framing(framing, fmt, background, mask)
    options = clip_options(framing, background, refine)
    info = probe_video(src, max_seconds=max_seconds, max_pixels=getattr(pipeline, "max_pixels", DEFAULT_MAX_PIXELS))
    paths = output_paths(src, out_dir, fmt=fmt, background=background, mask=mask)
    _check_outputs(src, paths, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(pipeline, info, max(1, int(batch_size or pipeline.batch_size)), smooth)
    writers: dict = {}
    with atomic_outputs(paths, overwrite=overwrite, folders=frozenset({"frames"})) as temporaries:
        try:
            if options is None:
                writers.update(_open_writers(temporaries, fmt, info))
                done = _encode_all(stages, writers, pipeline, background, refine, info, progress)
            else:
                done = _encode_framed(stages, temporaries, writers, fmt, pipeline, options, info, progress)
            finishing = time.perf_counter()
            for writer in writers.values():
                writer.finish()
            stages.timings["encode"] += time.perf_counter() - finishing
        finally:
            stages.close()
            for writer in writers.values():
                writer.close()
    return VideoResult(paths, done, info.fps, time.perf_counter() - started, info, dict(stages.timings))


def check_video_framing(framing, fmt: str, background, mask: bool) -> None:
    """What `remove_video` checks of `framing` (OptionError) before any work, for planners to ask first."""
    options = clip_options(framing, background, False)
    if options is not None:
        check_clip_framing(options, _resolve_format(fmt, background), mask)


def clip_options(framing, background, refine: bool):
    """`framing` with the clip's background and refine, or None when it asks for no framing."""
    if framing is None or not framing.framed:
        return None
    return framing.replace(background=background, refine=refine)


def _encode_framed(stages: _Stages, temporaries: dict, writers: dict, fmt: str, pipeline, options,
                   info: VideoInfo, progress) -> int:
    """Both passes of a framed clip (`video.framed`); the writers are opened between them, once the
    clip's frame size is known, upright (the display rotation is applied to the pixels)."""
    upright = _UPRIGHT.get(info.rotation)
    stages.start()
    boxes, mattes = first_pass(stages.results_in_order(), pipeline, upright, progress, 2 * info.frames)
    with contextlib.closing(mattes):
        geometry = clip_framing(boxes, info.display_size, options, info.path.name)
        width, height = framed_size(geometry[0], options)
        writers.update(_open_writers(temporaries, fmt, replace(info, width=width, height=height, rotation=0)))
        done = 0
        with contextlib.closing(decoded_frames(info)) as frames:
            started = time.perf_counter()
            for picture, mask, pts in framed_frames(frames, mattes, boxes, options, geometry, pipeline.model_name,
                                                    upright):
                for kind, writer in writers.items():
                    writer.write(mask if kind == "mask" else picture, pts)
                done += 1
                stages.timings["encode"] += time.perf_counter() - started  # with the second decode and framing
                if progress is not None:
                    progress(len(boxes) + done, 2 * info.frames)
                started = time.perf_counter()
    if done != len(boxes):
        raise VideoError(f"{info.path.name}: {done} frames decoded the second time, {len(boxes)} the first")
    return done


def _encode_all(stages: _Stages, writers: dict, pipeline, background, refine: bool, info: VideoInfo,
                progress) -> int:
    done = 0
    stages.start()
    for image, pts, probability in stages.results_in_order():
        started = time.perf_counter()
        matte = pipeline.to_mask(probability, image.size)
        result = RemovalResult(image, matte, pipeline.model_name)
        picture = result.composite(background, refine)
        for kind, writer in writers.items():
            writer.write(matte if kind == "mask" else picture, pts)
        done += 1
        stages.timings["encode"] += time.perf_counter() - started
        if progress is not None:
            progress(done, info.frames)
    return done
