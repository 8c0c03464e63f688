"""Video background removal: `remove_video` turns a clip into an alpha video (VP9 WebM, ProRes 4444 MOV),
PNG frames or an H.264 MP4 over a new background, keeping frame rate, timing, rotation and audio; with
framing settings (crop, canvas, shadow...), one geometry for the whole clip (`video.framed`).

Needs PyAV (`pip install av`), which brings its own FFmpeg."""
from .probe import MAX_STREAMS, VIDEO_EXTENSIONS, VideoError, VideoInfo, classify_media, is_video, probe_video
from .remove import ALPHA_FORMATS, FORMATS, VideoResult, check_video_framing, output_paths, remove_video
from .smooth import MotionAwareSmoother

__all__ = ["ALPHA_FORMATS", "FORMATS", "MAX_STREAMS", "VIDEO_EXTENSIONS", "MotionAwareSmoother", "VideoError",
           "VideoInfo", "VideoResult", "check_video_framing", "classify_media", "is_video", "output_paths",
           "probe_video", "remove_video"]
