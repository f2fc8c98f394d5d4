"""The prefill -> decode handoff of an SAQ cache over gRPC, in process: PrefillServicer (its PullKv
chunks) and KvPuller (which places them) around engines on the spec-backed toy model
(tests/saq_toy.py). The decode side continues exactly as one engine alone would; its Stats count the
blocks and slots held."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from protos.edge.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc
from runtime.artifact import load_artifact
from runtime.errors import InvalidRequestError
from runtime.sampling import SamplingParams
from runtime.sequence import ImportedKV
from runtime.worker import EngineWorker
from services.common.config import GatewayConfig, PrefillConfig
from services.common.messages import sampling_to_pb
from services.decode.kv_transfer import KvPuller
from services.decode.servicer import DecodeServicer
from services.prefill.servicer import PrefillServicer
from tests.saq_toy import LAYERS, saq_kv_cache, spec_engine, write_artifact

SAQ = "8:2,4:1,2;stage=16;v_group=16"  # the slot's bytes in use (4736 of 5376) exceed the 4 KiB chunk limit
CHUNK_BYTES = 4096
PROMPT = [(5 * i + 1) % 64 for i in range(75)]  # 4 closed stages: the oldest is on the paged bottom stair


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return write_artifact(tmp_path_factory.mktemp("saq-handoff") / "artifact", saq_kv_cache(SAQ))


async def _prefill_and_pull(prefill, decode, params):
    """Prefill PROMPT on `prefill` behind a PrefillServicer; pull it twice: once raw (the chunks), once
    through KvPuller into `decode`'s format."""
    worker = EngineWorker(prefill)
    worker.start()
    servicer = PrefillServicer("toy", PrefillConfig(kv_chunk_bytes=CHUNK_BYTES))
    servicer.attach(worker)
    server = grpc.aio.server()
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)
            request = prefill_pb2.PrefillRequest(prompt_token_ids=PROMPT, sampling=sampling_to_pb(params))
            raw, pulled = await stub.Prefill(request), await stub.Prefill(request)
            chunks = [c async for c in stub.PullKv(prefill_pb2.PullKvRequest(session_id=raw.kv.session_id))]
        handle = decode_pb2.KvHandle()
        handle.CopyFrom(pulled.kv)
        handle.address = address
        imported = await KvPuller(16 << 20).pull(handle, decode, len(PROMPT), timeout=60)
        kept = await worker.call(lambda engine: engine.stats().kept_kv_sequences)
        return pulled, chunks, imported, kept
    finally:
        await server.stop(None)
        worker.stop()


def test_saq_kv_crosses_the_wire_and_decoding_continues_exactly(artifact, monkeypatch):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    decode = spec_engine(artifact, monkeypatch)
    expected = [e.token_id for e in decode.generate(PROMPT, params)]
    prefill = spec_engine(artifact, monkeypatch, max_batch_size=2)
    pulled, chunks, imported, kept = asyncio.run(_prefill_and_pull(prefill, decode, params))
    assert pulled.first.token_id == expected[0] and pulled.kv.kv_format == decode.artifact.kv_spec
    assert kept == 0  # both sessions pulled in full: released
    assert max(len(c.data) for c in chunks) <= CHUNK_BYTES and {(c.layer, c.part) for c in chunks} == {
        (layer, part) for layer in range(LAYERS) for part in (0, 1)
    }
    shapes = decode.kv_shapes(len(PROMPT))
    fmt = decode.artifact.saq
    assert shapes == [((1, fmt.block_bytes), np.uint8), ((1, 4736), np.uint8)]  # 11 open rows, 3 ring records
    assert sum(len(c.data) for c in chunks) == LAYERS * sum(rows * width for (rows, width), _ in shapes)
    assert sum(len(c.data) for c in chunks) == LAYERS * fmt.handoff_bytes(len(PROMPT))
    assert [[(a.shape, a.dtype) for a in layer] for layer in imported.layers] == [shapes] * LAYERS
    assert all(layer[0][0].any() for layer in imported.layers)  # stage 0's record left the slot's rings
    request = decode.add_request(PROMPT, params, imported=imported)
    got = []
    while decode.has_work():
        got += [e.token_id for e in decode.step() if e.request_id == request]
    assert got == expected and decode.stats().kv_bytes_in_use == 0


def test_a_node_with_another_staircase_refuses_the_handle(artifact, tmp_path, monkeypatch):
    other = spec_engine(
        write_artifact(tmp_path / "other", saq_kv_cache("8:1,4:2,2;stage=16;v_group=16")), monkeypatch
    )
    handle = decode_pb2.KvHandle(
        address="127.0.0.1:1",
        session_id="s",
        num_tokens=len(PROMPT),
        kv_format=spec_engine(artifact, monkeypatch).artifact.kv_spec,
    )
    with pytest.raises(
        InvalidRequestError, match=r"kv.kv_format: 'saq 8:2,4:1,2;stage=16.*this node stores 'saq 8:1,4:2,2"
    ):
        asyncio.run(KvPuller(1 << 20).pull(handle, other, len(PROMPT), timeout=5))
    layers = [(np.zeros((5, 1), np.uint8), np.zeros((1, 1), np.uint8))] * LAYERS
    with pytest.raises(InvalidRequestError, match="expected"):
        other.add_request(PROMPT, SamplingParams(), imported=ImportedKV(1, layers))


def test_decode_stats_count_the_held_blocks_and_slot(artifact, monkeypatch):
    engine = spec_engine(artifact, monkeypatch)
    list(engine.generate_kept(PROMPT, SamplingParams(max_tokens=1)))  # kept: 76 tokens = 1 block, 1 slot

    async def stats():
        worker = EngineWorker(engine)
        worker.start()
        servicer = DecodeServicer("toy")
        servicer.attach(worker, KvPuller(1 << 20))
        try:
            return await servicer.Stats(decode_pb2.StatsRequest(), None)
        finally:
            worker.stop()

    stats = asyncio.run(stats())
    fmt, layout = engine.artifact.saq, engine.allocator.layout
    assert stats.kv_format == "saq" and stats.kept_kv_sequences == 1
    assert stats.kv_bytes_per_token == -(-LAYERS * fmt.block_bytes // fmt.stage)
    # of its 5 stages, 1..3 are on the upper stairs and 4 is open at 76 tokens: stage 0 alone has a block
    assert dict(stats.kv_bytes_in_use_by_format) == {"saq": LAYERS * (fmt.block_bytes + fmt.slot_bytes)}
    # a sequence alone: every block at the bottom, 3 stages on the upper stairs, 15 tokens open
    assert stats.kv_tokens_capacity == (layout.num_blocks - 1 + 3 + 1) * fmt.stage - 1
    assert (
        stats.kv_bytes_in_use + stats.kv_bytes_free
        == (layout.num_blocks - 1) * layout.bytes_per_block + (layout.num_slots - 1) * layout.bytes_per_slot
    )


def test_the_gateway_costs_a_split_with_the_artifacts_handoff_bytes(artifact):
    """split_policy auto without kv_bytes_per_token: the cost model takes the artifact's handoff bytes (not
    linear for SAQ) and searches up to the model's context; a configured kv_bytes_per_token stays linear."""
    from services.gateway.__main__ import _split_policy

    node = SimpleNamespace(artifact=str(artifact))
    config = GatewayConfig(split_policy="auto", prefill=("127.0.0.1:1",))
    policy = _split_policy(node, config)
    saq = load_artifact(artifact, verify=False)
    assert policy.max_prompt_tokens == saq.model.max_position_embeddings
    assert [policy.estimate(n).kv_bytes for n in (5, 75, 200)] == [
        saq.kv_handoff_bytes(n) for n in (5, 75, 200)
    ]
    assert saq.kv_handoff_bytes(75) == LAYERS * saq.saq.handoff_bytes(75) != 75 * saq.kv_bytes_per_token
    manual = _split_policy(node, dataclasses.replace(config, kv_bytes_per_token=100))
    assert manual.estimate(75).kv_bytes == 7500
