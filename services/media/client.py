"""Python client of the media service: encoded files in, encoded files out.

    from services.media.client import MediaClient
    with MediaClient("127.0.0.1:50064") as media:
        reply = media.merge_burst([open(p, "rb").read() for p in paths], format="jpeg")
        open("merged.jpg", "wb").write(reply.files["image"])

Frames go up in chunks of at most `chunk_bytes`, results come back in chunks and are joined here.
Errors are grpc.RpcError with the server's status code and a message that says what to change.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from protos.edge.v1 import media_pb2, media_pb2_grpc

IMAGE_FORMATS = {
    "png": media_pb2.IMAGE_FORMAT_PNG,
    "png16": media_pb2.IMAGE_FORMAT_PNG16,
    "jpeg": media_pb2.IMAGE_FORMAT_JPEG,
    "heic": media_pb2.IMAGE_FORMAT_HEIC,
}
CLIP_FORMATS = {
    "mp4": media_pb2.CLIP_FORMAT_MP4,
    "gif": media_pb2.CLIP_FORMAT_GIF,
    "apng": media_pb2.CLIP_FORMAT_APNG,
    "ffv1": media_pb2.CLIP_FORMAT_FFV1,
}
CHUNK_BYTES = 1 * 2**20


@dataclass
class MediaReply:
    files: dict[str, bytes] = field(default_factory=dict)  # "image" / "clip" / "mask" -> file bytes
    mime_types: dict[str, str] = field(default_factory=dict)
    width: int = 0
    height: int = 0
    num_frames: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def requests(request_class, options, frames: list[bytes], chunk_bytes: int = CHUNK_BYTES) -> Iterator:
    """The request stream: the options, then each frame in chunks."""
    yield request_class(options=options)
    for index, data in enumerate(frames):
        for start in range(0, max(len(data), 1), chunk_bytes):
            chunk = media_pb2.FrameChunk(frame_index=index, data=data[start : start + chunk_bytes])
            yield request_class(frame=chunk)


def gather(stream) -> MediaReply:
    """Join a MediaResult stream into whole files."""
    reply, names, parts = MediaReply(), [], {}
    for message in stream:
        if message.WhichOneof("item") == "header":
            h = message.header
            names = [f.name for f in h.files]
            reply.mime_types = {f.name: f.mime_type for f in h.files}
            reply.width, reply.height, reply.num_frames = h.width, h.height, h.num_frames
            reply.stats = dict(h.stats)
            parts = {name: [] for name in names}
        else:
            parts[names[message.chunk.file_index]].append(message.chunk.data)
    reply.files = {name: b"".join(chunks) for name, chunks in parts.items()}
    return reply


class MediaClient:
    def __init__(self, address: str = "127.0.0.1:50064", *, timeout: float | None = None) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = media_pb2_grpc.MediaStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> MediaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def merge_burst(
        self, frames: list[bytes], *, reference: int | None = None, format: str = "png", quality: int = 0
    ) -> MediaReply:
        options = media_pb2.MergeBurstOptions(format=IMAGE_FORMATS[format], quality=quality)
        if reference is not None:
            options.reference_frame = reference
        stream = self._stub.MergeBurst(
            requests(media_pb2.MergeBurstRequest, options, frames), timeout=self.timeout
        )
        return gather(stream)

    def long_exposure(
        self,
        frames: list[bytes],
        *,
        reference: int | None = None,
        trail_px: float = 0.0,
        subject_point: tuple[float, float] | None = None,
        subject_mask: bytes = b"",
        format: str = "png",
        quality: int = 0,
    ) -> MediaReply:
        options = media_pb2.LongExposureOptions(
            trail_px=trail_px, subject_mask=subject_mask, format=IMAGE_FORMATS[format], quality=quality
        )
        if reference is not None:
            options.reference_frame = reference
        if subject_point is not None:
            options.subject_point.x, options.subject_point.y = subject_point
        request_stream = requests(media_pb2.LongExposureRequest, options, frames)
        return gather(self._stub.LongExposure(request_stream, timeout=self.timeout))

    def animate_region(
        self,
        image: bytes,
        clicks: list[tuple[float, float]],
        prompt: str,
        *,
        speed: float = 0.0,
        num_frames: int = 0,
        fps: float = 0.0,
        format: str = "mp4",
    ) -> MediaReply:
        options = media_pb2.AnimateRegionOptions(
            clicks=[media_pb2.Point(x=x, y=y) for x, y in clicks],
            prompt=prompt,
            speed=speed,
            num_frames=num_frames,
            fps=fps,
            format=CLIP_FORMATS[format],
        )
        request_stream = requests(media_pb2.AnimateRegionRequest, options, [image])
        return gather(self._stub.AnimateRegion(request_stream, timeout=self.timeout))
