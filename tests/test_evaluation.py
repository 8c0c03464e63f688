"""Metrics on masks whose scores are known, the eval/make-benchmark/compare commands on real files."""
import csv
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import ASSETS
from PIL import Image

from rmbg_demo.evaluation import BUILTIN_BENCHMARK, compare_collage, image_metrics, match_pairs


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
    run = subprocess.run([sys.executable, "-m", "rmbg_demo", "eval", str(images), str(BUILTIN_BENCHMARK / "masks"),
                          "--model", "u2netp", "--csv", str(table)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "unmatched image (no mask with its name):" in run.stderr and "stray.jpg" in run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("| model | S-measure | max F | mean F | weighted F | mean E | MAE | IoU@0.5")
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[0] == "u2netp" and 0.7 < float(row[1]) <= 1 and float(row[6]) < 0.15
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "model", "smeasure", "maxf", "meanf", "wfm", "emeasure", "mae", "iou", "seconds"]
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
    run = lambda out, seed: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "rmbg_demo", "make-benchmark", str(fg), str(bg), "-o", str(out), "-n", "3",
         "--seed", str(seed), "--size", "320x240"], capture_output=True, text=True, timeout=120)
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


def test_compare_collage(tmp_path):
    out = tmp_path / "collage.png"
    run = subprocess.run([sys.executable, "-m", "rmbg_demo", "compare", str(ASSETS / "chelsea.jpg"),
                          str(ASSETS / "coffee.jpg"), "--model", "u2netp", "--model", "u2netp", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    collage = Image.open(out)
    assert collage.size == (3 * 320, 28 + 2 * 320)
    grid = np.asarray(collage.convert("RGB"), int)
    corner = grid[28 + 5:28 + 40, 320 + 5:320 + 40]  # the first cut-out's background: checkerboard
    assert set(np.unique(corner)) <= {200, 235, 255}


def test_collage_in_process_labels_each_column():
    collage = compare_collage([ASSETS / "astronaut.jpg"], ["u2netp"], cell=200, device="cpu")
    assert collage.size == (400, 228)
