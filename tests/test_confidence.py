"""The confidence score (rmbg_demo.confidence) and what runs route by it: --review-below and the
--escalate-to cascade, through the CLI's own main (the --ray side is in test_cluster.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS, rmbg_in_process

from rmbg_demo.confidence import confidence
from rmbg_demo.engines import TorchEngine
from rmbg_demo.pipeline import RemovalPipeline

# u2netp's scores on these photos: astronaut 0.93, coffee 0.97, chelsea 0.80 (a threshold of 0.85 splits them)
PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")
THRESHOLD = 0.85


def disc(size=320, radius=0.3, edge=1.0) -> np.ndarray:
    """A subject's probability map: a disc whose edge ramps over `edge` pixels."""
    ys, xs = np.mgrid[0:size, 0:size]
    distance = np.hypot(xs - size / 2, ys - size / 2) - radius * size
    return np.clip(0.5 - distance / edge, 0, 1)


def test_a_sure_map_scores_high_a_grey_one_low_an_empty_or_full_one_zero():
    sure = confidence(disc())
    assert sure > 0.95
    assert confidence(np.full((320, 320), 0.5)) < 0.05  # grey everywhere
    assert confidence(disc(edge=40)) < sure - 0.3  # a wide soft edge: doubtful
    small_and_grey = disc(radius=0.05, edge=12)
    assert confidence(small_and_grey) < confidence(disc(edge=12))  # the same grey edge round a smaller subject
    assert confidence(np.zeros((320, 320))) == 0.0 and confidence(np.ones((320, 320))) == 0.0
    assert confidence(disc()[None]) == sure  # (1, h, w) as the engines answer


def test_the_pipeline_gives_each_result_its_score():
    result = RemovalPipeline("u2netp")(ASSETS / "chelsea.jpg")
    assert 0.0 < result.confidence < 1.0  # rmbg eval's CSV carries it too (test_evaluation.py)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(ASSETS / name, folder / name)
    return folder


def manifest(path) -> dict:
    return {Path(record["input"]).name: record for record in map(json.loads, Path(path).read_text().splitlines())}


def test_review_routing_writes_exactly_the_doubtful_ones_to_review_and_a_rerun_resumes(photos, tmp_path):
    out = tmp_path / "out"
    run = rmbg_in_process("remove", photos, "-o", out, "--model", "u2netp", "--mask", "--review-below",
                          THRESHOLD, "--manifest", tmp_path / "m.jsonl", "-q")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (out / "review").iterdir()) == ["chelsea.png", "chelsea_mask.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["astronaut.png", "astronaut_mask.png", "coffee.png",
                                                         "coffee_mask.png"]
    assert "1 under --review-below 0.85" in run.stderr and "chelsea.jpg" in run.stderr
    records = manifest(tmp_path / "m.jsonl")
    assert records["chelsea.jpg"]["review"] and records["chelsea.jpg"]["confidence"] < THRESHOLD
    assert not records["coffee.jpg"]["review"] and records["coffee.jpg"]["confidence"] >= THRESHOLD
    assert records["chelsea.jpg"]["outputs"][0].endswith("review/chelsea.png")
    again = rmbg_in_process("remove", photos, "-o", out, "--model", "u2netp", "--mask", "--review-below", THRESHOLD)
    assert "0 written, 0 failed, 3 skipped" in again.stderr  # the reviewed ones count as done


def test_the_cascade_runs_the_second_model_on_the_doubtful_ones_only(photos, tmp_path, lite_weights_file,
                                                                    monkeypatch):
    seen = []
    real_call = TorchEngine.__call__
    monkeypatch.setattr(TorchEngine, "__call__", lambda engine, batch: seen.append(len(batch)) or
                        real_call(engine, batch))
    out = tmp_path / "out"
    argv = ("remove", photos, "-o", out, "--model", "u2netp", "--escalate-to", "birefnet-lite", "--escalate-below",
            THRESHOLD, "--escalate-weights", lite_weights_file, "--escalate-size", 256, "--dtype", "float32",
            "--manifest", tmp_path / "m.jsonl", "-q")
    run = rmbg_in_process(*argv)
    assert run.returncode == 0, run.stderr
    assert sum(seen) == 1  # birefnet-lite (the only torch model here) saw one image
    assert "escalating 1 images" in run.stderr and "3 written" in run.stderr
    records = manifest(tmp_path / "m.jsonl")
    escalated = records["chelsea.jpg"]
    assert escalated["model"] == "birefnet-lite" and escalated["escalated_from"] == "u2netp"
    assert escalated["first_confidence"] < THRESHOLD and escalated["confidence"] is not None
    kept = RemovalPipeline("birefnet-lite", lite_weights_file, "cpu", "float32", input_size=(256, 256))
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(out / "chelsea.png").getchannel("A")),
                          np.asarray(kept(photos / "chelsea.jpg").mask))  # the second model's answer is kept
    for name in ("astronaut.jpg", "coffee.jpg"):
        assert records[name]["model"] == "u2netp" and records[name]["escalated_from"] is None
    assert "0 written, 0 failed, 3 skipped" in rmbg_in_process(*argv).stderr  # a rerun resumes


@pytest.mark.parametrize("flags, words", [
    (["--review-below", "2"], "--review-below 2.0: a confidence threshold is between 0 and 1"),
    (["--escalate-to", "rmbg-3", "--escalate-below", "0.5"], "--escalate-to 'rmbg-3': unknown model"),
    (["--escalate-to", "u2netp", "--escalate-below", "0.5"], "is the model every image runs on first"),
    (["--escalate-to", "birefnet-lite"], "--escalate-to MODEL and --escalate-below T go together"),
    (["--escalate-to", "birefnet-lite", "--escalate-below", "-0.1"], "between 0 and 1"),
])
def test_bad_routing_settings_are_refused_before_any_work(photos, tmp_path, flags, words):
    run = rmbg_in_process("remove", photos, "-o", tmp_path / "out", "--model", "u2netp", *flags)
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
