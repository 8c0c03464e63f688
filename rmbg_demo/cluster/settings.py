"""What a service replica is configured with (no Ray needed to make one: the CLI builds it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..imageio import DEFAULT_MAX_PIXELS


@dataclass
class ServeSettings:
    """How a replica serves, beside each request's own `RemovalOptions`."""

    model: str = "auto"
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 8
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_private_urls: bool = False
    max_memory: int | None = None  # bytes of the image memory budget (budget.MemoryBudget); None: a quarter of RAM
