"""A memory budget for large images in long-running front ends (the HTTP service, the page).

A pixel cap alone let a 6 KB PNG of 7000x7000 take ~1.3 GB while it was decoded, run and composed, and
16 such requests at once could take a 24 GB host down. Here each request is admitted against a budget
of bytes before its pixels are decoded (the size comes from the file's header): requests that do not fit
wait their turn, or after `timeout` are refused (the service answers 503), so the work in flight never
needs more than the budget. After a large request the freed memory is handed back to the system.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Working bytes per pixel of one image through decode, network input, mask, compositing and encoding:
# measured 1.3 GB for a 49 MP PNG composed over a colour (~27 B/px), with room for a background image.
BYTES_PER_PIXEL = 32
# Memory freed by requests this large is handed back to the system at once (glibc keeps it otherwise).
TRIM_ABOVE = 64 * 2**20


class BudgetExceeded(RuntimeError):
    """A request could not be admitted in time (or can never fit); `status` is the HTTP answer."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


def image_cost(width: int, height: int) -> int:
    return int(width) * int(height) * BYTES_PER_PIXEL


def machine_memory() -> int:
    """Bytes of RAM (cgroup limit if lower), or 8 GiB when it cannot be read."""
    total = 8 * 2**30
    with contextlib.suppress(OSError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = open(limit_file).read().strip()
            if text.isdigit():
                total = min(total, int(text))
    return total


def default_budget() -> int:
    """A quarter of the machine's memory (the models, Python and the other requests need the rest)."""
    return max(512 * 2**20, machine_memory() // 4)


def parse_memory(text: str | int | None) -> int | None:
    """'6G', '512M', '2.5GB', '0' (no budget) or bytes -> bytes; None: the default."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(value[-1:], 1)
    try:
        amount = float(value[:-1] if scale > 1 else value)
    except ValueError:
        raise ValueError(f"max memory {text!r}: give bytes or a size like 6G or 512M") from None
    if amount < 0:
        raise ValueError(f"max memory {text!r}: must not be negative")
    return int(amount * scale)


def release_memory() -> None:
    """Hands freed heap memory back to the system (glibc's malloc_trim); nothing elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class LaterTrims:
    """`release_memory` again a little after a large request is done: its answer is often still being
    encoded or sent when the budget is released (the page: Gradio saves the returned pictures after the
    handler returns), and what that frees afterwards would otherwise stay with the process until the next
    large request. One daemon thread, started on first use; each call moves the pending trims later."""

    DELAYS = (2.0, 15.0)

    def __init__(self):
        self._due: list[float] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self) -> None:
        with self._wake:
            self._due = [time.monotonic() + delay for delay in self.DELAYS]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rmbg-trim", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due:
                    self._wake.wait()
                left = self._due[0] - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self._due.pop(0)
            release_memory()


LATER_TRIMS = LaterTrims()


class MemoryBudget:
    """`with budget.admit(cost): ...` holds `cost` bytes of the budget for the block. `limit` 0: no budget
    (every request admitted at once, as before)."""

    def __init__(self, limit: int | None = None, *, timeout: float = 60.0):
        self.limit = default_budget() if limit is None else int(limit)
        self.timeout = timeout
        self.used = 0
        self.peak = 0  # the most admitted at once (for logs and tests)
        self._free = threading.Condition()

    def acquire(self, cost: int, timeout: float | None = None) -> None:
        if not self.limit:
            return
        if cost > self.limit:
            raise BudgetExceeded(f"this image needs about {cost / 2**20:.0f} MB to process, over the server's "
                                 f"{self.limit / 2**20:.0f} MB budget for images (--max-memory)", 413)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._free:
            while self.used + cost > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetExceeded(f"busy: large images in progress hold the memory budget "
                                         f"({self.used / 2**20:.0f} of {self.limit / 2**20:.0f} MB); retry later")
                self._free.wait(left)
            self.used += cost
            self.peak = max(self.peak, self.used)

    def release(self, cost: int) -> None:
        if self.limit:
            with self._free:
                self.used -= cost
                self._free.notify_all()
        if cost >= TRIM_ABOVE:
            release_memory()
            LATER_TRIMS.schedule()

    @contextlib.contextmanager
    def admit(self, cost: int, timeout: float | None = None) -> Iterator[None]:
        self.acquire(cost, timeout)
        try:
            yield
        finally:
            self.release(cost)
