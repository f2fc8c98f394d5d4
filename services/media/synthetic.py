"""Synthetic bursts with known truth, built from the photos scikit-image bundles (never upscaled).

The evaluation protocol of ../shared/research/photo.md section 4.1, used by the tests and by
benchmarks/media.py:

    scene = mosaic_scene()                                   # 1056x800 native-resolution photos
    burst = make_burst(scene, 8, (768, 1024), "mid", seed=1)  # frames, clean reference, moving mask

- global camera motion: U(+-6 px) translation and U(+-0.5 deg) rotation per frame;
- local motion: two smooth Gaussian displacement bumps (sigma 9% of the width, <= 2 px);
- one independently moving object: a soft-edged textured disk cut from another photo, moving a
  fixed number of px per frame over the scene (it occludes and reveals the background);
- noise in the sRGB-encoded domain, y = lam_s * Poisson(x / lam_s) + N(0, lam_r), quantised to 8 bits.
The reference frame has identity camera motion, so its clean rendering is the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NOISE_LEVELS = {  # (lam_s, lam_r as a variance), in [0, 1] units; sigma at mid-grey 8.8/255 and 19/255
    "mid": (2e-3, 2e-4),
    "high": (8e-3, 1.6e-3),
}


@dataclass
class Burst:
    frames: list[np.ndarray]  # uint8 (H, W, 3) RGB, noisy
    clean: list[np.ndarray]  # float32 (H, W, 3) in [0, 1], the same frames without noise
    reference: int  # index of the frame with identity camera motion
    moving_mask: np.ndarray  # bool (H, W): the moving object at the reference frame
    object_centers: list[tuple[float, float]]  # (x, y) of the moving object in each frame
    world: np.ndarray  # the scene the frames were cut from, `margin` px larger on each side
    margin: int
    object_radius: int

    @property
    def truth(self) -> np.ndarray:
        return self.clean[self.reference]


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {
        "coffee": data.coffee(),  # 400 x 600
        "astronaut": data.astronaut(),  # 512 x 512
        "rocket": data.rocket(),  # 427 x 640
        "motorcycle": data.stereo_motorcycle()[0],  # 500 x 741
        "chelsea": data.chelsea(),  # 300 x 451
    }


def mosaic_scene() -> np.ndarray:
    """A 800x1056 RGB float32 scene: four bundled photos at native resolution, tiled 2x2."""
    p = _photos()
    top = np.concatenate([p["coffee"][:400, 28:572], p["astronaut"][60:460, :512]], axis=1)
    bottom = np.concatenate([p["rocket"][:400, 40:568], p["motorcycle"][50:450, 100:628]], axis=1)
    return (np.concatenate([top, bottom], axis=0) / 255.0).astype(np.float32)


def object_texture(radius: int) -> np.ndarray:
    """The moving object's texture: a native-resolution crop of the chelsea photo (the cat's face)."""
    cat = _photos()["chelsea"]
    size = 2 * radius + 1
    if size > 300:
        raise ValueError(f"radius {radius}: the object texture is at most 300 px wide")
    y0, x0 = 150 - radius // 2 - radius // 2, 230 - radius
    y0 = max(0, min(y0, 300 - size))
    return (cat[y0 : y0 + size, x0 : x0 + size] / 255.0).astype(np.float32)


def disk_alpha(shape: tuple[int, int], center: tuple[float, float], radius: float, soft: float = 1.5):
    """A soft-edged disk coverage map in [0, 1]."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dist = np.hypot(xx - center[0], yy - center[1])
    return np.clip((radius - dist) / soft + 0.5, 0.0, 1.0)


def paste_object(scene: np.ndarray, texture: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """The scene with the textured disk composited at a (sub-pixel) center (work in its box only)."""
    radius = (texture.shape[0] - 1) / 2
    h, w = scene.shape[:2]
    x0, y0 = max(0, int(center[0] - radius) - 2), max(0, int(center[1] - radius) - 2)
    x1, y1 = min(w, int(center[0] + radius) + 3), min(h, int(center[1] + radius) + 3)
    out = scene.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    local = (center[0] - x0, center[1] - y0)
    shift = np.float32([[1, 0, local[0] - radius], [0, 1, local[1] - radius]])
    box = (x1 - x0, y1 - y0)
    moved = cv2.warpAffine(texture, shift, box, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    alpha = disk_alpha((y1 - y0, x1 - x0), local, radius - 1)[..., None]
    out[y0:y1, x0:x1] = scene[y0:y1, x0:x1] * (1 - alpha) + np.clip(moved, 0, 1) * alpha
    return out


def camera_map(shape: tuple[int, int], margin: int, angle_deg: float, shift, bumps) -> tuple:
    """remap() coordinates sampling a frame of `shape` from a scene with `margin` px on each side:
    a rotation about the frame center, a translation, and Gaussian displacement bumps."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a = np.deg2rad(angle_deg)
    x = np.cos(a) * (xx - cx) - np.sin(a) * (yy - cy) + cx + shift[0]
    y = np.sin(a) * (xx - cx) + np.cos(a) * (yy - cy) + cy + shift[1]
    for bx, by, sigma, dx, dy in bumps:
        g = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sigma**2))
        x, y = x + dx * g, y + dy * g
    return (x + margin).astype(np.float32), (y + margin).astype(np.float32)


def add_noise(clean: np.ndarray, level: str, rng: np.random.Generator) -> np.ndarray:
    lam_s, lam_r = NOISE_LEVELS[level]
    shot = rng.poisson(np.clip(clean, 0, 1) / lam_s) * lam_s
    noisy = shot + rng.normal(0.0, np.sqrt(lam_r), clean.shape)
    return np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)


def make_burst(
    scene: np.ndarray,
    num_frames: int,
    shape: tuple[int, int],
    noise: str | None,
    seed: int,
    *,
    reference: int | None = None,
    max_shift_px: float = 6.0,
    max_angle_deg: float = 0.5,
    bump_px: float = 2.0,
    object_radius: int = 60,
    object_velocity: tuple[float, float] = (4.0, 2.0),
) -> Burst:
    """A burst of `num_frames` frames of `shape` (H, W) cut from the middle of `scene`."""
    rng = np.random.default_rng(seed)
    h, w = shape
    margin = min((scene.shape[0] - h) // 2, (scene.shape[1] - w) // 2)
    if margin < 0:
        raise ValueError(f"scene {scene.shape[:2]} is smaller than the frames {shape}")
    reference = num_frames // 2 - 1 if reference is None else reference
    y0, x0 = (scene.shape[0] - h) // 2 - margin, (scene.shape[1] - w) // 2 - margin
    scene = scene[y0 : y0 + h + 2 * margin, x0 : x0 + w + 2 * margin]
    texture = object_texture(object_radius) if object_radius else None
    start = (w * rng.uniform(0.35, 0.45), h * rng.uniform(0.35, 0.45))
    frames, clean, centers = [], [], []
    for i in range(num_frames):
        t = i - reference
        center = (start[0] + t * object_velocity[0], start[1] + t * object_velocity[1])
        centers.append(center)
        world = scene
        if texture is not None:  # the object's center is in frame-of-reference coordinates
            world = paste_object(scene, texture, (center[0] + margin, center[1] + margin))
        if i == reference:
            image = world[margin : margin + h, margin : margin + w]
        else:
            shift = rng.uniform(-max_shift_px, max_shift_px, 2)
            angle = rng.uniform(-max_angle_deg, max_angle_deg)
            bumps = [
                (rng.uniform(0, w), rng.uniform(0, h), 0.09 * w, *rng.uniform(-bump_px, bump_px, 2))
                for _ in range(2)
            ]
            map_x, map_y = camera_map(shape, margin, angle, shift, bumps)
            image = cv2.remap(world, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        image = np.clip(image, 0, 1).astype(np.float32)
        clean.append(image)
        frames.append(add_noise(image, noise, rng) if noise else np.round(image * 255).astype(np.uint8))
    mask = np.zeros(shape, bool)
    if texture is not None:
        mask = disk_alpha(shape, centers[reference], object_radius) > 0.5
    return Burst(frames, clean, reference, mask, centers, scene, margin, object_radius)


def exposure_truth(burst: Burst, first: int, gaps: float, samples_per_gap: int = 24) -> np.ndarray:
    """What a tripod at the reference frame's pose would record while the object moves from its
    position in frame `first` for `gaps` frame intervals: a dense average of rendered instants."""
    h, w = burst.truth.shape[:2]
    m = burst.margin
    texture = object_texture(burst.object_radius)
    c0, c1 = np.array(burst.object_centers[first]), np.array(burst.object_centers[first + 1])
    count = max(2, int(round(gaps * samples_per_gap)))
    total = np.zeros((h, w, 3), np.float64)
    for t in (np.arange(count) + 0.5) / count * gaps:
        x, y = c0 + t * (c1 - c0)
        total += paste_object(burst.world, texture, (x + m, y + m))[m : m + h, m : m + w]
    return (total / count).astype(np.float32)


def panning_truth(burst: Burst, first: int, gaps: float, samples_per_gap: int = 24) -> np.ndarray:
    """What a camera panning with the object records (burst taken from a tripod, no shake): the
    object stays at its reference position while the background slides by minus its motion; a dense
    average of rendered instants from frame `first` over `gaps` frame intervals."""
    h, w = burst.truth.shape[:2]
    m = burst.margin
    texture = object_texture(burst.object_radius)
    ref = np.array(burst.object_centers[burst.reference])
    c0, c1 = np.array(burst.object_centers[first]), np.array(burst.object_centers[first + 1])
    count = max(2, int(round(gaps * samples_per_gap)))
    total = np.zeros((h, w, 3), np.float64)
    size = burst.world.shape[1], burst.world.shape[0]
    for t in (np.arange(count) + 0.5) / count * gaps:
        dx, dy = c0 + t * (c1 - c0) - ref  # the camera has followed the object this far
        shift = np.float32([[1, 0, -dx], [0, 1, -dy]])
        flags = cv2.INTER_CUBIC
        background = cv2.warpAffine(burst.world, shift, size, flags=flags, borderMode=cv2.BORDER_REFLECT)
        total += paste_object(background, texture, (ref[0] + m, ref[1] + m))[m : m + h, m : m + w]
    return np.clip(total / count, 0, 1).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, border: int = 16) -> float:
    """PSNR in dB of images in [0, 1] (or uint8), over `mask` if given, with a border crop."""
    a = a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)
    b = b.astype(np.float64) / (255.0 if b.dtype == np.uint8 else 1.0)
    keep = np.zeros(a.shape[:2], bool)
    keep[border : a.shape[0] - border, border : a.shape[1] - border] = True
    if mask is not None:
        keep &= mask
    mse = np.mean((a[keep] - b[keep]) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))
