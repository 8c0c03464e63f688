"""Video: real clips made here with PyAV (tiny, a horse crossing a brick wall, a 440 Hz tone), the embedded
u2netp model, and the outputs decoded back to check what a user relies on: alpha, timing, rotation, audio."""
from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageFilter

from rmbg_demo.pipeline import RemovalPipeline
from rmbg_demo.video import VideoError, classify_media, is_video, probe_video, remove_video

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SIZE = (160, 120)
HORSE_COLOUR = np.array([150, 75, 40], dtype=np.uint8)


def moving_subject(size=SIZE, frames=24, *, texture="brick", noise=0.0, jitter=0.0, hold=0, seed=0):
    """Frames of a chestnut horse silhouette crossing a tinted texture, with the true mattes (bool).

    `noise`: per-frame Gaussian noise (grey levels); `jitter`: per-frame exposure change (fraction);
    `hold`: the horse stands still for this many frames at the start and at the end."""
    rng = np.random.default_rng(seed)
    width, height = size
    ground = np.asarray(Image.open(ASSETS / f"{texture}.jpg").convert("L").resize(size), dtype=np.float32)
    background = ground[..., None] * np.array([0.8, 0.7, 0.6], dtype=np.float32)
    horse = Image.open(ASSETS / "horse_mask.png").convert("L")
    horse_width = width // 2
    horse = np.asarray(horse.resize((horse_width, round(horse.height * horse_width / horse.width)))) >= 128
    top = (height - horse.shape[0]) // 2
    moving = max(1, frames - 2 * hold)
    images, truths = [], []
    for index in range(frames):
        step = min(max(index - hold, 0), moving - 1)
        left = 4 + round(step * (width - horse_width - 8) / max(1, moving - 1))
        truth = np.zeros((height, width), dtype=bool)
        truth[top:top + horse.shape[0], left:left + horse_width] = horse
        picture = np.where(truth[..., None], HORSE_COLOUR.astype(np.float32), background)
        picture = picture * (1 + jitter * rng.uniform(-1, 1)) + rng.normal(0, noise, picture.shape) * (noise > 0)
        images.append(np.clip(picture + 0.5, 0, 255).astype(np.uint8))
        truths.append(truth)
    return images, truths


def write_clip(path, images, *, fps=12, audio=True, rotation=0, codec="libx264", pts=None, container_format=None,
               crf=12):
    """An H.264 (or other) clip of RGB frames, with a 440 Hz tone as long as the video."""
    height, width = images[0].shape[:2]
    with av.open(str(path), "w", format=container_format) as out:
        video = out.add_stream(codec, rate=fps, options={"crf": str(crf)} if codec == "libx264" else {})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, fps * 10)
        if rotation:
            video.set_display_rotation(rotation)
        tone = out.add_stream("aac", rate=48000) if audio else None
        if tone is not None:
            tone.layout = "mono"
        for index, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts[index] if pts is not None else index * 10
            frame.time_base = Fraction(1, fps * 10)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if tone is not None:
            samples = np.sin(2 * np.pi * 440 * np.arange(48000 * len(images) // fps) / 48000).astype(np.float32) * 0.3
            for start in range(0, len(samples), 1024):
                frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 48000, start
                out.mux(tone.encode(frame))
            out.mux(tone.encode(None))
    return Path(path)


def upright_to_stored(array: np.ndarray, rotation: int) -> np.ndarray:
    """What a phone stores for an upright scene shown with a `rotation` (counter-clockwise) display matrix."""
    return np.ascontiguousarray(np.rot90(array, k=-rotation // 90))


def iou(alpha: np.ndarray, truth: np.ndarray) -> float:
    found = alpha >= 128
    return (found & truth).sum() / max(1, (found | truth).sum())


def decode_video(path, *, alpha_decoder: str | None = None, fmt: str = "rgba"):
    """[(pts seconds, HxWxC array)] of every frame, and the first frame's rotation. `alpha_decoder`: a
    decoder to use instead of FFmpeg's default (its native vp9 decoder drops the alpha channel)."""
    frames, rotation = [], None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoder = av.CodecContext.create(alpha_decoder, "r") if alpha_decoder else stream.codec_context
        for packet in container.demux(stream):
            for frame in decoder.decode(packet if packet.size else None):
                rotation = frame.rotation if rotation is None else rotation
                seconds = float(frame.pts * (frame.time_base or stream.time_base))
                frames.append((seconds, frame.format.name, frame.to_ndarray(format=fmt)))
    return frames, rotation


def decode_audio(path) -> tuple[str, int, np.ndarray] | None:
    """(codec, sample rate, mono samples) of the first audio track, or None."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray().reshape(frame.layout.nb_channels if frame.format.is_planar else 1, -1)[0]
                  for frame in container.decode(stream)]
        return stream.codec_context.name, stream.codec_context.sample_rate, np.concatenate(chunks)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.fixture(scope="module")
def pipeline():
    return RemovalPipeline("u2netp")


@pytest.fixture(scope="module")
def phone_clip(tmp_path_factory):
    """12 frames at 12 fps (1 s), stored sideways with a 90 degree display matrix, as phones record; a tone."""
    images, truths = moving_subject(frames=12)
    folder = tmp_path_factory.mktemp("phone")
    path = write_clip(folder / "clip.mp4", [upright_to_stored(im, 90) for im in images], rotation=90)
    return path, [upright_to_stored(t, 90) for t in truths]


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """6 frames, upright, no rotation, with a tone: for the other formats."""
    images, truths = moving_subject(frames=6)
    return write_clip(tmp_path_factory.mktemp("short") / "short.mp4", images), truths


@pytest.fixture(scope="module")
def webm_run(pipeline, phone_clip, tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("webm")
    result = remove_video(pipeline, phone_clip[0], out, mask=True, progress=lambda done, total: calls.append((done, total)))
    return result, calls, out


def test_probe_reads_what_the_container_says(phone_clip):
    info = probe_video(phone_clip[0])
    assert (info.width, info.height, info.display_size) == (120, 160, (160, 120))
    assert (info.frames, info.fps, info.rotation, info.has_audio, info.codec) == (12, 12, 90, True, "h264")
    assert info.duration == pytest.approx(1.0)
    assert is_video(phone_clip[0])


def test_webm_has_alpha_that_matches_the_subject(webm_run, phone_clip):
    result, _, out = webm_run
    assert result.outputs == {"video": out / "clip.webm", "mask": out / "clip_mask.mp4"}
    frames, _ = decode_video(result.outputs["video"], alpha_decoder="libvpx-vp9")
    assert len(frames) == result.frames == 12
    assert {name for _, name, _ in frames} == {"yuva420p"}
    truths = phone_clip[1]
    scores = [iou(rgba[..., 3], truth) for (_, _, rgba), truth in zip(frames, truths)]
    assert min(scores) >= 0.85, scores


def test_webm_keeps_frame_rate_duration_and_audio(webm_run):
    result, _, _ = webm_run
    info = probe_video(result.outputs["video"])
    assert (info.frames, info.fps, info.rotation) == (12, 12, 90)  # shown upright, like the input
    assert info.duration == pytest.approx(1.0, abs=0.01)
    frames, _ = decode_video(result.outputs["video"])
    assert [round(seconds * 12) for seconds, _, _ in frames] == list(range(12))
    codec, rate, samples = decode_audio(result.outputs["video"])
    assert codec == "opus" and len(samples) / rate == pytest.approx(1.0, abs=0.05)
    assert dominant_hz(samples, rate) == pytest.approx(440, abs=5)


def test_mask_video_is_the_matte_in_grey(webm_run, phone_clip):
    result, _, _ = webm_run
    frames, rotation = decode_video(result.outputs["mask"], fmt="gray")
    assert len(frames) == 12 and rotation == 90
    assert min(iou(grey, truth) for (_, _, grey), truth in zip(frames, phone_clip[1])) >= 0.85
    assert decode_audio(result.outputs["mask"]) is None


def test_progress_counts_every_frame(webm_run):
    _, calls, _ = webm_run
    assert calls == [(n, 12) for n in range(1, 13)]


def test_mov_is_prores_4444_with_alpha(pipeline, short_clip, tmp_path):
    result = remove_video(pipeline, short_clip[0], tmp_path, fmt="mov")
    assert result.outputs == {"video": tmp_path / "short.mov"}
    frames, _ = decode_video(result.outputs["video"])
    assert len(frames) == 6 and all(name.startswith("yuva444p") for _, name, _ in frames)  # 4:4:4 with alpha
    with av.open(str(result.outputs["video"])) as container:
        assert container.streams.video[0].codec_context.codec_tag == "ap4h"  # ProRes 4444
    assert min(iou(rgba[..., 3], truth) for (_, _, rgba), truth in zip(frames, short_clip[1])) >= 0.85
    assert decode_audio(result.outputs["video"])[0] == "aac"


def test_background_gives_h264_with_the_subject_over_it(pipeline, short_clip, tmp_path):
    result = remove_video(pipeline, short_clip[0], tmp_path, background="#00ff00")
    assert result.outputs == {"video": tmp_path / "short.mp4"}
    with av.open(str(result.outputs["video"])) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    frames, _ = decode_video(result.outputs["video"], fmt="rgb24")
    assert len(frames) == 6 and {name for _, name, _ in frames} == {"yuv420p"}  # no alpha
    for (_, _, rgb), truth in zip(frames, short_clip[1]):
        inside = np.asarray(Image.fromarray(truth).filter(ImageFilter.MinFilter(5)))
        outside = ~np.asarray(Image.fromarray(truth).filter(ImageFilter.MaxFilter(5)))
        assert np.abs(np.median(rgb[inside], axis=0) - HORSE_COLOUR).max() < 16
        assert np.abs(np.median(rgb[outside], axis=0) - (0, 255, 0)).max() < 16
    codec, rate, samples = decode_audio(result.outputs["video"])
    assert codec == "aac" and dominant_hz(samples, rate) == pytest.approx(440, abs=5)


def test_png_frames_are_rgba_and_upright(pipeline, tmp_path):
    images, truths = moving_subject(frames=4)
    clip = write_clip(tmp_path / "turned.mp4", [upright_to_stored(im, 90) for im in images], rotation=90, audio=False)
    result = remove_video(pipeline, clip, tmp_path / "out", fmt="png")
    folder = tmp_path / "out" / "turned"
    assert result.outputs == {"frames": folder}
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["000001.png", "000002.png", "000003.png", "000004.png"]
    for name, truth in zip(names, truths):
        with Image.open(folder / name) as frame:
            assert frame.mode == "RGBA" and frame.size == SIZE  # upright: the display size
            assert iou(np.asarray(frame.getchannel("A")), truth) >= 0.85


def test_variable_frame_rate_timing_is_kept(pipeline, tmp_path):
    images, _ = moving_subject(frames=6)
    pts = [0, 10, 15, 40, 45, 70]  # in 1/120 s: frames 83, 42, 208, 42 and 208 ms apart
    clip = write_clip(tmp_path / "vfr.mp4", images, pts=pts, audio=False)
    assert probe_video(clip).variable_rate
    result = remove_video(pipeline, clip, tmp_path / "out")
    frames, _ = decode_video(result.outputs["video"], alpha_decoder="libvpx-vp9")
    assert [round(seconds * 1000) for seconds, _, _ in frames] == [round(p * 1000 / 120) for p in pts]


def test_existing_outputs_are_kept_unless_overwrite(pipeline, short_clip, tmp_path):
    (tmp_path / "short.webm").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        remove_video(pipeline, short_clip[0], tmp_path)
    assert (tmp_path / "short.webm").read_bytes() == b"precious"
    remove_video(pipeline, short_clip[0], tmp_path, overwrite=True)
    assert is_video(tmp_path / "short.webm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.webm"]  # no temporary files left


def test_a_run_stopped_midway_leaves_nothing_behind(pipeline, short_clip, tmp_path):
    def stop_at_third(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        remove_video(pipeline, short_clip[0], tmp_path, mask=True, fmt="png", progress=stop_at_third)
    assert list(tmp_path.iterdir()) == []


def truncated(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[:len(source.read_bytes()) * 6 // 10])
    return target


def y4m_header(width: int, height: int) -> bytes:
    """A raw YUV4MPEG2 stream header: states the frame size, holds no frame."""
    return f"YUV4MPEG2 W{width} H{height} F12:1 Ip A1:1 C420jpeg\n".encode()


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def many_streams(path: Path, count: int = 200) -> Path:
    """A Matroska file with one frame of video and `count` tiny attachments (each one a stream)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=12)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        for index in range(count):
            out.add_attachment(f"{index}.txt", "text/plain", b"x")
        out.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        out.mux(video.encode(None))
    return path


BAD_INPUTS = {
    "truncated mp4": (lambda d, clip: truncated(clip, d / "cut.mp4"), {}, "truncated"),
    "truncated webm": (lambda d, clip: truncated(write_clip(d / "whole.webm", moving_subject()[0], audio=False,
                                                            codec="libvpx-vp9"), d / "cut.webm"), {}, "truncated"),
    "zero frames": (lambda d, clip: (d / "empty.y4m").write_bytes(y4m_header(160, 120)) and d / "empty.y4m", {},
                    "no frames"),
    "audio only": (lambda d, clip: audio_only(d / "song.mp4"), {}, "no video stream"),
    "absurd size": (lambda d, clip: (d / "huge.y4m").write_bytes(y4m_header(10000, 6000) + b"FRAME\n" + bytes(4096))
                    and d / "huge.y4m", {}, r"10000x6000 \(60.0 MP\), over the 50.0 MP limit"),
    "many streams": (lambda d, clip: many_streams(d / "streams.mkv"), {}, "201 streams"),
    "image renamed": (lambda d, clip: shutil.copy(ASSETS / "chelsea.jpg", d / "cat.mp4") and d / "cat.mp4", {},
                      r"an image \(JPEG\), not a video"),
    "too long": (lambda d, clip: clip, {"max_seconds": 0.5}, r"1.0 s long, over the 0.5 s limit"),
    "not a file": (lambda d, clip: d / "missing.mp4", {}, "no such file"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_refused_before_any_work(kind, pipeline, phone_clip, tmp_path):
    make, options, message = BAD_INPUTS[kind]
    folder = tmp_path / "in"
    folder.mkdir()
    bad = make(folder, phone_clip[0])
    with pytest.raises(VideoError, match=message):
        remove_video(pipeline, bad, tmp_path / "out", mask=True, **options)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_videos_are_recognised_by_content(phone_clip, tmp_path):
    renamed_video = tmp_path / "clip.jpg"
    shutil.copy(phone_clip[0], renamed_video)
    shutil.copy(ASSETS / "chelsea.jpg", tmp_path / "cat.mp4")
    (tmp_path / "notes.webm").write_text("not a video\n" * 20)
    assert is_video(renamed_video)
    assert not is_video(tmp_path / "cat.mp4")
    assert not is_video(audio_only(tmp_path / "song.mp4"))
    assert not is_video(tmp_path / "notes.webm")
    assert not is_video(tmp_path / "missing.mp4")


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# Files that look like a video but cannot be used: classify_media says what is wrong instead of passing
# them on to the image decoder (which could only say "not an image").
UNUSABLE_VIDEOS = {
    "truncated mp4": (lambda d, clip: truncated(clip, d / "cut.mp4"),
                      r"cut.mp4: an MP4/MOV file without its index \(moov atom\): the file is truncated"),
    "zero-byte mp4": (lambda d, clip: written(d / "empty.mp4", b""), r"empty.mp4: the file is empty \(0 bytes\)"),
    "audio only": (lambda d, clip: audio_only(d / "song.mp4"), r"song.mp4: no video stream \(the file holds audio\)"),
    "20000x20000 y4m": (lambda d, clip: written(d / "huge.y4m", y4m_header(20000, 20000) + b"FRAME\n" + bytes(4096)),
                        r"huge.y4m: frames are 20000x20000 \(400.0 MP\), over the 50.0 MP limit per frame"),
}


@pytest.mark.parametrize("case", UNUSABLE_VIDEOS)
def test_classify_media_says_what_is_wrong_with_a_video(case, phone_clip, tmp_path):
    make, message = UNUSABLE_VIDEOS[case]
    path = make(tmp_path, phone_clip[0])
    with pytest.raises(VideoError, match=message):
        classify_media(path)
    with pytest.raises(VideoError, match=message):
        probe_video(path)


def test_classify_media_leaves_images_to_the_image_decoder(phone_clip, tmp_path):
    assert classify_media(phone_clip[0]) == "video"
    shutil.copy(phone_clip[0], tmp_path / "clip")  # no extension: judged by content
    assert classify_media(tmp_path / "clip") == "video"
    shutil.copy(ASSETS / "chelsea.jpg", tmp_path / "cat.mp4")
    assert classify_media(tmp_path / "cat.mp4") == "image"  # a JPEG renamed .mp4 is an image
    assert classify_media(written(tmp_path / "notes.webm", b"not a video\n" * 20)) == "image"  # no container at all
    assert classify_media(written(tmp_path / "blank", b"")) == "image"  # empty, no video extension
    # An image extension always goes to the image decoder, which names its own problems; nothing is opened.
    shutil.copy(phone_clip[0], tmp_path / "clip.jpg")
    assert classify_media(tmp_path / "clip.jpg") == "image"
    assert classify_media(written(tmp_path / "empty.png", b"")) == "image"
    assert classify_media(tmp_path / "absent.png") == "image"
    with pytest.raises(VideoError, match="no such file"):
        classify_media(tmp_path / "absent.mp4")
    assert is_video(tmp_path / "clip.jpg")  # is_video still judges by content alone
