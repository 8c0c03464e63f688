"""`rmbg` / `python -m rmbg_demo`: background removal from the command line."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import storage
from .arguments import (
    add_compile_argument,
    add_memory_argument,
    add_model_arguments,
    add_size_argument,
    size_argument,
)
from .atomic import write_atomic
from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, encode_image
from .manifest import ManifestRecord, ManifestWriter
from .models import REGISTRY, model_names, torch_model_names
from .outputs import BatchRun, Job, plan_outputs, skipped_record
from .request import RemovalOptions, encoded_outputs

log = logging.getLogger("rmbg_demo")


def build_parser() -> argparse.ArgumentParser:
    from .video import FORMATS as VIDEO_FORMATS

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
    add_framing_arguments(remove)
    remove.add_argument("--recursive", "-r", action="store_true", help="look into sub-folders of folder inputs")
    remove.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    remove.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse larger images (default 50 MP)")
    remove.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    routing = remove.add_argument_group("by confidence", "each result's confidence (0-1, in the manifest) routes it")
    routing.add_argument("--review-below", type=float, metavar="T",
                         help="write the outputs of images scoring under T to OUT/review/ and list them at the end")
    routing.add_argument("--escalate-to", metavar="MODEL", help="run the images scoring under --escalate-below "
                                                                "again on MODEL and keep its answer")
    routing.add_argument("--escalate-below", type=float, metavar="T", help="the cascade's threshold")
    routing.add_argument("--escalate-weights", metavar="FILE", help="the second model's weights (--weights is "
                                                                   "the first model's)")
    routing.add_argument("--escalate-size", type=size_argument, metavar="N|WxH",
                         help="the second model's network size (--size is the first model's; default: its own)")
    remove.add_argument("--manifest", metavar="FILE",
                        help="JSON Lines, one record per input: input, outputs, model, width, height, seconds, error, "
                             "confidence (with a cascade: escalated_from, first_confidence; review) "
                             "(with --ray always written, by default to OUT/manifest.jsonl)")
    add_ray_arguments(remove)
    video = remove.add_argument_group("video", "clips (recognised by their content) in the inputs")
    video.add_argument("--video-format", choices=list(VIDEO_FORMATS), default="webm",
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


def add_framing_arguments(parser) -> None:
    """Product-photo finishing (RemovalOptions' framing fields; checked before any image is read)."""
    group = parser.add_argument_group("framing", "crop to the subject, place it on a canvas, add a shadow")
    group.add_argument("--crop", action="store_const", const=True, help="crop the output (and mask) to the subject")
    group.add_argument("--margin", metavar="N|N%", help="space around the subject: pixels, or a percentage of its "
                                                       "box's width (left, right) and height (top, bottom)")
    group.add_argument("--canvas", metavar="WxH", help="place the subject on a canvas of this size")
    group.add_argument("--scale", metavar="P%", help="the subject's box fills P%% of the canvas (its limiting side; "
                                                     "without --canvas, of the output frame); default: as it comes")
    group.add_argument("--position", metavar="WHERE", help="original (default: where it is; centred on a canvas), "
                                                           "center, top, bottom, left, right or X%%,Y%%: where the "
                                                           "subject's box sits")
    group.add_argument("--shadow", choices=["drop", "contact", "none"], help="a soft shadow from the subject's alpha")
    group.add_argument("--shadow-opacity", metavar="0-1", help="default 0.5")
    group.add_argument("--shadow-blur", metavar="PX", help="default: 2.5%% of the subject's height")
    group.add_argument("--shadow-offset", metavar="X,Y", help="pixels (default: drop 2%%, 3%% of the subject's box)")
    group.add_argument("--srgb", action="store_const", const=True,
                       help="convert to sRGB (default: keep the photo's colour profile in the output)")


def add_ray_arguments(parser) -> None:
    """--ray, --workers, --gpus-per-worker on `rmbg remove`."""
    group = parser.add_argument_group("cluster (Ray Data)")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run as a Ray Data job: on RAY_ADDRESS if set, else on a local Ray started here; "
                            "or at ADDRESS ('auto', 'ray://HOST:10001', 'HOST:6379')")
    group.add_argument("--workers", default=None, metavar="N|MIN,MAX",
                       help="model actors: a fixed N, or MIN,MAX to autoscale (default: one per GPU, else 1)")
    group.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                       help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")


def add_serve_parser(subparsers):
    serve = subparsers.add_parser(
        "serve", help="an HTTP API (POST /remove, remove.bg's POST /v1.0/removebg; OpenAPI at /docs)",
        description="Runs until Ctrl-C: here, with uvicorn (no Ray needed), or with --ray on Ray Serve "
                    "(pip install 'rmbg-demo[ray]').")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="deploy on Ray Serve: the cluster at ADDRESS (default: RAY_ADDRESS, else a local Ray)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface: "
                                                           "add an API key)")
    serve.add_argument("--port", type=int, default=8000)
    add_model_arguments(serve)  # --model, --weights (a path every node sees), --device, --dtype
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="a key clients must send (X-Api-Key: KEY or Authorization: Bearer KEY); repeatable")
    serve.add_argument("--api-keys", metavar="FILE", help="keys, one per line (also: RMBG_API_KEYS=KEY1,KEY2)")
    serve.add_argument("--rate-limit", metavar="N/min", help="requests a minute per key (per address without keys); "
                                                             "more get 429 with Retry-After")
    serve.add_argument("--replicas", default=None, metavar="N|auto",
                       help="with --ray: replicas of the model; auto: 1 to one per GPU (or 4), by requests in flight")
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests that share a network batch")
    serve.add_argument("--max-queued", type=int, default=64, metavar="N",
                       help="requests waiting beyond those being served; more get 503")
    serve.add_argument("--max-upload-mb", type=float, default=25.0, help="bigger bodies get 413")
    add_memory_argument(serve)
    serve.add_argument("--allow-private-urls", action="store_true",
                       help="let URL fields (JSON url, image_url, bg_image_url) reach private and loopback addresses")
    return serve


_RAY_ADDRESS = re.compile(r"^(auto|local|[a-z][a-z0-9+.-]*://.*|[\w.-]+:\d+)$")


def split_ray_address(args) -> None:
    """`--ray` takes an optional value, so `rmbg remove --ray photo.jpg -o out` would read the photo as the
    address: a value that is no address is given back to the inputs."""
    value = getattr(args, "ray", None)
    if value and not _RAY_ADDRESS.match(value):
        args.inputs = [value, *args.inputs]
        args.ray = ""


def run_remove(args) -> int:
    split_ray_address(args)
    options = RemovalOptions.from_args(args)  # OptionError (a ValueError): exit 2 before any work
    run = BatchRun.from_args(args)
    if args.ray is not None:
        from .cluster.job import RaySettings, run_ray_job

        return run_ray_job(run, options, RaySettings(args.ray, args.workers, args.gpus_per_worker))
    manifest = ManifestWriter(run.manifest) if run.manifest else None
    try:
        return remove_here(run, options, manifest)
    finally:
        if manifest:
            manifest.close()


def outputs_for(run: BatchRun):
    """The planner's hook for clips: told apart by their content (a clip renamed .jpg is still a clip), and
    one that looks like a clip but cannot be used says why (truncated, audio only, too large: VideoError, a
    ValueError: that input fails alone). Files with an image extension go to the image decoder."""
    from .outputs import image_outputs
    from .video import check_video_framing, classify_media, output_paths

    def outputs(source: str, out: str, options: RemovalOptions) -> tuple[dict[str, str], bool]:
        if classify_media(source, max_pixels=run.max_pixels) == "video":
            check_video_framing(options, run.video_format, options.background.value, options.mask)
            paths = output_paths(source, out, fmt=run.video_format, background=options.background.value,
                                 mask=options.mask)
            return {kind: str(path) for kind, path in paths.items()}, True
        return image_outputs(source, out, options), False

    return outputs


@dataclass
class Tally:
    """What a run did, for its summary: counts, errors, and the images routed by their confidence."""

    written: int = 0
    errors: list[str] = field(default_factory=list)
    escalated: list[tuple[Job, float]] = field(default_factory=list)  # (job, the first model's confidence)
    reviewed: list[str] = field(default_factory=list)


def remove_here(run: BatchRun, options: RemovalOptions, manifest) -> int:
    """`rmbg remove` in this process."""
    from .video import VIDEO_EXTENSIONS

    plan = plan_outputs(run, options, outputs_for=outputs_for(run), extensions=IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
    tally = Tally(errors=[f"{failed.input}: {failed.error}" for failed in plan.failed])
    for failed, message in zip(plan.failed, tally.errors):
        print(f"error: {message}", file=sys.stderr)
        record(manifest, failed)
    for job in plan.skipped:
        record(manifest, skipped_record(job))
    if plan.jobs:
        pipeline = open_pipeline(options.model, run.weights, run, options.size)
        if pipeline is None:
            return 2
        run.check_cascade(pipeline.model_name)  # OptionError: before any image
        process_images(pipeline, [job for job in plan.jobs if not job.video], run, options, manifest, tally)
        for job in (job for job in plan.jobs if job.video):
            process_video_job(pipeline, job, run, options, manifest, tally)
        if tally.escalated and escalate(pipeline, run, options, manifest, tally) is None:
            return 2
    summary = f"{tally.written} written, {len(tally.errors)} failed, {len(plan.skipped)} skipped"
    if plan.skipped:
        summary += " (outputs exist; --overwrite replaces them)"
    print(summary, file=sys.stderr)
    if tally.reviewed:
        review = storage.join(run.output, "review")
        print(f"{len(tally.reviewed)} under --review-below {run.review_below:g}, written to {review}: "
              + ", ".join(Path(source).name for source in tally.reviewed), file=sys.stderr)
    return 1 if tally.errors else 0


def open_pipeline(model: str, weights, run: BatchRun, size):
    """The run's pipeline for `model` at network size `size` (None: the model's own), or None after
    saying why it cannot be built."""
    from .pipeline import RemovalPipeline
    from .weights import WeightsError

    try:
        pipeline = RemovalPipeline(model, weights, run.device, run.dtype, batch_size=run.batch_size,
                                   max_pixels=run.max_pixels, compile=run.compile, input_size=size,
                                   runtime=run.runtime)
    except (WeightsError, ValueError, RuntimeError) as exc:  # RuntimeError: a device torch cannot use
        print(f"error: {exc}", file=sys.stderr)
        return None
    print(f"model: {pipeline.describe()}", file=sys.stderr)
    return pipeline


def escalate(first, run: BatchRun, options: RemovalOptions, manifest, tally: Tally):
    """The images the first model was unsure of, again on --escalate-to; its answers are kept."""
    jobs = [job for job, _ in tally.escalated]
    print(f"escalating {len(jobs)} images (confidence under {run.escalate_below:g} with {first.model_name}) "
          f"to {run.escalate_to}", file=sys.stderr)
    second = open_pipeline(run.escalate_to, run.escalate_weights, run, run.escalate_size)
    if second is None:
        return None
    scores = {job.source: score for job, score in tally.escalated}
    tally.escalated = []
    process_images(second, jobs, run, options, manifest, tally, first=(first.model_name, scores))
    return second


def record(manifest, entry: ManifestRecord) -> None:
    """One manifest line (when --manifest was given)."""
    if manifest is not None:
        manifest.write(entry)


def process_video_job(pipeline, job: Job, run: BatchRun, options: RemovalOptions, manifest, tally: Tally) -> None:
    """One clip, with a progress bar of frames (frames/s and time left)."""
    from .video import remove_video

    started = time.perf_counter()
    try:
        with tqdm(unit="frame", desc=Path(job.source).name, disable=run.quiet, file=sys.stderr) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = remove_video(pipeline, job.source, run.output, fmt=run.video_format,
                                  background=options.background.value, mask=options.mask, smooth=run.smooth,
                                  refine=options.refine, overwrite=run.overwrite,
                                  max_seconds=run.max_video_seconds, progress=progress, framing=options)
        tally.written += 1
        record(manifest, ManifestRecord(job.source, list(job.outputs.values()), pipeline.model_name,
                                        result.info.width, result.info.height, time.perf_counter() - started))
    except (OSError, ValueError, RuntimeError) as exc:  # VideoError is a ValueError
        tally.errors.append(f"{job.source}: {exc}")
        print(f"error: {tally.errors[-1]}", file=sys.stderr)
        record(manifest, ManifestRecord(job.source, model=pipeline.model_name, error=str(exc)))


def process_images(pipeline, jobs: list[Job], run: BatchRun, options: RemovalOptions, manifest, tally: Tally,
                   first: tuple[str, dict[str, float]] | None = None) -> None:
    """Runs the image jobs `batch_size` at a time; one bad input never stops the others. With a cascade,
    an image under --escalate-below is held for the second model (`first`: that first model and its
    scores, when these are the held images); one under --review-below goes to OUT/review/."""
    bar = tqdm(total=len(jobs), unit="img", disable=run.quiet, file=sys.stderr)
    for job, outcome in zip(jobs, pipeline.iter_results(job.source for job in jobs)):
        try:
            if outcome.error is not None:
                raise outcome.error
            result = outcome.result
            if first is None and run.escalate_to and run.escalates(result.confidence):
                tally.escalated.append((job, result.confidence))
                bar.update(1)
                continue
            review = run.reviews(result.confidence)
            targets = {kind: run.review_location(location) if review else location
                       for kind, location in job.todo.items()}
            for kind, data in encoded_outputs(result, options, kinds=targets).items():
                storage.write_bytes(data, targets[kind], overwrite=run.overwrite)
            tally.written += 1
            tally.reviewed += [job.source] if review else []
            record(manifest, ManifestRecord(
                job.source, [targets.get(kind, location) for kind, location in job.outputs.items()],
                pipeline.model_name, result.image.width, result.image.height, result.seconds,
                confidence=result.confidence, review=review, escalated_from=first[0] if first else None,
                first_confidence=first[1][job.source] if first else None))
        except (OSError, ValueError, RuntimeError) as exc:
            tally.errors.append(report(bar, job.source, exc))
            record(manifest, ManifestRecord(job.source, model=pipeline.model_name, error=str(exc)))
        bar.update(1)
    bar.close()


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
                      runtime=args.runtime, weights=args.weights, input_size=args.size,
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

    collage = compare_collage(args.images, args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                              runtime=args.runtime)
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
    from .service.access import load_api_keys, open_host_warning, parse_rate_limit
    from .service.settings import ServeSettings

    try:
        keys = load_api_keys(args.api_key, args.api_keys)
        rate_limit = parse_rate_limit(args.rate_limit)
        if args.replicas is not None and args.ray is None:
            raise ValueError("--replicas needs --ray (the plain server is one process; batching shares its model)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = ServeSettings(model=args.model, weights=str(args.weights) if args.weights else None,
                             device=args.device, dtype=args.dtype, runtime=args.runtime, max_batch=args.max_batch,
                             max_queued=args.max_queued,
                             max_bytes=int(args.max_upload_mb * 1024 * 1024),
                             allow_private_urls=args.allow_private_urls, max_memory=args.max_memory, api_keys=keys,
                             rate_limit=rate_limit)
    warning = None if keys else open_host_warning(args.host)
    if warning:
        print(f"\n{warning}\n", file=sys.stderr)
    if args.ray is None:
        from .service.plain import serve_here

        return serve_here(settings, host=args.host, port=args.port)
    from .cluster.serve import run_serve

    return run_serve(settings, address=args.ray, host=args.host, port=args.port, replicas=args.replicas or "1")


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
