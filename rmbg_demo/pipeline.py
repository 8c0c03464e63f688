"""Image in -> mask out: the predictor that owns pre- and post-processing for every registered model.

Preprocessing is the RMBG-2.0 model card's (resize to the network's input size, bilinear and
antialiased; scale to [0, 1]; normalise), done with torch on the inference device.
Postprocessing: activation (sigmoid for logit maps), bicubic resize back to the original size
(Pillow's kernel, a = -0.5, as the card's `PIL.Image.resize` does), rounding to an 8-bit mask.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

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


class RemovalPipeline:
    """Loads one model once; turns images into masks and cut-outs, in batches, on one device."""

    def __init__(self, model: str | None = "auto", weights=None, device="auto", dtype="auto", batch_size: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, input_size: tuple[int, int] | None = None, network=None):
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
        self.load_seconds = time.perf_counter() - started
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        log.info("%s on %s (%s), loaded in %.1f s", self.model_name, self.device, str(self.dtype).replace("torch.", ""),
                 self.load_seconds)

    @property
    def title(self) -> str:
        return self.spec.title

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.spec.title} [{self.model_name}] on {self.device.type} ({dtype}); licence: {self.spec.licence}"

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
        out = self.network(network_input)[self.spec.output_index].float().to(self.device)
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

    def predict_masks(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        masks: list[Image.Image] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            probs = self.probabilities_within_memory(torch.cat([self.preprocess(im) for im in chunk]))
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
