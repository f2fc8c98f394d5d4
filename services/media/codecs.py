"""Image and clip files <-> arrays. Inputs: JPEG, PNG (8/16-bit), TIFF, WebP, HEIC/HEIF, AVIF and DNG
raw; outputs: PNG, 16-bit PNG, JPEG, HEIC for images, MP4 (H.264), GIF, APNG and FFV1 (MKV) for clips.

Decoded images are float32 (H, W, 3) RGB in [0, 1], EXIF orientation applied. A file that does not
decode, or holds more than `max_pixels`, raises InvalidRequestError naming it; the size is read from
the header before any pixel is decoded, so an oversized file costs no memory.
"""

from __future__ import annotations

import io
import warnings

import av
import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import InvalidRequestError

pillow_heif.register_heif_opener()  # HEIC/HEIF through Pillow; AVIF is Pillow's own
# OpenCV logs errors only: a truncated file becomes our InvalidRequestError, not a warning line
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
DNG_VERSION_TAG = 50706
IMAGE_FORMATS = {"png": "image/png", "png16": "image/png", "jpeg": "image/jpeg", "heic": "image/heic"}
CLIP_FORMATS = {"mp4": "video/mp4", "gif": "image/gif", "apng": "image/apng", "ffv1": "video/x-matroska"}
LOSSLESS_CLIP_FORMATS = ("apng", "ffv1")


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """float32 RGB in [0, 1] from an encoded image file; `name` says which input in errors."""
    if not data:
        raise InvalidRequestError(f"{name}: empty; send the bytes of an image file")
    if data[:4] in (b"II*\0", b"MM\0*") and _is_dng(data, name, max_pixels):
        return _decode_dng(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        _check_pixels(name, width, height, max_pixels)
        if image.format in ("PNG", "TIFF"):
            decoded = _decode_deep(data, image)
            if decoded is not None:
                return decoded
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidRequestError(f"{name}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{name}: not an image file of a known format ({_ACCEPTED})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidRequestError(f"{name}: not a decodable image ({e}); {_ACCEPTED}") from None


_ACCEPTED = "send JPEG, PNG, TIFF, WebP, HEIC, AVIF or DNG"


def _is_dng(data: bytes, name: str, max_pixels: int) -> bool:
    """A TIFF whose first IFD has a DNGVersion tag (Pillow cannot read CFA raw data)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            if DNG_VERSION_TAG not in page.tags:
                return False
            largest = max(p.shape[0] * p.shape[1] for p in tiff.pages if len(p.shape) >= 2)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError):
        return False  # let Pillow give its reason
    _check_pixels(name, largest, 1, max_pixels)
    return True


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        size = f"{width}x{height} is {width * height} pixels" if height > 1 else f"{width} pixels"
        raise InvalidRequestError(
            f"{name}: {size}, more than the limit of {max_pixels}; send a smaller image"
        )


def _decode_deep(data: bytes, image: Image.Image) -> np.ndarray | None:
    """16-bit PNG/TIFF keep their depth (Pillow would cut RGB48 to 8 bits); None if 8-bit."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16:
        return None
    image.close()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    else:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return array.astype(np.float32) / 65535.0


def _decode_dng(data: bytes, name: str) -> np.ndarray:
    """Demosaiced, white-balanced sRGB from a DNG (LibRaw through rawpy)."""
    import rawpy

    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            rgb = raw.postprocess(use_camera_wb=True, no_auto_bright=True, output_bps=16)
    except (rawpy.LibRawError, OSError, ValueError) as e:
        raise InvalidRequestError(f"{name}: the DNG does not decode ({e})") from None
    return rgb.astype(np.float32) / 65535.0


def encode_image(image: np.ndarray, fmt: str, quality: int = 92) -> bytes:
    """An image file of float RGB in [0, 1]: png, png16, jpeg or heic."""
    rgb = np.clip(image, 0.0, 1.0)
    if fmt == "png16":
        bgr = cv2.cvtColor((rgb * 65535.0 + 0.5).astype(np.uint16), cv2.COLOR_RGB2BGR)
        return cv2.imencode(".png", bgr)[1].tobytes()
    rgb8 = (rgb * 255.0 + 0.5).astype(np.uint8)
    if fmt == "png":
        return cv2.imencode(".png", cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR))[1].tobytes()
    if fmt == "jpeg":
        bgr = cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
    if fmt == "heic":
        out = io.BytesIO()
        Image.fromarray(rgb8).save(out, format="HEIF", quality=quality)
        return out.getvalue()
    raise ValueError(f"image format {fmt!r}")


def encode_clip(frames: list[np.ndarray], fmt: str, fps: float) -> bytes:
    """A looping clip of uint8 RGB frames: mp4 (H.264 yuv420p), gif, apng or ffv1 (lossless)."""
    if fmt in ("gif", "apng"):
        images = [Image.fromarray(f) for f in frames]
        if fmt == "gif":
            images = _shared_palette(frames, images)
        out = io.BytesIO()
        duration = round(1000 / fps)
        kind = "GIF" if fmt == "gif" else "PNG"
        images[0].save(out, format=kind, save_all=True, append_images=images[1:], duration=duration, loop=0)
        return out.getvalue()
    out = io.BytesIO()
    container = "mp4" if fmt == "mp4" else "matroska"
    with av.open(out, mode="w", format=container) as box:
        if fmt == "mp4":
            frames = [_even(f) for f in frames]
            stream = box.add_stream("libx264", rate=round(fps), options={"crf": "18", "preset": "fast"})
            stream.pix_fmt = "yuv420p"
        elif fmt == "ffv1":
            stream = box.add_stream("ffv1", rate=round(fps))
            stream.pix_fmt = "bgr0"
        else:
            raise ValueError(f"clip format {fmt!r}")
        stream.height, stream.width = frames[0].shape[:2]
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return out.getvalue()


def _shared_palette(frames: list[np.ndarray], images: list[Image.Image]) -> list[Image.Image]:
    """One 256-colour palette (octree, from the first and middle frames) for every GIF frame, no
    dithering: what does not move keeps the same palette index in every frame, so it does not
    flicker. Measured on a 320x240 16-frame loop: 35.2 dB to the frames in 0.01 s and 130 KB,
    against 34.1 dB, 2.4 s and 936 KB for Pillow's per-frame adaptive palettes."""
    sample = Image.fromarray(np.concatenate([frames[0], frames[len(frames) // 2]], axis=0))
    palette = sample.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    return [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]


def decode_clip(data: bytes) -> list[np.ndarray]:
    """uint8 RGB frames of a clip written by encode_clip (any of its formats)."""
    if data[:6] in (b"GIF87a", b"GIF89a") or data[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(data)) as image:
            frames = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                frames.append(np.asarray(image.convert("RGB")))
            return frames
    with av.open(io.BytesIO(data)) as box:
        return [frame.to_ndarray(format="rgb24") for frame in box.decode(video=0)]


def _even(frame: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: repeat the last row/column when one is odd."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
