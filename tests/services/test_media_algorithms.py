"""The media algorithms against the bars of issue 7, on synthetic bursts with known truth
(services/media/synthetic.py: native-resolution crops of scikit-image's photos, known sub-pixel
motion, local warps, one moving object, Poisson + Gaussian noise). Small crops keep this fast;
benchmarks/media.py has the full-size numbers."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from services.media import align, animate, burst, codecs, exposure
from services.media.synthetic import (
    disk_alpha,
    exposure_truth,
    make_burst,
    mosaic_scene,
    object_texture,
    panning_truth,
    paste_object,
    psnr,
)

NLM_H = {"mid": 4.2, "high": 9.0}  # OpenCV NLM strength tuned by benchmarks/media.py's sweep


@pytest.fixture(scope="module")
def scene():
    return mosaic_scene()


def as_float(frames):
    return [f.astype(np.float32) / 255.0 for f in frames]


def nlm_multi(b, level):
    bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in b.frames]
    h = NLM_H[level]
    out = cv2.fastNlMeansDenoisingColoredMulti(bgr, b.reference, 7, None, h, h, 7, 21)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


# --- burst merge -------------------------------------------------------------------------------


@pytest.mark.parametrize("level,min_gain_db", [("mid", 5.0), ("high", 7.0)])
def test_merge_beats_the_noisy_frame_and_opencv_and_does_not_ghost(scene, level, min_gain_db):
    b = make_burst(scene, 8, (240, 320), level, seed=11, object_radius=28)
    frames = as_float(b.frames)
    merged = burst.merge_burst(frames, b.reference).image
    noisy = b.frames[b.reference]
    naive = np.mean([align.warp_global(f, align.global_motion(*_grays(frames, b.reference, i))) for i, f in
                     enumerate(frames)], axis=0)  # fmt: skip
    gain = psnr(merged, b.truth) - psnr(noisy, b.truth)
    moving = psnr(merged, b.truth, b.moving_mask)
    assert gain >= min_gain_db, f"merge gains only {gain:.2f} dB over the noisy reference"
    assert psnr(merged, b.truth) >= psnr(nlm_multi(b, level), b.truth) + 2.0
    # no ghosting: the moving object is at least as good as OpenCV's and far better than a mean
    assert moving >= psnr(nlm_multi(b, level), b.truth, b.moving_mask)
    assert moving >= psnr(noisy, b.truth, b.moving_mask) + 1.0
    assert moving >= psnr(naive, b.truth, b.moving_mask) + 6.0


def _grays(frames, reference, i):
    return align.to_gray8(frames[reference], 1.0), align.to_gray8(frames[i], 1.0)


def test_merge_picks_a_sharp_reference_and_reports_stats(scene):
    b = make_burst(scene, 4, (96, 128), "mid", seed=2, object_radius=0)
    frames = as_float(b.frames)
    frames[0] = cv2.GaussianBlur(frames[0], (0, 0), 2.0)  # a shaken frame is never the reference
    result = burst.merge_burst(frames)
    assert result.reference != 0 and result.image.shape == frames[0].shape
    assert 0.02 < result.stats["noise_sigma_mid_grey"] < 0.06  # mid noise: 8.8 / 255 = 0.035


def test_noise_model_is_close_to_the_truth(scene):
    for level, sigma in (("mid", 8.8 / 255), ("high", 19.0 / 255)):
        b = make_burst(scene, 2, (240, 320), level, seed=3, object_radius=0)
        estimated = burst.estimate_noise(b.frames[b.reference].astype(np.float32) / 255).sigma_at(0.5)
        assert abs(estimated / sigma - 1) < 0.25, (level, estimated * 255)


def test_spatial_wiener_equals_its_tile_by_tile_reference():
    rng = np.random.default_rng(0)
    for shape in ((17, 23), (40, 33)):
        image = rng.random(shape + (3,), dtype=np.float32)
        variance = rng.random(shape, dtype=np.float32) * 0.02
        fast = burst.spatial_wiener(image, variance)
        np.testing.assert_allclose(fast, burst.spatial_wiener_ref(image, variance), atol=2e-5)
    flat = burst.spatial_wiener(image, np.full(shape, 1e-12, np.float32))  # no noise: identity
    np.testing.assert_allclose(flat, image, atol=2e-5)


def test_global_motion_recovers_a_known_similarity(scene):
    b = make_burst(scene, 2, (240, 320), "mid", seed=4, object_radius=0, bump_px=0.0, reference=0)
    frames = as_float(b.frames)
    matrix = align.global_motion(*_grays(frames, 0, 1))
    aligned = align.warp_global(frames[1], matrix)
    # aligned frame 1 matches the clean reference as well as the noisy reference itself does
    assert psnr(aligned, b.truth, border=24) >= psnr(b.frames[0], b.truth, border=24) - 0.3


@pytest.mark.parametrize("level", ["mid", "high"])
def test_dense_alignment_is_sub_pixel(scene, level):
    """Flow from the noisy frames, applied to the clean ones, must put them on the reference to within
    a fraction of a pixel: rounding the same flow to whole pixels must cost several dB."""
    b = make_burst(scene, 3, (240, 320), level, seed=8, object_radius=24, reference=0)
    frames = as_float(b.frames)
    static = ~cv2.dilate(b.moving_mask.astype(np.uint8), np.ones((61, 61), np.uint8)).astype(bool)
    for i in (1, 2):
        flow = align.dense_flow(*_grays(frames, 0, i))
        aligned = psnr(align.warp_by_flow(b.clean[i], flow), b.truth, static, border=24)
        rounded = psnr(align.warp_by_flow(b.clean[i], np.round(flow)), b.truth, static, border=24)
        assert aligned >= 36.0 and aligned >= rounded + 3.0, (aligned, rounded)


# --- long exposure -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streak_burst(scene):
    """A fast object over a static scene, mild camera shake (research/photo.md 4.4, smaller)."""
    return make_burst(
        scene, 8, (240, 320), "mid", seed=5, max_shift_px=3, max_angle_deg=0.2, bump_px=0.0,
        object_radius=26, object_velocity=(9.0, 2.0),
    )  # fmt: skip


def swept_region(b, first, gaps):
    c0 = np.array(b.object_centers[first])
    v = np.array(b.object_centers[1]) - np.array(b.object_centers[0])
    region = np.zeros(b.truth.shape[:2], bool)
    for t in np.linspace(0, gaps, 40):
        region |= disk_alpha(region.shape, tuple(c0 + t * v), b.object_radius) > 0
    return region


@pytest.mark.parametrize("trail_px", [0.0, 30.0])
def test_long_exposure_trails_are_continuous_and_the_background_sharp(streak_burst, trail_px):
    b = streak_burst
    frames = as_float(b.frames)
    result = exposure.long_exposure(frames, b.reference, trail_px)
    truth = exposure_truth(b, result.first_frame, result.gaps)
    region = swept_region(b, result.first_frame, result.gaps)
    static = ~cv2.dilate(region.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    aligned = exposure.align_frames(frames, b.reference, None)
    whole = aligned[result.first_frame : result.first_frame + math.ceil(result.gaps) + 1]
    strobed = np.mean(whole, axis=0)  # align + mean: strobed copies of the object
    assert psnr(result.image, truth, region) >= psnr(strobed, truth, region) + 2.0
    assert psnr(result.image, truth, static) >= psnr(b.frames[b.reference], truth, static) + 4.0
    speed = math.hypot(9.0, 2.0)
    assert abs(result.stats["speed_px_per_frame"] / speed - 1) <= 0.10
    if trail_px:
        achieved = result.gaps * speed  # the trail the frames and fraction chosen actually give
        assert abs(achieved / trail_px - 1) <= 0.10


def test_panning_keeps_the_subject_sharp_and_blurs_the_background(streak_burst):
    b = streak_burst
    frames = as_float(b.frames)
    center = b.object_centers[b.reference]
    result = exposure.long_exposure(frames, b.reference, subject_point=center)
    subject = disk_alpha(b.truth.shape[:2], center, b.object_radius - 4) > 0.5
    assert psnr(result.image, b.truth, subject) >= psnr(b.frames[b.reference], b.truth, subject) + 2.0
    background = ~cv2.dilate(b.moving_mask.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
    sharpness = [cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.CV_32F)[background].var()
                 for x in (result.image, b.truth)]  # fmt: skip
    assert sharpness[0] < 0.5 * sharpness[1], "the background should be motion-blurred"


@pytest.mark.parametrize("subject", ["point", "mask"])
def test_panning_against_a_dense_render_of_a_camera_following_the_subject(scene, subject):
    """A tripod burst of a moving object; panning mode must look like a camera that tracked it:
    continuous background streaks (not strobed copies) and the subject sharp and denoised."""
    b = make_burst(
        scene, 8, (240, 320), "mid", seed=6, max_shift_px=0, max_angle_deg=0, bump_px=0,
        object_radius=30, object_velocity=(6.0, 1.0),
    )  # fmt: skip
    frames = as_float(b.frames)
    center = b.object_centers[b.reference]
    disk = disk_alpha(b.truth.shape[:2], center, b.object_radius) > 0.5
    given = {"subject_point": center} if subject == "point" else {"subject_mask": disk}
    result = exposure.long_exposure(frames, b.reference, **given)
    truth = panning_truth(b, result.first_frame, result.gaps)
    aligned = exposure.align_frames(frames, b.reference, disk)  # on the true subject
    strobed = np.mean(aligned[result.first_frame : result.first_frame + math.ceil(result.gaps) + 1], axis=0)
    background = ~cv2.dilate(disk.astype(np.uint8), np.ones((21, 21), np.uint8)).astype(bool)
    inner = disk_alpha(b.truth.shape[:2], center, b.object_radius - 4) > 0.5
    assert psnr(result.image, truth, background) >= psnr(strobed, truth, background) + 2.0
    assert psnr(result.image, truth, inner) >= psnr(b.frames[b.reference], truth, inner) + 4.0


# --- region animation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def still(scene):
    """A photo crop with a textured disk (fur from another photo) on it: (image, true mask, click)."""
    center, radius = (170.0, 110.0), 40
    image = paste_object(scene[400:640, 528:848], object_texture(radius), center).astype(np.float32)
    return image, disk_alpha((240, 320), center, radius - 1) > 0.5, center


def measured_motion(frames, mask):
    inner = cv2.erode(mask.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flows = []
    for a, b in zip(frames, frames[1:]):
        flow = dis.calc(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY), None)
        flows.append(np.median(flow[inner], axis=0))
    dx, dy = np.median(flows, axis=0)
    return math.hypot(dx, dy), math.degrees(math.atan2(-dy, dx)) % 360


def test_click_selects_the_object(still):
    image, truth, click = still
    mask = animate.click_mask(image, [click])
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.85


@pytest.mark.parametrize(
    "prompt,speed,direction",
    [("flow right", 2.0, 0.0), ("flow 30 deg fast", 4.0, 30.0), ("rise", 2.0, 90.0)],
)
def test_animation_moves_only_the_region_at_the_requested_motion(still, prompt, speed, direction):
    image, truth, _ = still
    motion = animate.parse_prompt(prompt)
    assert (motion.speed, motion.direction_deg) == (speed, direction)
    frames = animate.animate(image, truth, motion, 16)
    for fmt in codecs.LOSSLESS_CLIP_FORMATS:  # outside the mask: bit-exact after a lossless codec
        decoded = codecs.decode_clip(codecs.encode_clip(frames, fmt, 12))
        original = np.round(image * 255).astype(np.uint8)
        assert len(decoded) == 16 and all(np.array_equal(f[~truth], original[~truth]) for f in decoded)
    magnitude, angle = measured_motion(frames, truth)
    assert abs(magnitude / speed - 1) <= 0.20, magnitude
    assert abs((angle - direction + 180) % 360 - 180) <= 5.0, angle
    adjacent = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:])])
    seam = np.abs(frames[-1].astype(int) - frames[0]).mean()
    assert seam <= 1.5 * adjacent  # the loop closes without a jump


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_lossy_delivery_formats_keep_the_motion_and_most_of_the_picture(still, fmt):
    """MP4 (H.264 yuv420p) and GIF (one palette) change pixels a little, outside the mask too (that is
    why the lossless codecs exist), but not the measured motion."""
    image, truth, _ = still
    frames = animate.animate(image, truth, animate.parse_prompt("flow 30 deg fast"), 16)
    decoded = codecs.decode_clip(codecs.encode_clip(frames, fmt, 12))
    assert len(decoded) == 16 and decoded[0].shape == image.shape
    original = np.round(image * 255).astype(np.uint8)
    assert min(psnr(f, original, ~truth, border=0) for f in decoded) >= 30.0
    magnitude, angle = measured_motion(decoded, truth)
    assert abs(magnitude / 4.0 - 1) <= 0.20 and abs(angle - 30.0) <= 5.0, (magnitude, angle)
    if fmt == "gif":  # a shared palette: what does not move does not flicker
        assert all(np.array_equal(f[~truth], decoded[0][~truth]) for f in decoded)


def test_sway_moves_the_region_rigidly_without_ghosts(still):
    image, truth, _ = still
    motion = animate.parse_prompt("sway", speed=2.0)
    frames = animate.animate(image, truth, motion, 16)
    alpha = animate._feather(truth)
    inner = alpha >= 1.0
    h, w = truth.shape
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    amplitude = motion.speed * 16 / (2 * math.pi)
    for t in (4, 12):  # the extremes of the swing: one sharp copy of the object, shifted
        shift = np.float32(amplitude * math.sin(2 * math.pi * t / 16))
        ideal = cv2.remap(image, xs - shift, ys, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        assert psnr(frames[t], ideal, inner, border=0) >= 35.0
        assert psnr(frames[t], image, inner, border=0) < 30.0  # it did move


@pytest.mark.parametrize(
    "prompt,needle",
    [("dance", "is not a motion"), ("flow sideways", "unknown word 'sideways'"), ("", "is not a motion")],
)
def test_unknown_motion_prompts_say_what_is_understood(prompt, needle):
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=needle) as error:
        animate.parse_prompt(prompt)
    assert "flow right fast" in str(error.value)


# --- codecs ------------------------------------------------------------------------------------


def test_image_codecs_round_trip_and_keep_16_bits():
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.random((40, 56, 3), dtype=np.float32), (0, 0), 2)
    assert np.abs(codecs.decode_image(codecs.encode_image(image, "png16"), "x", 10**6) - image).max() < 1e-4
    assert (
        np.abs(codecs.decode_image(codecs.encode_image(image, "png"), "x", 10**6) - image).max() < 2.1 / 255
    )
    for fmt in ("jpeg", "heic"):
        assert psnr(codecs.decode_image(codecs.encode_image(image, fmt), "x", 10**6), image, border=0) > 30


def test_exif_orientation_is_applied():
    import io

    from PIL import Image

    image = np.zeros((30, 50, 3), np.uint8)
    image[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", exif=exif, quality=95)
    decoded = codecs.decode_image(out.getvalue(), "x", 10**6)
    assert decoded.shape == (50, 30, 3) and decoded[:8].mean() > 0.9 and decoded[-30:].mean() < 0.1


def test_avif_and_dng_decode(tmp_path):
    import io

    import tifffile
    from PIL import Image

    image = (np.random.default_rng(2).random((32, 48, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="AVIF", quality=95)
    assert codecs.decode_image(out.getvalue(), "x", 10**6).shape == (32, 48, 3)
    photo = mosaic_scene()[300:364, 500:596]  # a minimal DNG: a photo crop as an RGGB mosaic
    cfa = np.zeros((64, 96), np.uint16)
    for (dy, dx), c in {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}.items():
        cfa[dy::2, dx::2] = photo[dy::2, dx::2, c] * 4000
    dng = io.BytesIO()
    tags = [(33421, "H", 2, (2, 2)), (33422, "B", 4, (0, 1, 1, 2)), (50706, "B", 4, (1, 4, 0, 0)),
            (50714, "H", 1, 0), (50717, "H", 1, 4095)]  # fmt: skip
    tifffile.imwrite(dng, cfa, photometric=32803, extratags=tags)
    decoded = codecs.decode_image(dng.getvalue(), "x", 10**6)
    assert decoded.shape == (64, 96, 3)
    for c in range(3):  # demosaiced in place (LibRaw's tone curve aside): each channel follows the photo
        assert np.corrcoef(decoded[..., c].ravel(), photo[..., c].ravel())[0, 1] > 0.8


@pytest.mark.parametrize(
    "data,needle",
    [(b"", "empty"), (b"not an image", "known format"), ("truncated", "not a decodable image")],
)
def test_bad_image_files_are_invalid_requests(data, needle):
    from runtime.errors import InvalidRequestError

    if data == "truncated":
        data = codecs.encode_image(np.zeros((64, 64, 3), np.float32) + 0.5, "png")[:70]
    with pytest.raises(InvalidRequestError, match=needle):
        codecs.decode_image(data, "frames[2]", 10**6)


def test_too_many_pixels_is_refused_from_the_header():
    from runtime.errors import InvalidRequestError

    png = codecs.encode_image(np.zeros((300, 400, 3), np.float32), "png")
    with pytest.raises(InvalidRequestError, match="400x300 is 120000 pixels, more than the limit of 100000"):
        codecs.decode_image(png, "frames[0]", 100_000)


def test_paste_object_is_the_scene_outside_the_disk(scene):
    crop = scene[:100, :100]
    out = paste_object(crop, np.zeros((21, 21, 3), np.float32), (50, 50))
    assert np.array_equal(out[:30], crop[:30]) and out[50, 50].max() < 0.01


def test_merge_at_native_resolution(scene):
    """One full-size burst (8 x 1024x768, mid noise): the bars of the benchmark, minus OpenCV."""
    b = make_burst(scene, 8, (768, 1024), "mid", seed=1)
    merged = burst.merge_burst(as_float(b.frames), b.reference).image
    noisy = b.frames[b.reference]
    assert psnr(merged, b.truth) >= psnr(noisy, b.truth) + 7.0
    assert psnr(merged, b.truth, b.moving_mask) >= psnr(noisy, b.truth, b.moving_mask) + 5.0
