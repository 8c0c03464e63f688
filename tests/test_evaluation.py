"""Metrics on masks whose scores are known, the eval/make-benchmark/compare commands on real files."""
import csv
import warnings

import numpy as np
import pytest
from helpers import ASSETS, LITE_256_PLUGIN, rmbg_in_process, run_with_lite_256
from PIL import Image, ImageDraw, ImageFont

from rmbg_demo.evaluation import (
    BUILTIN_BENCHMARK,
    checkerboard,
    compare_collage,
    evaluate,
    image_metrics,
    match_pairs,
)

rmbg = rmbg_in_process  # the commands as they run, in this hermetic process (helpers.rmbg_in_process)


@pytest.fixture(scope="module")
def truth():
    mask = np.zeros((60, 80), np.uint8)
    mask[15:45, 20:60] = 255
    return mask


def test_perfect_prediction(truth):
    m = image_metrics(truth.copy(), truth)
    assert m["mae"] == 0 and m["iou"] == 1
    for key in ("smeasure", "maxf", "wfm"):
        assert m[key] == pytest.approx(1.0, abs=1e-6), key
    # The E-curve's top threshold (255) leaves no foreground at all, so its mean stays just below 1.
    assert 0.99 < m["emeasure"] <= 1


def test_inverted_prediction(truth):
    m = image_metrics(255 - truth, truth)
    assert m["mae"] == 1 and m["iou"] == 0
    # Only the lowest threshold (everything foreground) scores: precision = the object's share.
    share = truth.mean() / 255
    assert m["maxf"] == pytest.approx(1.3 * share / (0.3 * share + 1))
    assert m["meanf"] < 0.01 and m["wfm"] < 1e-3 and m["smeasure"] < 0.1


def test_empty_prediction(truth):
    m = image_metrics(np.zeros_like(truth), truth)
    assert m["mae"] == pytest.approx(truth.mean() / 255) and m["iou"] == 0


def test_half_prediction(truth):
    half = truth.copy()
    half[:, 40:] = 0  # keeps the left half of the object
    m = image_metrics(half, truth)
    assert m["iou"] == pytest.approx(0.5)
    assert m["mae"] == pytest.approx((truth.mean() / 255) / 2)


def test_agrees_with_pysodmetrics_called_directly(truth):
    import py_sod_metrics as sod

    rng = np.random.default_rng(0)
    prediction = np.clip(truth.astype(float) * 0.7 + rng.normal(40, 30, truth.shape), 0, 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm, fm, wfm, em, mae = sod.Smeasure(), sod.Fmeasure(), sod.WeightedFmeasure(), sod.Emeasure(), sod.MAE()
    for measure in (sm, fm, wfm, em, mae):
        measure.step(pred=prediction, gt=truth)
    ours = image_metrics(prediction, truth)
    assert ours["smeasure"] == pytest.approx(sm.get_results()["sm"])
    assert ours["maxf"] == pytest.approx(fm.get_results()["fm"]["curve"].max())
    assert ours["meanf"] == pytest.approx(fm.get_results()["fm"]["curve"].mean())
    assert ours["wfm"] == pytest.approx(wfm.get_results()["wfm"])
    assert ours["emeasure"] == pytest.approx(em.get_results()["em"]["curve"].mean())
    assert ours["mae"] == pytest.approx(mae.get_results()["mae"])


def test_pairs_are_matched_by_stem(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        (tmp_path / "i" / name).write_bytes(b"x")
    for name in ("a.png", "b.png", "z.png"):
        (tmp_path / "m" / name).write_bytes(b"x")
    pairs, images, masks = match_pairs(tmp_path / "i", tmp_path / "m")
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.png", "b.png")]
    assert [p.name for p in images] == ["c.webp"] and [p.name for p in masks] == ["z.png"]


def test_eval_command_on_the_builtin_set(tmp_path):
    # An extra image without a mask is listed, not fatal.
    images = tmp_path / "images"
    images.mkdir()
    for path in (BUILTIN_BENCHMARK / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "stray.jpg").write_bytes((ASSETS / "coffee.jpg").read_bytes())
    table = tmp_path / "scores.csv"
    run = rmbg("eval", images, BUILTIN_BENCHMARK / "masks", "--model", "u2netp", "--csv", table)
    assert run.returncode == 0, run.stderr
    assert "unmatched image (no mask with its name):" in run.stderr and "stray.jpg" in run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("| model | S-measure | max F | mean F | weighted F | mean E | MAE | IoU@0.5")
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[0] == "u2netp" and 0.7 < float(row[1]) <= 1 and float(row[6]) < 0.15
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "model", "smeasure", "maxf", "meanf", "wfm", "emeasure", "mae", "iou", "seconds",
                            "confidence"]
    assert all(0.0 <= float(row["confidence"]) <= 1.0 for row in rows)  # each image's score beside the truth
    assert len(rows) == 8 and {r["model"] for r in rows} == {"u2netp"}
    assert all(0 <= float(r["iou"]) <= 1 and float(r["seconds"]) > 0 for r in rows)


def test_make_benchmark_is_reproducible_and_its_masks_are_true(tmp_path):
    fg, bg = tmp_path / "fg", tmp_path / "bg"
    fg.mkdir()
    bg.mkdir()
    horse = Image.open(ASSETS / "horse_mask.png").convert("L")
    foreground = Image.new("RGBA", horse.size, (200, 30, 30, 255))
    foreground.putalpha(horse)
    foreground.save(fg / "horse.png")
    Image.open(ASSETS / "grass.jpg").save(bg / "grass.jpg")
    run = lambda out, seed: rmbg("make-benchmark", fg, bg, "-o", out, "-n", "3", "--seed", seed,  # noqa: E731
                                 "--size", "320x240")
    assert run(tmp_path / "a", 5).returncode == 0
    assert run(tmp_path / "b", 5).returncode == 0
    assert run(tmp_path / "c", 6).returncode == 0
    a = [(tmp_path / "a" / "masks" / f"{i:04d}.png").read_bytes() for i in range(3)]
    assert a == [(tmp_path / "b" / "masks" / f"{i:04d}.png").read_bytes() for i in range(3)]
    assert a != [(tmp_path / "c" / "masks" / f"{i:04d}.png").read_bytes() for i in range(3)]
    image = np.asarray(Image.open(tmp_path / "a" / "images" / "0000.jpg"), int)
    mask = np.asarray(Image.open(tmp_path / "a" / "masks" / "0000.png"))
    assert image.shape == (240, 320, 3) and mask.shape == (240, 320)
    inside = image[mask == 255]
    assert np.abs(inside - [200, 30, 30]).mean() < 12  # the pasted red horse is where the mask says


def test_eval_with_two_models_unmatched_masks_and_a_bad_image(tmp_path, lite_weights_file):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in ("0000", "0001"):
        (images / f"{stem}.jpg").write_bytes((BUILTIN_BENCHMARK / "images" / f"{stem}.jpg").read_bytes())
        (masks / f"{stem}.png").write_bytes((BUILTIN_BENCHMARK / "masks" / f"{stem}.png").read_bytes())
    (images / "broken.jpg").write_bytes(b"<html>not a photo</html>")
    (masks / "broken.png").write_bytes((BUILTIN_BENCHMARK / "masks" / "0000.png").read_bytes())
    (masks / "lonely.png").write_bytes((BUILTIN_BENCHMARK / "masks" / "0001.png").read_bytes())
    table = tmp_path / "scores.csv"
    run = run_with_lite_256(tmp_path, "eval", images, masks, "--model", "u2netp", "--model", "lite-256", "--csv",
                            table, env={"LITE_256_WEIGHTS": str(lite_weights_file)})
    assert run.returncode == 1, run.stderr  # some images failed
    assert "unmatched mask (no image with its name):" in run.stderr and "lonely.png" in run.stderr
    for model in ("u2netp", "lite-256"):
        assert f"broken.jpg ({model}): not an image" in run.stderr
    table_rows = [line.split("|")[1].strip() for line in run.stdout.strip().splitlines()[2:]]
    assert table_rows == ["u2netp", "lite-256"]
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["model"], r["image"]) for r in rows) == [
        ("lite-256", "0000.jpg"), ("lite-256", "0001.jpg"), ("u2netp", "0000.jpg"), ("u2netp", "0001.jpg")]
    scores = {r["model"]: float(r["iou"]) for r in rows if r["image"] == "0000.jpg"}
    assert scores["u2netp"] != scores["lite-256"]  # two models, really run


def test_eval_exit_codes_when_nothing_is_scored_and_for_bad_arguments(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (images / "a.jpg").write_bytes((ASSETS / "chelsea.jpg").read_bytes())
    (masks / "b.png").write_bytes((BUILTIN_BENCHMARK / "masks" / "0000.png").read_bytes())
    nothing = rmbg("eval", images, masks, "--model", "u2netp")
    assert nothing.returncode == 1, nothing.stderr  # no pair matched: nothing scored
    assert "unmatched image (no mask with its name):" in nothing.stderr
    missing = rmbg("eval", tmp_path / "absent", masks, "--model", "u2netp")
    assert missing.returncode == 2 and "error:" in missing.stderr and "absent" in missing.stderr
    unknown = rmbg("eval", images, masks, "--model", "nope")
    assert unknown.returncode == 2 and "invalid choice: 'nope'" in unknown.stderr



def test_weights_with_several_models_is_refused_not_ignored(tmp_path, capsys):
    from rmbg_demo.cli import main

    for command in (["eval", "images", "masks"], ["compare", str(ASSETS / "chelsea.jpg"), "-o", "c.png"]):
        with pytest.raises(SystemExit) as exit_code:
            main([*command, "--model", "u2netp", "--model", "rmbg-2.0", "--weights", str(tmp_path / "w.pth")])
        assert exit_code.value.code == 2 and "--weights is for one --model" in capsys.readouterr().err
    # The library says so too (it used to drop the file silently and score the hub's weights).
    for library_call in (lambda: evaluate(tmp_path, tmp_path, ["u2netp", "rmbg-2.0"], weights=tmp_path / "w.pth"),
                         lambda: compare_collage([ASSETS / "chelsea.jpg"], ["u2netp", "rmbg-2.0"],
                                                 weights=tmp_path / "w.pth")):
        with pytest.raises(ValueError, match="weights are for one model"):
            library_call()


def test_compare_collage_shows_two_models_cutouts_on_a_checkerboard(tmp_path, lite_weights_file, lite_fixture_model):
    out = tmp_path / "collage.png"
    run = run_with_lite_256(tmp_path, "compare", ASSETS / "chelsea.jpg", "--model", "u2netp", "--model", "lite-256",
                            "-o", out, "--device", "cpu", "--dtype", "float32",
                            env={"LITE_256_WEIGHTS": str(lite_weights_file)})
    assert run.returncode == 0, run.stderr
    collage = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert collage.shape == (28 + 320, 3 * 320, 3)
    # Each model's tile is its cut-out over the checkerboard: where its mask is 0, the
    # checkerboard shows through. The expected tiles come from the same models in this process.
    from rmbg_demo.pipeline import RemovalPipeline

    photo = Image.open(ASSETS / "chelsea.jpg").convert("RGB")
    pipelines = [RemovalPipeline("u2netp", device="cpu"),
                 RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                                 input_size=(256, 256))]
    tiles = []
    for column, pipeline in enumerate(pipelines, start=1):
        cut = pipeline(photo).cutout()
        cut.thumbnail((312, 312))
        expected = checkerboard(cut.size)
        expected.alpha_composite(cut)
        left, top = column * 320 + (320 - cut.width) // 2, 28 + (320 - cut.height) // 2
        tile = collage[top:top + cut.height, left:left + cut.width]
        alpha = np.asarray(cut)[..., 3]
        assert np.abs(tile - np.asarray(expected.convert("RGB"), dtype=int)).mean() < 1
        assert np.abs(tile - np.asarray(cut.convert("RGB"), dtype=int)).mean() > 5  # not the opaque photo
        if pipeline.model_name == "u2netp":  # (the fixture weights' masks are soft everywhere, never 0)
            assert (alpha == 0).any()
            assert np.isin(tile[alpha == 0], [200, 235]).all()  # the checkerboard, where the mask is 0
        tiles.append(tile)
    assert np.abs(tiles[0] - tiles[1]).mean() > 5  # two different models, two different cut-outs


@pytest.fixture
def lite_256_registered(tmp_path, lite_weights_file, monkeypatch):
    """The plug-in model `lite-256` registered in this process, its weights found through its variable."""
    from rmbg_demo.models import unregister

    monkeypatch.setenv("LITE_256_WEIGHTS", str(lite_weights_file))
    exec(LITE_256_PLUGIN, {})
    yield "lite-256"
    unregister("lite-256")


def test_collage_in_process_labels_each_column(lite_256_registered):
    collage = compare_collage([ASSETS / "astronaut.jpg"], ["u2netp", lite_256_registered], cell=200, device="cpu",
                              dtype="float32")
    assert collage.size == (600, 228)
    strips = np.asarray(collage.convert("RGB"))[:28]
    font = ImageFont.load_default(size=18)
    for column, title in enumerate(["input", "u2netp", "lite-256"]):
        label = Image.new("RGB", (200, 28), "white")
        ImageDraw.Draw(label).text((8, 4), title, fill="black", font=font)
        assert np.array_equal(strips[:, column * 200:(column + 1) * 200], np.asarray(label)), title
