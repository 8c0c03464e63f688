"""`rmbg` / `python -m rmbg_demo`: background removal from the command line."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .cluster.manifest import ManifestRecord, ManifestWriter
from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, encode_image, image_files, write_atomic
from .models import REGISTRY, model_names, torch_model_names
from .options import add_compile_argument, add_model_arguments, add_size_argument

log = logging.getLogger("rmbg_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmbg", description="Remove image backgrounds with RMBG-2.0 and friends.")
    sub = parser.add_subparsers(dest="command", required=True)

    remove = sub.add_parser("remove", help="cut out the subject of each image",
                            description="Writes OUT_DIR/<name>.png (RGBA) per input; a bad file is reported and "
                                        "skipped.")
    remove.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    # A string, not a Path: with --ray it may be object storage (Path would turn s3://b/k into s3:/b/k).
    remove.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="a folder (or with --ray a URI)")
    add_model_arguments(remove)
    add_size_argument(remove)
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
    remove.add_argument("--manifest", metavar="FILE",
                        help="JSON Lines, one record per input: input, outputs, model, width, height, seconds, error "
                             "(with --ray always written, by default to OUT/manifest.jsonl)")
    from .cluster import add_ray_arguments, add_serve_parser

    add_ray_arguments(remove)
    video = remove.add_argument_group("video", "clips (recognised by their content) in the inputs")
    video.add_argument("--video-format", choices=["webm", "mov", "png", "mp4"], default="webm",
                       help="webm: VP9 with alpha (default); mov: ProRes 4444 with alpha; png: a folder of RGBA "
                            "frames; with --background the result is an H.264 mp4")
    video.add_argument("--smooth", action="store_true", help="steady edges: temporal smoothing that follows motion")
    video.add_argument("--max-video-seconds", type=float, metavar="S", help="refuse longer clips")

    sub.add_parser("models", help="list the models, their licences and whether their weights are here")
    add_serve_parser(sub)

    export = sub.add_parser("export", help="write a PyTorch model as ONNX (dynamic batch), checked by ONNX Runtime",
                            description="The file's input is the normalised image as the model card prepares it; "
                                        "its one output the final map; its metadata the model, size, mean/std and "
                                        "licence. Run it with: rmbg remove ... --weights FILE.onnx")
    export.add_argument("model", choices=torch_model_names(), metavar="MODEL",
                        help=f"one of: {', '.join(torch_model_names())}")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.onnx")
    export.add_argument("--weights", metavar="FILE", help="a .safetensors/.pth/.bin checkpoint (default: as `remove`)")
    add_size_argument(export)
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (16 or newer: GridSample)")
    export.add_argument("--overwrite", action="store_true")

    evaluate = sub.add_parser("eval", help="score models against ground-truth masks (pysodmetrics)",
                              description="Images and masks are matched by file stem; unmatched files are listed.")
    evaluate.add_argument("images_dir", type=Path, metavar="IMAGES_DIR")
    evaluate.add_argument("masks_dir", type=Path, metavar="MASKS_DIR")
    add_model_arguments(evaluate, repeatable=True)  # --weights: only with one --model
    add_size_argument(evaluate)
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
    outputs: dict[str, Path] = field(default_factory=dict)  # "image"/"video"/"frames"/"mask" -> path
    video: bool = False


def list_sources(args) -> tuple[list[Path], list[str]]:
    """Files, folders (-r) and globs -> the files to process (images and videos), and errors."""
    from .video import VIDEO_EXTENSIONS

    errors: list[str] = []
    sources: list[Path] = []
    for pattern in args.inputs:
        try:
            found = image_files([pattern], recursive=args.recursive, extensions=IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
            sources += [p for p in found if p not in sources]
        except FileNotFoundError as exc:
            errors.append(f"{pattern}: {exc}")
    return sources, errors


def job_for(source: Path, args, background) -> Job:
    """Videos are told apart by their content (a clip renamed .jpg is still a clip); files with an
    image extension are left to the image decoder, which says what is wrong with them."""
    from .video import is_video, output_paths

    if source.suffix.lower() not in IMAGE_EXTENSIONS and is_video(source):
        return Job(source, output_paths(source, args.output, fmt=args.video_format, background=background,
                                        mask=args.mask), video=True)
    ext = FORMAT_EXTENSIONS[args.format]
    job = Job(source, {"image": args.output / f"{source.stem}{ext}"})
    if args.mask:
        job.outputs["mask"] = args.output / f"{source.stem}_mask{ext}"
    return job


def plan_jobs(args, background=None) -> tuple[list[Job], list[str], list[Job]]:
    """Inputs -> jobs with their output paths; returns (jobs, errors, jobs skipped: outputs exist)."""
    sources, errors = list_sources(args)
    jobs, taken, skipped = [], {}, []
    inputs = {p.resolve() for p in sources}
    for source in sources:
        try:
            job = job_for(source, args, background)
        except ValueError as exc:  # e.g. an mp4 without a background for a clip
            errors.append(f"{source}: {exc}")
            continue
        problem = output_problem(job, taken, inputs)
        if problem:
            errors.append(f"{source}: {problem}")
            continue
        if not args.overwrite and all(p.exists() for p in job.outputs.values()):
            skipped.append(job)
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
    if args.ray is not None:
        from .cluster import run_ray_job
        from .cluster.job import split_ray_address

        split_ray_address(args)
        return run_ray_job(args)
    args.output = Path(args.output)
    manifest = ManifestWriter(args.manifest) if args.manifest else None
    try:
        return remove_here(args, manifest)
    finally:
        if manifest:
            manifest.close()


def remove_here(args, manifest) -> int:
    """`rmbg remove` in this process."""
    from .pipeline import RemovalPipeline
    from .weights import WeightsError

    background = resolve_background(args.background)
    jobs, errors, skipped = plan_jobs(args, background)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
        record(manifest, message.split(": ", 1)[0], error=message.split(": ", 1)[-1])
    for job in skipped:
        record(manifest, job.source, job.outputs, skipped=True)
    written = 0
    if jobs:
        try:
            pipeline = RemovalPipeline(args.model, args.weights, args.device, args.dtype, batch_size=args.batch_size,
                                       max_pixels=args.max_pixels, compile=args.compile, input_size=args.size)
        except (WeightsError, ValueError, RuntimeError) as exc:  # RuntimeError: a device torch cannot use
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"model: {pipeline.describe()}", file=sys.stderr)
        written, failed = process_jobs(pipeline, [job for job in jobs if not job.video], background, args, manifest)
        errors += failed
        for job in (job for job in jobs if job.video):
            started = time.perf_counter()
            try:
                result = process_video(pipeline, job, background, args)
                written += 1
                record(manifest, job.source, job.outputs, pipeline.model_name, result.info.width, result.info.height,
                       time.perf_counter() - started)
            except (OSError, ValueError, RuntimeError) as exc:  # VideoError is a ValueError
                errors.append(f"{job.source}: {exc}")
                print(f"error: {errors[-1]}", file=sys.stderr)
                record(manifest, job.source, model=pipeline.model_name, error=str(exc))
    summary = f"{written} written, {len(errors)} failed, {len(skipped)} skipped"
    if skipped:
        summary += " (outputs exist; --overwrite replaces them)"
    print(summary, file=sys.stderr)
    return 1 if errors else 0


def record(manifest, source, outputs=None, model=None, width=None, height=None, seconds=0.0, error=None,
           skipped=False) -> None:
    """One manifest line (when --manifest was given)."""
    if manifest is not None:
        manifest.write(ManifestRecord(str(source), [str(p) for p in (outputs or {}).values()], model, width, height,
                                      seconds, error, skipped))


def process_video(pipeline, job: Job, background, args) -> None:
    """One clip, with a progress bar of frames (frames/s and time left)."""
    from .video import remove_video

    with tqdm(unit="frame", desc=job.source.name, disable=args.quiet, file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return remove_video(pipeline, job.source, args.output, fmt=args.video_format, background=background,
                     mask=args.mask, smooth=args.smooth, refine=args.refine, overwrite=args.overwrite,
                     max_seconds=args.max_video_seconds, progress=progress)


def process_jobs(pipeline, jobs: list[Job], background, args, manifest=None) -> tuple[int, list[str]]:
    """Runs the image jobs `batch_size` at a time; one bad input never stops the others."""
    written, failed = 0, []
    bar = tqdm(total=len(jobs), unit="img", disable=args.quiet, file=sys.stderr)
    for job, outcome in zip(jobs, pipeline.iter_results(job.source for job in jobs)):
        try:
            if outcome.error is not None:
                raise outcome.error
            save_outputs(job, outcome.result, background, args)
            written += 1
            image = outcome.result.image
            record(manifest, job.source, job.outputs, pipeline.model_name, image.width, image.height,
                   outcome.result.seconds)
        except (OSError, ValueError, RuntimeError) as exc:
            failed.append(report(bar, job.source, exc))
            record(manifest, job.source, model=pipeline.model_name, error=str(exc))
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
                      weights=args.weights, input_size=args.size,
                      progress=lambda items, **kw: tqdm(items, file=sys.stderr, **kw))
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

    collage = compare_collage(args.images, args.model, device=args.device, dtype=args.dtype, weights=args.weights)
    write_atomic(encode_image(collage, "png"), args.output, overwrite=True)
    print(f"collage written to {args.output}", file=sys.stderr)
    return 0


def run_export(args) -> int:
    from .export import ExportError, export_onnx

    try:
        report = export_onnx(args.model, args.output, weights=args.weights, size=args.size, dtype=args.dtype,
                             opset=args.opset, overwrite=args.overwrite)
    except ExportError as exc:  # the file disagreed with the network, or the exporter failed: nothing kept
        print(f"error: {exc}", file=sys.stderr)
        return 1
    height, width = report.size
    check = f"; ONNX Runtime agrees with PyTorch (worst {report.check.worst})" if report.check else ""
    data = f" (its tensors in {report.data_path.name} beside it: keep the two together)" if report.data_path else ""
    print(f"{report.path}: {report.model} at {width}x{height}, {report.dtype}, opset {report.opset}, dynamic "
          f"{'/'.join(report.dynamic_axes)}, {report.file_bytes / 2**20:.0f} MiB{data} in {report.seconds:.0f} s"
          f"{check}", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    from .cluster import run_serve as serve

    return serve(args)


COMMANDS = {"remove": run_remove, "models": run_models, "eval": run_eval, "make-benchmark": run_make_benchmark,
            "compare": run_compare, "export": run_export, "serve": run_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(getattr(args, "model", None), list) and len(args.model) > 1 and args.weights:
        parser.error(f"--weights is for one --model; with {len(args.model)} models it would be ambiguous")
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
