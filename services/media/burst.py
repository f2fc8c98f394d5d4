"""Burst merge: align every frame to a reference, merge robustly, then denoise what is left.

    merged = merge_burst(frames)            # frames: float32 (H, W, 3) RGB in [0, 1]
    merged.image, merged.stats

The story, top to bottom:
1. reference: the sharpest of the first three frames (gradient energy), unless the caller picks one;
2. noise: a signal-dependent model var(x) = a * x + b fitted blind on the reference
   (Immerkaer's Laplacian residual, robust median per intensity bin);
3. align: dense DIS flow from the reference to each frame, bicubic resampling (align.py);
4. merge: a per-pixel robust weighted mean (research/photo.md 4.1): a frame's weight falls off where
   its 5x5 mean squared difference to the reference exceeds what noise explains, so a moving
   object comes from the reference alone and never ghosts;
5. denoise: the merged image still has noise var * sum(w^2) / sum(w)^2 at each pixel (more where
   frames were rejected); a Wiener filter in the DFT of 16x16 half-overlapping tiles removes it
   (the spatial half of the HDR+ merge, Hasinoff et al. 2016, with its raised-cosine overlap-add).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.fft

from services.media.align import (
    FLOW_PREBLUR_SIGMA,
    Check,
    dense_flow,
    keep_going,
    to_gray8,
    warp_by_flow,
)

TILE = 16  # spatial Wiener tile (half-overlapping)
MERGE_BOX = 5  # window of the robust merge's local difference
MERGE_THRESHOLD = 2.0  # mean squared difference explained by noise, in units of var(x)
MERGE_SOFTNESS = 1.0  # how fast the weight falls beyond it
WIENER_STRENGTH = 1.5  # noise power multiplier of the spatial Wiener filter (tuned on seed 0)
_LAPLACIAN = np.float32([[1, -2, 1], [-2, 4, -2], [1, -2, 1]]) / 6.0  # unit noise gain


@dataclass(frozen=True)
class NoiseModel:
    """Per-pixel noise variance var(x) = slope * x + floor, for x the local intensity in [0, 1]."""

    slope: float
    floor: float

    def variance(self, image: np.ndarray) -> np.ndarray:
        intensity = cv2.blur(image.mean(axis=2, dtype=np.float32), (5, 5))
        return (self.slope * intensity + self.floor).astype(np.float32)

    def sigma_at(self, x: float) -> float:
        return float(np.sqrt(self.slope * x + self.floor))


@dataclass
class MergeResult:
    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    reference: int
    noise: NoiseModel
    stats: dict[str, float] = field(default_factory=dict)


def estimate_noise(image: np.ndarray, bins: int = 16, min_samples: int = 400) -> NoiseModel:
    """Fit var(x) = a x + b blind from one image: Laplacian residuals, median per intensity bin."""
    xs, vs = [], []
    for c in range(3):
        channel = np.ascontiguousarray(image[..., c])
        residual = cv2.filter2D(channel, -1, _LAPLACIAN)[2:-2:2, 2:-2:2].ravel()
        level = cv2.blur(channel, (3, 3))[2:-2:2, 2:-2:2].ravel()
        index = np.clip((level * bins).astype(np.int32), 0, bins - 1)
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], np.arange(bins + 1))
        for k in range(bins):
            chunk = residual[order[bounds[k] : bounds[k + 1]]]
            if chunk.size >= min_samples:
                xs.append((k + 0.5) / bins)
                vs.append((np.median(np.abs(chunk)) / 0.6745) ** 2)
    if len(xs) < 2:
        sigma2 = float(np.median(np.abs(cv2.filter2D(image.mean(axis=2), -1, _LAPLACIAN))) / 0.6745) ** 2
        return NoiseModel(0.0, max(sigma2, 1e-7))
    slope, floor = np.polyfit(np.array(xs), np.array(vs), 1)
    return NoiseModel(float(max(slope, 0.0)), float(max(floor, 1e-7)))


def choose_reference(frames: list[np.ndarray], candidates: int = 3) -> int:
    """The sharpest of the first frames (HDR+ picks its reference by gradient energy)."""
    scores = []
    for frame in frames[:candidates]:
        gray = to_gray8(frame, 1.0).astype(np.float32)
        scores.append(float(np.mean(cv2.Sobel(gray, -1, 1, 0) ** 2 + cv2.Sobel(gray, -1, 0, 1) ** 2)))
    return int(np.argmax(scores))


def robust_merge(
    reference: np.ndarray, aligned: list[np.ndarray], variance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Robust weighted mean of the reference and aligned frames -> (merged, sum(w^2) / sum(w)^2)."""
    expected = (MERGE_THRESHOLD * variance).astype(np.float32)
    scale = (-1.0 / (MERGE_SOFTNESS * expected)).astype(np.float32)
    total = reference.copy()
    weight_sum = np.ones(reference.shape[:2], np.float32)
    weight_sq = np.ones(reference.shape[:2], np.float32)
    to_mean = np.full((1, 3), 1.0 / 3.0, np.float32)
    for frame in aligned:
        diff = cv2.subtract(frame, reference)
        distance = cv2.boxFilter(cv2.transform(cv2.multiply(diff, diff), to_mean), -1, (MERGE_BOX,) * 2)
        weight = cv2.exp(cv2.multiply(cv2.max(cv2.subtract(distance, expected), 0.0), scale))
        total += frame * weight[..., None]
        weight_sum += weight
        weight_sq += weight * weight
    return total / weight_sum[..., None], weight_sq / (weight_sum * weight_sum)


def _window(n: int) -> np.ndarray:
    """Raised cosine: w(x) + w(x + n/2) = 1, so half-overlapping tiles add up exactly."""
    w = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(n) + 0.5) / n)
    return np.outer(w, w).astype(np.float32)


def _pad_for_tiles(image: np.ndarray, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    s = n // 2
    h, w = image.shape[:2]
    hp, wp = -(-h // s) * s + 2 * s, -(-w // s) * s + 2 * s
    pad = ((s, hp - h - s), (s, wp - w - s)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode="reflect"), (hp, wp)


def spatial_wiener(image: np.ndarray, variance: np.ndarray, strength: float = WIENER_STRENGTH) -> np.ndarray:
    """Denoise (H, W, C) `image` with per-pixel noise `variance`: per 16x16 half-overlapping tile
    and frequency, gain |T|^2 / (|T|^2 + strength * n^2 * var_tile), DC kept; overlap-add with a
    raised-cosine window. Vectorised over tiles; spatial_wiener_ref is the loop it must equal."""
    n, s = TILE, TILE // 2
    padded, (hp, wp) = _pad_for_tiles(image.astype(np.float32), n)
    var_padded, _ = _pad_for_tiles(variance.astype(np.float32), n)
    tiles = np.lib.stride_tricks.sliding_window_view(padded, (n, n), axis=(0, 1))[::s, ::s]
    ny, nx = tiles.shape[:2]
    tile_var = cv2.blur(var_padded, (n, n))[s::s, s::s][:ny, :nx]  # mean over each tile
    spectrum = scipy.fft.rfft2(tiles, axes=(-2, -1), workers=-1)
    power = spectrum.real**2 + spectrum.imag**2
    noise = (strength * n * n) * tile_var[:, :, None, None, None]
    gain = power / (power + noise)
    gain[..., 0, 0] = 1.0
    filtered = scipy.fft.irfft2(spectrum * gain, s=(n, n), axes=(-2, -1), workers=-1) * _window(n)
    out = np.zeros((hp, wp, image.shape[2]), np.float32)
    for py in range(2):  # the four grids of non-overlapping tiles
        for px in range(2):
            grid = filtered[py::2, px::2]
            my, mx = grid.shape[:2]
            block = grid.transpose(0, 3, 1, 4, 2).reshape(my * n, mx * n, -1)
            y0, x0 = py * s, px * s
            out[y0 : y0 + my * n, x0 : x0 + mx * n] += block[: hp - y0, : wp - x0]
    h, w = image.shape[:2]
    return out[s : s + h, s : s + w]


def spatial_wiener_ref(image: np.ndarray, variance: np.ndarray, strength: float = WIENER_STRENGTH):
    """The obviously correct twin of spatial_wiener: one tile at a time with numpy's FFT."""
    n, s = TILE, TILE // 2
    padded, (hp, wp) = _pad_for_tiles(image.astype(np.float64), n)
    var_padded, _ = _pad_for_tiles(variance.astype(np.float64), n)
    out = np.zeros(padded.shape)
    window = _window(n).astype(np.float64)
    for y in range(0, hp - n + 1, s):
        for x in range(0, wp - n + 1, s):
            tile_var = var_padded[y : y + n, x : x + n].mean()
            for c in range(image.shape[2]):
                spectrum = np.fft.fft2(padded[y : y + n, x : x + n, c])
                power = np.abs(spectrum) ** 2
                gain = power / (power + strength * n * n * tile_var)
                gain[0, 0] = 1.0
                out[y : y + n, x : x + n, c] += np.real(np.fft.ifft2(spectrum * gain)) * window
    h, w = image.shape[:2]
    return out[s : s + h, s : s + w]


def merge_burst(
    frames: list[np.ndarray], reference: int | None = None, check: Check = keep_going
) -> MergeResult:
    """One denoised image from a burst of same-size float RGB frames (at least two); `check` is
    called before each frame's alignment and before the merge (it raises to stop the job)."""
    assert len(frames) >= 2 and all(f.shape == frames[0].shape for f in frames)
    started = time.perf_counter()
    ref_index = choose_reference(frames) if reference is None else reference
    ref = frames[ref_index]
    noise = estimate_noise(ref)
    variance = noise.variance(ref)
    ref_gray = to_gray8(ref, FLOW_PREBLUR_SIGMA)
    aligned = []
    for i, frame in enumerate(frames):
        if i != ref_index:
            check()
            flow = dense_flow(ref_gray, to_gray8(frame, FLOW_PREBLUR_SIGMA))
            aligned.append(warp_by_flow(frame, flow))
    check()
    aligned_at = time.perf_counter()
    merged, residual = robust_merge(ref, aligned, variance)
    image = np.clip(spatial_wiener(merged, variance * residual), 0.0, 1.0)
    return MergeResult(
        image,
        ref_index,
        noise,
        {
            "reference_frame": float(ref_index),
            "noise_sigma_mid_grey": noise.sigma_at(0.5),
            "frames_used_mean": float(np.mean(1.0 / residual)),
            "align_ms": (aligned_at - started) * 1e3,
            "merge_ms": (time.perf_counter() - aligned_at) * 1e3,
        },
    )
