"""`rmbg remove --ray`: the same removal as the plain CLI, as a Ray Data job that spreads over a cluster.

Stages, each where Ray runs it best:
  read (CPU tasks: bytes from disk or object storage)
  -> decode + check (CPU tasks)
  -> network (an actor pool: the model loaded once per actor, one GPU per actor where there are GPUs,
     batches of --batch-size)
  -> mask + compose + encode (CPU tasks)
  -> write (CPU tasks: temp+rename locally, one PUT on object storage).
Rows carry their own error: a bad file becomes a manifest line, never the end of the job.
A dead model actor is restarted (its model loaded again) and its batches sent again: Ray Data's
actor pools default to max_restarts=-1 and max_task_retries=-1 (ray 2.60; passing them ourselves is
deprecated), and tests/test_cluster.py kills one mid-job to hold it to that.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..imageio import FORMAT_EXTENSIONS
from . import storage
from .manifest import ManifestRecord, ManifestWriter

STAGES = ("read", "decode", "network", "post", "write")
_ADDRESS = re.compile(r"^(auto|local|[a-z][a-z0-9+.-]*://.*|[\w.-]+:\d+)$")


# -- arguments ---------------------------------------------------------------------------------------
def add_ray_arguments(parser) -> None:
    """Adds --ray, --workers, --gpus-per-worker (and --manifest, unless the parser has it) to `rmbg remove`."""
    group = parser.add_argument_group("cluster (Ray Data)")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run as a Ray Data job: on RAY_ADDRESS if set, else on a local Ray started here; "
                            "or at ADDRESS ('auto', 'ray://HOST:10001', 'HOST:6379')")
    group.add_argument("--workers", default=None, metavar="N|MIN,MAX",
                       help="model actors: a fixed N, or MIN,MAX to autoscale (default: one per GPU, else 1)")
    group.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                       help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    if "--manifest" not in parser._option_string_actions:
        group.add_argument("--manifest", default=None, metavar="FILE",
                           help="JSON Lines, one record per input (with --ray: default OUT/manifest.jsonl)")


def split_ray_address(args) -> None:
    """`--ray` takes an optional value, so `rmbg remove --ray photo.jpg -o out` would read the photo as the
    address: a value that is no address is given back to the inputs."""
    value = getattr(args, "ray", None)
    if value and not _ADDRESS.match(value):
        args.inputs = [value, *args.inputs]
        args.ray = ""


def parse_workers(text: str | None, gpus_in_cluster: float) -> tuple[int, int]:
    """'4' -> (4, 4); '1,8' -> (1, 8); None -> one actor per GPU (autoscaling from 1), or 1 without GPUs."""
    if text is None:
        return (1, max(1, int(gpus_in_cluster))) if gpus_in_cluster >= 1 else (1, 1)
    parts = [p.strip() for p in str(text).split(",")]
    try:
        low, high = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise ValueError(f"--workers takes N or MIN,MAX, not {text!r}") from None
    if len(parts) > 2 or low < 1 or high < low:
        raise ValueError(f"--workers takes N or MIN,MAX with 1 <= MIN <= MAX, not {text!r}")
    return low, high


# -- the plan: inputs -> outputs, what is left to do -------------------------------------------------------
@dataclass
class Plan:
    tasks: list[dict] = field(default_factory=list)     # rows for the dataset
    done: list[ManifestRecord] = field(default_factory=list)    # every output there already (skipped)
    failed: list[ManifestRecord] = field(default_factory=list)  # inputs that cannot run (missing, name clash)


def plan_job(args) -> Plan:
    """The plain CLI's naming (`<stem>.png`, `<stem>_mask.png`) and rules: an output never replaces an
    input or another input's output; existing outputs are kept unless --overwrite (so a rerun resumes)."""
    plan = Plan()
    sources, errors = storage.list_images(args.inputs, recursive=args.recursive)
    sources = [storage.absolute(s) for s in sources]  # workers may have another working directory
    plan.failed += [ManifestRecord(input=text.split(": ", 1)[0], error=text) for text in errors]
    ext = FORMAT_EXTENSIONS[args.format]
    out = storage.absolute(storage.location(args.output))
    existing = {_canonical(p) for p in storage.existing_files(out)}
    inputs = {_canonical(s) for s in sources}
    taken: dict[str, str] = {}
    for source in sources:
        stem = storage.stem(source)
        outputs = {"image": storage.join(out, f"{stem}{ext}")}
        if args.mask:
            outputs["mask"] = storage.join(out, f"{stem}_mask{ext}")
        clash = next((p for p in outputs.values() if _canonical(p) in inputs or _canonical(p) in taken), None)
        if clash:
            why = "would overwrite an input" if _canonical(clash) in inputs else \
                f"is also the output of {taken[_canonical(clash)]} (same name); rename one"
            plan.failed.append(ManifestRecord(input=source, error=f"its output {clash} {why}"))
            continue
        taken.update({_canonical(p): source for p in outputs.values()})
        todo = {k: p for k, p in outputs.items() if args.overwrite or _canonical(p) not in existing}
        if not todo:
            plan.done.append(ManifestRecord(input=source, outputs=list(outputs.values()), skipped=True))
            continue
        kept = [p for k, p in outputs.items() if k not in todo]
        plan.tasks.append({"input": source, "image": todo.get("image", ""), "mask": todo.get("mask", ""),
                           "kept": json.dumps(kept)})
    return plan


def _canonical(location: str) -> str:
    if storage.is_uri(location):
        return location
    from pathlib import Path

    return str(Path(storage._local(location)).resolve())


# -- stages (module-level functions and a class: Ray ships them to the workers by reference) --------------
def _column(values, dtype=object) -> np.ndarray:
    out = np.empty(len(values), dtype=dtype)
    out[:] = values
    return out


def read_stage(batch: dict) -> dict:
    data, errors, seconds = [], [], []
    for location in batch["input"]:
        started = time.perf_counter()
        try:
            data.append(storage.read_bytes(str(location)))
            errors.append("")
        except OSError as exc:
            data.append(b"")
            errors.append(f"cannot read {location}: {exc}")
        seconds.append(time.perf_counter() - started)
    return {**batch, "data": _column(data), "error": _column(errors), "t_read": np.array(seconds)}


def decode_stage(batch: dict, max_pixels: int, model: str) -> dict:
    """Bytes -> pixels (RGB or RGBA, as the plain CLI decodes them) and the network's input, on the CPU;
    or the file's own error."""
    from ..imageio import ImageDecodeError, load_image
    from ..models import get_spec
    from ..processing import preprocess

    spec = get_spec(model)
    pixels, tensors, widths, heights, channels, errors, seconds = [], [], [], [], [], [], []
    for data, error in zip(batch["data"], batch["error"]):
        started = time.perf_counter()
        width = height = bands = 0
        raw = tensor = b""
        if not error:
            try:
                image = load_image(bytes(data), max_pixels=max_pixels)
                width, height, bands = image.width, image.height, len(image.getbands())
                raw = image.tobytes()
                tensor = preprocess(image, spec).numpy().tobytes()
            except (ImageDecodeError, OSError) as exc:
                error = str(exc)
        pixels.append(raw)
        tensors.append(tensor)
        widths.append(width)
        heights.append(height)
        channels.append(bands)
        errors.append(error)
        seconds.append(time.perf_counter() - started)
    rest = {k: v for k, v in batch.items() if k != "data"}
    return {**rest, "pixels": _column(pixels), "tensor": _column(tensors), "width": np.array(widths),
            "height": np.array(heights), "channels": np.array(channels), "error": _column(errors),
            "t_decode": np.array(seconds)}


def _image(row_pixels, width: int, height: int, channels: int):
    from PIL import Image

    return Image.frombytes("RGBA" if channels == 4 else "RGB", (int(width), int(height)), bytes(row_pixels))


class NetworkStage:
    """One engine per actor, built once (the model loaded once); each call is one network batch of the rows
    that decoded, their inputs already preprocessed by the CPU tasks."""

    def __init__(self, model: str, weights, device: str, dtype: str, batch_size: int, compile: str | None = None):
        from ..engines import build_engine
        from ..models import get_spec

        self.model = model
        self.size = tuple(get_spec(model).input_size)
        self.engine = build_engine(model, weights, device, dtype, input_size=self.size, compile=compile,
                                   max_batch=batch_size)

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..pipeline import BATCH_ERRORS

        ok = [i for i, error in enumerate(batch["error"]) if not error]
        n = len(batch["error"])
        probs, shapes, errors = [b""] * n, [(0, 0)] * n, list(batch["error"])
        started = time.perf_counter()
        if ok:
            inputs = np.stack([np.frombuffer(bytes(batch["tensor"][i]), np.float32) for i in ok])
            try:
                out = self.engine(torch.from_numpy(inputs.reshape(len(ok), 3, *self.size))).numpy()
                for i, probability in zip(ok, out):
                    probs[i] = np.ascontiguousarray(probability[0], dtype=np.float32).tobytes()
                    shapes[i] = probability.shape[1:]
            except BATCH_ERRORS as exc:  # out of memory at batch size 1, a device error: these rows fail
                for i in ok:
                    errors[i] = f"network: {exc}"
        each = (time.perf_counter() - started) / max(1, len(ok))
        rest = {k: v for k, v in batch.items() if k != "tensor"}
        return {**rest, "prob": _column(probs), "prob_h": np.array([s[0] for s in shapes]),
                "prob_w": np.array([s[1] for s in shapes]), "error": _column(errors),
                "model": _column([self.model] * n), "t_network": np.full(n, each if ok else 0.0)}


def _to_mask(probability: np.ndarray, size: tuple[int, int], model: str):
    """The model's own resize of the probabilities to the photo's size (the same masks as the plain CLI)."""
    import torch

    from ..models import get_spec
    from ..processing import to_mask

    return to_mask(torch.from_numpy(probability)[None], size, get_spec(model))


def post_stage(batch: dict, background, refine: bool, fmt: str) -> dict:
    """Probabilities -> mask at the photo's size -> cut-out or composite -> encoded bytes."""
    from ..imageio import encode_image
    from ..pipeline import RemovalResult

    images, masks, errors, seconds = [], [], list(batch["error"]), []
    for i in range(len(errors)):
        started = time.perf_counter()
        encoded_image = encoded_mask = b""
        if not errors[i]:
            try:
                size = (int(batch["width"][i]), int(batch["height"][i]))
                probability = np.frombuffer(bytes(batch["prob"][i]), np.float32).reshape(
                    int(batch["prob_h"][i]), int(batch["prob_w"][i]))
                mask = _to_mask(probability.copy(), size, str(batch["model"][i]))
                if batch["image"][i]:
                    photo = _image(batch["pixels"][i], *size, batch["channels"][i])
                    result = RemovalResult(photo, mask, str(batch["model"][i]))
                    encoded_image = encode_image(result.composite(_background(background), refine), fmt)
                if batch["mask"][i]:
                    encoded_mask = encode_image(mask, fmt)
            except (ValueError, OSError) as exc:
                errors[i] = str(exc)
        images.append(encoded_image)
        masks.append(encoded_mask)
        seconds.append(time.perf_counter() - started)
    rest = {k: v for k, v in batch.items() if k not in ("pixels", "prob", "prob_h", "prob_w")}
    return {**rest, "encoded_image": _column(images), "encoded_mask": _column(masks), "error": _column(errors),
            "t_post": np.array(seconds)}


def _background(spec):
    """None, a colour or 'blur' as given; an image background travels as its file's bytes."""
    if isinstance(spec, (bytes, bytearray)):
        from ..imageio import load_image

        return load_image(bytes(spec))
    return spec


def write_output(data: bytes, location: str, overwrite: bool) -> None:
    """Writes one output. A retried task (its worker died after writing) finds its own bytes there: not an error,
    and not written twice. Anything else already there is kept and reported."""
    try:
        storage.write_bytes(data, location, overwrite=overwrite)
    except FileExistsError:
        if storage.read_bytes(location) != data:
            raise


def write_stage(batch: dict, overwrite: bool) -> dict:
    outputs, errors, seconds = [], list(batch["error"]), []
    for i in range(len(errors)):
        started = time.perf_counter()
        written = json.loads(str(batch["kept"][i]))
        if not errors[i]:
            try:
                for kind, data_key in (("image", "encoded_image"), ("mask", "encoded_mask")):
                    if batch[kind][i]:
                        write_output(bytes(batch[data_key][i]), str(batch[kind][i]), overwrite)
                        written.append(str(batch[kind][i]))
            except OSError as exc:
                errors[i] = str(exc)
        outputs.append(json.dumps(written))
        seconds.append(time.perf_counter() - started)
    keep = ("input", "model", "width", "height", "t_read", "t_decode", "t_network", "t_post")
    return {**{k: batch[k] for k in keep}, "outputs": _column(outputs), "error": _column(errors),
            "t_write": np.array(seconds)}


# -- the driver ----------------------------------------------------------------------------------------------
def build_dataset(ray, plan: Plan, args, model: str, workers: tuple[int, int], gpus: float):
    """The stages as a lazy Ray Dataset of result rows (input, outputs, model, width, height, error, t_*)."""
    from ray.data import ActorPoolStrategy

    background = _background_for_workers(args.background)
    blocks = max(1, min(len(plan.tasks), 64))
    ds = ray.data.from_items(plan.tasks, override_num_blocks=blocks)
    small = {"batch_format": "numpy", "batch_size": 4, "zero_copy_batch": False}
    ds = ds.map_batches(read_stage, **small)
    ds = ds.map_batches(decode_stage, fn_kwargs={"max_pixels": args.max_pixels, "model": model}, **small)
    # Actor pool: the model loads once per actor; Ray restarts a dead actor and resends its batches.
    ds = ds.map_batches(
        NetworkStage, fn_constructor_kwargs={"model": model, "weights": _weights(args.weights),
                                             "device": args.device, "dtype": args.dtype,
                                             "batch_size": args.batch_size,
                                             "compile": getattr(args, "compile", None)},
        batch_size=args.batch_size, batch_format="numpy", zero_copy_batch=False,
        compute=ActorPoolStrategy(min_size=workers[0], max_size=workers[1]),
        num_gpus=gpus or None, num_cpus=None if gpus else 1, memory=actor_memory(model))
    ds = ds.map_batches(post_stage, fn_kwargs={"background": background, "refine": args.refine,
                                               "fmt": args.format}, **small)
    return ds.map_batches(write_stage, fn_kwargs={"overwrite": args.overwrite}, **small)


def actor_memory(model: str) -> int:
    """Bytes of RAM a model actor asks Ray for: the network, its inputs and outputs (a scheduling hint).

    It also makes the actor's resources differ from the CPU stages', so Ray does not fuse reading and
    decoding into the actor (it would, when both ask for one CPU), which would serialise them with the network."""
    from ..models import get_spec

    return (1024 if get_spec(model).runtime == "onnx" else 4096) * 1024 * 1024


def _weights(weights):
    return None if weights is None else str(weights)


def _background_for_workers(spec):
    """A background image file is read here (it may exist on this machine only); a colour is checked here."""
    from pathlib import Path

    if spec is None or spec in ("transparent", "none"):
        return None
    if Path(spec).is_file():
        return Path(spec).read_bytes()
    if spec != "blur":
        from ..compose import parse_color

        parse_color(spec)
    return spec


def _record(row: dict) -> ManifestRecord:
    error = str(row["error"]) or None
    return ManifestRecord(input=str(row["input"]), outputs=json.loads(str(row["outputs"])),
                          model=str(row["model"]) or None, width=int(row["width"]) or None,
                          height=int(row["height"]) or None, error=error,
                          seconds=sum(float(row[f"t_{stage}"]) for stage in STAGES))


class _Manifest:
    """The job's manifest: appended line by line locally; for an object-storage OUT, kept in a local
    file and uploaded (after any earlier run's lines) when the job ends or is interrupted."""

    def __init__(self, location: str):
        import tempfile

        self.location = location
        self.local = location if not storage.is_uri(location) else tempfile.mkstemp(suffix=".jsonl")[1]
        self.writer = ManifestWriter(self.local)

    def close(self) -> None:
        self.writer.close()
        if storage.is_uri(self.location):
            from pathlib import Path

            earlier = storage.read_bytes(self.location) if storage.exists(self.location) else b""
            storage.write_bytes(earlier + Path(self.local).read_bytes(), self.location, overwrite=True)
            Path(self.local).unlink(missing_ok=True)


def run_ray_job(args) -> int:
    """`rmbg remove ... --ray [ADDRESS]`: 0 when every input was written or kept, 1 when any failed,
    2 when the job could not start, 130 when interrupted (a rerun writes what is missing)."""
    from .runtime import RayMissingError, cluster_gpus, connect, import_ray

    split_ray_address(args)
    try:
        ray = import_ray()
        from ..pipeline import choose_model

        model = choose_model(args.model, args.weights)
        parse_workers(args.workers, 0)  # a bad --workers fails before anything starts
        plan = plan_job(args)
        started_here = connect(args.ray, quiet=args.quiet)
    except (RayMissingError, ValueError, OSError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output = storage.location(args.output)
    manifest = _Manifest(storage.location(args.manifest) if args.manifest else storage.join(args.output,
                                                                                             "manifest.jsonl"))
    totals = dict.fromkeys(STAGES, 0.0)
    started = time.perf_counter()
    processed = 0
    interrupted = False
    try:
        for record in plan.failed + plan.done:
            manifest.writer.write(record)
        for record in plan.failed:
            print(f"error: {record.error}", file=sys.stderr)
        if plan.tasks:
            gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if cluster_gpus() else 0.0)
            workers = parse_workers(args.workers, cluster_gpus() / gpus if gpus else 0)
            _quiet_progress(ray, args.quiet)
            if not args.quiet:
                print(f"ray: {len(plan.tasks)} images, model {model}, {workers[0]}-{workers[1]} model actors, "
                      f"{gpus:g} GPU each", file=sys.stderr)
            for row in build_dataset(ray, plan, args, model, workers, gpus).iter_rows():
                record = _record(row)
                manifest.writer.write(record)
                processed += 1
                for stage in STAGES:
                    totals[stage] += float(row[f"t_{stage}"])
                if record.error:
                    print(f"error: {record.input}: {record.error}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
    except ValueError as exc:  # a bad --workers or background colour
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        manifest.close()
        if started_here:
            ray.shutdown()
    wall = time.perf_counter() - started
    failed = manifest.writer.failed
    print(summary(processed - (failed - len(plan.failed)), failed, len(plan.done), wall, totals,
                  manifest.location), file=sys.stderr)
    if interrupted:
        print("interrupted: rerun the same command to write what is missing", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _quiet_progress(ray, quiet: bool) -> None:
    """-q: no progress bars and no execution log from Ray Data (errors and the summary still print)."""
    if quiet:
        import logging

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def summary(written: int, failed: int, skipped: int, wall: float, totals: dict, manifest: str) -> str:
    """What happened, how fast, and where the time went (seconds summed over all workers)."""
    rate = written / wall if wall > 0 else 0.0
    spent = sum(totals.values()) or 1.0
    stages = ", ".join(f"{stage} {seconds:.1f} s ({100 * seconds / spent:.0f}%)" for stage, seconds in totals.items())
    text = (f"{written} written, {failed} failed, {skipped} skipped in {wall:.1f} s ({rate:.2f} images/s)\n"
            f"time per stage, summed over workers: {stages}\nmanifest: {manifest}")
    if skipped:
        text += f"\n{skipped} inputs had every output already (--overwrite replaces them)"
    return text


def remove_parser():
    """The CLI's `rmbg remove` parser with the Ray flags (added here until the CLI adds them itself)."""
    from ..cli import build_parser

    parser = build_parser()
    remove = parser._subparsers._group_actions[0].choices["remove"]
    if "--ray" not in remove._option_string_actions:
        add_ray_arguments(remove)
    return parser
