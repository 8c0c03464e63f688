"""What framing adds to a clip: the same 48-frame 640x360 clip (the tests' horse crossing a brick wall)
through `remove_video` with the embedded u2netp, plain, cropped, and on a canvas with a drop shadow
(WebM and the mask video). A framed clip takes two passes (video/framed.py): the encoding waits for the
clip's box instead of overlapping the network, so its time is added to the wall time.

    python bench/video_framing.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_video import moving_subject, write_clip  # noqa: E402

from rmbg_demo.pipeline import RemovalPipeline  # noqa: E402
from rmbg_demo.request import RemovalOptions  # noqa: E402
from rmbg_demo.video import remove_video  # noqa: E402

CASES = {"plain": None, "crop, margin 5%": RemovalOptions(crop=True, margin="5%"),
         "canvas 720x720, drop shadow": RemovalOptions(canvas="720x720", shadow="drop")}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        images, _ = moving_subject(size=(640, 360), frames=48)
        clip = write_clip(folder / "clip.mp4", images, audio=False)
        pipeline = RemovalPipeline("u2netp")
        remove_video(pipeline, clip, folder / "warm-up")
        for index, (name, framing) in enumerate(CASES.items()):
            started = time.perf_counter()
            result = remove_video(pipeline, clip, folder / str(index), mask=True, framing=framing)
            busy = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            print(f"{name:28s} {time.perf_counter() - started:6.1f} s wall for {result.frames} frames ({busy})")


if __name__ == "__main__":
    main()
