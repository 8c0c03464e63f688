"""Workarounds for Gradio, each with the reason and the versions it was checked on.

Kept apart from the page so that the page reads as a page, and so that a Gradio upgrade
means reading one file. Nothing here runs at import: `app.py` installs the cache-cleaning
guard at start-up (it changes Gradio process-wide).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import gradio as gr

log = logging.getLogger(__name__)

# Gradio majors whose internals below were read and tested (tests/test_hardening.py).
CHECKED_MAJORS = (5, 6)


def _gradio_major() -> int:
    try:
        return int(gr.__version__.split(".")[0])
    except ValueError:
        return 0


def delete_cached_files(blocks: gr.Blocks, age: float | None) -> None:
    """Gradio's periodic cache cleaning (`delete_cache`, gradio-app/gradio#7447), made safe
    while requests run.

    Gradio's own version iterates over its live sets of cached files; a request that adds a
    file meanwhile raises "Set changed size during iteration", which ends the cleaning task
    for good, and the cache then grows until the server restarts (seen under load with
    Gradio 6.31; we found no upstream report). This one walks a snapshot of each set.
    `age` None deletes everything (at shutdown).
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


def guard_cache_cleaning() -> Callable[[], None]:
    """Have Gradio's scheduled cleaning call `delete_cached_files` (it looks the function up by
    name in `gradio.route_utils` on every round). Returns a function that puts Gradio's back."""
    from gradio import route_utils

    original = getattr(route_utils, "delete_files_created_by_app", None)
    if original is None or _gradio_major() not in CHECKED_MAJORS:
        log.warning("Gradio %s: cache-cleaning guard not installed (checked on Gradio %s only)", gr.__version__,
                    "/".join(map(str, CHECKED_MAJORS)))
        return lambda: None
    route_utils.delete_files_created_by_app = delete_cached_files

    def undo() -> None:
        route_utils.delete_files_created_by_app = original

    return undo


class RawImage(gr.Image):
    """An image input whose upload reaches our decoder untouched. Gradio would open it with
    Pillow first (`gr.Image.preprocess`), turning a bad or hostile file into an unreadable
    error before our checks (size caps, EXIF, HEIC) run. Checked on Gradio 5 and 6."""

    is_template = True  # rendered by the frontend's own Image component

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return super().preprocess(payload)
