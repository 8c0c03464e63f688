"""`rmbg remove --ray`: the same removal as the plain CLI, as a Ray Data job that spreads over a cluster.

Stages, each where Ray runs it best, each the pipeline's own public step:
  read (CPU tasks: bytes from disk or object storage)
  -> decode + preprocess (CPU tasks: `Processor.load`, `Processor.preprocess`)
  -> network (an actor pool: the engine built once per actor by `build_engine`, one GPU per actor where
     there are GPUs, batches of --batch-size)
  -> mask + compose + encode (CPU tasks: `Processor.to_mask`, then `request.encoded_outputs`)
  -> write (CPU tasks: temp+rename locally, one PUT on object storage).
The plan (which outputs, what is left to do) is `outputs.plan_outputs`, the plain CLI's. Rows carry their
own error: a bad file becomes a manifest line, never the end of the job. A dead model actor is restarted
(its model loaded again) and its batches sent again: Ray Data's actor pools default to max_restarts=-1
and max_task_retries=-1 (ray 2.60; passing them ourselves is deprecated), and tests/test_cluster.py kills
one mid-job to hold it to that.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import storage
from ..engines import build_engine, is_exported_file, runtime_for
from ..imageio import ImageDecodeError
from ..manifest import ManifestRecord, ManifestWriter
from ..models import Runtime, get_spec
from ..outputs import BatchRun, Plan, plan_outputs, skipped_record
from ..pipeline import BATCH_ERRORS, Processor, network_size_for, resolve_model
from ..request import NetworkSize, RemovalOptions, encoded_outputs
from .runtime import RayMissingError, cluster_gpus, import_ray, ray_session

STAGES = ("read", "decode", "network", "post", "write")


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None or "": RAY_ADDRESS, else a local Ray started here
    workers: str | None = None  # N or MIN,MAX model actors
    gpus_per_worker: float | None = None


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


# -- the plan: the plain CLI's -------------------------------------------------------------------------
def tasks_of(plan: Plan) -> list[dict]:
    """The dataset's rows: each input with the outputs to write now and those kept (and, for a cascade's
    second pass, the first model and its score)."""
    return [{"input": storage.absolute(job.source), "image": job.todo.get("image", ""),
             "mask": job.todo.get("mask", ""), "kept": json.dumps(job.kept), "first_model": "",
             "first_confidence": float("nan")} for job in plan.jobs]


def resolve_model_size(model: str | None, weights, size, runtime: str = "auto") -> tuple[str, NetworkSize]:
    """The model and network size a pass runs at, decided as the plain CLI's pipeline decides them. An ONNX
    engine is opened here to read what it says (an export's model and size, a fixed size); a PyTorch network
    is not loaded on the driver. A runtime that cannot run the model is refused here, not in every actor."""
    chosen, engine = resolve_model(model, weights), None  # resolved once: choose_model logs its pick
    runtime_for(get_spec(chosen), weights, runtime=runtime, device="cpu")
    if is_exported_file(weights) or get_spec(chosen).runtime is Runtime.ONNX:
        engine = build_engine(chosen, weights, "cpu", input_size=size)
        chosen = resolve_model(model, weights, engine, chosen)
    return chosen, network_size_for(get_spec(chosen), size, engine)


def resolve_request(options: RemovalOptions, run: BatchRun) -> tuple[str, NetworkSize]:
    return resolve_model_size(options.model, run.weights, options.size, run.runtime)


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


def decode_stage(batch: dict, model: str, size: tuple[int, int], max_pixels: int) -> dict:
    """Bytes -> pixels (RGB or RGBA, as the plain CLI decodes them) and the network's input, on the CPU;
    or the file's own error."""
    processor = Processor(get_spec(model), size, max_pixels)
    pixels, tensors, widths, heights, channels, errors, seconds = [], [], [], [], [], [], []
    for data, error in zip(batch["data"], batch["error"]):
        started = time.perf_counter()
        width = height = bands = 0
        raw = tensor = b""
        if not error:
            try:
                image = processor.load(bytes(data))
                width, height, bands = image.width, image.height, len(image.getbands())
                raw = image.tobytes()
                tensor = processor.preprocess(image).numpy().tobytes()
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


def _image(row_pixels, width: int, height: int, channels: int) -> Image.Image:
    return Image.frombytes("RGBA" if channels == 4 else "RGB", (int(width), int(height)), bytes(row_pixels))


class NetworkStage:
    """One engine per actor, built once (the model loaded once); each call is one network batch of the rows
    that decoded, their inputs already preprocessed by the CPU tasks."""

    def __init__(self, model: str, size: tuple[int, int], weights, run: BatchRun):
        self.model, self.size = model, tuple(size)
        self.engine = build_engine(model, weights, run.device, run.dtype, input_size=self.size,
                                   compile=run.compile, max_batch=run.batch_size, runtime=run.runtime)

    def __call__(self, batch: dict) -> dict:
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


def post_stage(batch: dict, size: tuple[int, int], options: RemovalOptions, run: BatchRun, escalating: bool) -> dict:
    """Probabilities -> mask at the photo's size and its confidence -> cut-out or composite -> encoded bytes.
    By confidence: held back for the cascade's second model (`escalating`: nothing encoded), or sent to
    OUT/review/ (the row's output locations change)."""
    images, masks, errors, seconds = [], [], list(batch["error"]), []
    targets = {kind: [str(value) for value in batch[kind]] for kind in ("image", "mask")}
    scores, reviewed, held = [], [], []
    for i in range(len(errors)):
        started = time.perf_counter()
        encoded, score, review, hold = {}, float("nan"), False, False
        if not errors[i]:
            try:
                model = str(batch["model"][i])
                photo_size = (int(batch["width"][i]), int(batch["height"][i]))
                probability = torch.from_numpy(np.frombuffer(bytes(batch["prob"][i]), np.float32).reshape(
                    int(batch["prob_h"][i]), int(batch["prob_w"][i])).copy())[None]
                photo = _image(batch["pixels"][i], *photo_size, batch["channels"][i])
                result = Processor(get_spec(model), size, run.max_pixels).result_of(photo, probability)
                score = result.confidence
                hold = escalating and run.escalates(score)
                review = not hold and run.reviews(score)
                for kind in ("image", "mask"):
                    if review and targets[kind][i]:
                        targets[kind][i] = run.review_location(targets[kind][i])
                kinds = [kind for kind in ("image", "mask") if targets[kind][i] and not hold]
                encoded = encoded_outputs(result, options, kinds=kinds)
            except (ValueError, OSError) as exc:
                errors[i] = str(exc)
        images.append(encoded.get("image", b""))
        masks.append(encoded.get("mask", b""))
        scores.append(score)
        reviewed.append(review)
        held.append(hold)
        seconds.append(time.perf_counter() - started)
    rest = {k: v for k, v in batch.items() if k not in ("pixels", "prob", "prob_h", "prob_w")}
    return {**rest, "image": _column(targets["image"]), "mask": _column(targets["mask"]),
            "encoded_image": _column(images), "encoded_mask": _column(masks), "error": _column(errors),
            "confidence": np.array(scores, dtype=np.float64), "review": np.array(reviewed, dtype=bool),
            "escalate": np.array(held, dtype=bool), "t_post": np.array(seconds)}


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
        if not errors[i] and not batch["escalate"][i]:
            try:
                for kind, data_key in (("image", "encoded_image"), ("mask", "encoded_mask")):
                    if batch[kind][i]:
                        write_output(bytes(batch[data_key][i]), str(batch[kind][i]), overwrite)
                        written.append(str(batch[kind][i]))
            except OSError as exc:
                errors[i] = str(exc)
        outputs.append(json.dumps(written))
        seconds.append(time.perf_counter() - started)
    keep = ("input", "model", "width", "height", "t_read", "t_decode", "t_network", "t_post", "confidence", "review",
            "escalate", "image", "mask", "kept", "first_model", "first_confidence")
    return {**{k: batch[k] for k in keep}, "outputs": _column(outputs), "error": _column(errors),
            "t_write": np.array(seconds)}


# -- the driver ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pass:
    """One pass of the job over its rows: the model, its network size and weights; `escalating`: rows
    under --escalate-below are held back for the second pass."""

    model: str
    size: NetworkSize
    weights: str | None
    escalating: bool


def build_dataset(ray, tasks: list[dict], run: BatchRun, options: RemovalOptions, stage: Pass,
                  workers: tuple[int, int], gpus: float):
    """The stages as a lazy Ray Dataset of result rows (input, outputs, model, width, height, error, t_*)."""
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(tasks, override_num_blocks=max(1, min(len(tasks), 64)))
    small = {"batch_format": "numpy", "batch_size": 4, "zero_copy_batch": False}
    ds = ds.map_batches(read_stage, **small)
    ds = ds.map_batches(decode_stage, fn_kwargs={"model": stage.model, "size": stage.size,
                                                 "max_pixels": run.max_pixels}, **small)
    # Actor pool: the model loads once per actor; Ray restarts a dead actor and resends its batches.
    ds = ds.map_batches(
        NetworkStage, fn_constructor_kwargs={"model": stage.model, "size": stage.size, "weights": stage.weights,
                                             "run": run},
        batch_size=run.batch_size, batch_format="numpy", zero_copy_batch=False,
        compute=ActorPoolStrategy(min_size=workers[0], max_size=workers[1]),
        num_gpus=gpus or None, num_cpus=None if gpus else 1, memory=actor_memory(stage.model))
    ds = ds.map_batches(post_stage, fn_kwargs={"size": stage.size, "options": options, "run": run,
                                               "escalating": stage.escalating}, **small)
    return ds.map_batches(write_stage, fn_kwargs={"overwrite": run.overwrite}, **small)


def actor_memory(model: str) -> int:
    """Bytes of RAM a model actor asks Ray for: the network, its inputs and outputs (a scheduling hint).

    It also makes the actor's resources differ from the CPU stages', so Ray does not fuse reading and
    decoding into the actor (it would, when both ask for one CPU), which would serialise them with the network."""
    return get_spec(model).actor_memory_mb * 1024 * 1024


def _score(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _record(row: dict) -> ManifestRecord:
    error = str(row["error"]) or None
    return ManifestRecord(input=str(row["input"]), outputs=json.loads(str(row["outputs"])),
                          model=str(row["model"]) or None, width=int(row["width"]) or None,
                          height=int(row["height"]) or None, error=error,
                          seconds=sum(float(row[f"t_{stage}"]) for stage in STAGES),
                          confidence=_score(row["confidence"]), review=bool(row["review"]),
                          escalated_from=str(row["first_model"]) or None,
                          first_confidence=_score(row["first_confidence"]))


def _held_task(row: dict) -> dict:
    """A row the first model was unsure of, as a task for the second pass."""
    return {"input": str(row["input"]), "image": str(row["image"]), "mask": str(row["mask"]),
            "kept": str(row["kept"]), "first_model": str(row["model"]), "first_confidence": float(row["confidence"])}


class _Manifest:
    """The job's manifest: appended line by line locally; for an object-storage OUT, kept in a local
    file and uploaded (after any earlier run's lines) when the job ends or is interrupted."""

    def __init__(self, location: str):
        self.location = location
        self.local = location if not storage.is_uri(location) else tempfile.mkstemp(suffix=".jsonl")[1]
        self.writer = ManifestWriter(self.local)

    def close(self) -> None:
        self.writer.close()
        if storage.is_uri(self.location):
            earlier = storage.read_bytes(self.location) if storage.exists(self.location) else b""
            storage.write_bytes(earlier + Path(self.local).read_bytes(), self.location, overwrite=True)
            Path(self.local).unlink(missing_ok=True)


def run_ray_job(run: BatchRun, options: RemovalOptions, ray_settings: RaySettings) -> int:
    """`rmbg remove ... --ray [ADDRESS]`: 0 when every input was written or kept, 1 when any failed,
    2 when the job could not start, 130 when interrupted (a rerun writes what is missing)."""
    run = replace(run, output=storage.absolute(run.output))  # workers may have another working directory
    try:
        import_ray()  # a missing extra is said first
        model, size = resolve_request(options, run)
        run.check_cascade(model)
        second = resolve_model_size(run.escalate_to, run.escalate_weights, run.escalate_size, run.runtime) \
            if run.escalate_to else None
        parse_workers(ray_settings.workers, 0)  # a bad --workers fails before anything starts
        plan = plan_outputs(run, options)
    except (RayMissingError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passes = [Pass(model, size, run.weights, escalating=second is not None)]
    if second:
        passes.append(Pass(*second, run.escalate_weights, escalating=False))
    try:
        with ray_session(ray_settings.address, quiet=run.quiet) as ray:
            return _run(ray, plan, run, options, ray_settings, passes)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _Progress:
    """The job's counts and where the time went, across its passes."""

    def __init__(self):
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.processed = 0
        self.reviewed: list[str] = []
        self.started = time.perf_counter()

    def add(self, row: dict, record: ManifestRecord) -> None:
        self.processed += 1
        for stage in STAGES:
            self.totals[stage] += float(row[f"t_{stage}"])
        if record.review:
            self.reviewed.append(record.input)


def _run(ray, plan: Plan, run: BatchRun, options: RemovalOptions, ray_settings: RaySettings,
         passes: list[Pass]) -> int:
    manifest = _Manifest(storage.location(run.manifest) if run.manifest else storage.join(run.output,
                                                                                           "manifest.jsonl"))
    progress = _Progress()
    interrupted = False
    try:
        for record in plan.failed + [skipped_record(job) for job in plan.skipped]:
            manifest.writer.write(record)
        for record in plan.failed:
            print(f"error: {record.input}: {record.error}", file=sys.stderr)
        tasks = tasks_of(plan)
        for stage in passes:
            if not tasks:
                break
            tasks = _one_pass(ray, tasks, run, options, ray_settings, stage, manifest, progress)
    except KeyboardInterrupt:
        interrupted = True
    except ValueError as exc:  # a bad --workers
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        manifest.close()
    wall = time.perf_counter() - progress.started
    failed = manifest.writer.failed
    print(summary(progress.processed - (failed - len(plan.failed)), failed, len(plan.skipped), wall,
                  progress.totals, manifest.location), file=sys.stderr)
    if progress.reviewed:
        print(f"{len(progress.reviewed)} under --review-below {run.review_below:g}, written to "
              f"{storage.join(run.output, 'review')}: " + ", ".join(storage.name(i) for i in progress.reviewed),
              file=sys.stderr)
    if interrupted:
        print("interrupted: rerun the same command to write what is missing", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _one_pass(ray, tasks: list[dict], run: BatchRun, options: RemovalOptions, ray_settings: RaySettings,
              stage: Pass, manifest: _Manifest, progress: _Progress) -> list[dict]:
    """Runs `tasks` through `stage`'s model, writing each finished row's manifest line; returns the rows held
    back for the next pass (the cascade's escalated ones; only their rows reach its actors)."""
    gpus = ray_settings.gpus_per_worker if ray_settings.gpus_per_worker is not None else \
        (1.0 if cluster_gpus() else 0.0)
    workers = parse_workers(ray_settings.workers, cluster_gpus() / gpus if gpus else 0)
    _quiet_progress(ray, run.quiet)
    if not run.quiet or tasks[0]["first_model"]:
        what = f"escalating {len(tasks)} images to" if tasks[0]["first_model"] else f"ray: {len(tasks)} images,"
        print(f"{what} model {stage.model} at {stage.size}, {workers[0]}-{workers[1]} model actors, {gpus:g} GPU "
              f"each", file=sys.stderr)
    held = []
    for row in build_dataset(ray, tasks, run, options, stage, workers, gpus).iter_rows():
        if bool(row["escalate"]):
            held.append(_held_task(row))
            continue
        record = _record(row)
        manifest.writer.write(record)
        progress.add(row, record)
        if record.error:
            print(f"error: {record.input}: {record.error}", file=sys.stderr)
    return held


def _quiet_progress(ray, quiet: bool) -> None:
    """-q: no progress bars and no execution log from Ray Data (errors and the summary still print)."""
    if quiet:
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
