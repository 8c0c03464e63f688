"""A removal run over files (`rmbg remove`, with or without `--ray`): what it reads, where each output goes,
and what is left to do. One planner for both, so that the names and rules are the same:

- OUT/<stem><ext> (the cut-out or composite), OUT/<stem>_mask<ext> with a mask; a clip's outputs as
  `rmbg_demo.video.output_paths` names them;
- an output never replaces an input, nor another input's output (same stem): that input fails, alone;
- existing outputs are kept unless --overwrite, so a rerun writes only what is missing.

Locations are local paths or object-storage URIs (`rmbg_demo.storage`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from .manifest import ManifestRecord
from .request import NetworkSize, OptionError, RemovalOptions, parse_model

REVIEW_FOLDER = "review"


@dataclass(frozen=True)
class BatchRun:
    """How a run over files goes, beside what each image asks for (`RemovalOptions`)."""

    inputs: tuple[str, ...]
    output: str  # a folder, or with --ray an object-storage prefix
    recursive: bool = False
    overwrite: bool = False
    quiet: bool = False
    manifest: str | None = None
    batch_size: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    runtime: str = "auto"
    compile: str | None = None
    # clips among the inputs
    video_format: str = "webm"
    smooth: bool = False
    max_video_seconds: float | None = None
    # by confidence (rmbg_demo.confidence): outputs under `review_below` go to OUT/review/; images under
    # `escalate_below` run again on `escalate_to`, whose answer is kept
    review_below: float | None = None
    escalate_to: str | None = None
    escalate_below: float | None = None
    escalate_weights: str | None = None  # the second model's weights (default: found as for --model)
    escalate_size: NetworkSize | None = None  # the second model's network size (default: its own)

    def __post_init__(self):
        for setting, value in (("--review-below", self.review_below), ("--escalate-below", self.escalate_below)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise OptionError(setting, value, "a confidence threshold is between 0 and 1")
        if (self.escalate_to is None) != (self.escalate_below is None):
            raise OptionError("--escalate-to" if self.escalate_to is None else "--escalate-below", None,
                              "--escalate-to MODEL and --escalate-below T go together")
        if self.escalate_to is not None:
            object.__setattr__(self, "escalate_to", parse_model(self.escalate_to, "--escalate-to"))

    @classmethod
    def from_args(cls, args) -> BatchRun:
        return cls(inputs=tuple(str(i) for i in args.inputs), output=storage.location(args.output),
                   recursive=args.recursive, overwrite=args.overwrite, quiet=args.quiet, manifest=args.manifest,
                   batch_size=max(1, args.batch_size), max_pixels=args.max_pixels,
                   weights=str(args.weights) if args.weights else None, device=args.device, dtype=args.dtype,
                   runtime=args.runtime,
                   compile=args.compile, video_format=args.video_format, smooth=args.smooth,
                   max_video_seconds=args.max_video_seconds, review_below=args.review_below,
                   escalate_to=args.escalate_to, escalate_below=args.escalate_below,
                   escalate_weights=str(args.escalate_weights) if args.escalate_weights else None,
                   escalate_size=args.escalate_size)

    def check_cascade(self, first_model: str) -> None:
        """The second model must be another one (the first as the run resolved it)."""
        if self.escalate_to is not None and self.escalate_to == first_model:
            raise OptionError("--escalate-to", self.escalate_to, "is the model every image runs on first; "
                              "choose another one")

    def escalates(self, confidence: float | None) -> bool:
        return self.escalate_below is not None and confidence is not None and confidence < self.escalate_below

    def reviews(self, confidence: float | None) -> bool:
        return self.review_below is not None and confidence is not None and confidence < self.review_below

    def review_location(self, location: str) -> str:
        """Where an output under the review threshold goes: OUT/review/<its name>."""
        return storage.join(storage.join(self.output, REVIEW_FOLDER), storage.name(location))


@dataclass
class Job:
    source: str
    outputs: dict[str, str]  # kind ("image", "mask"; a clip's "video"/"frames") -> location
    todo: dict[str, str] = field(default_factory=dict)  # those to write now; the others exist and are kept
    video: bool = False

    @property
    def kept(self) -> list[str]:
        return [location for kind, location in self.outputs.items() if kind not in self.todo]


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)  # every output there already
    failed: list[ManifestRecord] = field(default_factory=list)  # inputs that cannot run (missing, name clash)


def image_outputs(source: str, out: str, options: RemovalOptions) -> dict[str, str]:
    stem = storage.stem(source)
    outputs = {"image": storage.join(out, f"{stem}{options.extension}")}
    if options.mask:
        outputs["mask"] = storage.join(out, f"{stem}_mask{options.extension}")
    return outputs


# (source, out, options) -> (outputs, is a clip); raises ValueError when the input cannot run
OutputsFor = Callable[[str, str, RemovalOptions], tuple[dict[str, str], bool]]


def images_only(source: str, out: str, options: RemovalOptions) -> tuple[dict[str, str], bool]:
    return image_outputs(source, out, options), False


def canonical(location: str) -> str:
    return location if storage.is_uri(location) else str(Path(location).resolve())


def plan_outputs(run: BatchRun, options: RemovalOptions, *, outputs_for: OutputsFor = images_only,
                 extensions=IMAGE_EXTENSIONS) -> Plan:
    """The inputs (files, folders, globs, URIs) -> jobs with their outputs, inputs skipped, inputs failed."""
    plan = Plan()
    sources, errors = storage.list_images(run.inputs, recursive=run.recursive, extensions=extensions)
    plan.failed += [ManifestRecord(input=text.split(": ", 1)[0], error=text.split(": ", 1)[-1]) for text in errors]
    out = run.output
    exists = _existence(out)
    if run.review_below is not None:  # an output routed to review/ by an earlier run is there too
        in_out, in_review = exists, _existence(storage.join(out, REVIEW_FOLDER))

        def exists(location: str) -> bool:
            return in_out(location) or in_review(run.review_location(location))
    inputs = {canonical(s) for s in sources}
    taken: dict[str, str] = {}
    for source in sources:
        try:
            outputs, video = outputs_for(source, out, options)
        except ValueError as exc:  # e.g. a clip that cannot take these settings
            plan.failed.append(ManifestRecord(input=source, error=str(exc)))
            continue
        problem = _clash(outputs, inputs, taken)
        if problem:
            plan.failed.append(ManifestRecord(input=source, error=problem))
            continue
        taken.update({canonical(p): source for p in outputs.values()})
        todo = {kind: p for kind, p in outputs.items() if run.overwrite or not exists(p)}
        job = Job(source, outputs, todo, video)
        (plan.jobs if todo else plan.skipped).append(job)
    return plan


def _existence(out: str) -> Callable[[str], bool]:
    """Whether an output is there: one listing for object storage (cheaper than a request per output)."""
    if storage.is_uri(out):
        existing = storage.existing_files(out)
        return lambda location: location in existing
    return lambda location: Path(location).exists()


def _clash(outputs: dict[str, str], inputs: set[str], taken: dict[str, str]) -> str | None:
    for location in outputs.values():
        resolved = canonical(location)
        if resolved in inputs:
            return f"its output {location} would overwrite an input; choose another -o folder"
        if resolved in taken:
            return f"its output {location} is also the output of {taken[resolved]} (same name); rename one"
    return None


def skipped_record(job: Job) -> ManifestRecord:
    return ManifestRecord(input=job.source, outputs=list(job.outputs.values()), skipped=True)
