"""What an SAQ sequence holds (kernels/kv_formats.SaqFormat.bottom_stages and slot_ranges): the spec
(kernels.kv_saq.paged_attention_saq_ref), the native CPU kernel (kernels/csrc/saq_cpu.cc, through
onnxruntime) and the Triton node (kernels/attention_triton_saq.py; Triton's interpreter without CUDA) never
read or write anything else. The runtime relies on it: a sequence gets pool blocks only for the stages that
reach the bottom stair (other table entries name the scratch block), and a handoff moves only those records
and the slot's bytes in use.

One sequence runs through prefill chunks and decode steps (sinks, rings and the bottom stair all reached)
twice: once with a block of its own for every stage, once with the stages that never reach the bottom
stair mapped to the scratch block, and before every call the scratch block and every byte of the slot that
slot_ranges does not name set to 0xFF (NaN as fp16, code 255). The outputs must be equal bit for bit, the
held bytes (bottom records, slot ranges) equal after every call, the scratch block never written, and in
the first run the blocks of stages off the bottom stair never written.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from onnx import TensorProto

from kernels import attention_cpu
from kernels.kv_formats import SaqFormat
from kernels.kv_saq import paged_attention_saq_ref

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels.attention_triton_saq is imported (in the test)

HQ, HKV, D = 4, 2, 32
W = HKV * D
STEPS = [13, 1, 1, 9, 30, 1, 1, 17, 1, 1]  # 75 tokens: 9 stages of 8 close
FORMATS = [
    "8:1,4:2,2;stage=8;v_group=16;sink=1;clip=2",  # a sink, two rings, the bottom
    "8:2,2;stage=8;v_group=16;sink=2",
    "4;stage=8;v_group=16;sink=1",  # one stair: every closed stage but the sink goes straight to the bottom
    "4:1,2;stage=8;v_group=16",
    "8:1,4:2,2;stage=8;v_group=16;sink_tokens=3;clip=2",  # token sinks: their rows held once stage 0 closes
]
GARBAGE = 0xFF


def test_bottom_stages_and_slot_ranges():
    fmt = SaqFormat.parse("8:1,4:7,2;stage=128;v_group=64;sink=1;clip=2", 192)
    assert fmt.upper_stages == 8
    assert [len(fmt.bottom_stages(n)) for n in (0, 127, 128, 9 * 128 - 1, 9 * 128, 10 * 128, 4096)] == [
        0, 0, 0, 0, 0, 1, 23,
    ]  # fmt: skip
    assert fmt.bottom_stages(4096) == range(1, 24)  # 32 closed: sink 0, 24..31 on the rings
    top, four = fmt.record_bytes(8), fmt.record_bytes(4)
    assert fmt.slot_ranges(0) == []
    assert fmt.slot_ranges(5) == [(0, 2 * 5 * 192), (fmt.tail_bytes, 2 * 5 * 192)]
    assert fmt.slot_ranges(128) == [(fmt.sink_offset, top)]  # stage 0 is the sink: no ring holds one
    ring4 = fmt.ring_offset(1)
    # 10 closed: 9 on the 8-bit ring's entry 0, 2..8 on the 4-bit ring (entries 2..6, 0, 1), 1 at the bottom
    assert fmt.slot_ranges(10 * 128 + 3) == [
        (0, 2 * 3 * 192), (fmt.tail_bytes, 2 * 3 * 192), (fmt.sink_offset, 2 * top + 7 * four),
    ]  # fmt: skip
    assert fmt.slot_ranges(4 * 128) == [(fmt.sink_offset, 2 * top), (ring4 + four, 2 * four)]
    assert fmt.handoff_bytes(4 * 128) == 2 * top + 2 * four
    assert fmt.handoff_bytes(4096) == 23 * fmt.block_bytes + 2 * top + 7 * four
    one = SaqFormat.parse("4;stage=64;v_group=32;sink=2", 192)  # one stair: no rings
    assert one.upper_stages == 0 and one.bottom_stages(64) == range(2, 2)
    assert one.bottom_stages(5 * 64) == range(2, 5)
    rows = [(0, 2 * 192), (one.tail_bytes, 2 * 192)]  # one row of K, of V
    assert one.slot_ranges(5 * 64 + 1) == rows + [(one.sink_offset, 2 * one.block_bytes)]
    assert SaqFormat.parse("4;stage=64", 192).slot_ranges(128) == []  # every closed stage in a block


# -- the three implementations of the node ------------------------------------------------------------


def _spec(fmt, q, k, v, pool, slots, table, past, total, seq_slots):
    return paged_attention_saq_ref(
        q, k, v, pool, slots, table, past, total, seq_slots, num_heads=HQ, num_kv_heads=HKV, scale=D**-0.5,
        fmt=fmt,
    )  # fmt: skip


def _native(fmt, q, k, v, pool, slots, table, past, total, seq_slots):
    from tests.kernels.test_attention_cpu_saq import make_session, saq_model

    try:
        attention_cpu.build_library()
    except attention_cpu.BuildError as error:
        if os.environ.get("CI"):
            pytest.fail(f"the CPU kernel library could not be built: {error}")
        pytest.skip(f"the CPU kernel library could not be built: {error}")
    model = saq_model(TensorProto.FLOAT, num_heads=HQ, num_kv_heads=HKV, head_dim=D, spec=fmt.text())
    feeds = dict(q=q, k=k, v=v, kv_pool=pool, kv_slots=slots, block_table=table, past_lens=past,
                 total_lens=total, seq_slots=seq_slots)  # fmt: skip
    feeds = {name: x.numpy() for name, x in feeds.items()}
    feeds["slot_mapping"] = np.zeros(q.shape[:2], np.int64)
    o, pool, slots = make_session(model).run(None, feeds)  # outputs in buffers of their own
    return torch.from_numpy(o), torch.from_numpy(pool), torch.from_numpy(slots)


def _triton(fmt, q, k, v, pool, slots, table, past, total, seq_slots):
    pytest.importorskip("triton")
    from kernels.attention_triton_saq import paged_attention_saq

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [x.to(device) for x in (q, k, v, pool.clone(), slots.clone(), table, past, total, seq_slots)]
    o, pool, slots = paged_attention_saq(*args, num_heads=HQ, num_kv_heads=HKV, scale=D**-0.5, fmt=fmt,
                                         use_kernel=True)  # fmt: skip
    return o.cpu(), pool.cpu(), slots.cpu()


NODES = {"spec": _spec, "native": _native, "triton": _triton}


def _slot_mask(fmt: SaqFormat, tokens: int) -> torch.Tensor:
    held = torch.zeros(fmt.slot_bytes, dtype=torch.bool)
    for offset, size in fmt.slot_ranges(tokens):
        held[offset : offset + size] = True
    return held


def _held(fmt, pool, slots, table, tokens) -> torch.Tensor:
    records = [pool[int(table[0, j])] for j in fmt.bottom_stages(tokens)]
    return torch.cat(records + [slots[1][_slot_mask(fmt, tokens)]])


def _run(node, fmt: SaqFormat, table: torch.Tensor, scribble: bool):
    """The sequence through STEPS on `node`: each call's output and held bytes, and the final pool."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (1 + table.shape[1], fmt.block_bytes), generator=g, dtype=torch.uint8)
    slots = torch.randint(0, 256, (2, fmt.slot_bytes), generator=g, dtype=torch.uint8)
    outputs, held, past = [], [], 0
    for n in STEPS:
        q = torch.randn(1, n, HQ * D, generator=g)
        k = torch.randn(1, n, W, generator=g) * torch.linspace(0.2, 3, W)
        v = torch.randn(1, n, W, generator=g)
        if scribble:
            pool[0] = GARBAGE
            slots[1][~_slot_mask(fmt, past)] = GARBAGE
        lens = torch.tensor([past], dtype=torch.int32), torch.tensor([past + n], dtype=torch.int32)
        o, pool, slots = node(fmt, q, k, v, pool, slots, table, *lens, torch.tensor([1], dtype=torch.int32))
        past += n
        if scribble:
            assert (pool[0] == GARBAGE).all(), f"the scratch block was written at {past} tokens"
        outputs.append(o)
        held.append(_held(fmt, pool, slots, table, past))
    return outputs, held, pool


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("spec", FORMATS)
def test_stages_off_the_bottom_stair_leave_their_blocks_alone(spec, node):
    fmt = SaqFormat.parse(spec, W)
    tokens = sum(STEPS)
    stages = -(-tokens // fmt.stage)
    own = torch.arange(1, stages + 1, dtype=torch.int32).flip(0)[None]  # a block per stage
    bottom = fmt.bottom_stages(tokens)
    assert len(bottom) and len(bottom) < stages - 1  # some stages stay in the slot
    scratch = torch.tensor([[int(own[0, j]) if j in bottom else 0 for j in range(stages)]], dtype=torch.int32)
    out_own, held_own, pool_own = _run(NODES[node], fmt, own, scribble=False)
    out_scratch, held_scratch, _ = _run(NODES[node], fmt, scratch, scribble=True)
    for step, (a, b, ha, hb) in enumerate(zip(out_own, out_scratch, held_own, held_scratch)):
        assert torch.equal(a, b), f"{node}: outputs differ at step {step}"
        assert torch.equal(ha, hb), f"{node}: held bytes differ at step {step}"
    initial = torch.randint(0, 256, (1 + stages, fmt.block_bytes), generator=torch.Generator().manual_seed(0),
                            dtype=torch.uint8)  # fmt: skip
    for j in range(stages):
        if j not in bottom:
            block = int(own[0, j])
            assert torch.equal(pool_own[block], initial[block]), f"{node} wrote stage {j}'s block"
