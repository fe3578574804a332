"""Frames in, files out: what the pipelines return turned into uint8 frames, written as video or PNG.

Videos are written with imageio's ffmpeg plugin (the `imageio` and `imageio-ffmpeg` wheels; the latter ships
an ffmpeg binary, so nothing else needs installing) as H.264 mp4. When that is not possible (the packages
are missing, ffmpeg fails, or STG_EXT_NO_FFMPEG=1 is set) the video is written as an animated GIF with
Pillow instead, next to the requested name, and the reason is logged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .errors import CLIError, UsageError

logger = logging.getLogger("stg_ext.cli")

#: Suffixes written through ffmpeg; ".gif" is written with Pillow.
FFMPEG_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
VIDEO_SUFFIXES = FFMPEG_SUFFIXES + (".gif",)


# --------------------------------------------------------------------------------------------------
# What pipelines return -> (T, H, W, 3) uint8
# --------------------------------------------------------------------------------------------------

def to_uint8_frames(frames: Any) -> np.ndarray:
    """The first video of a pipeline's `.frames` as a (T, H, W, 3) uint8 array.

    Accepts what diffusers video pipelines return: an array or tensor (B, T, H, W, C) / (T, H, W, C) with
    floats in [0, 1] or uint8, a (B, T, C, H, W) tensor, or (nested) lists of PIL images or arrays."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise CLIError("the pipeline returned no frames")
        first = frames[0]
        if isinstance(first, (list, tuple)) or (isinstance(first, np.ndarray) and first.ndim == 4):
            frames = first  # a batch of videos: keep the first
        frames = np.stack([_image_array(f) for f in frames])
    else:
        frames = _as_numpy(frames)
        if frames.ndim == 5:
            frames = frames[0]
    if frames.ndim != 4:
        raise CLIError(f"cannot read the pipeline's frames: expected a video, got an array of shape {frames.shape}")
    if frames.shape[-1] not in (1, 3, 4) and frames.shape[1] in (1, 3, 4):
        frames = frames.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3]
    if frames.dtype != np.uint8:
        frames = np.clip(np.rint(frames.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frames)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _image_array(img: Any) -> np.ndarray:
    if hasattr(img, "convert"):  # PIL
        return np.asarray(img.convert("RGB"))
    arr = _as_numpy(img)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3]


# --------------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------------

def check_video_path(path: os.PathLike) -> Path:
    """Validates a video --out before any work is done: a known suffix and a writable folder."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--out {str(path)!r}: give a video file name ending in "
                         f"{', '.join(VIDEO_SUFFIXES)}")
    if path.is_dir():
        raise UsageError(f"--out {str(path)!r} is a folder; this command writes one video file")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    return path


def ensure_writable_dir(folder: os.PathLike) -> Path:
    """Creates `folder` if needed and proves it writable, so a long run does not fail at its very end."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CLIError(f"cannot write to {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".stg-ext-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"cannot write to {str(folder)!r}: {e.strerror or e}") from None
    return folder


# --------------------------------------------------------------------------------------------------
# Writing and reading videos
# --------------------------------------------------------------------------------------------------

def _ffmpeg_unavailable_reason() -> Optional[str]:
    if os.environ.get("STG_EXT_NO_FFMPEG", "") not in ("", "0"):
        return "STG_EXT_NO_FFMPEG is set"
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # ImportError, or no usable ffmpeg binary
        return f"mp4 writing needs imageio and imageio-ffmpeg ({' '.join(str(e).split())}); " \
               "pip install 'stg_ext[cli]'"
    return None


def write_video(path: os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Writes (T, H, W, 3) uint8 frames; returns the path actually written (a .gif beside `path` when the
    ffmpeg route is unavailable)."""
    path = Path(path)
    frames = np.ascontiguousarray(frames)
    if path.suffix.lower() == ".gif":
        return _write_gif(path, frames, fps)
    reason = _ffmpeg_unavailable_reason()
    if reason is None:
        try:
            _write_ffmpeg(path, frames, fps)
            return path
        except Exception as e:
            reason = f"ffmpeg failed: {' '.join(str(e).split())[:300]}"
            path.unlink(missing_ok=True)
    gif = path.with_suffix(".gif")
    logger.warning("cannot write %s (%s): writing %s instead", path.name, reason, gif.name)
    return _write_gif(gif, frames, fps)


def _write_ffmpeg(path: Path, frames: np.ndarray, fps: float) -> None:
    import imageio

    height, width = frames.shape[1:3]
    # yuv420p (what every player plays) needs even sizes; odd ones keep every pixel with yuv444p instead of
    # letting ffmpeg rescale the frames.
    even = height % 2 == 0 and width % 2 == 0
    pixelformat = "yuv420p" if even else "yuv444p"
    if not even:
        logger.info("%s: odd frame size %dx%d, written as yuv444p (some players need even sizes)",
                    path.name, width, height)
    writer = imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat=pixelformat, macro_block_size=1, ffmpeg_log_level="error")
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    try:
        images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0,
                       optimize=False, disposal=1)
    except OSError as e:
        raise CLIError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path


def read_video(path: os.PathLike) -> np.ndarray:
    """All frames of a video written by `write_video` as (T, H, W, 3) uint8."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    import imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([np.asarray(f)[..., :3] for f in reader])
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------------
# Pictures: side-by-side videos, labeled frame grids
# --------------------------------------------------------------------------------------------------

LABEL_HEIGHT = 14
GAP = 2
BACKGROUND = (255, 255, 255)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_width(text: str) -> int:
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font())
    return box[2] - box[0]


def _draw_text(canvas: np.ndarray, text: str, x: int, y: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(canvas)
    ImageDraw.Draw(img).text((x, y), text, fill=(0, 0, 0), font=_font())
    return np.asarray(img).copy()


def side_by_side(videos: Sequence[Tuple[str, np.ndarray]]) -> np.ndarray:
    """Videos next to each other, GAP white pixels apart, each under a LABEL_HEIGHT band with its label.
    Output: (T, LABEL_HEIGHT + H, n W + (n - 1) GAP, 3); videos of unequal length are cut to the shortest."""
    t = min(v.shape[0] for _, v in videos)
    h = max(v.shape[1] for _, v in videos)
    widths = [v.shape[2] for _, v in videos]
    out = np.full((t, LABEL_HEIGHT + h, sum(widths) + GAP * (len(videos) - 1), 3), 255, np.uint8)
    band = out[0, :LABEL_HEIGHT].copy()
    x = 0
    for (label, video), w in zip(videos, widths):
        out[:, LABEL_HEIGHT:LABEL_HEIGHT + video.shape[1], x:x + w] = video[:t]
        band = _draw_text(band, label, x + 2, 1)
        x += w + GAP
    out[:, :LABEL_HEIGHT] = band
    return out


def pick_frames(frames: np.ndarray, count: Optional[int]) -> np.ndarray:
    """`count` frames spread evenly over the video, first and last included (all when count is None)."""
    if count is None or count >= len(frames):
        return frames
    idx = np.unique(np.linspace(0, len(frames) - 1, max(1, count)).round().astype(int))
    return frames[idx]


def labeled_grid(rows: Sequence[Tuple[str, np.ndarray]], title: Optional[str] = None) -> np.ndarray:
    """One image: each row a label then its frames left to right, GAP pixels apart, on white; an optional
    title line on top. Rows are (label, (N, H, W, 3) frames) of equal frame size."""
    h, w = rows[0][1].shape[1:3]
    label_w = max(_text_width(label) for label, _ in rows) + 8
    cols = max(len(frames) for _, frames in rows)
    top = LABEL_HEIGHT + GAP if title else 0
    width = label_w + cols * w + (cols - 1) * GAP
    if title:
        width = max(width, _text_width(title) + 8)
    canvas = np.full((top + len(rows) * h + (len(rows) - 1) * GAP, width, 3), 255, np.uint8)
    if title:
        canvas = _draw_text(canvas, title, 4, 1)
    for r, (label, frames) in enumerate(rows):
        y = top + r * (h + GAP)
        for c, frame in enumerate(frames):
            x = label_w + c * (w + GAP)
            canvas[y:y + h, x:x + w] = frame
        canvas = _draw_text(canvas, label, 4, y + max(0, (h - LABEL_HEIGHT) // 2))
    return canvas


def save_png(path: os.PathLike, image: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    try:
        Image.fromarray(image).save(path)
    except OSError as e:
        raise CLIError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path
