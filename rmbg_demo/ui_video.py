"""The page's "video" tab (API name `video`): a clip in, a transparent WebM (or ProRes MOV, or
an H.264 MP4 over a background) and its matte out, with progress, and limits that protect a
shared demo (clip length, pixels per frame), each refused with a clear message before any work."""
from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from .video import ALPHA_FORMATS, FORMATS

log = logging.getLogger(__name__)

# The result plays over a checkerboard, so that transparency shows.
CSS = "#video-result video { background: repeating-conic-gradient(#d0d0d0 0% 25%, #fff 0% 50%) 50% / 24px 24px; }"


class VideoHandler:
    def __init__(self, models, folders, max_seconds: float | None, options_of):
        """`options_of(model, background, colour, background_image, refine, fmt, resolution, crop, margin,
        canvas, scale, position, shadow, srgb)`: the page's settings as `RemovalOptions`, errors as Gradio's."""
        self.models, self.folders, self.max_seconds, self.options_of = models, folders, max_seconds, options_of

    def __call__(self, path, model=None, background="transparent", colour="#ffffff", background_image=None,
                 refine=False, resolution="auto", smooth=True, video_format="webm", crop=False, margin="", canvas="",
                 scale="", position="original", shadow="none", progress=gr.Progress()):
        from .video import VideoError, remove_video

        if not path:
            raise gr.Error("upload or drop a video first")
        # The Framing group applies to clips too (one geometry for the whole clip); sRGB does not: a clip's
        # colours are BT.709, sRGB's primaries already
        options = self.options_of(model, background, colour, background_image, refine, "png", resolution, crop,
                                  margin, canvas, scale, position, shadow, False)
        pipeline = self.models.get(options.model, options.size)
        folder = self.folders.new()
        (folder / "in").mkdir()
        source = folder / "in" / Path(path).name  # outputs are named after the upload, not Gradio's temp name
        source.symlink_to(Path(path).resolve())

        def report(done: int, total: int) -> None:
            progress((done, total), desc="frames", unit="frames")

        try:
            result = remove_video(pipeline, source, folder, fmt=video_format, background=options.background.value,
                                  mask=True, smooth=smooth, refine=options.refine, max_seconds=self.max_seconds,
                                  progress=report, framing=options)
        except (VideoError, ValueError, FileExistsError) as exc:
            raise gr.Error(str(exc)) from exc
        except RuntimeError as exc:
            log.exception("video failed")
            raise gr.Error(f"inference failed: {exc}") from exc
        video = result.outputs["video"]
        info = (f"**Model:** {pipeline.describe()}  \n{result.frames} frames at {float(result.fps):.2f} fps, "
                f"{result.seconds:.1f} s ({result.frames / max(result.seconds, 1e-9):.1f} frames/s)"
                f"{', steady edges' if smooth else ''}{', framed' if options.framed else ''}")
        playable = video.suffix in (".webm", ".mp4")
        if not playable:
            info += "  \nProRes MOV does not play in browsers: download it below."
        return (str(video) if playable else None), [str(video), str(result.outputs["mask"])], info


def video_tab(handler: VideoHandler, settings: list) -> None:
    """Inside a gr.Blocks: the tab's components and its event; `settings` are the page's shared settings
    (model, background, colour, background image, refine, format, resolution, then the Framing group's crop,
    margin, canvas, scale, position, shadow, srgb)."""
    model, background, colour, background_image, refine, _fmt, resolution = settings[:7]
    framing = settings[7:13]  # crop ... shadow; not srgb (see VideoHandler)
    with gr.Tab("video"):
        # A plain file input: our own decoder checks the content (gr.Video would hand it to ffmpeg first).
        clip = gr.File(label="Upload or drop a video", file_types=["video"], type="filepath", elem_id="video-input")
        with gr.Row():
            smooth = gr.Checkbox(True, label="Steady edges (temporal smoothing that follows motion)")
            video_format = gr.Radio([(FORMATS[name], name) for name in ALPHA_FORMATS], value="webm",
                                    label="Video format (transparent background)")
        run = gr.Button("Remove background", variant="primary", elem_id="run-video")
        result = gr.Video(label="Result", elem_id="video-result", autoplay=True, loop=True, format=None)
        files = gr.File(label="Video and matte (greyscale MP4)", file_count="multiple", elem_id="video-files")
        info = gr.Markdown(elem_id="video-info")
        gr.HTML(f"<style>{CSS}</style>")  # in the page itself: Gradio 5 takes css= in Blocks, Gradio 6 in launch()
        run.click(handler, [clip, model, background, colour, background_image, refine, resolution, smooth,
                            video_format, *framing], [result, files, info], api_name="video")
