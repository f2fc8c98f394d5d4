"""Media service: protobuf in, protobuf out. The work is services.media.jobs.MediaStudio's.

Requests stream in as [options] + frame chunks; they are gathered into encoded files (checking
order, count and size as they arrive, so an oversized burst is refused early), the job runs in a
worker thread, and the result streams back as a header and then chunks of each output file.

Cancellation and deadlines: gRPC cancels the handler when the caller cancels or its deadline passes;
the handler then sets the job's StopFlag and waits for the thread to stop at its next check (between
frames), so a job slot is only given back once its CPU is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from protos.edge.v1 import media_pb2
from runtime.errors import InvalidRequestError, ResourceExhaustedError, UnavailableError
from services.common.config import MediaConfig
from services.media.jobs import (
    AnimateJob,
    ExposureJob,
    JobCancelled,
    MediaOutput,
    MediaStudio,
    MergeJob,
    StopFlag,
)

log = logging.getLogger("edge.media")

IMAGE_FORMATS = {
    media_pb2.IMAGE_FORMAT_UNSPECIFIED: "png",
    media_pb2.IMAGE_FORMAT_PNG: "png",
    media_pb2.IMAGE_FORMAT_PNG16: "png16",
    media_pb2.IMAGE_FORMAT_JPEG: "jpeg",
    media_pb2.IMAGE_FORMAT_HEIC: "heic",
}
CLIP_FORMATS = {
    media_pb2.CLIP_FORMAT_UNSPECIFIED: "mp4",
    media_pb2.CLIP_FORMAT_MP4: "mp4",
    media_pb2.CLIP_FORMAT_GIF: "gif",
    media_pb2.CLIP_FORMAT_APNG: "apng",
    media_pb2.CLIP_FORMAT_FFV1: "ffv1",
}


class MediaServicer:
    """Calls before `attach` (still starting) or after draining began get UNAVAILABLE."""

    def __init__(self, config: MediaConfig) -> None:
        self._config = config
        self._studio: MediaStudio | None = None
        self._running = 0
        self.draining = False

    def attach(self, studio: MediaStudio) -> None:
        self._studio = studio

    @property
    def studio(self) -> MediaStudio:
        if self._studio is None or self.draining:
            raise UnavailableError("media is starting or draining; retry on another replica")
        return self._studio

    async def MergeBurst(self, requests, context):
        options, frames = await self._receive(requests, media_pb2.MergeBurstOptions)
        job = MergeJob(
            frames=frames,
            reference=options.reference_frame if options.HasField("reference_frame") else None,
            format=_enum(IMAGE_FORMATS, options.format, "format"),
            quality=options.quality or 92,
        )
        async for message in self._run("MergeBurst", self.studio.merge_burst, job):
            yield message

    async def LongExposure(self, requests, context):
        options, frames = await self._receive(requests, media_pb2.LongExposureOptions)
        point = options.subject_point
        job = ExposureJob(
            frames=frames,
            reference=options.reference_frame if options.HasField("reference_frame") else None,
            trail_px=options.trail_px,
            subject_point=(point.x, point.y) if options.HasField("subject_point") else None,
            subject_mask=options.subject_mask or None,
            format=_enum(IMAGE_FORMATS, options.format, "format"),
            quality=options.quality or 92,
        )
        async for message in self._run("LongExposure", self.studio.long_exposure, job):
            yield message

    async def AnimateRegion(self, requests, context):
        options, frames = await self._receive(requests, media_pb2.AnimateRegionOptions)
        if len(frames) != 1:
            raise InvalidRequestError(
                f"frame: AnimateRegion takes one image (frame_index 0), got {len(frames)}"
            )
        job = AnimateJob(
            image=frames[0],
            clicks=[(p.x, p.y) for p in options.clicks],
            prompt=options.prompt,
            speed=options.speed or None,
            num_frames=options.num_frames or 24,
            fps=options.fps or 12.0,
            format=_enum(CLIP_FORMATS, options.format, "format"),
        )
        async for message in self._run("AnimateRegion", self.studio.animate_region, job):
            yield message

    async def _receive(self, requests: AsyncIterator, options_class) -> tuple:
        """(options, encoded frames) from [options] + chunks, checked as they arrive."""
        options, frames, total = options_class(), [], 0
        first = True
        async for request in requests:
            item = request.WhichOneof("item")
            if item == "options":
                if not first:
                    raise InvalidRequestError("options: send them once, as the first message")
                options = request.options
            elif item == "frame":
                index, data = request.frame.frame_index, request.frame.data
                if index == len(frames):
                    if index >= self._config.max_frames:
                        raise InvalidRequestError(
                            f"frames: more than the limit of {self._config.max_frames}; send fewer frames"
                        )
                    frames.append(bytearray())
                elif index != len(frames) - 1:
                    raise InvalidRequestError(
                        f"frame_index: {index} after frame {len(frames) - 1}; send frames 0, 1, 2, ... "
                        "in order, all chunks of a frame together"
                    )
                total += len(data)
                if total > self._config.max_input_bytes:
                    raise InvalidRequestError(
                        f"frames: more than {self._config.max_input_bytes} bytes in all; send smaller files"
                    )
                frames[index] += data
            first = False
        return options, [bytes(f) for f in frames]

    async def _run(self, method: str, work, job) -> AsyncIterator[media_pb2.MediaResult]:
        with self._slot():
            output = await self.compute(method, work, job)
        for message in result_messages(output, self._config.chunk_bytes):
            yield message

    async def compute(self, method: str, work, job) -> MediaOutput:
        """work(job, check) in a thread; if this coroutine is cancelled, stop the thread and wait."""
        stop, started = StopFlag(), time.perf_counter()
        log.info("job started", extra={"fields": {"method": method}})
        worker = asyncio.ensure_future(asyncio.to_thread(work, job, stop.check))
        try:
            return await asyncio.shield(worker)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([worker])
            error = None if worker.cancelled() else worker.exception()  # retrieved either way
            if error is not None and not isinstance(error, JobCancelled):
                log.warning("a cancelled job failed", exc_info=error)
            ms = round((time.perf_counter() - started) * 1e3, 2)
            fields = {"method": method, "checks": stop.checks, "ms": ms}
            log.info("job stopped: the caller cancelled or its deadline passed", extra={"fields": fields})
            raise

    @contextlib.contextmanager
    def _slot(self):
        if self._running >= self._config.max_concurrent_jobs:
            raise ResourceExhaustedError(
                f"media is busy with {self._running} jobs (max_concurrent_jobs); retry shortly"
            )
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1


def result_messages(output: MediaOutput, chunk_bytes: int):
    """The header, then every file in chunks of at most chunk_bytes."""
    header = media_pb2.ResultHeader(
        files=[
            media_pb2.OutputFile(name=f.name, mime_type=f.mime_type, size_bytes=len(f.data))
            for f in output.files
        ],
        width=output.width,
        height=output.height,
        num_frames=output.num_frames,
        stats=output.stats,
    )
    yield media_pb2.MediaResult(header=header)
    for index, file in enumerate(output.files):
        for start in range(0, max(len(file.data), 1), chunk_bytes):
            chunk = media_pb2.ResultChunk(file_index=index, data=file.data[start : start + chunk_bytes])
            yield media_pb2.MediaResult(chunk=chunk)


def _enum(table: dict, value: int, field: str) -> str:
    if value not in table:
        raise InvalidRequestError(f"{field}: unknown value {value}; use one of {sorted(table)}")
    return table[value]
