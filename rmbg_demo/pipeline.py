"""Image in -> mask out: the predictor that owns pre- and post-processing for every registered model.

Preprocessing is the RMBG-2.0 model card's (resize to the network's input size, bilinear and
antialiased; scale to [0, 1]; normalise), done with torch on the inference device.
Postprocessing: activation (sigmoid for logit maps), bicubic resize back to the original size
(Pillow's kernel, a = -0.5, as the card's `PIL.Image.resize` does), rounding to an 8-bit mask.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import compose
from .imageio import DEFAULT_MAX_PIXELS, load_image
from .models import ModelSpec, get_spec
from .weights import load_model, weights_available

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto': CUDA, then Apple's MPS, then the CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bfloat16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16, AMX), where oneDNN runs them ~2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': float16 on CUDA, bfloat16 on CPUs with native bf16, else float32.

    Both half types keep masks within 2/255 of float32 (tests/test_pipeline.py); the
    deformable convolutions still compute in float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bfloat16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}") from None


def choose_model(model: str | None = "auto", weights=None) -> str:
    """The model to run: the one asked for, or for 'auto' RMBG-2.0 when its weights resolve, else the embedded one."""
    if model not in (None, "auto"):
        return get_spec(model).name
    if weights is not None or weights_available("rmbg-2.0"):
        chosen = "rmbg-2.0"
    else:
        chosen = "u2netp"
        log.warning("RMBG-2.0 weights not available (accept the licence at https://huggingface.co/briaai/RMBG-2.0 "
                    "and set HF_TOKEN, or pass --weights): using the embedded u2netp model")
    log.info("model: %s", chosen)
    return chosen


@dataclass
class RemovalResult:
    """One image's outcome. `image` is the decoded original (RGB, or RGBA if it had transparency)."""

    image: Image.Image
    mask: Image.Image  # mode "L", the image's size
    model: str
    seconds: float = 0.0
    source: str | None = None
    _foreground: Image.Image | None = field(default=None, repr=False)

    def foreground(self, refine: bool = False) -> Image.Image:
        """The colours to show through the mask; with `refine`, re-estimated at soft edges so that
        none of the old background bleeds into the cut-out. Keeps the source's own alpha."""
        if not refine:
            return self.image
        if self._foreground is None:
            self._foreground = compose.estimate_foreground(self.image.convert("RGB"), self.mask)
            if self.image.mode == "RGBA":
                self._foreground = self._foreground.convert("RGBA")
                self._foreground.putalpha(self.image.getchannel("A"))
        return self._foreground

    def cutout(self, refine: bool = False) -> Image.Image:
        """RGBA: the original (or refined) colours with the mask as alpha."""
        return compose.cutout(self.foreground(refine), self.mask)

    def composite(self, background=None, refine: bool = False) -> Image.Image:
        """The cut-out when `background` is None, else the subject over a colour, 'blur' or an image."""
        if background is None or background == "transparent":
            return self.cutout(refine)
        return compose.replace_background(self.foreground(refine), self.mask, background)


class RequestBatcher:
    """Runs the network for many concurrent callers, several images at a time.

    Callers decode and preprocess on their own threads, then hand their input here and wait.
    One worker thread takes everything queued (up to `max_batch` images) and runs it as one
    batch: a lone request starts at once, so batching adds no latency, and under load the
    device sees full batches. A network failure reaches every caller of that batch; a bad
    file never gets this far (it fails its own caller's decode).
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], max_batch: int, name: str = "network"):
        self.run = run
        self.max_batch = max(1, int(max_batch))
        self.name = name
        self.batches = 0  # counters, for logs and tests
        self.largest = 0
        self._pending: list[tuple[torch.Tensor, Future]] = []
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Images waiting for the network (not counting the batch running now)."""
        with self._wake:
            return sum(len(batch) for batch, _ in self._pending)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) network input -> the network's (n, 1, h, w) probabilities; blocks until done."""
        future: Future = Future()
        with self._wake:
            self._pending.append((batch, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=f"batcher-{self.name}", daemon=True)
                self._worker.start()
            self._wake.notify()
        return future.result()

    def _take(self) -> list[tuple[torch.Tensor, Future]]:
        """The oldest request, then more in arrival order while they fit in `max_batch` images."""
        with self._wake:
            while not self._pending:
                self._wake.wait()
            taken, images = [], 0
            while self._pending and (not taken or images + len(self._pending[0][0]) <= self.max_batch):
                taken.append(self._pending.pop(0))
                images += len(taken[-1][0])
            return taken

    def _serve(self) -> None:
        while True:
            taken = self._take()
            try:
                out = self.run(torch.cat([batch for batch, _ in taken]) if len(taken) > 1 else taken[0][0])
            except BaseException as exc:  # noqa: BLE001 - handed to the callers, who raise it
                for _, future in taken:
                    future.set_exception(exc)
                continue
            self.batches += 1
            self.largest = max(self.largest, len(out))
            if len(taken) > 1:
                log.info("%s: one batch of %d images for %d requests", self.name, len(out), len(taken))
            start = 0
            for batch, future in taken:
                future.set_result(out[start:start + len(batch)])
                start += len(batch)


class RemovalPipeline:
    """Loads one model once; turns images into masks and cut-outs, in batches, on one device.

    `batch_size`: images per network batch within one call. `batch_requests` > 1: concurrent
    calls (the app's users) share network batches of up to that many images.
    `compile`: a `torch.compile` backend ("inductor") to compile the network with, warmed up
    here for every batch size it will see, so no request pays for compilation.
    """

    def __init__(self, model: str | None = "auto", weights=None, device="auto", dtype="auto", batch_size: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, input_size: tuple[int, int] | None = None, network=None,
                 batch_requests: int = 1, compile: str | None = None):
        self.model_name = choose_model(model, weights)
        self.spec: ModelSpec = get_spec(self.model_name)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device) if self.spec.runtime == "torch" else torch.float32
        self.batch_size = max(1, int(batch_size))
        self.max_pixels = max_pixels
        self.input_size = tuple(input_size or self.spec.input_size)
        started = time.perf_counter()
        # `network` lets a caller hand in a model it already built (tests, benchmarks).
        self.network = network if network is not None else load_model(
            self.model_name, weights, device=self.device if self.spec.runtime == "torch" else None,
            dtype=self.dtype if self.spec.runtime == "torch" else None)
        if self.spec.runtime == "torch":
            self.network = self.network.to(device=self.device, dtype=self.dtype).eval()
            if self.device.type == "cuda":
                tune_cuda()
        self.load_seconds = time.perf_counter() - started
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        log.info("%s on %s (%s), loaded in %.1f s", self.model_name, self.device, str(self.dtype).replace("torch.", ""),
                 self.load_seconds)
        self.batcher = RequestBatcher(self.probabilities_within_memory, batch_requests, self.model_name) \
            if batch_requests > 1 else None
        self.compiled_batch_sizes: tuple[int, ...] = ()
        self.compile_seconds = 0.0
        if compile:
            self.compile_network(compile, max(self.batch_size, batch_requests))

    @property
    def title(self) -> str:
        return self.spec.title

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        compiled = ", compiled" if self.compiled_batch_sizes else ""
        return (f"{self.spec.title} [{self.model_name}] on {self.device.type} ({dtype}{compiled}); "
                f"licence: {self.spec.licence}")

    def compile_network(self, backend: str, max_batch: int) -> None:
        """`torch.compile` with static shapes, then one warm-up pass per batch size the network
        will see (powers of two up to `max_batch`; batches are zero-padded up to the next one)."""
        if self.spec.runtime != "torch":
            raise ValueError(f"compiling needs a PyTorch network; {self.model_name} is an {self.spec.runtime} "
                             "graph run by onnxruntime")
        started = time.perf_counter()
        self.network = torch.compile(self.network, backend=backend, dynamic=False)
        self.compiled_batch_sizes = compiled_batch_sizes(max_batch)
        for size in self.compiled_batch_sizes:
            self.probabilities(torch.zeros(size, 3, *self.input_size, device=self.device))
        self.compile_seconds = time.perf_counter() - started
        log.info("%s compiled (%s) for batches of %s in %.1f s", self.model_name, backend,
                 "/".join(map(str, self.compiled_batch_sizes)), self.compile_seconds)

    def _padded(self, batch: torch.Tensor) -> torch.Tensor:
        """A compiled network's input zero-padded to the next batch size it was warmed up for."""
        size = next((s for s in self.compiled_batch_sizes if s >= len(batch)), len(batch))
        if size == len(batch):
            return batch
        return torch.cat([batch, batch.new_zeros(size - len(batch), *batch.shape[1:])])

    # -- preprocess -----------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W) normalised network input from an RGB(A) image."""
        rgb = np.array(image.convert("RGB") if image.mode != "RGB" else image)  # a writable copy
        pixels = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float()
        resized = F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False,
                                antialias=self.spec.resize_antialias)
        return (resized / 255.0 - self._mean) / self._std

    # -- network ----------------------------------------------------------------------
    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) foreground probabilities at the network's resolution, float32."""
        network_input = batch.to(self.dtype) if self.spec.runtime == "torch" else batch
        if self.compiled_batch_sizes:
            network_input = self._padded(network_input)
        out = self.network(network_input)[self.spec.output_index][:len(batch)].float().to(self.device)
        if self.spec.activation == "sigmoid":
            return out.sigmoid()
        # Probability maps stretched to 0..1 per image, as rembg and the RMBG-1.4 card do. Done
        # before resizing so that a bicubic overshoot cannot lift the background above 0.
        low = out.amin(dim=(1, 2, 3), keepdim=True)
        high = out.amax(dim=(1, 2, 3), keepdim=True)
        return (out - low) / (high - low).clamp_min(1e-8)

    # -- postprocess ------------------------------------------------------------------
    def to_mask(self, probability: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """(1, h, w) probabilities -> 8-bit mask of `size` (width, height)."""
        width, height = size
        if self.spec.mask_resize == "bicubic":
            # As the RMBG-2.0 card: 8 bits at the network's size (truncated, as its ToPILImage
            # does), then Pillow's bicubic resize: its SIMD path on 8-bit images takes ~0.03 s
            # for 12 MP where a float resize in torch took ~0.2 s.
            small = (probability[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
            return Image.fromarray(small, "L").resize((width, height), Image.Resampling.BICUBIC)
        resized = F.interpolate(probability[None], size=(height, width), mode="bilinear", align_corners=False)
        mask = (resized[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(mask, mode="L")

    def predict_probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 1, h, w) float32 CPU probabilities at the network's size, `batch_size` images a pass."""
        run = self.batcher or self.probabilities_within_memory
        out = [run(torch.cat([self.preprocess(im) for im in images[start:start + self.batch_size]])).float().cpu()
               for start in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def predict_masks(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        masks: list[Image.Image] = []
        run = self.batcher or self.probabilities_within_memory
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            probs = run(torch.cat([self.preprocess(im) for im in chunk]))
            masks += [self.to_mask(p, im.size) for p, im in zip(probs, chunk)]
        return masks

    def probabilities_within_memory(self, batch: torch.Tensor) -> torch.Tensor:
        """`probabilities`, halving the batch when the device runs out of memory."""
        try:
            return self.probabilities(batch)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise RuntimeError(f"out of memory on {self.device} for a single image at "
                                   f"{self.input_size[1]}x{self.input_size[0]}; try --device cpu or a smaller "
                                   f"--dtype") from None
            half = len(batch) // 2
            log.warning("out of memory at batch %d on %s: retrying in halves", len(batch), self.device)
            return torch.cat([self.probabilities_within_memory(batch[:half]),
                              self.probabilities_within_memory(batch[half:])])

    # -- the public face --------------------------------------------------------------
    def load(self, source) -> Image.Image:
        return load_image(source, max_pixels=self.max_pixels)

    def process(self, sources: Iterable) -> list[RemovalResult]:
        """Decode and mask many inputs (paths, bytes, PIL images, arrays), `batch_size` at a time."""
        sources = list(sources)
        images = [self.load(s) for s in sources]
        started = time.perf_counter()
        masks = self.predict_masks(images)
        each = (time.perf_counter() - started) / max(1, len(images))
        return [RemovalResult(im, m, self.model_name, each, _name(s)) for s, im, m in zip(sources, images, masks)]

    def __call__(self, source) -> RemovalResult:
        return self.process([source])[0]

    def remove(self, source, *, background=None, refine: bool = False) -> Image.Image:
        """The cut-out (RGBA), or the subject over `background` (RGB)."""
        return self(source).composite(background, refine)


def compiled_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled network is warmed up for: 1, 2, 4, ... below `max_batch`, and `max_batch`."""
    return tuple(2**i for i in range(max_batch.bit_length()) if 2**i < max_batch) + (max_batch,)


def tune_cuda() -> None:
    """Settings that make fixed-size inference faster on NVIDIA GPUs: cuDNN picks the fastest
    convolution algorithm for each shape once (every input is the same size), and float32
    matmuls may use TF32, as the model card's `set_float32_matmul_precision('high')` does."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def _name(source) -> str | None:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


_PIPELINES: dict[tuple, RemovalPipeline] = {}


def get_pipeline(model: str | None = "auto", weights=None, device="auto", dtype="auto", **kwargs) -> RemovalPipeline:
    """A pipeline per (model, weights, device, dtype), built once and reused."""
    key = (choose_model(model, weights), os.fspath(weights) if weights else None, str(device), str(dtype),
           tuple(sorted(kwargs.items())))
    if key not in _PIPELINES:
        _PIPELINES[key] = RemovalPipeline(key[0], weights, device, dtype, **kwargs)
    return _PIPELINES[key]


def remove(data, *, model: str | None = "auto", weights=None, background=None, refine: bool = False,
           only_mask: bool = False, fmt: str = "png", device="auto", dtype="auto"):
    """One call, like rembg's: bytes in -> encoded bytes out; PIL in -> PIL out; ndarray in -> ndarray out.

    Returns the cut-out (RGBA), the subject over `background` (RGB), or with `only_mask` the mask (L).
    """
    from .imageio import encode_image

    result = get_pipeline(model, weights, device, dtype)(data)
    out = result.mask if only_mask else result.composite(background, refine)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return encode_image(out, fmt)
    if isinstance(data, np.ndarray):
        return np.asarray(out)
    return out
