"""One description of a request (`rmbg_demo.request.RemovalOptions`): each setting parsed in one place,
errors that name the setting and the bad value, and the same object from every front end's input."""

import pytest
from helpers import ASSETS
from PIL import Image

from rmbg_demo.cli import build_parser
from rmbg_demo.request import (
    Background,
    NetworkSize,
    OptionError,
    RemovalOptions,
    parse_background,
    parse_network_size,
)


def test_network_sizes_are_height_width_and_written_width_x_height():
    assert parse_network_size("1024") == NetworkSize(1024, 1024)
    size = parse_network_size("768x1024")  # width x height, as images are named
    assert (size.height, size.width) == (1024, 768) and str(size) == "768x1024"
    assert parse_network_size(" 512 X 256 ") == (256, 512)
    assert parse_network_size((1024, 768)) == (1024, 768) and parse_network_size(512) == (512, 512)
    assert parse_network_size("auto") is None and parse_network_size(None) is None
    for bad, reason in (("1000", "multiple of 32"), ("128", "from 256 to 2048"), ("4096", "from 256 to 2048"),
                        ("big", "WIDTHxHEIGHT"), ("1024x", "WIDTHxHEIGHT"), ("-512", "from 256 to 2048")):
        with pytest.raises(OptionError, match=reason) as caught:
            parse_network_size(bad)
        assert caught.value.setting == "size"


def test_backgrounds_from_text_files_and_images(tmp_path):
    assert parse_background(None) == Background() and parse_background("transparent").transparent
    assert parse_background("blur").value == "blur"
    for spec in ("#00ff00", "00ff00", "lime", "rgb(0, 255, 0)", "rgba(0, 255, 0, 1)"):
        assert parse_background(spec).value == (0, 255, 0), spec
    picture = parse_background(str(ASSETS / "coffee.jpg"))
    assert picture.kind == "image" and picture.image.size == Image.open(ASSETS / "coffee.jpg").size
    # A query never names a file on the server: the same path is an unknown colour there.
    with pytest.raises(OptionError, match="background .*not a colour") as caught:
        parse_background(str(ASSETS / "coffee.jpg"), files=False)
    assert "or an image file" not in str(caught.value)
    (tmp_path / "bad.png").write_text("not a picture")
    with pytest.raises(OptionError, match=r"background .*bad.png.*cannot be read as an image"):
        parse_background(str(tmp_path / "bad.png"))


def test_every_setting_is_checked_when_the_options_are_made():
    for changes, setting in (({"model": "rmbg-3"}, "model 'rmbg-3'"), ({"size": "1000"}, "size '1000'"),
                             ({"background": "notacolour"}, "background 'notacolour'"),
                             ({"format": "jpeg"}, "format 'jpeg'"), ({"refine": "maybe"}, "refine 'maybe'"),
                             ({"mask": "2"}, "mask '2'")):
        with pytest.raises(OptionError, match=setting):
            RemovalOptions(**changes)
    options = RemovalOptions(model="rmbg2", size="512", background="white", refine="yes", format="WEBP", mask=1)
    assert (options.model, options.size, options.background.value, options.refine, options.format, options.mask) == \
        ("rmbg-2.0", (512, 512), (255, 255, 255), True, "webp", True)


def test_cli_flags_query_and_page_widgets_give_the_same_options(tmp_path):
    args = build_parser().parse_args(["remove", "a.jpg", "-o", "out", "--model", "u2netp", "--size", "512x768",
                                      "--background", "#102030", "--refine", "--format", "webp", "--mask"])
    from_cli = RemovalOptions.from_args(args)
    from_query = RemovalOptions.from_query(from_cli.to_query())
    from_page = RemovalOptions.from_widgets("u2netp", "colour", "rgba(16, 32, 48, 1)", None, True, "webp", "512x768")
    assert from_cli == from_query == from_page.replace(mask=True)
    assert from_cli.size == NetworkSize(768, 512)
    with pytest.raises(OptionError, match="background image"):
        RemovalOptions.from_widgets(background="image")
    with pytest.raises(SystemExit):  # argparse reports --size's own message
        build_parser().parse_args(["remove", "a.jpg", "-o", "out", "--size", "100"])


def test_the_size_flag_says_what_is_wrong(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["remove", "a.jpg", "-o", "out", "--size", "1000"])
    assert "--size: size '1000': each side must be a multiple of 32 from 256 to 2048" in capsys.readouterr().err
