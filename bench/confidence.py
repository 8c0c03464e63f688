"""Does the confidence score know which cut-outs are wrong? A labelled set made with `rmbg make-benchmark`
(horse silhouettes and discs in many colours, on textures and flat colours; some deliberately hard: the
subject's colour close to the background's, low contrast, small subjects), the embedded u2netp, and for
each candidate score of `rmbg_demo.confidence`: Spearman's rank correlation with the true error (1 - IoU
and MAE; a useful score correlates negatively with the error, so the figure reported is -rho), and the
share of the worst 10 % (by 1 - IoU) that "review the lowest-scoring 10 %" catches.

    python bench/confidence.py [--n 120] [--seed 3] [--no-append]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402

ASSETS = ROOT / "assets"
TEXTURES = ("grass.jpg", "gravel.jpg", "brick.jpg", "rocket.jpg")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ranks(values) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def silhouette() -> Image.Image:
    mask = Image.open(ASSETS / "horse_mask.png").convert("L")
    return mask.point(lambda v: 255 if v > 127 else 0)


def disc(size=300) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((10, 10, size - 10, size - 10), fill=255)
    return mask


def foreground(shape: Image.Image, colour, pad: float = 0.0) -> Image.Image:
    """An RGBA subject: `shape` filled with `colour` (with a little shading, so it is not flat), on a
    transparent canvas `pad` times its size larger on each side (a small subject once composed)."""
    width, height = shape.size
    shade = np.linspace(0.85, 1.1, height)[:, None, None]
    rgb = np.clip(np.array(colour, np.float32)[None, None] * shade * np.ones((height, width, 1)), 0, 255)
    subject = Image.fromarray(rgb.astype(np.uint8), "RGB").convert("RGBA")
    subject.putalpha(shape)
    if pad:
        border = (int(width * pad), int(height * pad))
        subject = ImageOps.expand(subject, border=border, fill=(0, 0, 0, 0))
    return subject


def mean_colour(path: Path) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).mean(0))


def build_sets(root: Path, n: int, seed: int) -> list[Path]:
    """Folders of composites (images/, masks/), each a make-benchmark run of its own kind."""
    from rmbg_demo.evaluation import make_benchmark

    kinds: dict[str, tuple[list[Image.Image], list[Image.Image]]] = {}
    bright = [(220, 40, 40), (40, 90, 230), (240, 200, 30), (30, 30, 30), (245, 245, 245)]
    textures = [Image.open(ASSETS / name).convert("RGB") for name in TEXTURES]
    kinds["easy"] = ([foreground(shape, colour) for shape in (silhouette(), disc()) for colour in bright], textures)
    near = [foreground(silhouette(), tuple(min(255, c + 18) for c in mean_colour(ASSETS / name)))
            for name in TEXTURES]
    kinds["close_colour"] = (near, textures)
    flats = [Image.new("RGB", (640, 480), colour) for colour in ((128, 128, 128), (90, 140, 70), (200, 190, 170))]
    kinds["low_contrast"] = ([foreground(silhouette(), (140, 140, 140)), foreground(disc(), (105, 150, 85)),
                              foreground(silhouette(), (210, 200, 185))], flats)
    kinds["small"] = ([foreground(shape, colour, pad=2.5) for shape in (silhouette(), disc())
                       for colour in bright[:3]], textures)
    share = {"easy": 0.4, "close_colour": 0.2, "low_contrast": 0.2, "small": 0.2}
    folders = []
    for index, (kind, (fgs, bgs)) in enumerate(kinds.items()):
        fg_dir, bg_dir, out = root / kind / "fg", root / kind / "bg", root / kind / "set"
        fg_dir.mkdir(parents=True)
        bg_dir.mkdir(parents=True)
        for i, image in enumerate(fgs):
            image.save(fg_dir / f"{i:02d}.png")
        for i, image in enumerate(bgs):
            image.save(bg_dir / f"{i:02d}.png")
        make_benchmark(fg_dir, bg_dir, out, max(1, round(n * share[kind])), seed + index, (480, 360))
        folders.append(out)
    return folders


def evaluate(folders: list[Path]) -> dict[str, np.ndarray]:
    from rmbg_demo.confidence import CANDIDATES, _as_map
    from rmbg_demo.pipeline import RemovalPipeline

    pipeline = RemovalPipeline("u2netp", device="cpu")
    columns: dict[str, list] = {"iou_error": [], "mae": [], "kind": [], **{name: [] for name in CANDIDATES}}
    network = scoring = 0.0
    for folder in folders:
        for image_path in sorted((folder / "images").iterdir()):
            truth = np.asarray(Image.open(folder / "masks" / f"{image_path.stem}.png").convert("L")) >= 128
            image = pipeline.load(image_path)
            started = time.perf_counter()
            probability = pipeline.predict_probabilities([image])[0]
            network += time.perf_counter() - started
            mask = np.asarray(pipeline.to_mask(probability, image.size), np.float32) / 255
            predicted = mask >= 0.5
            union = (predicted | truth).sum()
            columns["iou_error"].append(1 - ((predicted & truth).sum() / union if union else 1.0))
            columns["mae"].append(float(np.abs(mask - truth).mean()))
            columns["kind"].append(folder.parent.name)
            started = time.perf_counter()
            p = _as_map(probability)
            for name, score in CANDIDATES.items():
                columns[name].append(score(p))
            scoring += time.perf_counter() - started
    out = {name: np.asarray(values) for name, values in columns.items()}
    out["cost_share"] = np.asarray(scoring / len(CANDIDATES) / max(network, 1e-9))
    return out


def caught(score: np.ndarray, error: np.ndarray, share: float = 0.1) -> float:
    """The share of the worst `share` by error that reviewing the lowest-scoring `share` catches."""
    count = max(1, round(len(error) * share))
    worst = set(np.argsort(-error, kind="stable")[:count])
    reviewed = set(np.argsort(score, kind="stable")[:count])
    return len(worst & reviewed) / count


def main() -> None:
    from rmbg_demo.confidence import CANDIDATES, CHOSEN
    from rmbg_demo.models import FALLBACK, model_names
    from rmbg_demo.weights import weights_available

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = evaluate(build_sets(Path(folder), args.n, args.seed))
    total = len(data["iou_error"])
    lines = [f"### Confidence vs the true error ({datetime.date.today()}, {cpu_name()})", "",
             f"`python bench/confidence.py --n {args.n} --seed {args.seed}`: {total} composites (easy "
             f"{int((data['kind'] == 'easy').sum())}, close colour {int((data['kind'] == 'close_colour').sum())}, "
             f"low contrast {int((data['kind'] == 'low_contrast').sum())}, small "
             f"{int((data['kind'] == 'small').sum())}), u2netp; mean 1 - IoU {data['iou_error'].mean():.3f}. "
             "-rho: Spearman's correlation of the score with the error, negated (higher is better).", "",
             "| score | -rho vs 1 - IoU | -rho vs MAE | worst 10 % caught by reviewing the lowest 10 % |",
             "|---|---|---|---|"]
    for name in CANDIDATES:
        mark = " (shipped)" if name == CHOSEN else ""
        lines.append(f"| {name}{mark} | {-spearman(data[name], data['iou_error']):.3f} | "
                     f"{-spearman(data[name], data['mae']):.3f} | "
                     f"{caught(data[name], data['iou_error']):.0%} |")
    lines.append("")
    lines.append(f"Scoring cost: {float(data['cost_share']):.2%} of a u2netp pass per candidate.")
    others = [name for name in model_names() if name != FALLBACK and weights_available(name)]
    lines.append("Cascade u2netp -> " + (others[0] + ": see `rmbg remove --escalate-to`" if others else
                                        "another model: no other model's real weights are on this machine, so "
                                        "the cascade's time and error were not measured here."))
    report("\n".join(lines), append=not args.no_append)


if __name__ == "__main__":
    main()
