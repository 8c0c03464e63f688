"""`rmbg` / `python -m rmbg_demo`: background removal from the command line."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, encode_image, image_files, write_atomic
from .models import REGISTRY, model_names
from .options import add_compile_argument, add_model_arguments

log = logging.getLogger("rmbg_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmbg", description="Remove image backgrounds with RMBG-2.0 and friends.")
    sub = parser.add_subparsers(dest="command", required=True)

    remove = sub.add_parser("remove", help="cut out the subject of each image",
                            description="Writes OUT_DIR/<name>.png (RGBA) per input; a bad file is reported and "
                                        "skipped.")
    remove.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    remove.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR")
    add_model_arguments(remove)
    remove.add_argument("--batch-size", type=int, default=1, metavar="N")
    add_compile_argument(remove)
    remove.add_argument("--mask", action="store_true", help="also write <name>_mask.png (8-bit greyscale)")
    remove.add_argument("--format", choices=sorted(FORMAT_EXTENSIONS), default="png", help="png, or lossless webp")
    remove.add_argument("--background", metavar="COLOR|blur|IMAGE",
                        help="put the subject on a colour (#hex or name), the blurred original, or an image file")
    remove.add_argument("--refine", action="store_true", help="re-estimate colours at soft edges (no halo)")
    remove.add_argument("--recursive", "-r", action="store_true", help="look into sub-folders of folder inputs")
    remove.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    remove.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse larger images (default 50 MP)")
    remove.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sub.add_parser("models", help="list the models, their licences and whether their weights are here")

    evaluate = sub.add_parser("eval", help="score models against ground-truth masks (pysodmetrics)",
                              description="Images and masks are matched by file stem; unmatched files are listed.")
    evaluate.add_argument("images_dir", type=Path, metavar="IMAGES_DIR")
    evaluate.add_argument("masks_dir", type=Path, metavar="MASKS_DIR")
    add_model_arguments(evaluate, repeatable=True)  # --weights applies when one model is evaluated
    evaluate.add_argument("--csv", type=Path, metavar="FILE", help="one row per (image, model)")

    bench = sub.add_parser("make-benchmark", help="paste RGBA foregrounds on backgrounds: images/ and masks/")
    bench.add_argument("foregrounds_dir", type=Path, metavar="FOREGROUNDS_DIR")
    bench.add_argument("backgrounds_dir", type=Path, metavar="BACKGROUNDS_DIR")
    bench.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    bench.add_argument("-n", type=int, default=20, help="number of composites")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of each composite")

    compare = sub.add_parser("compare", help="a labelled collage: each image, then each model's cut-out")
    compare.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    compare.add_argument("-o", "--output", type=Path, required=True, metavar="COLLAGE.png")
    add_model_arguments(compare, repeatable=True)
    return parser


@dataclass
class Job:
    source: Path
    outputs: dict[str, Path] = field(default_factory=dict)  # "image" / "mask" -> path


def plan_jobs(args) -> tuple[list[Job], list[str], int]:
    """Inputs -> jobs with their output paths; returns (jobs, errors, skipped)."""
    errors: list[str] = []
    sources: list[Path] = []
    for pattern in args.inputs:
        try:
            sources += [p for p in image_files([pattern], recursive=args.recursive) if p not in sources]
        except FileNotFoundError as exc:
            errors.append(f"{pattern}: {exc}")
    jobs, taken, skipped = [], {}, 0
    ext = FORMAT_EXTENSIONS[args.format]
    inputs = {p.resolve() for p in sources}
    for source in sources:
        job = Job(source, {"image": args.output / f"{source.stem}{ext}"})
        if args.mask:
            job.outputs["mask"] = args.output / f"{source.stem}_mask{ext}"
        problem = output_problem(job, taken, inputs)
        if problem:
            errors.append(f"{source}: {problem}")
            continue
        if not args.overwrite and all(p.exists() for p in job.outputs.values()):
            skipped += 1
            continue
        taken.update({p.resolve(): source for p in job.outputs.values()})
        jobs.append(job)
    return jobs, errors, skipped


def output_problem(job: Job, taken: dict, inputs: set) -> str | None:
    for path in job.outputs.values():
        resolved = path.resolve()
        if resolved in inputs:
            return f"its output {path} would overwrite an input; choose another -o folder"
        if resolved in taken:
            return f"its output {path} is also the output of {taken[resolved]} (same name); rename one"
    return None


def run_remove(args) -> int:
    from .pipeline import RemovalPipeline
    from .weights import WeightsError

    jobs, errors, skipped = plan_jobs(args)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    written = 0
    if jobs:
        try:
            pipeline = RemovalPipeline(args.model, args.weights, args.device, args.dtype, batch_size=args.batch_size,
                                       max_pixels=args.max_pixels, compile=args.compile)
        except (WeightsError, ValueError, RuntimeError) as exc:  # RuntimeError: a device torch cannot use
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"model: {pipeline.describe()}", file=sys.stderr)
        written, failed = process_jobs(pipeline, jobs, args)
        errors += failed
    summary = f"{written} written, {len(errors)} failed, {skipped} skipped"
    if skipped:
        summary += " (outputs exist; --overwrite replaces them)"
    print(summary, file=sys.stderr)
    return 1 if errors else 0


def process_jobs(pipeline, jobs: list[Job], args) -> tuple[int, list[str]]:
    """Runs the jobs `batch_size` at a time; one bad input never stops the others."""
    written, failed = 0, []
    background = resolve_background(args.background)
    bar = tqdm(total=len(jobs), unit="img", disable=args.quiet, file=sys.stderr)
    for job, outcome in zip(jobs, pipeline.iter_results(job.source for job in jobs)):
        try:
            if outcome.error is not None:
                raise outcome.error
            save_outputs(job, outcome.result, background, args)
            written += 1
        except (OSError, ValueError, RuntimeError) as exc:
            failed.append(report(bar, job.source, exc))
        bar.update(1)
    bar.close()
    return written, failed


def resolve_background(spec: str | None):
    """A path to an existing file is an image background; anything else is a colour name or 'blur'."""
    if spec is None or spec in ("transparent", "none"):
        return None
    if Path(spec).is_file():
        from .imageio import load_image

        return load_image(Path(spec))
    if spec != "blur":
        from .compose import parse_color

        parse_color(spec)  # fail before any work, not once per image
    return spec


def save_outputs(job: Job, result, background, args) -> None:
    todo = {kind: path for kind, path in job.outputs.items() if args.overwrite or not path.exists()}
    if "image" in todo:
        out = result.composite(background, refine=args.refine)
        write_atomic(encode_image(out, args.format), todo["image"], overwrite=args.overwrite)
    if "mask" in todo:
        write_atomic(encode_image(result.mask, args.format), todo["mask"], overwrite=args.overwrite)


def report(bar, source, exc) -> str:
    message = f"{source}: {exc}"
    bar.write(f"error: {message}", file=sys.stderr)
    return message


def run_models(_args) -> int:
    from .weights import weights_available

    for name in model_names():
        spec = REGISTRY[name]
        if weights_available(name):
            here = "embedded" if spec.embedded else "available"
        else:
            size = f", ~{spec.download_mb} MB" if spec.download_mb else ""
            gated = "; gated: accept the licence and set HF_TOKEN" if spec.gated else ""
            here = f"downloads on first use ({spec.page_url}{size}{gated})"
        print(f"{name:18} {spec.title} | licence: {spec.licence} | {here}")
    return 0


def run_eval(args) -> int:
    from .evaluation import evaluate, markdown_table, write_csv

    report = evaluate(args.images_dir, args.masks_dir, args.model, device=args.device, dtype=args.dtype,
                      weights=args.weights, progress=lambda items, **kw: tqdm(items, file=sys.stderr, **kw))
    for path in report.unmatched_images:
        print(f"unmatched image (no mask with its name): {path}", file=sys.stderr)
    for path in report.unmatched_masks:
        print(f"unmatched mask (no image with its name): {path}", file=sys.stderr)
    for message in report.errors:
        print(f"error: {message}", file=sys.stderr)
    print(markdown_table(report))
    if args.csv:
        write_csv(report, args.csv)
    return 1 if report.errors or not report.rows else 0


def run_make_benchmark(args) -> int:
    from .evaluation import make_benchmark

    width, height = (int(v) for v in args.size.lower().split("x"))
    names = make_benchmark(args.foregrounds_dir, args.backgrounds_dir, args.output, args.n, args.seed, (width, height))
    print(f"{len(names)} composites in {args.output}/images and their masks in {args.output}/masks", file=sys.stderr)
    return 0


def run_compare(args) -> int:
    from .evaluation import compare_collage
    from .imageio import encode_image

    collage = compare_collage(args.images, args.model, device=args.device, dtype=args.dtype)
    write_atomic(encode_image(collage, "png"), args.output, overwrite=True)
    print(f"collage written to {args.output}", file=sys.stderr)
    return 0


COMMANDS = {"remove": run_remove, "models": run_models, "eval": run_eval, "make-benchmark": run_make_benchmark,
            "compare": run_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from .engines import configure_torch
    from .weights import WeightsError

    configure_torch(getattr(args, "device", "auto"))

    try:
        return COMMANDS[args.command](args)
    except (WeightsError, ValueError, OSError) as exc:  # missing weights, bad images, missing folders...
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
