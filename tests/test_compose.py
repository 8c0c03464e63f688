"""Cut-outs, backgrounds and foreground colour estimation on images whose answer is known."""
import numpy as np
import pytest
from helpers import ASSETS
from PIL import Image

from rmbg_demo.compose import cover, cutout, estimate_foreground, parse_color, refine_cutout, replace_background


@pytest.fixture(scope="module")
def photo():
    return Image.open(ASSETS / "chelsea.jpg").convert("RGB")


@pytest.fixture(scope="module")
def ramp_mask(photo):
    """0 on the left, 255 on the right, a linear ramp in between."""
    width, height = photo.size
    ramp = np.clip((np.arange(width) - 150) * 255 / 150, 0, 255).astype(np.uint8)
    return Image.fromarray(np.tile(ramp, (height, 1)), "L")


def test_cutout_alpha_is_the_mask(photo, ramp_mask):
    out = np.asarray(cutout(photo, ramp_mask))
    assert np.array_equal(out[..., 3], np.asarray(ramp_mask))
    assert np.array_equal(out[..., :3], np.asarray(photo))


def test_cutout_alpha_is_the_minimum_of_the_images_own_alpha_and_the_mask(photo, ramp_mask):
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    alpha = np.asarray(cutout(rgba, ramp_mask))[..., 3].astype(int)
    assert np.array_equal(alpha, np.minimum(np.asarray(ramp_mask, int), 128))


def test_size_mismatch_is_refused(photo):
    with pytest.raises(ValueError, match="451x300 but mask is 10x10"):
        cutout(photo, Image.new("L", (10, 10)))


def test_colour_background(photo, ramp_mask):
    out = np.asarray(replace_background(photo, ramp_mask, "#00ff00"))
    mask = np.asarray(ramp_mask)
    assert (out[mask == 0] == [0, 255, 0]).all()
    assert np.array_equal(out[mask == 255], np.asarray(photo)[mask == 255])


def test_blur_and_image_backgrounds(photo, ramp_mask):
    blurred = np.asarray(replace_background(photo, ramp_mask, "blur"), int)
    left = np.asarray(photo, int)[:, :100]
    assert np.abs(blurred[:, :100] - left).mean() > 2  # the kept background is softened
    # A tall background with a marker at its centre: covering keeps its aspect ratio.
    tall = Image.new("RGB", (100, 400), (0, 0, 0))
    tall.paste((255, 0, 0), (40, 190, 60, 210))
    out = replace_background(photo, Image.new("L", photo.size, 0), tall)
    assert out.getpixel((225, 150))[0] > 200
    assert cover(tall, (451, 300)).size == (451, 300)


@pytest.mark.parametrize("spec, rgb", [("#ff8000", (255, 128, 0)), ("#f80", (255, 136, 0)), ("00ff00", (0, 255, 0)),
                                       ("white", (255, 255, 255)), ("rgb(1, 2, 3)", (1, 2, 3)),
                                       ("rgba(10,20,30,0.5)", (10, 20, 30)), ((4, 5, 6), (4, 5, 6))])
def test_parse_color(spec, rgb):
    assert parse_color(spec) == rgb


def test_parse_color_error():
    with pytest.raises(ValueError, match="not a colour: 'nocolour'"):
        parse_color("nocolour")


def test_foreground_estimation_removes_the_old_background_at_soft_edges():
    # A known foreground colour over a known background, mixed by a soft alpha ramp.
    height, width = 120, 200
    alpha = np.clip((np.arange(width) - 60) / 80, 0, 1)[None, :, None].repeat(height, axis=0)
    foreground = np.array([220.0, 40.0, 40.0])
    background = np.array([30.0, 200.0, 60.0])
    mixed = alpha * foreground + (1 - alpha) * background
    image = Image.fromarray(np.round(mixed).astype(np.uint8))
    mask = Image.fromarray(np.round(alpha[..., 0] * 255).astype(np.uint8), "L")
    estimated = np.asarray(estimate_foreground(image, mask), float)
    soft = (alpha[..., 0] > 0.15) & (alpha[..., 0] < 0.85)
    raw_error = np.abs(mixed[soft] - foreground).mean()
    refined_error = np.abs(estimated[soft] - foreground).mean()
    assert refined_error < raw_error / 4, (raw_error, refined_error)
    opaque = alpha[..., 0] == 1
    assert np.abs(estimated[opaque] - np.asarray(image, float)[opaque]).max() <= 1


def test_refined_cutout_keeps_the_mask(photo, ramp_mask):
    out = np.asarray(refine_cutout(photo, ramp_mask))
    assert out.shape == (300, 451, 4)
    assert np.array_equal(out[..., 3], np.asarray(ramp_mask))
