"""Framing for product photos, with known geometry: a built-in composite whose true mask is known, cut out
by the embedded model, then cropped, margined, placed on a canvas, shadowed; and colour profiles kept."""
import io

import numpy as np
import pytest
from helpers import ASSETS, display_p3_profile, rmbg_in_process, tinted_cmyk_profile
from PIL import Image, ImageCms

from rmbg_demo.framing import subject_box
from rmbg_demo.pipeline import RemovalPipeline
from rmbg_demo.request import OptionError, RemovalOptions, encoded_outputs, rendered

BENCHMARK = ASSETS.parent / "rmbg_demo" / "data" / "benchmark"


@pytest.fixture(scope="module")
def result():
    """0005.jpg (400x300) through u2netp (its mask's box is within 1 pixel of the true one)."""
    return RemovalPipeline("u2netp")(BENCHMARK / "images" / "0005.jpg")


@pytest.fixture(scope="module")
def true_box():
    return subject_box(Image.open(BENCHMARK / "masks" / "0005.png").convert("L"))


def alpha_box(image: Image.Image):
    return subject_box(image.getchannel("A") if image.mode == "RGBA" else image)


def test_crop_is_the_subjects_box_plus_the_margin(result, true_box):
    picture, mask = rendered(result, RemovalOptions(crop=True, margin="12"))
    assert abs(picture.width - (true_box.width + 24)) <= 3 and abs(picture.height - (true_box.height + 24)) <= 3
    assert mask.size == picture.size and picture.mode == "RGBA"
    picture, _ = rendered(result, RemovalOptions(crop=True, margin="10%"))
    assert abs(picture.width - true_box.width * 1.2) <= 4 and abs(picture.height - true_box.height * 1.2) <= 4


@pytest.mark.parametrize("position, where", [("center", (0.5, 0.5)), ("bottom", (0.5, 1.0)), ("25%,75%", (0.25, 0.75))])
def test_on_a_canvas_the_subject_has_the_asked_scale_and_position(result, position, where):
    canvas = (600, 500)
    picture, mask = rendered(result, RemovalOptions(canvas="600x500", scale="60%", position=position))
    assert picture.size == canvas == mask.size
    box = alpha_box(picture)
    limiting = max(box.width / canvas[0], box.height / canvas[1])
    assert limiting == pytest.approx(0.6, abs=0.02)  # the limiting side is 60 % of the canvas's
    free_x, free_y = canvas[0] - box.width, canvas[1] - box.height
    assert box.left == pytest.approx(where[0] * free_x, abs=0.02 * canvas[0])
    assert box.top == pytest.approx(where[1] * free_y, abs=0.02 * canvas[1])


def test_scale_and_position_without_a_canvas_move_the_subject_within_its_own_frame(result, true_box):
    """remove.bg's meaning: with no canvas, the output frame (the photo, or the crop) is the canvas. Before,
    --scale and --position without --canvas were silently ignored."""
    photo = result.image.size
    picture, mask = rendered(result, RemovalOptions(scale="50%"))
    box = alpha_box(picture)
    assert picture.size == photo == mask.size
    assert max(box.width / photo[0], box.height / photo[1]) == pytest.approx(0.5, abs=0.02)
    assert box.left == pytest.approx((photo[0] - box.width) / 2, abs=3)  # scaling centres it
    picture, _ = rendered(result, RemovalOptions(position="bottom"))
    box = alpha_box(picture)
    assert (box.width, box.height) == pytest.approx((true_box.width, true_box.height), abs=3)  # size kept
    assert box.bottom == pytest.approx(photo[1], abs=2)
    picture, _ = rendered(result, RemovalOptions(crop=True, margin="20", scale="50%"))
    assert max(alpha_box(picture).width / picture.width, alpha_box(picture).height / picture.height) == \
        pytest.approx(0.5, abs=0.02)
    assert RemovalOptions(position="original") == RemovalOptions()  # the default: the subject stays put


def test_resampling_onto_a_canvas_leaves_no_dark_fringe():
    """A flat red subject with a soft edge, scaled onto a white canvas: every edge pixel lies between the
    subject's colour and white (straight colours resampled through premultiplied alpha: nothing darker)."""
    from rmbg_demo.pipeline import RemovalResult

    size = 300
    ys, xs = np.mgrid[0:size, 0:size]
    soft = np.clip((0.35 * size - np.hypot(xs - size / 2, ys - size / 2)) / 6 + 0.5, 0, 1)
    subject = RemovalResult(Image.new("RGB", (size, size), (200, 40, 40)),
                            Image.fromarray((soft * 255).astype(np.uint8), "L"), "u2netp")
    for canvas in ("700x700", "150x150"):  # up and down
        picture, mask = rendered(subject, RemovalOptions(canvas=canvas, background="#ffffff"))
        pixels, alpha = np.asarray(picture, int), np.asarray(mask, int)
        assert picture.getpixel((1, 1)) == (255, 255, 255)
        edge = (alpha > 5) & (alpha < 250)
        assert edge.any()
        assert pixels[edge][:, 0].min() >= 198 and pixels[edge][:, 1:].min() >= 38, canvas


def test_a_drop_shadow_is_semi_transparent_black_outside_the_subject_on_its_offset_side(result):
    picture, mask = rendered(result, RemovalOptions(crop=True, margin="40", shadow="drop", shadow_offset="14,20",
                                                    shadow_blur="3", shadow_opacity="0.6"))
    alpha, subject = np.asarray(picture.getchannel("A"), int), np.asarray(mask, int)
    added = alpha - subject
    assert added.min() >= 0 and added.max() > 40  # only adds opacity
    shaded = (added > 10) & (subject == 0)
    assert shaded.any() and (added[subject == 255] == 0).all()  # never over the subject
    rows, columns = np.nonzero(shaded)
    box = subject_box(mask)
    assert columns.mean() > (box.left + box.right) / 2 and rows.mean() > (box.top + box.bottom) / 2
    assert np.asarray(picture.convert("RGB"))[shaded].max() <= 10  # black
    plain, _ = rendered(result, RemovalOptions(crop=True, margin="40"))
    assert np.array_equal(np.asarray(plain.getchannel("A")), subject)  # the mask output has no shadow


def test_a_subject_free_image_keeps_the_full_frame(caplog):
    empty = RemovalPipeline("u2netp")(Image.new("RGB", (64, 48), (128, 128, 128)))
    empty.mask = Image.new("L", (64, 48), 0)
    picture, _ = rendered(empty, RemovalOptions(crop=True, margin="10"))
    assert picture.size == (64, 48) and "no subject found" in caplog.text


def test_the_photos_colour_profile_is_kept_or_converted_to_srgb(tmp_path):
    p3 = display_p3_profile()
    photo = Image.open(ASSETS / "coffee.jpg").convert("RGB")
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        photo.save(buffer, fmt, icc_profile=p3, **({"lossless": True} if fmt == "WEBP" else {}))
        result = RemovalPipeline("u2netp")(buffer.getvalue())
        kept = Image.open(io.BytesIO(encoded_outputs(result, RemovalOptions(format=fmt), ["image"])["image"]))
        assert kept.info.get("icc_profile") == p3, fmt
    converted = Image.open(io.BytesIO(encoded_outputs(result, RemovalOptions(srgb=True), ["image"])["image"]))
    assert not converted.info.get("icc_profile")
    expected = ImageCms.profileToProfile(photo, ImageCms.ImageCmsProfile(io.BytesIO(p3)),
                                         ImageCms.createProfile("sRGB"))
    solid = np.asarray(converted.getchannel("A")) == 255
    assert np.abs(np.asarray(converted.convert("RGB"), int)[solid] - np.asarray(expected, int)[solid]).max() <= 1


def test_cmyk_comes_out_as_rgb_and_upright(tmp_path):
    photo = Image.open(ASSETS / "chelsea.jpg")
    cmyk = photo.convert("CMYK")
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: to be shown turned 90 degrees
    cmyk.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif)
    result = RemovalPipeline("u2netp")(buffer.getvalue())
    out = Image.open(io.BytesIO(encoded_outputs(result, RemovalOptions(), ["image"])["image"]))
    assert out.size == photo.size and out.mode == "RGBA" and not out.getexif().get(0x0112)
    reference = np.asarray(Image.open(buffer).transpose(Image.Transpose.ROTATE_270).convert("RGB"), int)
    assert np.abs(np.asarray(out.convert("RGB"), int) - reference).mean() < 2


CMYK_PATCHES = {"paper": (0, 0, 0, 0), "cyan": (255, 0, 0, 0), "magenta": (0, 255, 0, 0),
                "mixed": (128, 64, 32, 0), "dark": (40, 40, 40, 160)}


def cmyk_swatches(path, icc: bytes) -> Image.Image:
    """A CMYK JPEG of flat 40x40 patches, saved by Pillow with `icc` embedded (and, as Pillow writes CMYK,
    Photoshop's APP14 "Adobe" marker and inverted values); returns the CMYK image as it was meant."""
    cmyk = Image.new("CMYK", (40 * len(CMYK_PATCHES), 40))
    for index, ink in enumerate(CMYK_PATCHES.values()):
        cmyk.paste(ink, (40 * index, 0, 40 * index + 40, 40))
    cmyk.save(path, "JPEG", quality=100, icc_profile=icc)
    return cmyk


def patch_colours(image: Image.Image) -> dict[str, np.ndarray]:
    """Each patch's median colour, away from its edges (JPEG ringing)."""
    pixels = np.asarray(image)
    return {name: np.median(pixels[10:30, 40 * i + 10:40 * i + 30].reshape(-1, pixels.shape[2]), axis=0)
            for i, name in enumerate(CMYK_PATCHES)}


@pytest.mark.parametrize("srgb", [False, True])
def test_a_cmyk_jpeg_is_converted_through_its_embedded_profile(tmp_path, srgb):
    icc = tinted_cmyk_profile()
    source = tmp_path / "swatches.jpg"
    meant = cmyk_swatches(source, icc)
    with Image.open(source) as stored:  # an Adobe-style inverted CMYK JPEG, read back uninverted (no double)
        assert stored.info.get("adobe") and stored.info["icc_profile"] == icc
        read = {name: tuple(colour) for name, colour in patch_colours(stored).items()}
        assert all(np.abs(np.subtract(read[name], ink)).max() <= 2 for name, ink in CMYK_PATCHES.items()), read
    run = rmbg_in_process("remove", source, "-o", tmp_path / "out", "--model", "u2netp", *(["--srgb"] if srgb else []))
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "out" / "swatches.png") as out:
        assert out.info.get("icc_profile") is None  # sRGB now: the CMYK profile does not describe RGB
        got = patch_colours(out.convert("RGB"))  # a cut-out keeps the colours under its alpha
    expected = patch_colours(ImageCms.profileToProfile(meant, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                                       ImageCms.createProfile("sRGB"), outputMode="RGB"))
    naive = patch_colours(meant.convert("RGB"))
    for name in CMYK_PATCHES:
        assert np.abs(got[name] - expected[name]).max() <= 3, (name, got[name], expected[name])
    for name in ("cyan", "magenta", "mixed"):  # the profile's inks, not 255 - x
        assert np.abs(got[name] - naive[name]).max() >= 60, (name, got[name], naive[name])


def test_a_cmyk_profile_that_cannot_be_used_is_reported_not_ignored(caplog):
    from rmbg_demo.imageio import load_image

    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(buffer, "JPEG", icc_profile=display_p3_profile())  # an RGB one
    with caplog.at_level("WARNING"):
        image = load_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((4, 4)) == pytest.approx((0, 255, 255), abs=2)
    assert "embedded colour profile cannot be used" in caplog.text


def test_an_input_alpha_and_the_mask_combine_as_their_minimum(result):
    rgba = result.image.convert("RGBA")
    own = np.zeros((rgba.height, rgba.width), np.uint8)
    own[:, : rgba.width // 2] = 255
    own[:, rgba.width // 2:] = 100
    rgba.putalpha(Image.fromarray(own))
    with_alpha = RemovalPipeline("u2netp")(rgba)
    cut = np.asarray(with_alpha.cutout().getchannel("A"))
    assert np.array_equal(cut, np.minimum(own, np.asarray(with_alpha.mask)))


@pytest.mark.parametrize("flags, words", [
    (["--margin", "-5"], "margin '-5'"), (["--scale", "0"], "scale '0': from 1% to 100%"),
    (["--scale", "500%"], "scale '500%'"), (["--canvas", "0x10"], "canvas '0x10'"),
    (["--canvas", "9000x9000"], "at most 50 MP"), (["--position", "middle"], "position 'middle'"),
    (["--shadow", "drop", "--shadow-opacity", "2"], "shadow opacity '2'"),
    (["--shadow-offset", "5"], "shadow offset '5'"),
])
def test_bad_framing_settings_are_refused_before_any_image_is_read(tmp_path, flags, words):
    run = rmbg_in_process("remove", ASSETS / "chelsea.jpg", "-o", tmp_path / "out", "--model", "u2netp", *flags)
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(OptionError):
        RemovalOptions.from_query({flag.lstrip("-").replace("-", "_"): value
                                   for flag, value in zip(flags[::2], flags[1::2])})


def test_a_stray_speck_does_not_widen_the_subjects_box():
    alpha = Image.new("L", (400, 300), 0)
    alpha.paste(255, (100, 80, 260, 220))
    alpha.paste(255, (380, 10, 382, 12))  # a 2x2 speck far away
    assert subject_box(alpha) == subject_box(alpha.crop((0, 0, 400, 300)).point(lambda v: v)) is not None
    box = subject_box(alpha)
    assert (box.left, box.top, box.right, box.bottom) == (100, 80, 260, 220)
    assert subject_box(Image.new("L", (400, 300), 0)) is None
