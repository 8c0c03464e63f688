"""The Gradio page: BRIA's RMBG-2.0 Space (tabs "input image" and "input url", API names
`image` and `text`, answers = before/after pair then the PNG), plus masks, batch, settings
and safe URL fetching."""
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
from .imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, ImageDecodeError, encode_image, load_image, write_atomic
from .models import get_spec
from .pipeline import RemovalPipeline, RemovalResult, choose_model, pick_device
from .weights import WeightsError, weights_available

log = logging.getLogger(__name__)

TITLE = "RMBG-2.0 for background removal"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = ["chelsea.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg"]
ENABLE_RMBG2 = ("To use RMBG-2.0, accept its licence at https://huggingface.co/briaai/RMBG-2.0 and set `HF_TOKEN`, "
                "or start the app with `--weights /path/to/model.safetensors`.")
BACKGROUNDS = ["transparent", "colour", "blur", "image"]


def _seconds_pair(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    try:
        frequency, age = (int(v) for v in (text or "").split(","))
        return frequency, age
    except ValueError:
        return default


# Gradio deletes the files it cached for a request this long after (checking every 10 minutes
# by default); RMBG_DELETE_CACHE="FREQUENCY,AGE" in seconds changes both.
DELETE_CACHE = _seconds_pair(os.environ.get("RMBG_DELETE_CACHE"), (600, 3600))


def delete_cached_files(blocks: gr.Blocks, age: float | None) -> None:
    """Gradio's periodic cache cleaning, made safe while requests run.

    Gradio's own version iterates over its live sets of cached files; a request that adds a
    file meanwhile raises "Set changed size during iteration", which ends the cleaning task
    for good, and the cache then grows until the server restarts (seen under load). This one
    walks a snapshot of each set. `age` None deletes everything (at shutdown).
    """
    keep = set()
    for component in blocks.blocks.values():
        keep.update(getattr(component, "keep_in_cache", ()))
    now = time.time()
    for cached in blocks.temp_file_sets:
        gone = set()
        for file in list(cached):
            if file in keep:
                continue
            try:
                if age is None or now - os.lstat(file).st_ctime > age:
                    os.remove(file)
                    gone.add(file)
            except FileNotFoundError:
                gone.add(file)
        cached.difference_update(gone)


def guard_cache_cleaning() -> None:
    """Have Gradio's scheduled cleaning call `delete_cached_files` (it looks the function up
    by name in `gradio.route_utils` on every round)."""
    from gradio import route_utils

    if not hasattr(route_utils, "delete_files_created_by_app"):
        log.warning("gradio.route_utils.delete_files_created_by_app is gone; cache cleaning is Gradio's own")
        return
    route_utils.delete_files_created_by_app = delete_cached_files

try:  # On Hugging Face ZeroGPU Spaces a GPU is attached only inside functions marked with spaces.GPU.
    import spaces

    gpu = spaces.GPU
    ON_ZEROGPU = True
except ImportError:
    ON_ZEROGPU = False

    def gpu(fn):
        return fn


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

    def request_batch(self) -> int:
        if self.max_batch is not None:
            return max(1, self.max_batch)
        return 8 if pick_device(self.device).type == "cuda" and not ON_ZEROGPU else 1


@dataclass
class Models:
    """Pipelines loaded once and shared by every request; one lock per model keeps loads single."""

    config: DemoConfig
    default: str = ""
    choices: list[str] = field(default_factory=list)
    _pipelines: dict[str, RemovalPipeline] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.default = choose_model(self.config.model, self.config.weights)
        self.choices = [name for name in ("rmbg-2.0", "birefnet-general", "birefnet-lite", "rmbg-1.4", "u2netp")
                        if name == self.default or name == "u2netp" or weights_available(name)]
        self.get(self.default)  # load at start-up, not on the first request

    def get(self, name: str | None) -> RemovalPipeline:
        name = name or self.default
        if name not in self.choices:
            raise gr.Error(f"model {name!r} is not available here; choose one of: {', '.join(self.choices)}")
        with self._lock:
            if name not in self._pipelines:
                config = self.config
                weights = config.weights if name == self.default else None
                compile_backend = config.compile if get_spec(name).runtime == "torch" else None
                try:
                    self._pipelines[name] = RemovalPipeline(
                        name, weights, config.device, config.dtype, batch_size=config.batch_size,
                        max_pixels=config.max_pixels, batch_requests=config.request_batch(), compile=compile_backend)
                except WeightsError as exc:
                    raise gr.Error(str(exc)) from exc
            return self._pipelines[name]

    def banner(self) -> str:
        pipeline = self.get(self.default)
        text = f"**Model:** {pipeline.describe()}"
        if pipeline.model_name != "rmbg-2.0":
            text += f"  \n{ENABLE_RMBG2}"
        return text


class RawImage(gr.Image):
    """An image input whose upload reaches our decoder untouched (Gradio would open it with
    Pillow first, turning a bad file into an unreadable error before our checks run)."""

    is_template = True  # rendered by the frontend's own Image component

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return super().preprocess(payload)


@dataclass
class Settings:
    model: str
    background: str
    colour: str
    background_image: str | None
    refine: bool
    fmt: str

    def background_value(self):
        if self.background == "colour":
            return self.colour or "#ffffff"
        if self.background == "blur":
            return "blur"
        if self.background == "image":
            if not self.background_image:
                raise gr.Error("choose a background image, or another background")
            return self.decode(self.background_image)
        return None

    @staticmethod
    def decode(source) -> Image.Image:
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


def write_result(result: RemovalResult, settings: Settings, stem: str, folder: Path) -> tuple[Image.Image, Path, Path]:
    ext = FORMAT_EXTENSIONS[settings.fmt]
    out = result.composite(settings.background_value(), refine=settings.refine)
    image_path = write_atomic(encode_image(out, settings.fmt), folder / f"{stem}-nobg{ext}")
    mask_path = write_atomic(encode_image(result.mask, settings.fmt), folder / f"{stem}-mask{ext}")
    return out, image_path, mask_path


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

    @staticmethod
    @gpu
    def _predict(pipeline: RemovalPipeline, images: list[Image.Image]) -> list[Image.Image]:
        return pipeline.predict_masks(images)

    @staticmethod
    def decode(pipeline: RemovalPipeline, source) -> Image.Image:
        try:
            return pipeline.load(source)
        except ImageDecodeError as exc:
            raise gr.Error(str(exc)) from exc

    def masks(self, pipeline: RemovalPipeline, images: list[Image.Image]) -> list[Image.Image]:
        try:
            return self._predict(pipeline, images)
        except RuntimeError as exc:
            log.exception("inference failed")
            raise gr.Error(f"inference failed on {pipeline.device}: {exc}") from exc

    def run(self, model: str, sources: list) -> list[RemovalResult]:
        """Decode each source (a bad one raises its own readable error), then mask them together."""
        pipeline = self.models.get(model)
        images = [self.decode(pipeline, source) for source in sources]
        started = time.perf_counter()
        masks = self.masks(pipeline, images)
        seconds = (time.perf_counter() - started) / len(images)
        return [RemovalResult(image, mask, pipeline.model_name, seconds) for image, mask in zip(images, masks)]

    def single(self, source, stem: str, settings: Settings):
        started = time.perf_counter()
        result = self.run(settings.model, [source])[0]
        out, image_path, mask_path = write_result(result, settings, stem, self.folders.new())
        info = (f"**Model:** {self.models.get(settings.model).describe()}  \n"
                f"{result.image.width}x{result.image.height}, {time.perf_counter() - started:.2f} s")
        return (out, result.image), str(image_path), str(mask_path), result.mask, info

    def image(self, path, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png"):
        if not path:
            raise gr.Error("upload, paste or drop an image first")
        settings = Settings(model, background, colour, background_image, refine, fmt)
        return self.single(path, safe_stem(Path(path).name), settings)

    def text(self, url, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png"):
        url = (url or "").strip()
        if not url:
            raise gr.Error("paste an image URL first")
        try:
            data = fetch.fetch_url(url, allow_private=self.models.config.allow_private_urls)
        except fetch.URLFetchError as exc:
            raise gr.Error(str(exc)) from exc
        stem = safe_stem(url.rstrip("/").rsplit("/", 1)[-1].split("?")[0])
        return self.single(data, stem, Settings(model, background, colour, background_image, refine, fmt))

    def batch(self, files, model=None, background="transparent", colour="#ffffff", background_image=None,
              refine=False, fmt="png"):
        if not files:
            raise gr.Error("add one or more images first")
        settings = Settings(model, background, colour, background_image, refine, fmt)
        folder, gallery, errors, outputs, stems = self.folders.new(), [], [], [], set()
        pipeline = self.models.get(model)
        for start in range(0, len(files), pipeline.batch_size):  # bounded memory, full network batches
            decoded = []
            for path in files[start:start + pipeline.batch_size]:
                try:
                    decoded.append((Path(path).name, self.decode(pipeline, path)))
                except gr.Error as exc:  # one bad file must not sink the batch
                    errors.append(f"{Path(path).name}: {exc.message}")
            if not decoded:
                continue
            try:
                masks = self.masks(pipeline, [image for _, image in decoded])
            except gr.Error as exc:
                errors += [f"{name}: {exc.message}" for name, _ in decoded]
                continue
            for (name, image), mask in zip(decoded, masks):
                result = RemovalResult(image, mask, pipeline.model_name)
                try:
                    out, image_path, mask_path = write_result(result, settings, unique_stem(name, stems), folder)
                except gr.Error as exc:
                    errors.append(f"{name}: {exc.message}")
                    continue
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
            raise gr.Error(f"choose at least two models to compare (available here: {', '.join(self.models.choices)})")
        image = Settings.decode(path)
        gallery, lines = [], ["| model | seconds |", "|---|---|"]
        for name in chosen:
            started = time.perf_counter()
            result = self.run(name, [image])[0]
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
            model = gr.Dropdown(models.choices, value=models.default, label="Model")
            fmt = gr.Radio(list(FORMAT_EXTENSIONS), value="png", label="Output format")
            refine = gr.Checkbox(False, label="Refine foreground colours (removes halos at soft edges)")
        with gr.Row():
            background = gr.Radio(BACKGROUNDS, value="transparent", label="Background")
            colour = gr.ColorPicker("#ffffff", label="Background colour")
            background_image = RawImage(type="filepath", label="Background image", sources=["upload", "clipboard"],
                                        image_mode=None, height=160)
    return [model, background, colour, background_image, refine, fmt]


def result_outputs(label: str, prefix: str) -> list:
    slider = gr.ImageSlider(label=label, type="pil", format="png", image_mode=None, elem_id=f"{prefix}-slider")
    with gr.Row():
        png = gr.File(label="output png file", elem_id=f"{prefix}-png")
        mask_file = gr.File(label="mask file", elem_id=f"{prefix}-mask-file")
    mask = gr.Image(label="mask", type="pil", image_mode="L", format="png", height=240, elem_id=f"{prefix}-mask")
    info = gr.Markdown(elem_id=f"{prefix}-info")
    return [slider, png, mask_file, mask, info]


def build_demo(config: DemoConfig | None = None) -> gr.Blocks:
    guard_cache_cleaning()
    models = Models(config or DemoConfig())
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
        with gr.Tab("Compare"):
            compare_image = RawImage(type="filepath", label="Image", image_mode=None, elem_id="compare-image",
                                     sources=["upload", "clipboard"])
            compare_models = gr.CheckboxGroup(models.choices, value=models.choices[:3], label="Models",
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
    demo.models = models  # for tests and app.py
    return demo
