"""remove.bg's API served by `rmbg serve` (the plain server, u2netp, real HTTP on 127.0.0.1): two remove.bg
client libraries from PyPI that no one here wrote, pointed at it by their base URL, then every field, the zip
and JSON forms, remove.bg's headers and error shape, and hostile requests."""
import base64
import io
import json
import zipfile

import numpy as np
import pytest
import requests
from helpers import ASSETS, bomb_png, truncated_image, ztxt_bomb_png
from PIL import Image

from rmbg_demo.framing import subject_box
from rmbg_demo.pipeline import RemovalPipeline
from rmbg_demo.service import ServeSettings
from rmbg_demo.service.plain import ServiceThread

KEY = "test-key-0123456789"
PHOTO_PATH = ASSETS / "coffee.jpg"  # 600x400: 0.24 MP, under every size tier
PHOTO = PHOTO_PATH.read_bytes()
MAX_BYTES = 2 * 2**20


@pytest.fixture(scope="module")
def server():
    running = ServiceThread(ServeSettings(model="u2netp", api_keys=(KEY,), allow_private_urls=True,
                                          max_bytes=MAX_BYTES))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local():
    """What `rmbg remove` makes of the same photo: the masks every answer is checked against."""
    return RemovalPipeline("u2netp")


def post(server, *, data=None, files=None, json_body=None, headers=None, key=KEY):
    return requests.post(f"{server.url}/v1.0/removebg", data=data, files=files, json=json_body, timeout=120,
                         headers={**({"X-Api-Key": key} if key else {}), **(headers or {})})


def opened(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def alpha_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.getchannel("A") if image.mode == "RGBA" else image)


# -- real clients -------------------------------------------------------------------------------------------
def test_remove_bg_api_client_gets_cutouts_crops_and_alpha(server, local, monkeypatch):
    """remove_bg_api (PyPI; by carvekit's author): it reads /v1.0/account when made, sends any field."""
    import remove_bg_api

    monkeypatch.setattr(remove_bg_api, "API_URL", f"{server.url}/v1.0")
    client = remove_bg_api.RemoveBg(KEY)
    expected = np.asarray(local(PHOTO).mask)

    cut = Image.open(io.BytesIO(client.remove_bg_file(str(PHOTO_PATH), size="full")))
    assert cut.size == (600, 400) and cut.mode == "RGBA"
    assert np.array_equal(alpha_of(cut), expected)  # the same mask as `rmbg remove`

    crop = Image.open(io.BytesIO(client.remove_bg_file(str(PHOTO_PATH), data={"size": "full", "crop": "true"})))
    box = subject_box(Image.fromarray(expected))
    assert crop.size == (box.width, box.height)
    assert np.array_equal(alpha_of(crop), expected[box.top:box.bottom, box.left:box.right])

    alpha = Image.open(io.BytesIO(client.remove_bg_file(str(PHOTO_PATH), data={"size": "full",
                                                                                "channels": "alpha"})))
    assert alpha.mode == "L" and np.array_equal(np.asarray(alpha), expected)

    with pytest.raises(remove_bg_api.Errors.ApiErrorCode403):
        remove_bg_api.RemoveBg("not-the-key-at-all")  # its account call is refused
    with pytest.raises(remove_bg_api.Errors.ApiErrorCode400):
        client.remove_bg_bytes(b"not an image")


def test_removebg_client_file_base64_and_url(server, local, tmp_path, image_server, monkeypatch):
    """removebg (PyPI, brilam): files beside the input, its default size 'regular' (0.25 MP)."""
    import removebg.removebg

    monkeypatch.setattr(removebg.removebg, "API_ENDPOINT", f"{server.url}/v1.0/removebg")
    client = removebg.RemoveBg(KEY, str(tmp_path / "errors.log"))
    big = tmp_path / "big.png"
    Image.open(PHOTO_PATH).resize((1200, 800), Image.Resampling.LANCZOS).save(big)
    client.remove_background_from_img_file(str(big))
    result = Image.open(f"{big}_no_bg.png")
    assert result.width * result.height <= 250_000 and abs(result.width / result.height - 1.5) < 0.01
    assert result.width >= 600  # as large as 'regular' allows

    client.remove_background_from_base64_img(base64.b64encode(PHOTO).decode(), size="full",
                                             new_file_name=str(tmp_path / "b64.png"), bg_color="00ff00")
    green = Image.open(tmp_path / "b64.png")
    assert green.mode == "RGB" and np.abs(np.subtract(green.getpixel((2, 2)), (0, 255, 0))).max() <= 4  # a jpg

    client.remove_background_from_img_url(image_server.url + "coffee.jpg", size="full",
                                          new_file_name=str(tmp_path / "url.png"))
    assert np.array_equal(alpha_of(Image.open(tmp_path / "url.png")), np.asarray(local(PHOTO).mask))


# -- every field --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, most", [("preview", 250_000), ("medium", 1_500_000), ("hd", 4_000_000),
                                        ("full", None)])
def test_size_tiers(server, size, most):
    big = io.BytesIO()
    Image.open(PHOTO_PATH).resize((1800, 1200)).save(big, "JPEG", quality=80)
    answer = post(server, files={"image_file": big.getvalue()}, data={"size": size})
    image = opened(answer)
    assert (image.width, image.height) == (int(answer.headers["X-Width"]), int(answer.headers["X-Height"]))
    if most:
        assert image.width * image.height <= most and image.width * image.height > 0.95 * min(most, 1800 * 1200)
    else:
        assert image.size == (1800, 1200)


def test_headers_type_and_json_form(server):
    answer = post(server, files={"image_file": PHOTO}, data={"size": "full", "type": "product"})
    image = opened(answer)
    box = subject_box(image.getchannel("A"))
    assert answer.headers["X-Type"] == "product" and answer.headers["X-Credits-Charged"] == "0"
    assert [int(answer.headers[f"X-Foreground-{k}"]) for k in ("Left", "Top", "Width", "Height")] == \
        [box.left, box.top, box.width, box.height]
    assert "X-Request-Id" in answer.headers
    assert "X-Type" not in post(server, files={"image_file": PHOTO}, data={"type_level": "none"}).headers

    as_json = post(server, files={"image_file": PHOTO}, data={"size": "full"}, headers={"Accept": "application/json"})
    data = as_json.json()["data"]
    assert base64.b64decode(data["result_b64"]) == answer.content
    assert (data["foreground_left"], data["foreground_top"], data["foreground_width"],
            data["foreground_height"]) == (box.left, box.top, box.width, box.height)


def test_formats_and_channels(server, local):
    expected = np.asarray(local(PHOTO).mask)
    auto = post(server, files={"image_file": PHOTO}, data={"size": "full"})
    assert auto.headers["Content-Type"] == "image/png"
    assert post(server, files={"image_file": PHOTO}, data={"bg_color": "fff"}).headers["Content-Type"] == \
        "image/jpeg"  # auto: nothing transparent left, so jpg
    jpg = opened(post(server, files={"image_file": PHOTO}, data={"format": "jpg", "size": "full"}))
    assert jpg.format == "JPEG" and min(jpg.getpixel((1, 1))) > 245  # white where the background was
    webp = opened(post(server, files={"image_file": PHOTO}, data={"format": "webp", "size": "full"}))
    assert webp.format == "WEBP" and np.array_equal(alpha_of(webp), expected)

    archive = zipfile.ZipFile(io.BytesIO(post(server, files={"image_file": PHOTO},
                                              data={"format": "zip", "size": "full"}).content))
    assert sorted(archive.namelist()) == ["alpha.png", "color.jpg"]
    color, alpha = (Image.open(archive.open(name)) for name in ("color.jpg", "alpha.png"))
    assert color.mode == "RGB" and color.size == (600, 400)
    assert np.array_equal(np.asarray(alpha), alpha_of(opened(auto)))

    matte = opened(post(server, json_body={"image_file_b64": base64.b64encode(PHOTO).decode(), "size": "full",
                                           "channels": "alpha"}))
    assert matte.mode == "L" and np.array_equal(np.asarray(matte), expected)


def test_backgrounds(server, image_server):
    green = opened(post(server, files={"image_file": PHOTO}, data={"bg_color": "green", "format": "png"}))
    assert green.mode == "RGB" and green.getpixel((1, 1)) == (0, 128, 0)
    backdrop = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 20, 240)).save(backdrop, "PNG")
    on_file = opened(post(server, files={"image_file": PHOTO, "bg_image_file": backdrop.getvalue()},
                          data={"format": "png"}))
    assert on_file.getpixel((1, 1)) == (200, 20, 240)
    on_url = opened(post(server, data={"image_url": image_server.url + "coffee.jpg", "format": "png",
                                       "bg_image_url": image_server.url + "brick.jpg"}))
    assert on_url.mode == "RGB" and on_url.size == (600, 400)


def test_crop_margin_scale_position_and_shadow(server, local):
    box = subject_box(local(PHOTO).mask)
    margined = opened(post(server, files={"image_file": PHOTO}, data={"crop": "true", "crop_margin": "20px"}))
    assert margined.size == (box.width + 40, box.height + 40)
    percent = opened(post(server, files={"image_file": PHOTO}, data={"crop": "true", "crop_margin": "10%"}))
    assert percent.size == (box.width + 2 * round(box.width / 10), box.height + 2 * round(box.height / 10))

    half = opened(post(server, files={"image_file": PHOTO}, data={"scale": "50%"}))
    found = subject_box(half.getchannel("A"))
    assert half.size == (600, 400) and max(found.width / 600, found.height / 400) == pytest.approx(0.5, abs=0.02)
    assert found.left == pytest.approx((600 - found.width) / 2, abs=2)  # scaled: centred unless asked
    low = opened(post(server, files={"image_file": PHOTO}, data={"scale": "50%", "position": "0% 100%"}))
    found = subject_box(low.getchannel("A"))
    assert found.left <= 2 and found.bottom >= 398

    shadowed = opened(post(server, files={"image_file": PHOTO}, data={"add_shadow": "true"}))
    plain = opened(post(server, files={"image_file": PHOTO}))
    assert (alpha_of(shadowed) > alpha_of(plain)).sum() > 500  # semi-transparent black beyond the subject


def test_roi_keeps_only_the_subject_inside_it(server, local):
    expected = np.asarray(local(PHOTO).mask)
    left_half = alpha_of(opened(post(server, files={"image_file": PHOTO}, data={"roi": "0% 0% 50% 100%"})))
    assert left_half[:, 300:].max() == 0 and np.array_equal(left_half[:, :300], expected[:, :300])
    in_pixels = alpha_of(opened(post(server, files={"image_file": PHOTO}, data={"roi": "0px 0px 600px 200px"})))
    assert in_pixels[200:].max() == 0 and np.array_equal(in_pixels[:200], expected[:200])


def test_urlencoded_body(server):
    answer = post(server, data={"image_file_b64": base64.b64encode(PHOTO).decode(), "size": "full"})
    assert opened(answer).size == (600, 400)


# -- errors, in remove.bg's shape ----------------------------------------------------------------------------
ERRORS = {  # case -> (request keywords, status, code, words of the title)
    "no_source": ({"data": {"size": "full"}}, 400, "missing_source", "exactly one of"),
    "two_sources": ({"files": {"image_file": PHOTO}, "data": {"image_url": "https://example.com/a.jpg"}}, 400,
                    "missing_source", "image_file, image_url"),
    "unknown_field": ({"files": {"image_file": PHOTO}, "data": {"semitransparency": "false"}}, 400, "unknown_field",
                      "semitransparency: no such field"),
    "bad_size": ({"files": {"image_file": PHOTO}, "data": {"size": "huge"}}, 400, "invalid_parameter", "size 'huge'"),
    "bad_format": ({"files": {"image_file": PHOTO}, "data": {"format": "gif"}}, 400, "invalid_parameter", "format"),
    "bad_colour": ({"files": {"image_file": PHOTO}, "data": {"bg_color": "nocolour"}}, 400, "invalid_parameter",
                   "bg_color 'nocolour'"),
    "two_margins": ({"files": {"image_file": PHOTO}, "data": {"crop": "true", "crop_margin": "10px 20px"}}, 400,
                    "invalid_parameter", "one value"),
    "margin_without_crop": ({"files": {"image_file": PHOTO}, "data": {"crop_margin": "10px"}}, 400,
                            "invalid_parameter", "add crop=true"),
    "alpha_zip": ({"files": {"image_file": PHOTO}, "data": {"channels": "alpha", "format": "zip"}}, 400,
                  "invalid_parameter", "zip"),
    "bad_roi": ({"files": {"image_file": PHOTO}, "data": {"roi": "0 0 50%"}}, 400, "invalid_parameter", "roi"),
    "bad_base64": ({"data": {"image_file_b64": "not base64!"}}, 400, "invalid_parameter", "not valid base64"),
    "not_an_image": ({"files": {"image_file": b"hello"}}, 400, "unknown_format", "not an image"),
    "truncated": ({"files": {"image_file": PHOTO[:5000]}}, 400, "unknown_format", "truncated or corrupt"),
    "bomb": ({"files": {"image_file": bomb_png(100_000, 100_000)}}, 400, "unknown_format", "decompression bomb"),
    "ztxt_bomb": ({"files": {"image_file": ztxt_bomb_png()}}, 400, "unknown_format", "text chunk"),
    "truncated_webp": ({"files": {"image_file": truncated_image("WEBP")}}, 400, "unknown_format", "truncated"),
    "too_big": ({"files": {"image_file": b"\0" * (MAX_BYTES + 10)}}, 413, "file_too_large", "byte limit"),
    "no_foreground": ({"files": {"image_file": PHOTO}, "data": {"roi": "0 0 4 4"}},
                      400, "unknown_foreground", "foreground"),
    "no_key": ({"files": {"image_file": PHOTO}, "key": None}, 403, "auth_failed", "API key"),
    "wrong_key": ({"files": {"image_file": PHOTO}, "key": "wrong-key-12345"}, 403, "auth_failed", "wrong API key"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_have_removebgs_shape(server, case):
    keywords, status, code, words = ERRORS[case]
    answer = post(server, **keywords)
    assert answer.status_code == status, answer.text
    error = answer.json()["errors"][0]
    assert error["code"] == code and words in error["title"]


def test_private_addresses_are_refused_by_default(tmp_path, image_server):
    running = ServiceThread(ServeSettings(model="u2netp"))
    try:
        answer = post(running, data={"image_url": image_server.url + "coffee.jpg"}, key=None)
        assert answer.status_code == 400 and answer.json()["errors"][0]["code"] == "invalid_url"
        assert "private" in answer.json()["errors"][0]["title"] or "loopback" in answer.json()["errors"][0]["title"]
    finally:
        running.stop()


def test_malformed_bodies(server):
    cases = [(b"garbage--x--", "multipart/form-data; boundary=x"), (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
             (b"%zz=1&&=", "application/x-www-form-urlencoded"), (b"{", "application/json"), (PHOTO, "image/jpeg")]
    for body, kind in cases:
        answer = requests.post(f"{server.url}/v1.0/removebg", data=body, timeout=30,
                               headers={"X-Api-Key": KEY, "Content-Type": kind})
        assert answer.status_code == 400 and answer.json()["errors"][0]["title"], (kind, answer.text)
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_account(server):
    answer = requests.get(f"{server.url}/v1.0/account", headers={"X-Api-Key": KEY}, timeout=10)
    assert answer.json()["data"]["attributes"]["credits"]["total"] == 0


def test_json_answer_is_valid_json_on_errors_too(server):
    answer = post(server, json_body={"image_url": 5}, headers={"Accept": "application/json"})
    assert answer.status_code == 400 and json.loads(answer.text)["errors"]
