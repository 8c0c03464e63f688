"""Every input kind and mode decodes to what the pipeline expects; bad data is refused by name."""
import io
import os
import re

import numpy as np
import pytest
from helpers import (
    ASSETS,
    bomb_png,
    image_with_broken_header,
    png_with_bad_crc,
    png_with_corrupt_idat,
    small_image_bytes,
    truncated_image,
    ztxt_bomb_png,
)
from PIL import Image

from rmbg_demo.atomic import write_atomic
from rmbg_demo.imageio import ImageDecodeError, encode_image, image_files, load_image


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo():
    return Image.open(ASSETS / "chelsea.jpg").convert("RGB")


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "1", "YCbCr", "LAB", "HSV", "I", "F"])
def test_opaque_modes_become_rgb(photo, mode):
    out = load_image(photo.convert(mode))
    assert out.mode == "RGB" and out.size == photo.size


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.new("I;16", (3, 1))
    image.frombytes(values.astype("<u2").tobytes())
    out = np.asarray(load_image(png_bytes(image)))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_is_kept_and_opaque_alpha_dropped(photo):
    rgba = photo.convert("RGBA")
    assert load_image(rgba).mode == "RGB"  # alpha all 255: nothing to keep
    rgba.putpixel((0, 0), (1, 2, 3, 0))
    assert load_image(png_bytes(rgba)).mode == "RGBA"
    la = photo.convert("LA")
    la.putpixel((5, 5), (9, 10))
    out = load_image(la)
    assert out.mode == "RGBA" and out.getpixel((5, 5)) == (9, 9, 9, 10)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    index = palette.getpixel((0, 0))
    with_transparency = load_image(png_bytes(palette, transparency=index))
    assert with_transparency.mode == "RGBA" and with_transparency.getpixel((0, 0))[3] == 0
    assert load_image(png_bytes(palette)).mode == "RGB"


def test_all_input_kinds(photo, tmp_path):
    path = tmp_path / "cat.png"
    data = png_bytes(photo)
    path.write_bytes(data)
    array = np.asarray(photo)
    expected = np.asarray(photo)
    for source in (path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), photo, array,
                   array.astype(np.float32) / 255.0, array.astype(np.uint16) * 257):
        assert np.array_equal(np.asarray(load_image(source)), expected), type(source)
    grey = load_image(array[..., 0])
    assert grey.mode == "RGB" and grey.size == photo.size
    assert load_image(array[..., 0] > 128).getpixel((0, 0)) in ((0, 0, 0), (255, 255, 255))
    with pytest.raises(ImageDecodeError, match=r"unsupported array shape \(4, 4, 7\)"):
        load_image(np.zeros((4, 4, 7), np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation, tmp_path):
    # A 40x20 image, red in its top-left corner as stored; each orientation moves that corner.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == ((40, 20) if orientation <= 4 else (20, 40))
    width, height = out.size
    corners = {"tl": (2, 2), "tr": (width - 3, 2), "bl": (2, height - 3), "br": (width - 3, height - 3)}
    where = {1: "tl", 2: "tr", 3: "br", 4: "bl", 5: "tl", 6: "tr", 7: "br", 8: "bl"}[orientation]
    assert out.getpixel(corners[where])[0] > 200, (orientation, out.getpixel(corners[where]))


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(path).getpixel((8, 8)) == (255, 0, 0)


def test_heic_is_read(photo):
    import pillow_heif  # a hard dependency: its absence must fail, not skip

    buffer = io.BytesIO()
    pillow_heif.from_pillow(photo).save(buffer, quality=90)  # a build without an HEVC encoder fails here
    assert buffer.getvalue()[4:12] == b"ftypheic"
    out = load_image(buffer.getvalue())
    assert out.size == photo.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, int) - np.asarray(photo, int)).mean() < 12


def test_avif_is_read(photo):
    from PIL import features

    assert features.check("avif"), ".avif is a listed input type: Pillow >= 11.2 reads it"
    buffer = io.BytesIO()
    photo.save(buffer, "AVIF", quality=90)
    out = load_image(buffer.getvalue())
    assert out.size == photo.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, int) - np.asarray(photo, int)).mean() < 12


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageDecodeError, match=r"claims 400.0 MP, over the 50.0 MP limit; refused as a decompression"):
        load_image(bomb_png(20000, 20000))
    with pytest.raises(ImageDecodeError, match=r"12000x6000 \(72.0 MP\), over the 50.0 MP limit"):
        load_image(bomb_png(12000, 6000))
    with pytest.raises(ImageDecodeError, match=r"over the 10.0 MP limit"):
        load_image(bomb_png(4000, 3000), max_pixels=10_000_000)
    with pytest.raises(ImageDecodeError, match="MP limit"):
        load_image(np.zeros((5000, 3000, 3), np.uint8), max_pixels=10_000_000)


def test_truncated_and_non_images(photo, tmp_path):
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    for data in (png_bytes(photo)[:5000], jpeg.getvalue()[:3000]):
        with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
            load_image(data)
    with pytest.raises(ImageDecodeError, match=r"not an image: no decoder recognises this data .*b'<!doctype html>"):
        load_image(b"<!doctype html><html><body>hello</body></html>")
    with pytest.raises(ImageDecodeError, match="not an image: the data is empty"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "absent.png")


# Hostile files: (file name, maker, the format Pillow identifies, how the file is, the reason in plain words).
HOSTILE = {
    "zTXt bomb before the pixels": ("bomb.png", ztxt_bomb_png, "PNG", "refused",
                                    r"its zTXt text chunk inflates past Pillow's 1 MB limit for text"),
    "zTXt bomb after the pixels": ("late.png", lambda: ztxt_bomb_png(after_pixels=True), "PNG", "refused",
                                   r"its zTXt text chunk inflates past Pillow's 1 MB limit for text"),
    "PNG chunk CRC": ("crc.png", png_with_bad_crc, "PNG", "corrupt", r"a chunk's checksum is wrong \(tEXt\)"),
    "PNG pixel data": ("idat.png", png_with_corrupt_idat, "PNG", "corrupt", r"the compressed pixel data is damaged"),
    "truncated WebP": ("cut.webp", lambda: truncated_image("WEBP"), "WebP", "truncated or corrupt",
                       r"the file ends early \(its header states \d+ bytes, there are \d+\)"),
    "truncated JPEG": ("cut.jpg", lambda: truncated_image("JPEG"), "JPEG", "truncated or corrupt", "the file ends early"),
    "truncated PNG": ("cut.png", lambda: truncated_image("PNG"), "PNG", "truncated or corrupt", "the file ends early"),
    "PNG cut in its header": ("head.png", lambda: small_image_bytes("PNG")[:40], "PNG", "truncated or corrupt",
                              "the file ends early"),
    "truncated GIF": ("cut.gif", lambda: truncated_image("GIF"), "GIF", "truncated or corrupt", "the file ends early"),
    "GIF LZW code size": ("lzw.gif", lambda: image_with_broken_header("GIF"), "GIF", "corrupt",
                          r"the compressed pixel data is damaged"),
    "BMP header": ("bad.bmp", lambda: image_with_broken_header("BMP"), "BMP", "corrupt",
                   r"unsupported BMP header type \(7\)"),
    "TIFF directory": ("bad.tif", lambda: image_with_broken_header("TIFF"), "TIFF", "truncated or corrupt",
                       "the file ends early"),
}


@pytest.mark.parametrize("kind", ["path", "bytes", "file object"])
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_refused_with_a_plain_reason(case, kind, tmp_path):
    name, make, fmt, state, reason = HOSTILE[case]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(ImageDecodeError) as error:
        if kind == "file object":
            with open(path, "rb") as handle:
                load_image(handle)
        else:
            load_image(path if kind == "path" else path.read_bytes())
    where = "" if kind == "bytes" else f" ({name})"
    message = str(error.value)
    assert re.fullmatch(rf"{fmt} image{re.escape(where)} is {state}: {reason}.*", message), message
    assert "Truncated File Read" not in message
    assert load_image(small_image_bytes("PNG")).size == (64, 48)  # nothing stays broken for the next file


def test_a_path_input_is_never_modified(tmp_path):
    path = tmp_path / "in.jpg"
    path.write_bytes((ASSETS / "coffee.jpg").read_bytes())
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    load_image(path)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_encode_png_and_lossless_webp(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    for fmt in ("png", "webp", "PNG"):
        decoded = Image.open(io.BytesIO(encode_image(rgba, fmt)))
        assert decoded.mode == "RGBA" and np.array_equal(np.asarray(decoded), np.asarray(rgba))
    jpeg = Image.open(io.BytesIO(encode_image(rgba, "jpeg")))  # remove.bg's jpg: the colours, no alpha
    assert jpeg.format == "JPEG" and jpeg.mode == "RGB" and jpeg.size == rgba.size
    with pytest.raises(ValueError, match="choose one of: png, webp"):
        encode_image(rgba, "gif")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (1601, 1203)])  # the largest spans several deflate slices
def test_fast_png_decodes_to_the_same_pixels(photo, mode, size):
    image = photo.resize(size).convert(mode)
    if mode == "RGBA":
        alpha = (np.arange(size[0] * size[1]) % 256).astype(np.uint8).reshape(size[1], size[0])
        image.putalpha(Image.fromarray(alpha, "L"))
    data = encode_image(image, "png")
    decoded = Image.open(io.BytesIO(data))
    decoded.verify()  # checksums of every chunk and of the zlib stream
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == mode and decoded.size == size
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_write_atomic(tmp_path):
    target = tmp_path / "sub" / "out.png"
    write_atomic(b"first", target)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_atomic(b"second", target)
    assert target.read_bytes() == b"first"
    write_atomic(b"third", target, overwrite=True)
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]  # no temp files left


def test_write_atomic_cleans_up_after_a_failure(tmp_path):
    with pytest.raises(TypeError):
        write_atomic(object(), tmp_path / "x.png")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_image_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.PNG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "c.webp").write_bytes(b"x")
    assert [p.name for p in image_files([tmp_path])] == ["a.jpg", "b.PNG"]
    assert [p.name for p in image_files([tmp_path], recursive=True)] == ["a.jpg", "b.PNG", "c.webp"]
    assert [p.name for p in image_files([str(tmp_path / "**" / "*.webp")])] == ["c.webp"]
    assert [p.name for p in image_files([tmp_path / "notes.txt", tmp_path / "a.jpg", tmp_path / "a.jpg"])] == [
        "notes.txt", "a.jpg"]
    with pytest.raises(FileNotFoundError, match="no image file matches"):
        image_files([str(tmp_path / "*.gif")])
