"""The runtime side of the SAQ KV format without its exporter or native kernel.

An SAQ pool is a paged tensor of bottom-stair records (per block) and a tensor of per-sequence slots
(per slot). Here: slot accounting in the allocator and the scheduler, the layout's bytes, the manifest
checks, OrtBackend's pool shapes and its seq_slots feed (on a hand-built ONNX graph), and the engine's
KV export/import, run on tests/saq_toy.SpecBackend: a two-layer toy model whose attention is the spec
itself (kernels.kv_saq.paged_attention_saq_ref) over the engine's real pools.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kernels.kv_formats import SaqFormat
from runtime.artifact import load_artifact
from runtime.backends.onnxruntime import OrtBackend, StepBatch
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.errors import ArtifactError, InvalidRequestError, ResourceExhaustedError
from runtime.kv_cache import (
    SCRATCH_BLOCK,
    SCRATCH_SLOT,
    KVBlockAllocator,
    KVCacheLayout,
    bytes_per_token,
    layout_for_budget,
    layout_for_pool,
    num_slots_for,
    pool_bytes,
    pool_tensors,
)
from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler
from runtime.sequence import ImportedKV, Sequence
from tests.saq_toy import HEAD_DIM, LAYERS, SAQ, VOCAB, WIDTH, saq_kv_cache, spec_engine, write_artifact


@pytest.fixture(scope="module")
def saq_artifact(tmp_path_factory) -> Path:
    return write_artifact(tmp_path_factory.mktemp("saq") / "artifact", saq_kv_cache())


@pytest.fixture(scope="module")
def token_sink_artifact(tmp_path_factory) -> Path:
    """Two token sinks beside the staircase: their fp16 rows live in the slot once stage 0 closes."""
    return write_artifact(tmp_path_factory.mktemp("saq") / "sinks", saq_kv_cache(SAQ + ";sink_tokens=2"))


# -- pool tensors, bytes, layout ----------------------------------------------------------------------


def test_saq_pool_tensors_and_bytes():
    fmt = SaqFormat.parse(SAQ, WIDTH)
    pool = pool_tensors("saq", WIDTH, HEAD_DIM, SAQ)
    assert [(t.name, t.width, t.dtype, t.per) for t in pool] == [
        ("kv_pool", fmt.block_bytes, np.uint8, "block"),
        ("kv_slots", fmt.slot_bytes, np.uint8, "slot"),
    ]
    assert pool_bytes(pool, LAYERS) == {
        "token": 0,
        "block": LAYERS * fmt.block_bytes,
        "slot": LAYERS * fmt.slot_bytes,
    }
    per_token = bytes_per_token("saq", LAYERS, WIDTH, HEAD_DIM, SAQ)
    record = 4 * WIDTH + 4 * 8 * (WIDTH // 16) + 2 * 8 * WIDTH * 2 // 8  # K lo/scale, V lo/scale, 2-bit codes
    assert fmt.block_bytes == record and per_token == LAYERS * record // 8 == 80
    assert bytes_per_token("fp16", LAYERS, WIDTH, HEAD_DIM) == 256
    layout = KVCacheLayout(5, fmt.stage, 0, num_slots=3, bytes_per_slot=7, block_record_bytes=11)
    assert [t.shape(layout) for t in pool] == [(5, fmt.block_bytes), (3, fmt.slot_bytes)]
    assert pool_tensors("fp16", WIDTH, HEAD_DIM)[0].shape(layout) == (5, fmt.stage, WIDTH)
    assert (
        num_slots_for(pool, max_batch_size=4) == 9
        and num_slots_for(pool_tensors("int8", WIDTH, HEAD_DIM), 4) == 0
    )


def test_layout_charges_slots_then_fits_blocks():
    pool = pool_tensors("saq", WIDTH, HEAD_DIM, SAQ)
    sizes = pool_bytes(pool, LAYERS)
    budget = 4 * sizes["slot"] + 10 * sizes["block"] + 1
    layout = layout_for_pool(budget, 8, pool, LAYERS, num_slots=5)  # 4 usable slots + scratch
    assert (layout.num_blocks, layout.num_slots) == (11, 5)  # 10 usable blocks + scratch
    assert layout.bytes_per_block == sizes["block"] and layout.bytes_per_slot == sizes["slot"]
    assert layout.total_bytes == 11 * sizes["block"] + 5 * sizes["slot"]
    allocator = KVBlockAllocator(layout)
    assert allocator.bytes_free == budget - 1 and allocator.bytes_in_use == 0
    allocator.allocate("a", 17)  # 3 blocks and a slot
    assert allocator.bytes_in_use == 3 * sizes["block"] + sizes["slot"]
    assert allocator.bytes_in_use + allocator.bytes_free == budget - 1
    with pytest.raises(ResourceExhaustedError, match="4 sequence slots.*lower max_batch_size"):
        layout_for_pool(4 * sizes["slot"] + sizes["block"] - 1, 8, pool, LAYERS, num_slots=5)
    plain = layout_for_budget(1000, 4, 10)  # formats without slots: as before
    assert (plain.num_blocks, plain.num_slots, plain.total_bytes) == (26, 0, 26 * 40)


# -- allocator and scheduler slots --------------------------------------------------------------------


def _slot_layout(num_blocks=40, num_slots=4) -> KVCacheLayout:
    return KVCacheLayout(num_blocks, 8, 0, num_slots=num_slots, bytes_per_slot=100, block_record_bytes=30)


def test_allocator_hands_out_slots_with_blocks_and_takes_them_back():
    allocator = KVBlockAllocator(_slot_layout())  # slots 1..3; 0 is scratch
    for name in "abc":
        allocator.allocate(name, 9)
    assert sorted(allocator.slot(n) for n in "abc") == [1, 2, 3]
    assert allocator.free_blocks == 39 - 6  # blocks remain, but no slot does
    assert not allocator.can_allocate(1)
    with pytest.raises(ResourceExhaustedError, match="3 sequence slots"):
        allocator.allocate("d", 1)
    assert allocator.num_sequences == 3  # the refused one took nothing
    freed = allocator.slot("b")
    allocator.free("b")
    allocator.free("b")  # twice: a no-op
    assert allocator.can_allocate(9) and allocator.free_slots == 1
    allocator.allocate("d", 9)
    assert allocator.slot("d") == freed and allocator.bytes_in_use == 3 * 100 + 6 * 30
    for name in "acd":
        allocator.free(name)
    assert (allocator.free_slots, allocator.free_blocks, allocator.bytes_in_use) == (3, 39, 0)
    no_slots = KVBlockAllocator(KVCacheLayout(9, 4, 10))
    no_slots.allocate("x", 4)
    assert no_slots.slot("x") == 0 and no_slots.can_allocate(4)  # formats without slots: scratch, unused


def test_allocator_pages_only_the_stages_that_reach_the_bottom_stair():
    """SAQ: a table names a block of its own only for the stages on the bottom stair at the sequence's final
    length (SaqFormat.bottom_stages); the others name the scratch block, which is neither counted, nor
    given back, nor ever handed out."""
    fmt = SaqFormat.parse("8:1,4:2,2;stage=8;v_group=16;sink=1", WIDTH)  # sink 0, then 3 stages in rings
    allocator = KVBlockAllocator(_slot_layout(num_blocks=6), fmt.bottom_stages)  # 5 blocks, 3 slots
    assert allocator.capacity_tokens == (5 + 1 + 3 + 1) * 8 - 1  # 9 closed stages: 0 sink, 1-5 bottom
    assert KVBlockAllocator(_slot_layout(num_blocks=6)).capacity_tokens == 5 * 8  # every stage paged
    table = allocator.allocate("a", 60)  # 7 closed: 1..3 at the bottom, 4..6 in the rings
    assert len(table) == 8 and table[0] == 0 and table[4:] == [0] * 4 and sorted(table[1:4]) == [1, 2, 3]
    assert allocator.bytes_in_use == 3 * 30 + 100 == allocator.bytes_for(60) and allocator.free_blocks == 2
    assert allocator.can_allocate(48) and not allocator.can_allocate(56)  # 2 and 3 blocks
    allocator.allocate("b", 48)
    assert allocator.free_blocks == 0 and allocator.bytes_in_use == 5 * 30 + 2 * 100
    allocator.allocate("c", 32)  # 4 closed: nothing at the bottom yet, a slot only
    assert allocator.table("c") == [0] * 4 and allocator.bytes_in_use == 5 * 30 + 3 * 100
    for name in "abc":
        allocator.free(name)
    assert (allocator.free_blocks, allocator.bytes_in_use) == (5, 0)
    assert sorted(allocator.allocate("d", 79)[1:6]) == [1, 2, 3, 4, 5]  # all five, never the scratch block
    one = KVBlockAllocator(
        _slot_layout(), SaqFormat.parse("4;stage=8;v_group=16;sink=1", WIDTH).bottom_stages
    )
    assert one.allocate("x", 20) == [0, 1, 0]  # one stair: stage 1 goes straight to the bottom, 0 is a sink


def test_benchmark_kv_bytes_allocated_equal_held(tmp_path, monkeypatch):
    """benchmarks/kv_accuracy.kv_bytes_at: what the allocator takes for an SAQ sequence is what the format
    holds at that length (sinks, rings, the bottom stair), and what it charges a sequence it admits."""
    from benchmarks.kv_accuracy import kv_bytes_at

    path = write_artifact(tmp_path / "sunk", saq_kv_cache("8:1,4:2,2;stage=8;v_group=16;sink=1"))
    engine = spec_engine(path, monkeypatch)
    for tokens in (1, 8, 31, 32, 40, 41, 100):
        sizes = kv_bytes_at(engine, tokens)
        assert sizes["allocated"] == sizes["held"], tokens
        engine.allocator.allocate("probe", tokens)
        assert engine.allocator.bytes_in_use == sizes["allocated"]
        engine.allocator.free("probe")
    fmt, layout = engine.artifact.saq, engine.allocator.layout
    assert kv_bytes_at(engine, 100)["held"] == LAYERS * (fmt.slot_bytes + 8 * fmt.block_bytes)  # 12 closed
    assert layout.bytes_per_block == LAYERS * fmt.block_bytes


class _Tokenizer:
    eos_token_ids = []

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _seq(name, prompt_len, max_tokens=4):
    return Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), _Tokenizer())


def test_a_prompt_waits_for_a_slot_like_for_blocks():
    allocator = KVBlockAllocator(_slot_layout(num_slots=3))  # two usable slots, blocks to spare
    scheduler = Scheduler(allocator, max_batch_size=4, max_step_tokens=64, max_queue=4)
    a, b, c = _seq("a", 5), _seq("b", 5), _seq("c", 5)
    for seq in (a, b, c):
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [r.seq for r in out.rows] == [a, b] and list(scheduler.waiting) == [c]
    assert {a.slot, b.slot} == {1, 2} and c.slot == 0
    for row in out.rows:  # a finishes with keep_kv (parked: slot kept), b is aborted (slot freed)
        row.seq.num_computed = 5
    scheduler.park(a)
    scheduler.finish(b)
    assert b.slot == 0 and b.block_table == []
    out = scheduler.schedule()
    assert [r.seq for r in out.rows] == [c] and c.slot == 2
    assert not allocator.can_allocate(1)  # a (parked) and c hold both slots
    scheduler.finish(a)
    scheduler.finish(c)
    assert allocator.free_slots == 2 and allocator.num_sequences == 0 and allocator.bytes_in_use == 0


# -- manifest ----------------------------------------------------------------------------------------


def test_manifest_fields(saq_artifact):
    artifact = load_artifact(saq_artifact)
    fmt = SaqFormat.parse(SAQ, WIDTH)
    assert artifact.kv_format == "saq" and artifact.saq == fmt and artifact.block_size == fmt.stage
    assert artifact.kv_spec == f"saq {fmt.text()}"
    assert [t.per for t in artifact.pool_tensors()] == ["block", "slot"]
    assert artifact.kv_bytes_per_token == bytes_per_token("saq", LAYERS, WIDTH, HEAD_DIM, SAQ)


@pytest.mark.parametrize(
    "kv_cache, op, message",
    [
        (saq_kv_cache(saq=None), "FlashAttentionSaq", "kv_cache.saq is None"),
        (saq_kv_cache(saq="8:1,3"), "FlashAttentionSaq", "8, 4 or 2 bits"),
        (saq_kv_cache(saq="8:1,2;v_group=5"), "FlashAttentionSaq", "v_group 5 must divide"),
        ({k: v for k, v in saq_kv_cache().items() if k != "stage"}, "FlashAttentionSaq", "stage is missing"),
        (saq_kv_cache(stage=16), "FlashAttentionSaq", "kv_cache.stage is 16"),
        (saq_kv_cache(slot_bytes=3), "FlashAttentionSaq", "kv_cache.slot_bytes is 3"),
        (saq_kv_cache(stairs="8:2,2"), "FlashAttentionSaq", "kv_cache.stairs"),
        ({"format": "fp16"}, "FlashAttentionSaq", "not one this runtime runs for KV format fp16"),
        (saq_kv_cache(), "FlashAttentionInt3", "FlashAttentionSaq"),
    ],
)
def test_malformed_saq_manifest_is_refused(tmp_path, kv_cache, op, message):
    path = write_artifact(tmp_path / "artifact", kv_cache, op)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


# -- OrtBackend: pool shapes per `per`, seq_slots only where the graph has it --------------------------


def _probe_graph(with_seq_slots: bool) -> bytes:
    """logits[b, 0, 0] = seq_slots[b] (or past_lens[b]); the caches pass through."""
    ints = {"input_ids": 2, "position_ids": 2, "slot_mapping": 2, "block_table": 2, "logit_positions": 2}
    inputs = [
        helper.make_tensor_value_info(
            n, TensorProto.INT64 if n != "block_table" else TensorProto.INT32, ["B", None]
        )
        for n in ints
    ]
    inputs += [
        helper.make_tensor_value_info(n, TensorProto.INT32, ["B"]) for n in ("past_lens", "total_lens")
    ]
    if with_seq_slots:
        inputs.append(helper.make_tensor_value_info("seq_slots", TensorProto.INT32, ["B"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1, 1])]
    nodes = [
        helper.make_node(
            "Cast", ["seq_slots" if with_seq_slots else "past_lens"], ["f"], to=TensorProto.FLOAT
        ),
        helper.make_node(
            "Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
        ),
        helper.make_node("Unsqueeze", ["f", "axes"], ["logits"]),
    ]
    for layer in range(LAYERS):
        for name in ("kv_pool", "kv_slots"):
            inputs.append(helper.make_tensor_value_info(f"{name}.{layer}", TensorProto.UINT8, [None, None]))
            outputs.append(
                helper.make_tensor_value_info(f"{name}.{layer}.out", TensorProto.UINT8, [None, None])
            )
            nodes.append(helper.make_node("Identity", [f"{name}.{layer}"], [f"{name}.{layer}.out"]))
    model = helper.make_model(
        helper.make_graph(nodes, "probe", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("with_seq_slots", [True, False])
def test_ort_backend_allocates_per_kind_and_feeds_seq_slots_only_to_graphs_that_take_them(
    tmp_path, with_seq_slots
):
    path = write_artifact(tmp_path / "artifact", saq_kv_cache(), graph=_probe_graph(with_seq_slots))
    artifact = load_artifact(path)
    fmt = artifact.saq
    layout = KVCacheLayout(6, fmt.stage, 0, num_slots=4, bytes_per_slot=1, block_record_bytes=1)
    backend = OrtBackend(artifact, RuntimeConfig(attention_kernel="function", num_threads=1), layout)
    assert [a.shape for a in backend.cache_arrays()] == [(6, fmt.block_bytes), (4, fmt.slot_bytes)] * LAYERS
    batch = StepBatch(
        input_ids=np.zeros((3, 1), np.int64), position_ids=np.zeros((3, 1), np.int64),
        slot_mapping=np.zeros((3, 1), np.int64), block_table=np.zeros((3, 2), np.int32),
        past_lens=np.array([5, 6, 7], np.int32), total_lens=np.array([6, 7, 8], np.int32),
        logit_positions=np.zeros((3, 1), np.int64), seq_slots=np.array([2, 0, 3], np.int32),
    )  # fmt: skip
    logits = backend.run(batch)
    assert logits[:, 0, 0].tolist() == ([2, 0, 3] if with_seq_slots else [5, 6, 7])
    assert "seq_slots" not in batch.feeds() and "seq_slots" in batch.feeds(seq_slots=True)


# -- the engine over a spec-backed toy model ------------------------------------------------------------


def _solo(engine, ids, params):
    return [e.token_id for e in engine.generate(ids, params)]


PROMPTS = [[(7 * i + 3) % VOCAB for i in range(n)] for n in (21, 8, 3, 30)]


def test_engine_uses_the_stage_as_block_size_and_accounts_slots(saq_artifact, monkeypatch, caplog):
    with caplog.at_level("INFO", logger="runtime.engine"):
        engine = spec_engine(saq_artifact, monkeypatch)
    layout = engine.allocator.layout
    assert layout.block_size == engine.artifact.saq.stage == 8 and "block_size 4 of the config" in caplog.text
    assert layout.num_slots == 2 * 3 + 1
    assert (
        engine.stats().kv_bytes_free
        == (layout.num_blocks - 1) * layout.bytes_per_block + 6 * layout.bytes_per_slot
    )
    request = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=5))
    engine.step()
    seq = engine._sequences[request]
    # 26 tokens: 4 stages of 8, 3 closed; 1 and 2 stay on the upper stairs, only stage 0 gets a block
    assert seq.slot == 1 and len(seq.block_table) == 4 and seq.block_table[1:] == [0, 0, 0]
    assert engine.stats().kv_bytes_in_use == layout.bytes_per_block + layout.bytes_per_slot
    engine.abort(request)
    assert engine.stats().kv_bytes_in_use == 0 and engine.allocator.free_slots == 6


def test_batched_requests_equal_their_solo_runs(saq_artifact, monkeypatch):
    """Rows of one batch read and write their own slots and blocks (prompts cross several stages)."""
    engine = spec_engine(saq_artifact, monkeypatch)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [_solo(engine, ids, params) for ids in PROMPTS]
    assert len({tuple(t) for t in expected}) == len(PROMPTS)  # the toy model's output depends on its input
    request_ids = [engine.add_request(ids, params) for ids in PROMPTS]  # 4 prompts, 3 rows: one waits
    got = {r: [] for r in request_ids}
    while engine.has_work():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    assert [got[r] for r in request_ids] == expected
    assert engine.stats().kv_bytes_in_use == 0 and engine.allocator.free_slots == 6


def _scribble_unheld(engine: Engine, held: list[str], value: int = 0xFF) -> None:
    """Every block and slot row the sequences `held` do not hold (the scratch block and slot too) set to
    `value`: bytes a receiving sequence must never read before it writes them."""
    blocks = {b for r in held for b in engine._sequences[r].block_table} - {SCRATCH_BLOCK}
    slots = {engine._sequences[r].slot for r in held} - {SCRATCH_SLOT}
    for pool, tensor in zip(engine.backend.cache_arrays(), engine.pool * LAYERS):
        mine = slots if tensor.per == "slot" else blocks
        pool[[i for i in range(len(pool)) if i not in mine]] = value


@pytest.mark.parametrize("artifact", ["saq_artifact", "token_sink_artifact"])
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1], PROMPTS[3]], ids=["21", "8", "30"])
def test_handoff_moves_records_and_slot(artifact, monkeypatch, prompt, request):
    """Prefill on one engine, export (records of the prompt's bottom-stair stages, its slot's bytes in use),
    import on another whose blocks and slot ids differ and whose every other byte is garbage: the same
    tokens as one engine alone, and the imported bytes land in the receiving sequence's blocks and slot."""
    saq_artifact = request.getfixturevalue(artifact)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    decode = spec_engine(saq_artifact, monkeypatch)
    expected = _solo(decode, prompt, params)
    prefill = spec_engine(saq_artifact, monkeypatch, max_batch_size=2)
    first = list(prefill.generate_kept(prompt, dataclasses.replace(params, max_tokens=1)))
    assert [e.token_id for e in first] == expected[:1]
    kv = prefill.export_kv(first[0].request_id)
    fmt = prefill.artifact.saq
    bottom = fmt.bottom_stages(len(prompt))
    slot_bytes = sum(size for _, size in fmt.slot_ranges(len(prompt)))
    assert [[a.shape for a in layer] for layer in kv] == [
        [(len(bottom), fmt.block_bytes), (1, slot_bytes)]
    ] * LAYERS
    assert all(sum(a.nbytes for a in layer) == fmt.handoff_bytes(len(prompt)) for layer in kv)
    assert sum(a.nbytes for layer in kv for a in layer) == prefill.artifact.kv_handoff_bytes(len(prompt))
    assert all(a.any() for layer in kv for a in layer[1:])  # the slot holds the open stage at least
    assert prefill.release_kv(first[0].request_id) and prefill.stats().kv_bytes_in_use == 0
    squatter = decode.add_request(PROMPTS[2], SamplingParams(max_tokens=60))  # takes slot 1 and low blocks
    decode.step()
    _scribble_unheld(decode, [squatter])
    request = decode.add_request(prompt, params, imported=ImportedKV(first[0].token_id, kv))
    run, seen = decode.backend.run, []
    decode.backend.run = lambda batch: (
        seen.append([a.copy() for a in decode.backend.cache_arrays()]) or run(batch)
    )
    got = [e.token_id for e in decode.step() if e.request_id == request]  # import, then a decode step
    seq = decode._sequences[request]
    assert seq.slot != 1 and seq.block_table[0] != decode._sequences[squatter].block_table[0]
    pools = seen[0]  # as the import left them, before the step wrote
    columns = np.concatenate([np.arange(o, o + n) for o, n in fmt.slot_ranges(len(prompt))])
    for layer, arrays in enumerate(kv):
        assert np.array_equal(pools[2 * layer][np.array(seq.block_table)[list(bottom)]], arrays[0])
        assert np.array_equal(pools[2 * layer + 1][seq.slot, columns], arrays[1][0])
        unused = np.ones(fmt.slot_bytes, bool)
        unused[columns] = False
        assert (pools[2 * layer + 1][seq.slot, unused] == 0xFF).all()  # garbage the import left alone
    decode.abort(squatter)
    while decode.has_work():
        got += [e.token_id for e in decode.step() if e.request_id == request]
    assert got == expected and decode.stats().kv_bytes_in_use == 0 and decode.allocator.free_slots == 6


def test_import_shapes_are_checked_and_export_needs_the_bare_prompt(saq_artifact, monkeypatch):
    engine = spec_engine(saq_artifact, monkeypatch)
    prompt = PROMPTS[3]  # 30 tokens: stage 0 on the bottom stair, 1 and 2 on the rings, 6 rows open
    first = list(engine.generate_kept(prompt, SamplingParams(max_tokens=1)))
    kv = engine.export_kv(first[0].request_id)
    engine.release_kv(first[0].request_id)
    fmt = engine.artifact.saq
    assert engine.kv_shapes(len(prompt)) == [
        ((1, fmt.block_bytes), np.uint8),
        ((1, 2 * 2 * 6 * WIDTH + fmt.record_bytes(8) + fmt.record_bytes(4)), np.uint8),
    ]
    assert [(a.shape, a.dtype) for a in kv[0]] == engine.kv_shapes(len(prompt))
    cases = {
        "one stage short": [(records[:-1], slot) for records, slot in kv],
        "two slots": [(records, np.concatenate([slot, slot])) for records, slot in kv],
        "fp16 records": [(records.view(np.float16), slot) for records, slot in kv],
    }
    for layers in cases.values():
        with pytest.raises(
            InvalidRequestError, match=r"expected \['\(1, \d+\) uint8', '\(1, \d+\) uint8'\] \(saq 8:1"
        ):
            engine.add_request(prompt, SamplingParams(), imported=ImportedKV(1, layers))
    with pytest.raises(InvalidRequestError, match=r"expected \['\(2, "):  # 35 tokens: 2 stages at the bottom
        engine.add_request(prompt + [1] * 5, SamplingParams(), imported=ImportedKV(1, kv))
    assert engine.allocator.num_sequences == 0 and engine.stats().kv_bytes_in_use == 0
    kept = list(engine.generate_kept(prompt, SamplingParams(max_tokens=3, ignore_eos=True)))
    with pytest.raises(InvalidRequestError, match="went past its prompt"):
        engine.export_kv(kept[-1].request_id)  # its slot has moved on: the prompt's state is gone
    assert engine.abort(kept[-1].request_id) and engine.allocator.free_slots == 6


def test_fp32_kv_wire_shapes_are_unchanged(tmp_path, monkeypatch):
    """The per-token formats keep [prompt_len, width] per tensor, whatever the block size."""
    path = write_artifact(tmp_path / "fp", {"format": "fp32"}, "FlashAttention")
    monkeypatch.setattr("runtime.engine.OrtBackend", lambda artifact, config, layout: None)
    engine = Engine.from_artifact(path, RuntimeConfig(block_size=4, kv_cache_bytes=1 << 20))
    assert engine.allocator.layout.num_slots == 0 and engine.artifact.kv_spec == "fp32"
    assert engine.kv_shapes(13) == [((13, WIDTH), np.float32)] * 2
    assert engine.artifact.kv_bytes_per_token == 2 * LAYERS * WIDTH * 4
    assert engine.artifact.kv_handoff_bytes(13) == 13 * engine.artifact.kv_bytes_per_token
    assert json.loads((path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
