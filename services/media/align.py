"""Aligning frames to a reference: dense optical flow (DIS), and a global motion robustly fitted to it.

Conventions: images are float32 (H, W, 3) RGB in [0, 1]. A flow F for (reference, frame) says where
each reference pixel is in the frame: reference(x) ~ frame(x + F(x)); `warp_by_flow(frame, F)`
resamples the frame onto the reference's grid. A global motion is a 2x3 affine matrix with the same
meaning (reference pixel x -> frame position A @ [x, 1]).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Check = Callable[[], None]  # called between steps of a long job; raises to stop it (jobs.py)

# DIS settings measured on the 8x1024x768 synthetic bursts (research/photo.md, benchmarks/media.py):
# half-resolution patches of 8 px at stride 4 with variational refinement keep most of the
# "medium" preset's quality (-0.05 dB) at about a third of its time; a light blur of the noisy
# grey frames makes the flow steadier at high noise.
DIS_FINEST_SCALE = 1
DIS_PATCH_SIZE = 8
DIS_PATCH_STRIDE = 4
DIS_GRADIENT_ITERATIONS = 16
DIS_REFINEMENT_ITERATIONS = 5
FLOW_PREBLUR_SIGMA = 1.0


def keep_going() -> None:
    """The default `check`: never stops the job."""


def to_gray8(image: np.ndarray, blur_sigma: float = 0.0) -> np.ndarray:
    """uint8 luma of a float RGB image, optionally blurred (what the flow and ECC see)."""
    gray = cv2.cvtColor(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    return cv2.GaussianBlur(gray, (0, 0), blur_sigma) if blur_sigma > 0 else gray


def _dis() -> cv2.DISOpticalFlow:
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(DIS_FINEST_SCALE)
    dis.setPatchSize(DIS_PATCH_SIZE)
    dis.setPatchStride(DIS_PATCH_STRIDE)
    dis.setGradientDescentIterations(DIS_GRADIENT_ITERATIONS)
    dis.setVariationalRefinementIterations(DIS_REFINEMENT_ITERATIONS)
    return dis


def dense_flow(reference_gray: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 flow from the reference to the frame (DIS, weight-free)."""
    return _dis().calc(reference_gray, gray, None)


def identity_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    xs = np.broadcast_to(np.arange(w, dtype=np.float32), (h, w))
    ys = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, w))
    return xs, ys


def warp_by_flow(image: np.ndarray, flow: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Sample `image` at x + scale * flow(x) (bicubic: bilinear blurs the detail the merge keeps)."""
    xs, ys = identity_grid(flow.shape[:2])
    scale = np.float32(scale)
    map_x = xs + scale * flow[..., 0]
    map_y = ys + scale * flow[..., 1]
    return cv2.remap(image, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def global_motion(
    reference_gray: np.ndarray, gray: np.ndarray, mask: np.ndarray | None = None, step: int = 8
) -> np.ndarray:
    """2x3 similarity mapping reference pixels to the frame, fitted with RANSAC to the dense flow
    on a grid of points (over `mask` if given), so a moving object does not pull it."""
    flow = dense_flow(reference_gray, gray)
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    if mask is not None:
        keep = mask[ys, xs] > 0
        ys, xs = ys[keep], xs[keep]
    src = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    dst = src + flow[src[:, 1].astype(int), src[:, 0].astype(int)]
    if len(src) < 3:
        return np.float32([[1, 0, 0], [0, 1, 0]])
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.0)
    if matrix is None:  # degenerate: fall back to the median translation
        dx, dy = np.median(dst - src, axis=0)
        return np.float32([[1, 0, dx], [0, 1, dy]])
    return matrix.astype(np.float32)


def warp_global(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Resample the frame onto the reference grid through a 2x3 reference -> frame matrix."""
    h, w = image.shape[:2]
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(image, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT)


def flow_of_matrix(matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The dense flow equivalent to a 2x3 reference -> frame matrix."""
    xs, ys = identity_grid(shape)
    fx = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] - xs
    fy = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] - ys
    return np.stack([fx, fy], axis=-1).astype(np.float32)
