"""Image in -> mask out: decode -> preprocess -> engine -> postprocess, for every registered model.

`RemovalPipeline` is thin: the spec (`rmbg_demo.models`) says how to pre- and post-process
(`rmbg_demo.processing`), an engine (`rmbg_demo.engines`) runs the network. Front ends (CLI,
page, cluster jobs, services) choose sources, sinks and an engine; `iter_results` is the one
batch loop they share.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import compose, processing
from .confidence import confidence
from .engines import Engine, RequestBatcher, build_engine
from .imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from .models import DEFAULT, FALLBACK, ModelSpec, get_spec
from .request import NetworkSize
from .weights import weights_available

log = logging.getLogger(__name__)


def choose_model(model: str | None = "auto", weights=None) -> str:
    """The model to run: the one asked for, or for 'auto' the default when its weights are on
    this machine (or given), else the embedded fallback. Never waits for the network."""
    if model not in (None, "auto"):
        return get_spec(model).name
    if weights is not None or weights_available(DEFAULT):
        chosen = DEFAULT
    else:
        chosen = FALLBACK
        spec = get_spec(DEFAULT)
        log.warning("%s weights not found on this machine (accept the licence at %s and set HF_TOKEN, or pass "
                    "--weights): using the embedded %s model", DEFAULT, spec.page_url, FALLBACK)
    log.info("model: %s", chosen)
    return chosen


def resolve_model(asked: str | None, weights, engine: Engine | None = None, chosen: str | None = None) -> str:
    """The registered model a request runs: `asked` (or for 'auto', `choose_model`'s pick, `chosen` when the
    caller has it: choosing logs), unless the engine knows better (an exported file's metadata says which
    model it is); `asked` must agree then."""
    chosen = chosen or choose_model(asked, weights)
    found = engine.model_name if engine is not None else None
    if found is None:
        return chosen
    found = get_spec(found).name
    if asked not in (None, "auto") and found != chosen:
        raise ValueError(f"{weights or engine.describe()} is an export of {found}, not {chosen}: drop --model or "
                         f"pass --model {found}")
    return found


def network_size_for(spec: ModelSpec, asked: tuple[int, int] | None, engine: Engine | None = None) -> NetworkSize:
    """The resolution a request runs at: the one asked, else what the engine is fixed at or prefers (an
    exported file's own), else the model's own. An engine fixed at another size refuses."""
    fixed = engine.fixed_size if engine is not None else None
    preferred = engine.input_size if engine is not None else None
    size = NetworkSize(*(asked or fixed or preferred or spec.input_size))
    if fixed and tuple(fixed) != tuple(size):
        raise ValueError(f"this {engine.name} model runs at {fixed[1]}x{fixed[0]} only, not {size}")
    return size


class Processor:
    """A model's own steps around its network, at one network size: decode (with the pixel cap),
    preprocess, and the probabilities back to a mask. No engine: cheap to make anywhere (a Ray task)."""

    def __init__(self, spec: ModelSpec, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS):
        self.spec, self.size, self.max_pixels = spec, NetworkSize(*size), max_pixels

    def load(self, source) -> Image.Image:
        return load_image(source, max_pixels=self.max_pixels)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W) float32 CPU network input."""
        return processing.preprocess(image, self.spec, self.size)

    def to_mask(self, probability: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """(1, h, w) probabilities -> 8-bit mask of `size` (width, height)."""
        return processing.to_mask(probability, size, self.spec)

    def result_of(self, image: Image.Image, probability: torch.Tensor, source: str | None = None) -> RemovalResult:
        """The network's (1, h, w) answer for `image` as a result: its mask at the image's size and its
        confidence."""
        return RemovalResult(image, self.to_mask(probability, image.size), self.spec.name, source=source,
                             confidence=confidence(probability))


@dataclass
class RemovalResult:
    """One image's outcome. `image` is the decoded original (RGB, or RGBA if it had transparency)."""

    image: Image.Image
    mask: Image.Image  # mode "L", the image's size
    model: str
    seconds: float = 0.0
    source: str | None = None
    # How sure the network was, in [0, 1] (rmbg_demo.confidence), from its probability map
    confidence: float | None = None
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


@dataclass
class Outcome:
    """One source's fate in `iter_results`: its result, or the error that stopped it."""

    source: object
    result: RemovalResult | None = None
    error: Exception | None = None

    @property
    def name(self) -> str:
        return _name(self.source) or "image"


# What one bad input may raise without stopping the others: undecodable or missing files,
# and a network failure (out of memory even for one image, a device error) for its batch.
INPUT_ERRORS = (ImageDecodeError, OSError)
BATCH_ERRORS = (RuntimeError,)


class RemovalPipeline:
    """One model, loaded once; images in, masks and cut-outs out, `batch_size` images a pass.

    `engine`: where the network runs (default: built from the model and weights, see
    `rmbg_demo.engines.build_engine`). `batch_requests` > 1: concurrent calls (a server's
    users) share network batches of up to that many images. `compile`: a `torch.compile`
    backend, warmed up for every batch size before the first image. `input_size` (H, W):
    the network's resolution, default the model's own. `runtime`: torch, onnxruntime, openvino
    or auto (`rmbg_demo.engines.runtime_for`).
    """

    def __init__(self, model: str | None = "auto", weights=None, device="auto", dtype="auto", batch_size: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, input_size: tuple[int, int] | None = None, network=None,
                 batch_requests: int = 1, compile: str | None = None, engine: Engine | None = None,
                 runtime: str = "auto"):
        started = time.perf_counter()
        self.batch_size = max(1, int(batch_size))
        chosen = choose_model(model, weights)
        if engine is None:
            engine = build_engine(chosen, weights, device, dtype, network=network, input_size=input_size,
                                  compile=compile, max_batch=max(self.batch_size, batch_requests), runtime=runtime)
            if batch_requests > 1:
                engine = RequestBatcher(engine, batch_requests)
        self.engine = engine
        self.model_name = resolve_model(model, weights, engine, chosen)
        self.spec: ModelSpec = get_spec(self.model_name)
        self.input_size = network_size_for(self.spec, input_size, engine)
        self.max_pixels = max_pixels
        self.processor = Processor(self.spec, self.input_size, max_pixels)
        self.load_seconds = time.perf_counter() - started
        log.info("%s: %s, loaded in %.1f s", self.model_name, self.engine.describe(), self.load_seconds)

    @property
    def title(self) -> str:
        return self.spec.title

    @property
    def batcher(self) -> RequestBatcher | None:
        return self.engine if isinstance(self.engine, RequestBatcher) else None

    def describe(self) -> str:
        return (f"{self.spec.title} [{self.model_name}] at {self.input_size}, {self.engine.describe()}; "
                f"licence: {self.spec.licence}")

    # -- the stages -------------------------------------------------------------------
    def load(self, source) -> Image.Image:
        return self.processor.load(source)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor.preprocess(image)

    def to_mask(self, probability: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        return self.processor.to_mask(probability, size)

    def predict_probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 1, h, w) float32 CPU probabilities at the network's size, `batch_size` images a pass."""
        return torch.cat([self.engine(torch.cat([self.preprocess(im) for im in images[start:start + self.batch_size]]))
                          for start in range(0, len(images), self.batch_size)])

    def result_of(self, image: Image.Image, probability: torch.Tensor, source: str | None = None) -> RemovalResult:
        return self.processor.result_of(image, probability, source)

    def predict_masks(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        masks: list[Image.Image] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            probabilities = self.predict_probabilities(chunk)
            masks += [self.to_mask(p, im.size) for p, im in zip(probabilities, chunk)]
        return masks

    # -- the public face --------------------------------------------------------------
    def iter_results(self, sources: Iterable) -> Iterator[Outcome]:
        """Each source (path, bytes, PIL image, array) with its result or its own error, in input
        order, `batch_size` at a time: memory stays bounded however many sources come, and a bad
        file or a failed batch never stops the others."""
        chunk: list = []
        for source in sources:
            chunk.append(source)
            if len(chunk) == self.batch_size:
                yield from self._results_of(chunk)
                chunk = []
        if chunk:
            yield from self._results_of(chunk)

    def _results_of(self, sources: list) -> list[Outcome]:
        outcomes = [Outcome(source) for source in sources]
        decoded: list[tuple[Outcome, Image.Image]] = []
        for outcome in outcomes:
            try:
                decoded.append((outcome, self.load(outcome.source)))
            except INPUT_ERRORS as exc:
                outcome.error = exc
        if decoded:
            started = time.perf_counter()
            try:
                probabilities = self.predict_probabilities([image for _, image in decoded])
            except BATCH_ERRORS as exc:
                log.warning("inference failed for a batch of %d images: %s", len(decoded), exc)
                for outcome, _ in decoded:
                    outcome.error = exc
                return outcomes
            for (outcome, image), probability in zip(decoded, probabilities):
                outcome.result = self.result_of(image, probability, _name(outcome.source))
            each = (time.perf_counter() - started) / len(decoded)
            for outcome, _ in decoded:
                outcome.result.seconds = each
        return outcomes

    def process(self, sources: Iterable) -> list[RemovalResult]:
        """Masks for many inputs; the first bad one raises its error."""
        results = []
        for outcome in self.iter_results(sources):
            if outcome.error is not None:
                raise outcome.error
            results.append(outcome.result)
        return results

    def __call__(self, source) -> RemovalResult:
        return self.process([source])[0]

    def remove(self, source, *, background=None, refine: bool = False) -> Image.Image:
        """The cut-out (RGBA), or the subject over `background` (RGB)."""
        return self(source).composite(background, refine)


def _name(source) -> str | None:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
