"""The Gradio page: BRIA's RMBG-2.0 Space (tabs "input image" and "input url", API names
`image` and `text`, answers = before/after pair then the PNG), plus masks, batch, compare,
settings and safe URL fetching. Model names come from the registry; Gradio workarounds live
in `gradio_compat`."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from . import fetch
from .cluster.client import RemoteRemover
from .engines import Engine, RequestBatcher, ZeroGpuEngine, build_engine, pick_device, zerogpu_decorator
from .gradio_compat import RawImage
from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, ImageDecodeError, encode_image, load_image, write_atomic
from .models import DEFAULT, REGISTRY, Runtime, get_spec, model_names
from .options import parse_size
from .pipeline import Outcome, RemovalPipeline, RemovalResult, choose_model
from .remote import RemotePipeline
from .ui_video import VideoHandler, video_tab
from .weights import WeightsError, weights_available

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
    zerogpu: bool = field(default_factory=lambda: zerogpu_decorator() is not None)

    def request_batch(self) -> int:
        if self.max_batch is not None:
            return max(1, self.max_batch)
        if self.backend:  # requests in flight together reach the service together, and share its batches
            return 8
        return 8 if pick_device(self.device).type == "cuda" and not self.zerogpu else 1


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


@dataclass
class Models:
    """Every registered model, listed; pipelines loaded once, on first use, and shared by every
    request. Which models are here is decided from local files only: start-up never waits for
    the network and never downloads what nobody asked for."""

    config: DemoConfig
    default: str = ""
    choices: list[str] = field(default_factory=list)  # every registered model, default first
    local: set[str] = field(default_factory=set)  # those that run without a download
    _engines: dict[str, Engine] = field(default_factory=dict)
    _pipelines: dict[tuple, RemovalPipeline] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.default = choose_model(self.config.model, self.config.weights)
        names = model_names()
        self.choices = [self.default, *(n for n in names if n != self.default)]
        self.local = {n for n in names if n == self.default or weights_available(n)}
        self.get(self.default)  # load at start-up, not on the first request

    def dropdown_choices(self) -> list[tuple[str, str]]:
        return [(model_label(name, name in self.local), name) for name in self.choices]

    def get(self, name: str | None, size: tuple[int, int] | None = None) -> RemovalPipeline:
        """The pipeline for model `name` at network resolution `size` (None: the model's own).
        Pipelines of one model share its engine, so they share network batches too."""
        name = get_spec(name).name if name else self.default
        with self._lock:
            if name not in self._engines:
                if name not in self.local:
                    gr.Info(f"Downloading {name} weights from {get_spec(name).page_url} (first use)...")
                try:
                    self._engines[name] = self._engine(name)
                except (WeightsError, ValueError, OSError) as exc:
                    raise gr.Error(f"{name} cannot run here: {exc}") from exc
                self.local.add(name)
            if (name, size) not in self._pipelines:
                weights = self.config.weights if name == self.default else None
                try:
                    self._pipelines[name, size] = RemovalPipeline(
                        name, weights, batch_size=self.config.batch_size, max_pixels=self.config.max_pixels,
                        input_size=size, engine=self._engines[name])
                except ValueError as exc:  # a size this model cannot run at
                    raise gr.Error(f"{name}: {exc}") from exc
            return self._pipelines[name, size]

    def _engine(self, name: str) -> Engine:
        config = self.config
        spec = get_spec(name)
        compile_backend = config.compile if spec.runtime is Runtime.TORCH else None
        engine = build_engine(spec, config.weights if name == self.default else None, config.device, config.dtype,
                              compile=compile_backend, max_batch=max(config.batch_size, config.request_batch()))
        if config.zerogpu:
            engine = ZeroGpuEngine(engine, zerogpu_decorator())
        return RequestBatcher(engine, config.request_batch()) if config.request_batch() > 1 else engine

    def banner(self) -> str:
        pipeline = self.get(self.default)
        text = f"**Model:** {pipeline.describe()}"
        if pipeline.model_name != DEFAULT:
            text += f"  \n{how_to_enable(DEFAULT)}"
        return text


@dataclass
class RemoteModels(Models):
    """The models a running `rmbg serve` at `config.backend` has weights for; their pipelines send each
    image there for its mask (`rmbg_demo.remote`). Nothing is loaded here. An unreachable service at
    start-up raises `RemoteError`; later, each request that cannot reach it fails with that error alone."""

    remote: RemoteRemover | None = None

    def __post_init__(self):
        self.remote = RemoteRemover(self.config.backend)
        offered = self.remote.models()  # RemoteError when nothing answers: the page would be useless
        available = [m["name"] for m in offered["models"] if m.get("available") and m["name"] in REGISTRY]
        asked = self.config.model
        if asked not in (None, "auto") and get_spec(asked).name not in available:
            raise ValueError(f"{self.config.backend} has no weights for {asked}; it offers {', '.join(available)}")
        self.default = get_spec(asked).name if asked not in (None, "auto") else offered["default"]
        self.choices = [self.default, *(n for n in available if n != self.default)]
        self.local = set(self.choices)

    def get(self, name: str | None, size: tuple[int, int] | None = None) -> RemovalPipeline:
        name = get_spec(name).name if name else self.default
        if name not in self.local:
            raise gr.Error(f"{name} is not available at {self.config.backend}; choose one of {', '.join(self.choices)}")
        with self._lock:
            if (name, size) not in self._pipelines:
                self._pipelines[name, size] = RemotePipeline(self.remote, name, size, self.config.batch_size,
                                                             self.config.max_pixels)
            return self._pipelines[name, size]

    def banner(self) -> str:
        return f"**Model:** {self.get(self.default).describe()}"


@dataclass
class Settings:
    """The page's settings, in the order of `settings_inputs` (and of the API's parameters)."""

    model: str | None = None
    background: str = "transparent"
    colour: str = "#ffffff"
    background_image: str | None = None
    refine: bool = False
    fmt: str = "png"
    resolution: str = "auto"  # the network's input size: "auto" (the model's own), "1024", "768x1024"

    @property
    def size(self) -> tuple[int, int] | None:
        try:
            return parse_size(self.resolution)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

    def background_value(self):
        """None (transparent), a colour, 'blur' or a decoded image; checked before any work."""
        if self.background == "colour":
            return self.colour or "#ffffff"
        if self.background == "blur":
            return "blur"
        if self.background == "image":
            if not self.background_image:
                raise gr.Error("choose a background image, or another background")
            return decode_or_explain(self.background_image)
        return None


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


def write_result(result: RemovalResult, settings: Settings, background, stem: str,
                 folder: Path) -> tuple[Image.Image, Path, Path]:
    ext = FORMAT_EXTENSIONS[settings.fmt]
    out = result.composite(background, refine=settings.refine)
    image_path = write_atomic(encode_image(out, settings.fmt), folder / f"{stem}-nobg{ext}")
    mask_path = write_atomic(encode_image(result.mask, settings.fmt), folder / f"{stem}-mask{ext}")
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

    def one(self, source, settings: Settings) -> RemovalResult:
        """One image through the chosen model; a bad upload raises its own readable error."""
        outcome = next(self.models.get(settings.model, settings.size).iter_results([source]))
        if outcome.error is not None:
            raise gr.Error(error_message(outcome))
        return outcome.result

    def single(self, source, stem: str, settings: Settings):
        started = time.perf_counter()
        background = settings.background_value()
        result = self.one(source, settings)
        out, image_path, mask_path = write_result(result, settings, background, stem, self.folders.new())
        info = (f"**Model:** {self.models.get(settings.model, settings.size).describe()}  \n"
                f"{result.image.width}x{result.image.height}, {time.perf_counter() - started:.2f} s")
        return (out, result.image), str(image_path), str(mask_path), result.mask, info

    # The settings are named, with their defaults, rather than taken as *settings: Gradio's API
    # marks a parameter optional only when the handler's own argument has a default, and
    # BRIA's Space is called with the image (or URL) alone.
    def image(self, path, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png", resolution="auto"):
        if not path:
            raise gr.Error("upload, paste or drop an image first")
        settings = Settings(model, background, colour, background_image, refine, fmt, resolution)
        return self.single(path, safe_stem(Path(path).name), settings)

    def text(self, url, model=None, background="transparent", colour="#ffffff", background_image=None,
             refine=False, fmt="png", resolution="auto"):
        url = (url or "").strip()
        if not url:
            raise gr.Error("paste an image URL first")
        try:
            data = fetch.fetch_url(url, allow_private=self.models.config.allow_private_urls)
        except fetch.URLFetchError as exc:
            raise gr.Error(str(exc)) from exc
        stem = safe_stem(url.rstrip("/").rsplit("/", 1)[-1].split("?")[0])
        settings = Settings(model, background, colour, background_image, refine, fmt, resolution)
        return self.single(data, stem, settings)

    def batch(self, files, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png", resolution="auto"):
        if not files:
            raise gr.Error("add one or more images first")
        settings = Settings(model, background, colour, background_image, refine, fmt, resolution)
        background = settings.background_value()
        pipeline = self.models.get(settings.model, settings.size)
        folder, gallery, errors, outputs, stems = self.folders.new(), [], [], [], set()
        for path, outcome in zip(files, pipeline.iter_results(files)):  # network batches, bounded memory
            name = Path(path).name
            if outcome.error is not None:  # one bad file must not sink the batch
                errors.append(f"{name}: {error_message(outcome)}")
                continue
            out, image_path, mask_path = write_result(outcome.result, settings, background,
                                                      unique_stem(name, stems), folder)
            gallery.append((out, name))
            outputs += [image_path, mask_path]
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
        image = decode_or_explain(path)
        gallery, lines = [], ["| model | seconds |", "|---|---|"]
        for name in chosen:
            started = time.perf_counter()
            result = self.one(image, Settings(name))
            seconds = time.perf_counter() - started
            gallery.append((result.cutout(), f"{name}: {seconds:.2f} s"))
            lines.append(f"| {self.models.get(name).title} [{name}] | {seconds:.2f} |")
        return gallery, "\n".join(lines)


def write_zip(paths: list[Path], target: Path) -> Path:
    tmp = target.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in paths:  # PNG/WebP are compressed already
            archive.write(path, arcname=path.name)
    os.replace(tmp, target)
    return target


def settings_inputs(models: Models) -> list:
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            model = gr.Dropdown(models.dropdown_choices(), value=models.default, label="Model")
            fmt = gr.Radio(list(FORMAT_EXTENSIONS), value="png", label="Output format")
            refine = gr.Checkbox(False, label="Refine foreground colours (removes halos at soft edges)")
            default = models.config.resolution
            choices = RESOLUTIONS + ([(default, default)] if default not in dict(RESOLUTIONS).values() else [])
            resolution = gr.Dropdown(choices, value=default, label="Network resolution", elem_id="resolution")
        with gr.Row():
            background = gr.Radio(BACKGROUNDS, value="transparent", label="Background")
            colour = gr.ColorPicker("#ffffff", label="Background colour")
            background_image = RawImage(type="filepath", label="Background image", sources=["upload", "clipboard"],
                                        image_mode=None, height=160)
    return [model, background, colour, background_image, refine, fmt, resolution]


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
    models = RemoteModels(config) if config.backend else Models(config)
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
            run_batch = gr.Button("Remove backgrounds", variant="primary", elem_id="run-batch")
            gallery = gr.Gallery(label="Cut-outs", columns=4, format="png", type="pil", elem_id="batch-gallery")
            archive = gr.File(label="zip of cut-outs and masks", elem_id="batch-zip")
            batch_info = gr.Markdown(elem_id="batch-info")
            run_batch.click(handlers.batch, [files, *settings], [gallery, archive, batch_info], api_name="batch")
        video_tab(VideoHandler(models, handlers.folders, Settings, models.config.max_video_seconds), settings)
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
