"""The media service's work as plain Python: encoded files and options in, encoded files out.

    studio = MediaStudio(MediaConfig())
    out = studio.merge_burst(MergeJob(frames=[jpeg0, jpeg1, ...]))
    out.files[0].data  # PNG bytes

Each job: check the options -> decode and check the frames -> run the algorithm (burst.py,
exposure.py, animate.py) -> encode (codecs.py). Every user mistake raises InvalidRequestError with a
message that names the field and what to change. Calls block: the servicer runs them in a thread and
passes a StopFlag's `check`, which the algorithms call between frames; when the caller cancels or its
deadline passes the servicer sets the flag and the job ends at the next check with JobCancelled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InvalidRequestError
from services.common.config import MediaConfig
from services.media import animate, codecs
from services.media.align import Check, keep_going
from services.media.burst import merge_burst
from services.media.exposure import long_exposure


@dataclass(frozen=True)
class MergeJob:
    frames: list[bytes]
    reference: int | None = None  # None = the sharpest of the first three
    format: str = "png"
    quality: int = 92


@dataclass(frozen=True)
class ExposureJob:
    frames: list[bytes]
    reference: int | None = None  # None = the middle frame
    trail_px: float = 0.0  # 0 = every frame
    subject_point: tuple[float, float] | None = None  # panning mode
    subject_mask: bytes | None = None  # panning mode: an image file, nonzero = subject
    format: str = "png"
    quality: int = 92


@dataclass(frozen=True)
class AnimateJob:
    image: bytes
    clicks: list[tuple[float, float]]
    prompt: str
    speed: float | None = None  # px per frame; None = from the prompt
    num_frames: int = 24
    fps: float = 12.0
    format: str = "mp4"


@dataclass
class OutputFile:
    name: str  # "image", "clip" or "mask"
    mime_type: str
    data: bytes


@dataclass
class MediaOutput:
    files: list[OutputFile]
    width: int
    height: int
    num_frames: int = 1
    stats: dict[str, float] = field(default_factory=dict)


class JobCancelled(Exception):
    """The caller went away (cancelled, or its deadline passed); the job stopped at a check."""


class StopFlag:
    """Set from the event loop, read by the worker thread through `check`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.checks = 0  # how many checks the job made (logged: how far it got)

    def set(self) -> None:
        self._event.set()

    def check(self) -> None:
        self.checks += 1
        if self._event.is_set():
            raise JobCancelled(f"stopped after {self.checks} checks")


class MediaStudio:
    def __init__(self, config: MediaConfig) -> None:
        self.config = config

    def merge_burst(self, job: MergeJob, check: Check = keep_going) -> MediaOutput:
        _check_image_format(job.format, job.quality)
        frames = self._burst(job.frames, check)
        reference = self._reference(job.reference, len(frames), default=None)
        result = merge_burst(frames, reference, check)
        return self._image_output(result.image, job.format, job.quality, result.stats)

    def long_exposure(self, job: ExposureJob, check: Check = keep_going) -> MediaOutput:
        _check_image_format(job.format, job.quality)
        frames = self._burst(job.frames, check)
        reference = self._reference(job.reference, len(frames), default=len(frames) // 2)
        h, w = frames[0].shape[:2]
        if job.subject_point is not None:
            _check_point("subject_point", job.subject_point, w, h)
        mask = None
        if job.subject_mask:
            mask = codecs.decode_image(job.subject_mask, "subject_mask", self.config.max_pixels)
            if mask.shape != frames[0].shape:
                raise InvalidRequestError(
                    f"subject_mask: {mask.shape[1]}x{mask.shape[0]} differs from the frames' {w}x{h}"
                )
            mask = mask.max(axis=2) > 0
            if not mask.any():
                raise InvalidRequestError("subject_mask: empty; mark the subject with nonzero pixels")
        if job.trail_px < 0:
            raise InvalidRequestError(f"trail_px: {job.trail_px} must be >= 0 (0 = every frame)")
        result = long_exposure(frames, reference, job.trail_px, job.subject_point, mask, check)
        stats = {**result.stats, "reference_frame": float(reference)}
        return self._image_output(result.image, job.format, job.quality, stats)

    def animate_region(self, job: AnimateJob, check: Check = keep_going) -> MediaOutput:
        if job.format not in codecs.CLIP_FORMATS:
            raise InvalidRequestError(f"format: {job.format!r}; use one of {', '.join(codecs.CLIP_FORMATS)}")
        if not 2 <= job.num_frames <= self.config.max_clip_frames:
            raise InvalidRequestError(
                f"num_frames: {job.num_frames} must be between 2 and {self.config.max_clip_frames}"
            )
        if not 0 < job.fps <= 120:
            raise InvalidRequestError(f"fps: {job.fps} must be in (0, 120]")
        if not job.clicks:
            raise InvalidRequestError("clicks: none; click at least one point on the region to animate")
        motion = animate.parse_prompt(job.prompt, job.speed)
        image = codecs.decode_image(job.image, "image", self.config.max_pixels)
        h, w = image.shape[:2]
        for i, click in enumerate(job.clicks):
            _check_point(f"clicks[{i}]", click, w, h)
        check()
        mask = animate.click_mask(image, job.clicks)
        frames = animate.animate(image, mask, motion, job.num_frames, check)
        check()
        clip = codecs.encode_clip(frames, job.format, job.fps)
        mask_png = codecs.encode_image(mask[..., None].repeat(3, axis=2).astype(np.float32), "png")
        stats = {
            "speed_px_per_frame": motion.speed,
            "direction_deg": motion.direction_deg,
            "mask_fraction": float(mask.mean()),
            "lossless": float(job.format in codecs.LOSSLESS_CLIP_FORMATS),
        }
        files = [
            OutputFile("clip", codecs.CLIP_FORMATS[job.format], clip),
            OutputFile("mask", "image/png", mask_png),
        ]
        return MediaOutput(files, w, h, len(frames), stats)

    def _burst(self, encoded: list[bytes], check: Check) -> list[np.ndarray]:
        """Decoded frames of one size; at least two, at most max_frames."""
        if len(encoded) < 2:
            raise InvalidRequestError(f"frames: got {len(encoded)}; a burst needs at least 2 frames")
        if len(encoded) > self.config.max_frames:
            raise InvalidRequestError(
                f"frames: got {len(encoded)}, more than the limit of {self.config.max_frames}"
            )
        frames = []
        for i, data in enumerate(encoded):
            check()
            frames.append(codecs.decode_image(data, f"frames[{i}]", self.config.max_pixels))
        h, w = frames[0].shape[:2]
        for i, frame in enumerate(frames[1:], start=1):
            if frame.shape[:2] != (h, w):
                raise InvalidRequestError(
                    f"frames[{i}]: {frame.shape[1]}x{frame.shape[0]} differs from frames[0]'s {w}x{h}; "
                    "every frame of a burst must have the same size"
                )
        if min(h, w) < 16:
            raise InvalidRequestError(f"frames: {w}x{h} is too small; send frames of at least 16x16 pixels")
        return frames

    @staticmethod
    def _reference(requested: int | None, count: int, default: int | None) -> int | None:
        if requested is None:
            return default
        if not 0 <= requested < count:
            raise InvalidRequestError(f"reference_frame: {requested} is not one of the {count} frames")
        return requested

    @staticmethod
    def _image_output(image: np.ndarray, fmt: str, quality: int, stats: dict) -> MediaOutput:
        data = codecs.encode_image(image, fmt, quality)
        h, w = image.shape[:2]
        return MediaOutput([OutputFile("image", codecs.IMAGE_FORMATS[fmt], data)], w, h, 1, stats)


def _check_image_format(fmt: str, quality: int) -> None:
    if fmt not in codecs.IMAGE_FORMATS:
        raise InvalidRequestError(f"format: {fmt!r}; use one of {', '.join(codecs.IMAGE_FORMATS)}")
    if not 1 <= quality <= 100:
        raise InvalidRequestError(f"quality: {quality} must be between 1 and 100")


def _check_point(name: str, point: tuple[float, float], width: int, height: int) -> None:
    x, y = point
    if not (0 <= x < width and 0 <= y < height):
        raise InvalidRequestError(
            f"{name}: ({x:g}, {y:g}) is outside the {width}x{height} image; "
            f"give x in [0, {width}) and y in [0, {height}) pixels"
        )
