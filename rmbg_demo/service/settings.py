"""How `rmbg serve` serves (no FastAPI or Ray needed to make one: the CLI builds it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..imageio import DEFAULT_MAX_PIXELS


@dataclass
class ServeSettings:
    """How the service runs, beside each request's own `RemovalOptions`."""

    model: str = "auto"
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    runtime: str = "auto"  # torch, onnxruntime, openvino or auto (engines.runtime_for)
    max_batch: int = 8  # requests that share a network batch
    max_queued: int = 64  # requests waiting beyond those being served; more get 503
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_private_urls: bool = False
    max_memory: int | None = None  # bytes of the image memory budget (budget.MemoryBudget); None: a quarter of RAM
    api_keys: tuple[str, ...] = ()  # when any: every route but /healthz and the docs needs one
    rate_limit: int | None = None  # requests per minute per key (per client address without keys)

    def __repr__(self) -> str:  # keys never reach a log or a traceback
        shown = {k: v for k, v in vars(self).items() if k != "api_keys"}
        return f"ServeSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())}, api_keys=<{len(self.api_keys)}>)"

    @property
    def max_in_flight(self) -> int:
        """Requests this process works on or holds at once; the next one gets 503."""
        return 2 * max(1, self.max_batch) + max(0, self.max_queued)
