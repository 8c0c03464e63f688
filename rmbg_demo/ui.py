"""The Gradio page: BRIA's RMBG-2.0 Space (tabs "input image" and "input url", API names
`image` and `text`, answers = before/after pair then the PNG), plus masks, batch, compare,
settings and safe URL fetching. Model names come from the registry; Gradio workarounds live
in `gradio_compat`."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from . import fetch
from .atomic import atomic_output, write_atomic
from .budget import BudgetExceeded, MemoryBudget, image_cost
from .engines import pick_device, zerogpu_decorator
from .gradio_compat import RawImage
from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, ImageDecodeError, image_size, load_image
from .models import DEFAULT, REGISTRY, get_spec
from .pipeline import Outcome, RemovalPipeline, RemovalResult
from .pool import ModelPool, PoolSettings
from .request import RemovalOptions, encoded_outputs, rendered
from .ui_video import VideoHandler, video_tab
from .weights import WeightsError

log = logging.getLogger(__name__)

TITLE = "RMBG-2.0 for background removal"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = ["chelsea.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg"]
BACKGROUNDS = ["transparent", "colour", "blur", "image"]
RESOLUTIONS = [("the model's own", "auto"), ("1024 (model card)", "1024"), ("768", "768"), ("512 (fast)", "512")]


def _seconds_pair(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    try:
        frequency, age = (int(v) for v in (text or "").split(","))
        return frequency, age
    except ValueError:
        return default


# Gradio deletes the files it cached for a request this long after (checking every 10 minutes
# by default); RMBG_DELETE_CACHE="FREQUENCY,AGE" in seconds changes both.
DELETE_CACHE = _seconds_pair(os.environ.get("RMBG_DELETE_CACHE"), (600, 3600))


@dataclass
class DemoConfig:
    model: str | None = "auto"
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    runtime: str = "auto"  # torch, onnxruntime, openvino or auto (rmbg_demo.engines.runtime_for)
    allow_private_urls: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 4  # images per network batch in the Batch tab
    # Concurrent requests share network batches of up to this many images; None: 8 on a
    # dedicated GPU, 1 (off) on the CPU, where a batch takes as long as its images one by one,
    # and on ZeroGPU, where the GPU exists only inside each request's own call.
    max_batch: int | None = None
    compile: str | None = None  # a torch.compile backend ("inductor"), warmed up at start-up
    resolution: str = "auto"  # the page's default network resolution (N or WxH; "auto": each model's own)
    max_video_seconds: float | None = 60  # longer clips are refused before any work (a shared demo's limit)
    # A running `rmbg serve` (http://HOST:PORT) that runs the network: the page decodes and composes only.
    backend: str | None = None
    max_memory: int | None = None  # bytes of the image memory budget (budget.MemoryBudget); None: a quarter of RAM
    zerogpu: bool = field(default_factory=lambda: zerogpu_decorator() is not None)

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(model=self.model, weights=self.weights, device=self.device, dtype=self.dtype,
                            runtime=self.runtime, compile=self.compile, batch_size=self.batch_size,
                            max_pixels=self.max_pixels,
                            request_batch=self.max_batch, backend=self.backend, zerogpu=self.zerogpu)

    def request_batch(self) -> int:
        return self.pool_settings().requests_per_batch()


def how_to_enable(name: str) -> str:
    spec = get_spec(name)
    if spec.gated:
        return (f"To use {spec.name}, accept its licence at {spec.page_url} and set `HF_TOKEN`, "
                f"or start the app with `--weights /path/to/model.safetensors`.")
    return f"{spec.name} downloads from {spec.page_url} on first use, or start the app with `--weights FILE`."


def model_label(name: str, here: bool) -> str:
    spec = REGISTRY[name]
    if here:
        return name
    size = f", ~{spec.download_mb} MB" if spec.download_mb else ""
    return f"{name} (downloads on first use{size})"


class Models:
    """The page's view of the `ModelPool`: every registered model listed (or those its backend offers),
    the default loaded at start-up, each other one on first use; pool errors shown as Gradio's."""

    def __init__(self, config: DemoConfig):
        self.config = config

        def downloading(name: str) -> None:
            gr.Info(f"Downloading {name} weights from {get_spec(name).page_url} (first use)...")

        self.pool = ModelPool(config.pool_settings(), on_download=downloading)
        self.default, self.choices, self.local = self.pool.default, self.pool.choices, self.pool.local

    def dropdown_choices(self) -> list[tuple[str, str]]:
        return [(model_label(name, name in self.local), name) for name in self.choices]

    def get(self, name: str | None, size: tuple[int, int] | None = None) -> RemovalPipeline:
        """The pipeline for model `name` at network resolution `size` (None: the model's own)."""
        try:
            return self.pool.pipeline(name, size)
        except (WeightsError, ValueError, OSError) as exc:  # ModelUnavailable is a ValueError
            raise gr.Error(f"{name or self.default} cannot run here: {exc}") from exc

    def banner(self) -> str:
        pipeline = self.get(self.default)
        text = f"**Model:** {pipeline.describe()}"
        if pipeline.model_name != DEFAULT and not self.config.backend:
            text += f"  \n{how_to_enable(DEFAULT)}"
        return text


def page_options(*widgets) -> RemovalOptions:
    """The page's settings widgets (`settings_inputs`, in order) as the request's options."""
    try:
        return RemovalOptions.from_widgets(*widgets)
    except ValueError as exc:  # OptionError: names the setting and the value
        raise gr.Error(str(exc)) from exc


def decode_or_explain(source) -> Image.Image:
    try:
        return load_image(source)
    except ImageDecodeError as exc:
        raise gr.Error(str(exc)) from exc


class OutputFolders:
    """A fresh folder per request, so no two requests share a file name. Gradio copies what a
    handler returns into its own cache (cleaned by `delete_cache`); our copies are pruned here
    once they are `max_age` seconds old, so the temp folder cannot grow without bound."""

    def __init__(self, max_age: float | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="rmbg-demo-"))
        self.max_age = max_age if max_age is not None else float(os.environ.get("RMBG_OUTPUT_MAX_AGE", "300"))

    def new(self) -> Path:
        self.prune()
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def prune(self) -> None:
        cutoff = time.time() - self.max_age
        for folder in self.root.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:  # pruned by a concurrent request
                pass


def write_result(result: RemovalResult, options: RemovalOptions, stem: str,
                 folder: Path) -> tuple[Image.Image, Path, Path]:
    out, mask = rendered(result, options)
    encoded = encoded_outputs(result, options, pictures=(out, mask))
    image_path = write_atomic(encoded["image"], folder / f"{stem}-nobg{options.extension}")
    mask_path = write_atomic(encoded["mask"], folder / f"{stem}-mask{options.extension}")
    return out, image_path, mask_path


def error_message(outcome: Outcome) -> str:
    """What a person reads when one image failed: the decoder's words, or the device's."""
    if isinstance(outcome.error, ImageDecodeError):
        return str(outcome.error)
    return f"inference failed: {outcome.error}"


def safe_stem(name: str | None, fallback: str = "image") -> str:
    stem = Path(name or fallback).stem or fallback
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60]


def unique_stem(name: str, taken: set[str]) -> str:
    """`safe_stem(name)`, numbered when an earlier file of the same batch had the same one."""
    base = stem = safe_stem(name)
    n = 1
    while stem in taken:
        n += 1
        stem = f"{base}-{n}"
    taken.add(stem)
    return stem


class Handlers:
    def __init__(self, models: Models):
        self.models = models
        self.folders = OutputFolders()
        self.budget = MemoryBudget(models.config.max_memory)

    @contextlib.contextmanager
    def admitted(self, sources):
        """Holds the memory `sources` will need (read from their headers; at most the whole budget) while
        the block runs; a file whose header is bad is left to the decoder, which says what is wrong."""
        cost = 0
        for source in sources:
            with contextlib.suppress(ImageDecodeError, OSError):
                cost += image_cost(*image_size(source, max_pixels=self.models.config.max_pixels))
        if self.budget.limit:
            cost = min(cost, self.budget.limit)
        try:
            with self.budget.admit(cost):
                yield
        except BudgetExceeded as exc:
            raise gr.Error(str(exc)) from exc

    def one(self, source, options: RemovalOptions) -> RemovalResult:
        """One image through the chosen model; a bad upload raises its own readable error."""
        outcome = next(self.models.get(options.model, options.size).iter_results([source]))
        if outcome.error is not None:
            raise gr.Error(error_message(outcome))
        return outcome.result

    def single(self, source, stem: str, options: RemovalOptions):
        started = time.perf_counter()
        with self.admitted([source]):
            result = self.one(source, options)
            out, image_path, mask_path = write_result(result, options, stem, self.folders.new())
        info = (f"**Model:** {self.models.get(options.model, options.size).describe()}  \n"
                f"{result.image.width}x{result.image.height}, {time.perf_counter() - started:.2f} s, "
                f"confidence {result.confidence:.2f}")
        return (out, result.image), str(image_path), str(mask_path), result.mask, info

    # The settings are named, with their defaults, rather than taken as *settings: Gradio's API
    # marks a parameter optional only when the handler's own argument has a default, and
    # BRIA's Space is called with the image (or URL) alone.
    def image(self, path, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png", resolution="auto", crop=False, margin="", canvas="", scale="",
              position="original", shadow="none", srgb=False):
        if not path:
            raise gr.Error("upload, paste or drop an image first")
        options = page_options(model, background, colour, background_image, refine, fmt, resolution, crop, margin,
                               canvas, scale, position, shadow, srgb)
        return self.single(path, safe_stem(Path(path).name), options)

    def text(self, url, model=None, background="transparent", colour="#ffffff", background_image=None,
             refine=False, fmt="png", resolution="auto", crop=False, margin="", canvas="", scale="",
             position="original", shadow="none", srgb=False):
        url = (url or "").strip()
        if not url:
            raise gr.Error("paste an image URL first")
        options = page_options(model, background, colour, background_image, refine, fmt, resolution, crop, margin,
                               canvas, scale, position, shadow, srgb)
        try:
            data = fetch.fetch_url(url, allow_private=self.models.config.allow_private_urls)
        except fetch.URLFetchError as exc:
            raise gr.Error(str(exc)) from exc
        stem = safe_stem(url.rstrip("/").rsplit("/", 1)[-1].split("?")[0])
        return self.single(data, stem, options)

    def batch(self, files, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png", resolution="auto", crop=False, margin="", canvas="", scale="",
              position="original", shadow="none", srgb=False, lowest_first=False):
        if not files:
            raise gr.Error("add one or more images first")
        options = page_options(model, background, colour, background_image, refine, fmt, resolution, crop, margin,
                               canvas, scale, position, shadow, srgb)
        pipeline = self.models.get(options.model, options.size)
        folder, gallery, errors, outputs, stems = self.folders.new(), [], [], [], set()
        for start in range(0, len(files), pipeline.batch_size):  # network batches; memory held per batch
            chunk = files[start:start + pipeline.batch_size]
            with self.admitted(chunk):
                for path, outcome in zip(chunk, pipeline.iter_results(chunk)):
                    name = Path(path).name
                    if outcome.error is not None:  # one bad file must not sink the batch
                        errors.append(f"{name}: {error_message(outcome)}")
                        continue
                    _, image_path, mask_path = write_result(outcome.result, options, unique_stem(name, stems),
                                                            folder)
                    score = outcome.result.confidence
                    # the file, not the picture: nothing held in memory
                    gallery.append((str(image_path), f"{name} · confidence {score:.2f}", score))
                    outputs += [image_path, mask_path]
        if lowest_first:  # the ones most worth a look first
            gallery.sort(key=lambda item: item[2])
        gallery = [(path, caption) for path, caption, _ in gallery]
        archive = write_zip(outputs, folder / "rmbg-batch.zip") if outputs else None
        info = f"**Model:** {pipeline.describe()}  \n{len(gallery)} done, {len(errors)} failed"
        info += "".join(f"  \n- {e}" for e in errors)
        return gallery, (str(archive) if archive else None), info

    def compare(self, path, chosen=None):
        """One image through two or more models, cut-outs side by side with each model's time."""
        if not path:
            raise gr.Error("upload an image to compare on")
        chosen = [m for m in (chosen or []) if m]
        if len(chosen) < 2:
            raise gr.Error(f"choose at least two models to compare (registered: {', '.join(self.models.choices)})")
        gallery, lines = [], ["| model | seconds |", "|---|---|"]
        with self.admitted([path]):
            image = decode_or_explain(path)
            for name in chosen:
                started = time.perf_counter()
                result = self.one(image, RemovalOptions(model=name))
                seconds = time.perf_counter() - started
                gallery.append((result.cutout(), f"{name}: {seconds:.2f} s"))
                lines.append(f"| {self.models.get(name).title} [{name}] | {seconds:.2f} |")
        return gallery, "\n".join(lines)


def write_zip(paths: list[Path], target: Path) -> Path:
    with atomic_output(target) as temporary, zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in paths:  # PNG/WebP are compressed already
            archive.write(path, arcname=path.name)
    return target


def settings_inputs(models: Models) -> list:
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            model = gr.Dropdown(models.dropdown_choices(), value=models.default, label="Model")
            fmt = gr.Radio(list(FORMAT_EXTENSIONS), value="png", label="Output format")
            refine = gr.Checkbox(False, label="Refine foreground colours (removes halos at soft edges)")
            default = models.config.resolution
            choices = RESOLUTIONS + ([(default, default)] if default not in dict(RESOLUTIONS).values() else [])
            resolution = gr.Dropdown(choices, value=default, label="Network resolution (N or WxH)",
                                     elem_id="resolution", allow_custom_value=True)
        with gr.Row():
            background = gr.Radio(BACKGROUNDS, value="transparent", label="Background")
            colour = gr.ColorPicker("#ffffff", label="Background colour")
            background_image = RawImage(type="filepath", label="Background image", sources=["upload", "clipboard"],
                                        image_mode=None, height=160)
    with gr.Accordion("Framing", open=False, elem_id="framing"):
        with gr.Row():
            crop = gr.Checkbox(False, label="Crop to the subject", elem_id="crop")
            margin = gr.Textbox("", label="Margin (px or %)", placeholder="e.g. 20 or 10%", elem_id="margin")
            canvas = gr.Textbox("", label="Canvas (WxH)", placeholder="e.g. 1200x1200", elem_id="canvas")
            scale = gr.Textbox("", label="Subject scale on the canvas (%)", placeholder="e.g. 80%", elem_id="scale")
        with gr.Row():
            position = gr.Dropdown(["original", "center", "top", "bottom", "left", "right"], value="original",
                                   allow_custom_value=True, label="Position (or X%,Y%)", elem_id="position")
            shadow = gr.Radio(["none", "drop", "contact"], value="none", label="Shadow", elem_id="shadow")
            srgb = gr.Checkbox(False, label="Convert to sRGB (else keep the photo's colour profile)", elem_id="srgb")
    return [model, background, colour, background_image, refine, fmt, resolution,
            crop, margin, canvas, scale, position, shadow, srgb]


def result_outputs(label: str, prefix: str) -> list:
    slider = gr.ImageSlider(label=label, type="pil", format="png", image_mode=None, elem_id=f"{prefix}-slider")
    with gr.Row():
        png = gr.File(label="output png file", elem_id=f"{prefix}-png")
        mask_file = gr.File(label="mask file", elem_id=f"{prefix}-mask-file")
    mask = gr.Image(label="mask", type="pil", image_mode="L", format="png", height=240, elem_id=f"{prefix}-mask")
    info = gr.Markdown(elem_id=f"{prefix}-info")
    return [slider, png, mask_file, mask, info]


def build_demo(config: DemoConfig | None = None) -> gr.Blocks:
    config = config or DemoConfig()
    models = Models(config)
    handlers = Handlers(models)
    with gr.Blocks(title=TITLE, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(models.banner(), elem_id="model-banner")
        settings = settings_inputs(models)
        with gr.Tab("input image"):
            image = RawImage(type="filepath", label="Upload an image", image_mode=None,
                             sources=["upload", "clipboard", "webcam"], elem_id="input-image")
            run_image = gr.Button("Remove background", variant="primary", elem_id="run-image")
            outputs = result_outputs(models.default, "image")
            run_image.click(handlers.image, [image, *settings], outputs, api_name="image")
            gr.Examples([[str(ASSETS / name)] for name in EXAMPLES if (ASSETS / name).exists()], inputs=[image])
        with gr.Tab("input url"):
            url = gr.Textbox(label="Paste an image URL", elem_id="input-url")
            run_url = gr.Button("Remove background", variant="primary", elem_id="run-url")
            url_outputs = result_outputs(models.default, "url")
            gr.on([run_url.click, url.submit], handlers.text, [url, *settings], url_outputs, api_name="text")
        with gr.Tab("Batch"):
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                            elem_id="batch-files")
            lowest_first = gr.Checkbox(False, label="Lowest confidence first", elem_id="batch-lowest-first")
            run_batch = gr.Button("Remove backgrounds", variant="primary", elem_id="run-batch")
            gallery = gr.Gallery(label="Cut-outs", columns=4, format="png", type="pil", elem_id="batch-gallery")
            archive = gr.File(label="zip of cut-outs and masks", elem_id="batch-zip")
            batch_info = gr.Markdown(elem_id="batch-info")
            run_batch.click(handlers.batch, [files, *settings, lowest_first], [gallery, archive, batch_info],
                            api_name="batch")
        video_tab(VideoHandler(models, handlers.folders, models.config.max_video_seconds, page_options), settings)
        with gr.Tab("Compare"):
            compare_image = RawImage(type="filepath", label="Image", image_mode=None, elem_id="compare-image",
                                     sources=["upload", "clipboard"])
            compare_models = gr.CheckboxGroup(models.dropdown_choices(), value=[n for n in models.choices
                                                                                 if n in models.local][:3],
                                              label="Models",
                                              elem_id="compare-models")
            run_compare = gr.Button("Compare", variant="primary", elem_id="run-compare")
            compare_gallery = gr.Gallery(label="Cut-outs", columns=3, format="png", type="pil",
                                         elem_id="compare-gallery")
            compare_info = gr.Markdown(elem_id="compare-info")
            run_compare.click(handlers.compare, [compare_image, compare_models], [compare_gallery, compare_info],
                              api_name="compare")
    # Requests that share a network batch must be in flight together; on a GPU, two at least
    # let one request decode and encode while another runs the network. (Gradio's own batched
    # events are not used: an exception there fails every request of the batch, so one bad
    # upload would fail the users batched with it. RequestBatcher batches after decoding.)
    on_gpu = pick_device(models.config.device).type == "cuda"
    concurrency = max(models.config.request_batch(), 2 if on_gpu else 1)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo
