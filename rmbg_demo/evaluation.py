"""Comparing models on your own images, as BRIA's RMBG-2.0 vs RMBG-1.4 benchmark note does.

- `evaluate`: masks from each model against ground truth, with the salient-object metrics of
  `pysodmetrics` (the implementation BiRefNet's evaluation uses) plus IoU and seconds per image.
- `make_benchmark`: RGBA foregrounds pasted on backgrounds, images and true masks, by seed.
- `compare_collage`: one row per image: the input, then each model's cut-out on a checkerboard.
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .imageio import IMAGE_EXTENSIONS, load_image

METRICS = ("smeasure", "maxf", "meanf", "wfm", "emeasure", "mae", "iou")
CSV_COLUMNS = ("image", "model", *METRICS, "seconds", "confidence")  # the score beside the true metrics
BUILTIN_BENCHMARK = Path(__file__).resolve().parent / "data" / "benchmark"


class MetricSet:
    """pysodmetrics' measures, accumulated over images (dataset-level figures, as papers report them)."""

    def __init__(self):
        try:
            import py_sod_metrics as sod
        except ImportError:
            raise ImportError("rmbg eval needs pysodmetrics: pip install 'rmbg-demo[eval]' "
                              "(or pip install pysodmetrics)") from None

        with warnings.catch_warnings():  # Fmeasure is the classic F-curve BiRefNet reports; V2 warns
            warnings.simplefilter("ignore")
            self.measures = {"sm": sod.Smeasure(), "fm": sod.Fmeasure(), "wfm": sod.WeightedFmeasure(),
                             "em": sod.Emeasure(), "mae": sod.MAE()}
        self.ious: list[float] = []

    def add(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Both uint8 (H, W), 0..255, the same size."""
        for measure in self.measures.values():
            measure.step(pred=prediction, gt=truth)
        predicted, actual = prediction >= 128, truth >= 128
        union = (predicted | actual).sum()
        self.ious.append(float((predicted & actual).sum() / union) if union else 1.0)

    def results(self) -> dict[str, float]:
        r = {name: measure.get_results() for name, measure in self.measures.items()}
        f_curve, e_curve = r["fm"]["fm"]["curve"], r["em"]["em"]["curve"]
        return {"smeasure": float(r["sm"]["sm"]), "maxf": float(np.max(f_curve)), "meanf": float(np.mean(f_curve)),
                "wfm": float(r["wfm"]["wfm"]), "emeasure": float(np.mean(e_curve)), "mae": float(r["mae"]["mae"]),
                "iou": float(np.mean(self.ious))}


def image_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    metrics = MetricSet()
    metrics.add(prediction, truth)
    return metrics.results()


def _images_by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return {p.stem: p for p in files}


def match_pairs(images_dir, masks_dir) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """(image, mask) pairs matched by file stem, plus the images and masks left without a partner."""
    images, masks = _images_by_stem(images_dir), _images_by_stem(masks_dir)
    pairs = [(images[s], masks[s]) for s in images if s in masks]
    return pairs, [images[s] for s in images if s not in masks], [masks[s] for s in masks if s not in images]


def load_truth(path: Path, size: tuple[int, int]) -> np.ndarray:
    truth = load_image(path).convert("L")
    if truth.size != size:
        truth = truth.resize(size, Image.Resampling.NEAREST)
    return np.asarray(truth)


@dataclass
class EvalReport:
    rows: list[dict] = field(default_factory=list)  # one per (image, model)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> metrics + seconds
    unmatched_images: list[Path] = field(default_factory=list)
    unmatched_masks: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # images that could not be scored, and why


def evaluate(images_dir, masks_dir, models: list[str], *, device="auto", dtype="auto", weights=None,
             progress=None, batch_size: int = 1, input_size: tuple[int, int] | None = None,
             runtime: str = "auto") -> EvalReport:
    """Each model's masks for the images that have a true mask, scored per image and over the set.
    An image that cannot be read (or a failed batch) is listed in `report.errors`, not scored.
    `weights`: a file for the model, when there is one (ValueError with several: which model's?)."""
    from .pipeline import RemovalPipeline

    if weights is not None and len(models) != 1:
        raise ValueError(f"weights are for one model; {len(models)} were given")
    pairs, lonely_images, lonely_masks = match_pairs(images_dir, masks_dir)
    report = EvalReport(unmatched_images=lonely_images, unmatched_masks=lonely_masks)
    for model in models:
        pipeline = RemovalPipeline(model, weights, device, dtype, batch_size=batch_size, input_size=input_size,
                                   runtime=runtime)
        dataset, seconds = MetricSet(), []
        outcomes = pipeline.iter_results(image for image, _ in pairs)
        if progress:
            outcomes = progress(outcomes, desc=model, total=len(pairs))
        for (image_path, mask_path), outcome in zip(pairs, outcomes):
            if outcome.error is not None:
                report.errors.append(f"{image_path} ({pipeline.model_name}): {outcome.error}")
                continue
            mask = outcome.result.mask
            seconds.append(outcome.result.seconds)
            prediction, truth = np.asarray(mask), load_truth(mask_path, mask.size)
            dataset.add(prediction, truth)
            report.rows.append({"image": image_path.name, "model": pipeline.model_name,
                                **image_metrics(prediction, truth), "seconds": seconds[-1],
                                "confidence": outcome.result.confidence})
        if seconds:
            report.summary[pipeline.model_name] = {**dataset.results(), "seconds": float(np.mean(seconds))}
    return report


def markdown_table(report: EvalReport) -> str:
    header = "| model | S-measure | max F | mean F | weighted F | mean E | MAE | IoU@0.5 | s/image |"
    lines = [header, "|" + "---|" * 9]
    for model, m in report.summary.items():
        lines.append(f"| {model} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + f" | {m['seconds']:.2f} |")
    return "\n".join(lines)


def write_csv(report: EvalReport, path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


# -- building a benchmark set --------------------------------------------------------------------

def make_benchmark(foregrounds_dir, backgrounds_dir, out_dir, n: int, seed: int, size=(640, 480)) -> list[str]:
    """`n` composites: a random RGBA foreground at a random scale and place on a random background.

    Writes OUT/images/NNNN.jpg and OUT/masks/NNNN.png (the foreground's alpha where it landed);
    the same seed gives the same files."""
    rng = np.random.default_rng(seed)
    foregrounds = [p for p in sorted(Path(foregrounds_dir).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    backgrounds = [p for p in sorted(Path(backgrounds_dir).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not foregrounds or not backgrounds:
        raise ValueError(f"need images in both {foregrounds_dir} and {backgrounds_dir}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    width, height = size
    names = []
    for index in range(n):
        fg = Image.open(foregrounds[rng.integers(len(foregrounds))]).convert("RGBA")
        from .compose import cover

        canvas = cover(Image.open(backgrounds[rng.integers(len(backgrounds))]), size)
        scale = rng.uniform(0.4, 0.85) * min(width / fg.width, height / fg.height)
        fg = fg.resize((max(1, round(fg.width * scale)), max(1, round(fg.height * scale))), Image.Resampling.LANCZOS)
        left = int(rng.integers(0, width - fg.width + 1))
        top = int(rng.integers(0, height - fg.height + 1))
        canvas.paste(fg, (left, top), fg)
        mask = Image.new("L", size, 0)
        mask.paste(fg.getchannel("A"), (left, top))
        name = f"{index:04d}"
        canvas.save(out / "images" / f"{name}.jpg", quality=95)
        mask.save(out / "masks" / f"{name}.png")
        names.append(name)
    return names


# -- side-by-side collage --------------------------------------------------------------------------

def checkerboard(size: tuple[int, int], square: int = 16) -> Image.Image:
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    board = np.where(((ys // square) + (xs // square)) % 2 == 0, 235, 200).astype(np.uint8)
    return Image.fromarray(board, "L").convert("RGBA")


def compare_collage(images, models: list[str], *, cell: int = 320, device="auto", dtype="auto",
                    weights=None, runtime: str = "auto") -> Image.Image:
    """A labelled grid: one row per image, the input then each model's cut-out on a checkerboard.
    `weights`: a file for the model, when there is one."""
    from .pool import get_pipeline

    if weights is not None and len(models) != 1:
        raise ValueError("weights are for one model")
    pipelines = [get_pipeline(m, weights, device=device, dtype=dtype, runtime=runtime) for m in models]
    label_height = 28
    columns = ["input", *[p.model_name for p in pipelines]]
    grid = Image.new("RGB", (cell * len(columns), label_height + cell * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=18)
    for col, title in enumerate(columns):
        draw.text((col * cell + 8, 4), title, fill="black", font=font)
    for row, source in enumerate(images):
        top = label_height + row * cell
        original = load_image(source)
        tiles = [original.convert("RGBA")]
        for pipeline in pipelines:
            tiles.append(pipeline(original).cutout())
        for col, tile in enumerate(tiles):
            tile = tile.copy()
            tile.thumbnail((cell - 8, cell - 8))
            background = checkerboard(tile.size)
            background.alpha_composite(tile)
            corner = (col * cell + (cell - tile.width) // 2, top + (cell - tile.height) // 2)
            grid.paste(background.convert("RGB"), corner)
    return grid
