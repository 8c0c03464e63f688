"""Framing for clips: real tiny clips (a horse crossing a brick wall, made here with PyAV), the embedded
u2netp model, the outputs decoded back. One geometry for the whole clip: the crop is the union of the
frames' subject boxes, so the frame size never changes; a canvas, its position and a shadow apply to every
frame; the shadow is in the alpha of an alpha video and not in the mask video."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import rmbg_in_process
from PIL import Image
from test_video import decode_video, moving_subject, upright_to_stored, write_clip

from rmbg_demo.framing import Box, subject_box
from rmbg_demo.pipeline import RemovalPipeline
from rmbg_demo.request import OptionError, RemovalOptions
from rmbg_demo.video import remove_video
from rmbg_demo.video.framed import clip_geometry, union


@pytest.fixture(scope="module")
def pipeline():
    return RemovalPipeline("u2netp")


@pytest.fixture(scope="module")
def phone_clip(tmp_path_factory):
    """5 frames stored sideways with a 90 degree display matrix (as phones record); the upright true mattes."""
    images, truths = moving_subject(frames=5)
    folder = tmp_path_factory.mktemp("phone")
    return write_clip(folder / "clip.mp4", [upright_to_stored(im, 90) for im in images], rotation=90,
                      audio=False), truths


def decoded_boxes(pipeline, clip):
    """The subject box of each frame's mask, from the clip's frames decoded here and turned upright."""
    frames, _ = decode_video(clip, fmt="rgb24")
    pictures = [Image.fromarray(np.rot90(rgb)) for _, _, rgb in frames]  # 90 degrees counter-clockwise
    probabilities = pipeline.predict_probabilities(pictures)
    return [subject_box(pipeline.to_mask(p, im.size)) for p, im in zip(probabilities, pictures)]


def test_crop_is_one_frame_size_for_the_clip_the_union_of_its_frames_boxes(pipeline, phone_clip, tmp_path):
    clip, truths = phone_clip
    result = remove_video(pipeline, clip, tmp_path, mask=True, framing=RemovalOptions(crop=True, margin="3"))
    boxes = decoded_boxes(pipeline, clip)
    clip_box = union(boxes)
    assert clip_box.width > max(box.width for box in boxes) + 20  # the horse moves: the union is wider
    true_box = union(subject_box(Image.fromarray(truth.astype(np.uint8) * 255)) for truth in truths)
    assert abs(clip_box.width - true_box.width) <= 3 and abs(clip_box.height - true_box.height) <= 3
    expected = (clip_box.width + 6, clip_box.height + 6)
    for kind, fmt, decoder in (("video", "rgba", "libvpx-vp9"), ("mask", "gray", None)):
        frames, rotation = decode_video(result.outputs[kind], alpha_decoder=decoder, fmt=fmt)
        sizes = {(pixels.shape[1], pixels.shape[0]) for _, _, pixels in frames}
        assert len(frames) == 5 and len(sizes) == 1, sizes  # one size for the whole clip
        (width, height), = sizes
        assert width % 2 == 0 and height % 2 == 0  # rounded outward to even: H.264 takes nothing else
        assert 0 <= width - expected[0] <= 2 and 0 <= height - expected[1] <= 2, (sizes, expected)
        assert width > height and rotation == 0  # framed upright, as the viewer sees the clip
    first, last = decode_video(result.outputs["video"], alpha_decoder="libvpx-vp9")[0][0::4]
    # the horse crosses the frame: at the left edge (plus the margin) first, at the right edge last
    assert subject_box(Image.fromarray(first[2][..., 3])).left == pytest.approx(3, abs=2)
    assert subject_box(Image.fromarray(last[2][..., 3])).right == pytest.approx(expected[0] - 3, abs=3)


def test_a_canvas_with_a_shadow_is_the_canvas_size_with_the_shadow_in_alpha_not_in_the_mask(pipeline, phone_clip,
                                                                                           tmp_path):
    clip, _ = phone_clip
    framing = RemovalOptions(canvas="240x100", position="bottom", shadow="drop", shadow_offset="6,-8",
                             shadow_blur="2", shadow_opacity="0.6")
    result = remove_video(pipeline, clip, tmp_path, fmt="mov", mask=True, framing=framing)
    pictures, _ = decode_video(result.outputs["video"])  # ProRes 4444: alpha kept at 10 bits
    masks, _ = decode_video(result.outputs["mask"], fmt="gray")
    assert len(pictures) == len(masks) == 5
    for (_, _, rgba), (_, _, mask) in zip(pictures, masks):
        assert rgba.shape == (100, 240, 4) and mask.shape == (100, 240)
        alpha = rgba[..., 3].astype(int)
        shadow = (alpha > 40) & (alpha < 200) & (mask.astype(int) < 8)  # semi-transparent, off the subject
        assert shadow.sum() > 50
        assert (alpha[mask > 250] > 240).all()  # the subject itself stays opaque
        assert subject_box(Image.fromarray(mask)).bottom == pytest.approx(100, abs=2)  # standing on the bottom


def test_a_clip_without_a_subject_keeps_the_full_frame_and_says_so_once(pipeline, tmp_path, caplog):
    flat = [np.full((120, 160, 3), 128, np.uint8)] * 3
    clip = write_clip(tmp_path / "empty.mp4", flat, audio=False)
    with caplog.at_level(logging.WARNING):
        result = remove_video(pipeline, clip, tmp_path / "out", framing=RemovalOptions(crop=True, margin="10"))
    frames, _ = decode_video(result.outputs["video"], alpha_decoder="libvpx-vp9")
    assert {rgba.shape for _, _, rgba in frames} == {(120, 160, 4)}
    assert [r.getMessage() for r in caplog.records] == ["empty.mp4: no subject in any frame; the full frame is kept"]


def test_an_odd_canvas_for_h264_is_refused_before_any_frame(pipeline, phone_clip, tmp_path):
    with pytest.raises(OptionError, match=r"canvas '241x100'.*even sides, e.g. 242x100"):
        remove_video(pipeline, phone_clip[0], tmp_path / "out", mask=True, framing=RemovalOptions(canvas="241x100"))
    assert not (tmp_path / "out").exists()
    run = rmbg_in_process("remove", phone_clip[0], "-o", tmp_path / "cli", "--model", "u2netp", "--canvas", "241x100",
                          "--background", "white")
    assert run.returncode == 1 and "canvas '241x100'" in run.stderr
    assert not list(Path(tmp_path / "cli").glob("*"))  # nothing written, not even a partial file


def test_bad_framing_settings_fail_before_a_clip_is_read(phone_clip, tmp_path):
    run = rmbg_in_process("remove", phone_clip[0], "-o", tmp_path, "--model", "u2netp", "--crop", "--scale", "0")
    assert run.returncode == 2 and "scale '0'" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_frames_without_a_subject_do_not_shrink_the_clips_box():
    assert union([None, Box(10, 20, 40, 50), None, Box(30, 5, 60, 45), None]) == Box(10, 5, 60, 50)
    assert union([None, None]) is None


def test_a_clips_crop_is_rounded_outward_to_even_sides():
    options = RemovalOptions(crop=True, margin="2")
    region, content = clip_geometry(Box(10, 20, 41, 49), (160, 120), options)  # 31x29, 35x33 with the margin
    assert (region.left, region.top, region.width, region.height) == (8, 18, 36, 34)
    assert content == Box(2, 2, 33, 31)  # the subject stays where the margin put it


def test_the_pages_video_tab_applies_the_framing_group(pipeline, phone_clip, tmp_path):
    import gradio as gr

    from rmbg_demo.ui import page_options
    from rmbg_demo.ui_video import VideoHandler

    folders = iter([tmp_path / "first", tmp_path / "second"])

    def new_folder() -> Path:
        folder = next(folders)
        folder.mkdir()
        return folder

    handler = VideoHandler(SimpleNamespace(get=lambda model, size: pipeline), SimpleNamespace(new=new_folder), None,
                           page_options)
    settings = dict(model="u2netp", smooth=False, canvas="240x100", position="bottom", shadow="drop")
    played, files, info = handler(str(phone_clip[0]), progress=lambda *args, **kwargs: None, **settings)
    assert "framed" in info
    for path, fmt, decoder in zip(files, ("rgba", "gray"), ("libvpx-vp9", None)):
        frames, _ = decode_video(path, alpha_decoder=decoder, fmt=fmt)
        assert {pixels.shape[:2] for _, _, pixels in frames} == {(100, 240)}
    with pytest.raises(gr.Error, match="canvas '241x100'"):  # the page's matte is H.264: even sides only
        handler(str(phone_clip[0]), progress=lambda *args, **kwargs: None, **{**settings, "canvas": "241x100"})
