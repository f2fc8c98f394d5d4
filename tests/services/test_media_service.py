"""The media service over real gRPC: its own process (started like `edge up` starts it), each RPC,
chunked streaming, the CLI, bad input -> INVALID_ARGUMENT while health stays SERVING, reflection,
deadlines and cancellation stopping the work, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.edge.v1 import media_pb2, media_pb2_grpc
from runtime.errors import ResourceExhaustedError
from services import launcher
from services.cli import main as cli_main
from services.common.config import MediaConfig
from services.media import codecs
from services.media.client import MediaClient, gather, requests
from services.media.jobs import MediaOutput
from services.media.servicer import MediaServicer
from services.media.synthetic import disk_alpha, make_burst, mosaic_scene, psnr

LIMITS = {"max_frames": 6, "max_pixels": 200_000, "chunk_bytes": 65536, "max_input_bytes": 8 * 2**20}


def start_media(folder: Path, **settings) -> tuple[str, object]:
    """A media process on a free port, SERVING; its JSON log is folder / media.log."""
    address = f"127.0.0.1:{launcher.free_port()}"
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"log_level": "INFO", "media": {"address": address, **settings}}))
    process = launcher.start("media", config, None, folder)
    launcher.wait_serving(address, 60, process)
    return address, process


def log_entries(folder: Path) -> list[dict]:
    lines = (folder / "media.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for_log(folder: Path, message: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in log_entries(folder) if e["msg"] == message]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {message!r} in the media log")


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def media(media_folder):
    address, process = start_media(media_folder, **LIMITS)
    try:
        yield address
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
def burst():
    """6 frames of 256x192 (PNG), mid noise, one moving object."""
    b = make_burst(mosaic_scene(), 6, (192, 256), "mid", seed=7, object_radius=22)
    return b, [codecs.encode_image(f.astype(np.float32) / 255, "png") for f in b.frames]


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_merge_burst_streams_chunks_both_ways(media, burst):
    b, frames = burst
    assert max(len(f) for f in frames) > LIMITS["chunk_bytes"]  # frames go up in several chunks
    with grpc.insecure_channel(media) as channel:
        stub = media_pb2_grpc.MediaStub(channel)
        options = media_pb2.MergeBurstOptions(
            reference_frame=b.reference, format=media_pb2.IMAGE_FORMAT_PNG16
        )
        messages = list(stub.MergeBurst(requests(media_pb2.MergeBurstRequest, options, frames, 50_000)))
    assert messages[0].WhichOneof("item") == "header" and len(messages) > 2  # the result came in chunks
    reply = gather(iter(messages))
    assert (reply.width, reply.height, reply.mime_types["image"]) == (256, 192, "image/png")
    merged = codecs.decode_image(reply.files["image"], "result", 10**6)
    assert psnr(merged, b.truth) >= psnr(b.frames[b.reference], b.truth) + 4.0
    assert reply.stats["reference_frame"] == b.reference


def test_long_exposure_both_modes(media, burst):
    b, frames = burst
    with MediaClient(media, timeout=60) as client:
        trail = client.long_exposure(frames, trail_px=12, format="jpeg")
        pan = client.long_exposure(frames, subject_point=b.object_centers[len(frames) // 2])
        disk = disk_alpha((192, 256), b.object_centers[len(frames) // 2], b.object_radius)
        mask_png = codecs.encode_image(np.repeat(disk[..., None], 3, axis=2), "png")
        pan_mask = client.long_exposure(frames, subject_mask=mask_png)
    assert trail.mime_types["image"] == "image/jpeg" and 0 < trail.stats["frame_intervals"] < 5
    assert codecs.decode_image(trail.files["image"], "x", 10**6).shape == (192, 256, 3)
    for reply in (pan, pan_mask):  # panning: the subject stays where it is in the reference frame
        assert reply.stats["frame_intervals"] == len(frames) - 1
        image = codecs.decode_image(reply.files["image"], "x", 10**6)
        subject = disk_alpha((192, 256), b.object_centers[len(frames) // 2], b.object_radius - 4) > 0.5
        assert psnr(image, b.clean[len(frames) // 2], subject) > psnr(b.frames[3], b.clean[3], subject)


def test_animate_region_returns_a_lossless_loop_and_the_mask(media, burst):
    b, frames = burst
    image = codecs.decode_image(frames[0], "x", 10**6)
    click = b.object_centers[0]
    with MediaClient(media, timeout=60) as client:
        reply = client.animate_region(frames[0], [click], "flow left fast", num_frames=8, format="ffv1")
    clip = codecs.decode_clip(reply.files["clip"])
    mask = codecs.decode_image(reply.files["mask"], "mask", 10**6)[..., 0] > 0.5
    assert reply.num_frames == len(clip) == 8 and mask[int(click[1]), int(click[0])]
    original = np.round(image * 255).astype(np.uint8)
    assert all(np.array_equal(f[~mask], original[~mask]) for f in clip)
    assert any(not np.array_equal(f[mask], original[mask]) for f in clip)
    assert reply.stats["speed_px_per_frame"] == 4.0 and reply.stats["direction_deg"] == 180.0


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


@pytest.mark.parametrize(
    "case,needle",
    [
        ("one frame", "a burst needs at least 2 frames"),
        ("undecodable", "frames[1]: not an image file of a known format"),
        ("different sizes", "frames[2]: 128x96 differs from frames[0]'s 256x192"),
        ("too many frames", "frames: more than the limit of 6"),
        ("too many pixels", "is 307200 pixels, more than the limit of 200000"),
        ("reference out of range", "reference_frame: 9 is not one of the 6 frames"),
        ("frames out of order", "frame_index: 2 after frame 0"),
        ("subject outside", "subject_point: (900, 5) is outside the 256x192 image"),
        ("mask size", "subject_mask: 128x96 differs from the frames' 256x192"),
        ("too many bytes", f"frames: more than {LIMITS['max_input_bytes']} bytes in all"),
    ],
)
def test_bad_bursts_are_invalid_argument(media, burst, case, needle):
    b, frames = burst
    small = codecs.encode_image(np.zeros((96, 128, 3), np.float32), "png")
    big = codecs.encode_image(np.zeros((480, 640, 3), np.float32), "png")
    with MediaClient(media, timeout=30) as client, grpc.insecure_channel(media) as channel:
        stub = media_pb2_grpc.MediaStub(channel)
        calls = {
            "one frame": lambda: client.merge_burst(frames[:1]),
            "undecodable": lambda: client.merge_burst([frames[0], b"\x89PNG garbage", frames[2]]),
            "different sizes": lambda: client.merge_burst([frames[0], frames[1], small]),
            "too many frames": lambda: client.merge_burst(frames + frames[:1]),
            "too many pixels": lambda: client.merge_burst([big, big]),
            "reference out of range": lambda: client.merge_burst(frames, reference=9),
            "frames out of order": lambda: gather(
                stub.MergeBurst(
                    iter(
                        [
                            media_pb2.MergeBurstRequest(frame=media_pb2.FrameChunk(frame_index=0, data=b"x")),
                            media_pb2.MergeBurstRequest(frame=media_pb2.FrameChunk(frame_index=2, data=b"x")),
                        ]
                    ),
                    timeout=30,
                )
            ),
            "subject outside": lambda: client.long_exposure(frames, subject_point=(900, 5)),
            "mask size": lambda: client.long_exposure(frames, subject_mask=small),
            "too many bytes": lambda: client.merge_burst([b"\0" * 2**20] * 5 + [b"\0" * (4 * 2**20)]),
        }
        error = _error(calls[case])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details(), error.details()
    assert serving(media)


@pytest.mark.parametrize(
    "clicks,prompt,needle",
    [
        ([(300.0, 20.0)], "flow right", "clicks[0]: (300, 20) is outside the 256x192 image"),
        ([(20.0, 20.0)], "explode", "prompt: 'explode' is not a motion"),
        ([(20.0, 20.0)], "flow sideways", "unknown word 'sideways'"),
        ([], "flow right", "clicks: none"),
    ],
)
def test_bad_animation_requests_are_invalid_argument(media, burst, clicks, prompt, needle):
    _, frames = burst
    with MediaClient(media, timeout=30) as client:
        error = _error(lambda: client.animate_region(frames[0], clicks, prompt))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details(), error.details()
    assert serving(media)


def test_malformed_message_is_invalid_argument(media):
    with grpc.insecure_channel(media) as channel:
        call = channel.stream_stream("/edge.v1.Media/MergeBurst")
        error = _error(lambda: list(call(iter([b"\xff\xff\xff"]), timeout=10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in error.details()
    assert serving(media)


def test_cli_writes_ordinary_files(media, burst, tmp_path, capsys):
    b, frames = burst
    paths = []
    for i, data in enumerate(frames):
        paths.append(tmp_path / f"frame{i}.png")
        paths[-1].write_bytes(data)
    out = tmp_path / "merged.jpg"
    code = cli_main(
        ["client", "--address", media, "media", "merge", *map(str, paths), "--out", str(out), "--json"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["width"] == 256 and out.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    clip, mask = tmp_path / "loop.gif", tmp_path / "mask.png"
    x, y = b.object_centers[0]
    args = ["client", "--address", media, "media", "animate", str(paths[0]), "--click", f"{x},{y}"]
    args += ["--prompt", "sway", "--frames", "8", "--out", str(clip), "--mask-out", str(mask)]
    assert cli_main(args) == 0
    assert len(codecs.decode_clip(clip.read_bytes())) == 8 and mask.read_bytes()[:4] == b"\x89PNG"
    long = tmp_path / "long.png"
    x, y = b.object_centers[len(paths) // 2]
    args = ["client", "--address", media, "media", "long-exposure", *map(str, paths), "--subject", f"{x},{y}"]
    assert cli_main([*args, "--out", str(long)]) == 0
    assert codecs.decode_image(long.read_bytes(), "long", 10**6).shape == (192, 256, 3)
    code = cli_main(["client", "--address", media, "media", "merge", str(paths[0]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "INVALID_ARGUMENT" in err and "at least 2 frames" in err


def test_reflection_lists_media_and_health(media):
    with grpc.insecure_channel(media) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"edge.v1.Media", "grpc.health.v1.Health"} <= names


def test_deadline_stops_the_job_between_frames(media, media_folder):
    """A 120-frame loop takes seconds; a 0.5 s deadline ends the call and the worker stops at its next
    check instead of computing the rest, and the service serves the next call."""
    scene = mosaic_scene()
    image = codecs.encode_image(scene[200:520, 100:548], "png")  # 448x320, under max_pixels
    with MediaClient(media, timeout=0.5) as client:
        error = _error(
            lambda: client.animate_region(image, [(200.0, 150.0)], "flow left fast", num_frames=120)
        )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stopped = wait_for_log(media_folder, "job stopped: the caller cancelled or its deadline passed")
    assert stopped["method"] == "AnimateRegion" and stopped["checks"] < 120  # 362 when it runs out
    assert serving(media)
    with MediaClient(media, timeout=60) as client:
        assert client.animate_region(image, [(200.0, 150.0)], "sway", num_frames=4).num_frames == 4


def test_cancelling_a_call_stops_its_thread_before_the_slot_is_given_back():
    servicer = MediaServicer(MediaConfig(max_concurrent_jobs=1))
    started, stopped_at_check = threading.Event(), threading.Event()

    def work(job, check):  # up to 10 s of work, with a check every 5 ms
        started.set()
        for _ in range(2000):
            try:
                check()
            except Exception:
                stopped_at_check.set()
                raise
            time.sleep(0.005)
        return MediaOutput([], 1, 1)

    async def drain(stream):
        return [m async for m in stream]

    async def scenario():
        first = asyncio.create_task(drain(servicer._run("MergeBurst", work, None)))
        await asyncio.to_thread(started.wait, 10)
        with pytest.raises(ResourceExhaustedError, match="max_concurrent_jobs"):
            await drain(servicer._run("MergeBurst", work, None))
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert stopped_at_check.is_set()  # the thread stopped before the call returned ...
        assert servicer._running == 0  # ... and only then was the slot given back

    asyncio.run(scenario())


def test_sigterm_drains_the_job_in_flight_and_exits_cleanly(tmp_path, burst):
    b, frames = burst
    address, process = start_media(tmp_path, **LIMITS)
    replies = []
    with MediaClient(address, timeout=120) as client:
        call = threading.Thread(
            target=lambda: replies.append(
                client.animate_region(frames[0], [b.object_centers[0]], "flow left fast", num_frames=120)
            )
        )
        call.start()
        wait_for_log(tmp_path, "job started")
        process.send_signal(signal.SIGTERM)
        call.join(120)
    assert process.wait(60) == 0
    assert len(replies) == 1 and replies[0].num_frames == 120  # the job finished during the drain
    messages = [e["msg"] for e in log_entries(tmp_path)]
    assert messages.index("draining") < messages.index("rpc ok") < messages.index("stopped")
