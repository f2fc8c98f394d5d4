"""Computational long exposure from a burst (after Tabellion et al., SIGGRAPH 2023, weight-free).

    result = long_exposure(frames, trail_px=120)                          # foreground blur
    result = long_exposure(frames, subject_point=(x, y))                  # background blur (panning)

The story, top to bottom:
1. align: every frame onto the reference by one global motion (ECC). Foreground-blur mode aligns on
   the whole picture, so the background stands still; panning mode aligns on the subject (a mask,
   or the region around a point that moves with it), so the subject stands still.
2. motion: DIS flow both ways between consecutive aligned frames; the speed of what still moves is
   the 90th percentile of the flow magnitude where it moves.
3. frames: for a requested trail length, span trail_px / speed frame intervals around the
   reference (the last interval counts in part), or every frame when no length is asked.
4. blur: each interval is filled with `subframes` instants interpolated along the flow from both
   ends (Lancelle et al., Eurographics 2019), so trails are continuous instead of strobed copies.
5. composite: where nothing moves, the sharp robust merge of the aligned frames (burst.py) replaces
   the blur, through a feathered motion mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from services.media.align import (
    FLOW_PREBLUR_SIGMA,
    Check,
    dense_flow,
    global_motion,
    keep_going,
    to_gray8,
    warp_by_flow,
    warp_global,
)
from services.media.burst import estimate_noise, robust_merge, spatial_wiener

MOVING_PX = 1.0  # flow above this (px per frame interval) counts as motion
SUBFRAMES = 12  # interpolated instants per frame interval
SUBJECT_RADIUS_FRACTION = 0.04  # panning mode with a point: the seed window, in image diagonals


@dataclass
class ExposureResult:
    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    motion_mask: np.ndarray  # float32 (H, W): 1 = blurred, 0 = sharp merge
    first_frame: int  # the exposure starts at this frame ...
    gaps: float  # ... and lasts this many frame intervals
    stats: dict[str, float] = field(default_factory=dict)


def subject_mask_from_point(
    frames: list[np.ndarray], reference: int, point: tuple[float, float], check: Check = keep_going
) -> np.ndarray:
    """The pixels that move with the clicked point: flow within 1 px of the point's own flow in
    every frame, the connected region that contains the point."""
    h, w = frames[0].shape[:2]
    radius = max(4, int(SUBJECT_RADIUS_FRACTION * math.hypot(h, w)))
    x, y = int(round(point[0])), int(round(point[1]))
    seed = np.zeros((h, w), np.uint8)
    cv2.circle(seed, (x, y), radius, 1, -1)
    ref_gray = to_gray8(frames[reference], FLOW_PREBLUR_SIGMA)
    agree = np.ones((h, w), bool)
    for i, frame in enumerate(frames):
        if i == reference:
            continue
        check()
        flow = dense_flow(ref_gray, to_gray8(frame, FLOW_PREBLUR_SIGMA))
        own = np.median(flow[seed > 0], axis=0)
        agree &= np.linalg.norm(flow - own, axis=2) < 1.0
    agree = cv2.morphologyEx(agree.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    _, labels = cv2.connectedComponents(agree | seed)
    return labels == labels[y, x]


def align_frames(
    frames: list[np.ndarray], reference: int, mask: np.ndarray | None, check: Check = keep_going
) -> list[np.ndarray]:
    """Every frame warped onto the reference by one global (euclidean) motion, fitted over `mask`."""
    ref_gray = to_gray8(frames[reference], FLOW_PREBLUR_SIGMA)
    aligned = []
    for i, frame in enumerate(frames):
        if i == reference:
            aligned.append(frame)
            continue
        check()
        matrix = global_motion(ref_gray, to_gray8(frame, FLOW_PREBLUR_SIGMA), mask)
        aligned.append(warp_global(frame, matrix))
    return aligned


def choose_span(num_frames: int, reference: int, speed: float, trail_px: float) -> tuple[int, float]:
    """(first frame, frame intervals) for a trail of `trail_px` at `speed` px per interval, centred
    on the reference; every interval when trail_px is 0 or longer than the burst allows."""
    available = num_frames - 1
    if trail_px <= 0 or speed <= 0:
        return 0, float(available)
    gaps = min(trail_px / speed, float(available))
    whole = math.ceil(gaps)
    first = min(max(reference - whole // 2, 0), num_frames - 1 - whole)
    return first, gaps


def blur_interval(a: np.ndarray, b: np.ndarray, forward: np.ndarray, backward: np.ndarray, until: float):
    """Sum and count of the instants t in [0, until) between aligned frames a and b: a pushed along
    the forward flow blended with b pulled back along the backward flow."""
    count = max(1, int(round(SUBFRAMES * until)))
    total = np.zeros_like(a)
    for t in (np.arange(count) + 0.5) / count * until:
        total += (1 - t) * warp_by_flow(a, forward, -t) + t * warp_by_flow(b, backward, -(1 - t))
    return total, count


def long_exposure(
    frames: list[np.ndarray],
    reference: int | None = None,
    trail_px: float = 0.0,
    subject_point: tuple[float, float] | None = None,
    subject_mask: np.ndarray | None = None,
    check: Check = keep_going,
) -> ExposureResult:
    """Foreground blur, or panning (background blur) when a subject point or mask is given.
    `check` is called between frames and frame intervals (it raises to stop the job)."""
    assert len(frames) >= 2
    reference = len(frames) // 2 if reference is None else reference
    panning = subject_point is not None or subject_mask is not None
    if subject_mask is None and subject_point is not None:
        subject_mask = subject_mask_from_point(frames, reference, subject_point, check)
    aligned = align_frames(frames, reference, subject_mask, check)
    grays = [to_gray8(f, FLOW_PREBLUR_SIGMA) for f in aligned]
    speeds = []
    flows = []
    for a, b in zip(grays, grays[1:]):
        check()
        forward, backward = dense_flow(a, b), dense_flow(b, a)
        flows.append((forward, backward))
        magnitude = np.linalg.norm(forward, axis=2)
        moving = magnitude[magnitude > MOVING_PX]
        speeds.append(float(np.percentile(moving, 90)) if moving.size > 64 else 0.0)
    speed = float(np.median(speeds))
    first, gaps = choose_span(len(frames), reference, speed, trail_px)
    total = np.zeros_like(aligned[0])
    count = 0
    motion = np.zeros(aligned[0].shape[:2], np.float32)
    for i in range(first, first + math.ceil(gaps - 1e-9)):
        check()
        forward, backward = flows[i]
        part, n = blur_interval(aligned[i], aligned[i + 1], forward, backward, min(1.0, gaps - (i - first)))
        total += part
        count += n
        motion = np.maximum(motion, np.linalg.norm(forward, axis=2))
    blurred = total / count
    sharp, variance = _sharp_merge(aligned, reference)
    differs = cv2.blur(np.mean((blurred - sharp) ** 2, axis=2), (5, 5)) > variance
    mask = _feathered(((motion > MOVING_PX) | differs).astype(np.float32), aligned[0].shape[:2])
    if panning:  # the subject stays sharp whatever the flow says about its edges
        mask = np.minimum(mask, 1.0 - _feathered(subject_mask.astype(np.float32), mask.shape))
    image = blurred * mask[..., None] + sharp * (1.0 - mask[..., None])
    return ExposureResult(
        np.clip(image, 0, 1),
        mask,
        first,
        gaps,
        {"speed_px_per_frame": speed, "first_frame": float(first), "frame_intervals": gaps},
    )


def _sharp_merge(aligned: list[np.ndarray], reference: int) -> np.ndarray:
    ref = aligned[reference]
    variance = estimate_noise(ref).variance(ref)
    others = [f for i, f in enumerate(aligned) if i != reference]
    merged, residual = robust_merge(ref, others, variance)
    return spatial_wiener(merged, variance * residual), variance


def _feathered(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    radius = max(3, int(0.01 * math.hypot(*shape)))
    grown = cv2.dilate(mask, np.ones((2 * radius + 1,) * 2, np.uint8))
    return np.clip(cv2.GaussianBlur(grown, (0, 0), radius / 2), 0.0, 1.0)
