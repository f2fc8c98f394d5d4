"""The served SAQ staircase (kernels/kv_formats.SaqFormat, kernels/kv_saq.paged_attention_saq_ref): the
paged op's spec agrees with the per-sequence staircase cache, and its byte layout is what it says."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_formats import SaqFormat
from kernels.kv_saq import (
    SaqCache,
    SaqSchedule,
    attend,
    decode_record,
    dequantize_asym,
    encode_record,
    paged_attention_saq_ref,
    quantize_asym,
)

HQ, HKV, D = 4, 2, 32
W = HKV * D


def _pools(fmt: SaqFormat, blocks: int, slots: int):
    return torch.zeros(blocks, fmt.block_bytes, dtype=torch.uint8), torch.zeros(
        slots, fmt.slot_bytes, dtype=torch.uint8
    )


def test_parse_layout_and_errors():
    fmt = SaqFormat.parse("8:1,4:4,2;stage=64;v_group=32", 192)
    assert (
        fmt.stairs == ((8, 1), (4, 4), (2, 0)) and fmt.text() == "8:1,4:4,2;stage=64;v_group=32;sink=0;clip=0"
    )
    # record: fp16 K lo/scale per channel, V lo/scale per token per group, then the codes
    assert fmt.record_bytes(2) == 4 * 192 + 4 * 64 * 6 + 2 * 64 * 192 * 2 // 8
    assert fmt.slot_bytes == 2 * 2 * 64 * 192 + fmt.record_bytes(8) + 4 * fmt.record_bytes(4)
    assert [fmt.stair_of_age(a) for a in range(7)] == [0, 1, 1, 1, 1, 2, 2]
    assert SaqFormat.parse("4", 192).slot_bytes == 2 * 2 * 64 * 192  # one stair: only the open stage
    sunk = SaqFormat.parse("8:1,2;stage=64;sink=2;clip=2", 192)
    assert sunk.slot_bytes == 2 * 2 * 64 * 192 + 3 * sunk.record_bytes(8)  # two sink records + the ring
    assert sunk.ring_offset(0) == sunk.sink_offset + 2 * sunk.record_bytes(8)
    tokens = SaqFormat.parse("8:1,2;stage=64;sink=1;sink_tokens=3", 192)
    assert tokens.text() == "8:1,2;stage=64;v_group=32;sink=1;clip=0;sink_tokens=3"
    assert SaqFormat.parse(tokens.text(), 192) == tokens
    # the token sinks' fp16 K and V rows sit between the open stage and the sink records
    assert (
        tokens.sink_rows_offset == 2 * 2 * 64 * 192
        and tokens.sink_offset == tokens.sink_rows_offset + 4 * 3 * 192
    )
    assert tokens.slot_bytes == sunk.slot_bytes - sunk.record_bytes(8) + 4 * 3 * 192
    assert tokens.slot_ranges(63) == [(0, 2 * 63 * 192), (tokens.tail_bytes, 2 * 63 * 192)]  # still open
    assert tokens.slot_ranges(64) == [(tokens.sink_rows_offset, 4 * 3 * 192 + tokens.record_bytes(8))]
    for spec, message in (
        ("8:1,3", "8, 4 or 2"),
        ("8:1,2;stage=64;sink_tokens=64", "sink_tokens=64: use 0 up to stage - 1"),
        ("8:1,2;sink_tokens=-1", "sink_tokens=N"),
        ("4:1,8", "must not increase"),
        ("8,2", "BITS:STAGES"),
        ("8:1,2;stage=12", "multiple of 8"),
        ("4;v_group=50", "divide"),
        ("4;x=1", "stage=N"),
        ("4;clip=3", "clip=3"),
    ):
        with pytest.raises(ValueError, match=message):
            SaqFormat.parse(spec, 192)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_record_round_trip(bits):
    fmt = SaqFormat.parse(f"{bits};stage=16;v_group=16", W)  # no clipping: every value within half a step
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(16, W, generator=g) * torch.linspace(0.1, 5, W)
    v = torch.randn(16, W, generator=g)
    record = encode_record(k, v, fmt, bits)
    assert record.shape == (fmt.record_bytes(bits),)
    k2, v2 = decode_record(record, fmt, bits)
    levels = (1 << bits) - 1
    assert ((k2 - k).abs() <= (k.amax(0) - k.amin(0)) / levels * 0.51 + 1e-2).all()
    assert torch.equal(encode_record(k2, v2, fmt, bits), record)  # re-quantizing the same bits is stable


CASES = [
    ("8:1,4:2,2", dict(), [1] * 70),
    ("8:1,4:2,2", dict(), [5, 11, 16, 1, 1, 30, 3, 1, 2]),
    ("8:1,4:2,2", dict(sink=1, clip=2), [1] * 45 + [20, 3]),
    ("8:2,2", dict(sink=2, clip=4), [13, 1, 9, 30, 1, 1, 2]),
    ("4", dict(clip=4), [3, 17, 1, 1, 40]),
    ("8:1,4:2,2", dict(sink_tokens=3, clip=2), [1] * 45 + [20, 3]),
    ("8:2,2", dict(sink=1, sink_tokens=1), [13, 1, 9, 30, 1, 1, 2]),
    ("4", dict(sink_tokens=7), [3, 17, 1, 1, 40]),
]


@pytest.mark.parametrize("stairs, options, chunks", CASES)
def test_paged_op_matches_the_staircase_cache(stairs, options, chunks):
    """Token by token and in odd chunks: the op's outputs equal SaqCache + attend (same stairs, sink and
    clipping, no rotation), so the bytes it keeps hold the same stages."""
    stage = 8
    extra = "".join(f";{k}={v}" for k, v in options.items())
    fmt = SaqFormat.parse(f"{stairs};stage={stage};v_group=16{extra}", W)
    cache = SaqCache(SaqSchedule.parse(stairs, stage=stage, v_group=16, **options), W, torch.float16, D)
    g = torch.Generator().manual_seed(1)
    n = sum(chunks)
    q = torch.randn(n, HQ * D, generator=g)
    k = torch.randn(n, W, generator=g) * torch.linspace(0.2, 3, W)
    v = torch.randn(n, W, generator=g)
    pool, slots = _pools(fmt, 12, 3)
    table = torch.tensor([[7, 3, 9, 1, 2, 4, 5, 6, 8, 10]])  # any blocks: the table names them
    past = 0
    for c in chunks:
        rows = slice(past, past + c)
        want = attend(q[rows], k[rows], v[rows], cache, HQ, HKV)
        cache.append(k[rows], v[rows])
        o, pool, slots = paged_attention_saq_ref(
            q[None, rows], k[None, rows], v[None, rows], pool, slots, table,
            torch.tensor([past]), torch.tensor([past + c]), torch.tensor([2]),
            num_heads=HQ, num_kv_heads=HKV, scale=D**-0.5, fmt=fmt,
        )  # fmt: skip
        torch.testing.assert_close(o[0], want, atol=1e-5, rtol=1e-5)
        past += c
    assert not slots[:2].any() and not slots[0].any()  # other slots untouched


def test_padding_rows_and_other_sequences_untouched():
    fmt = SaqFormat.parse("4:2,2;stage=8;v_group=32", W)
    g = torch.Generator().manual_seed(2)
    pool, slots = _pools(fmt, 8, 3)
    q, k, v = (
        torch.randn(2, 20, HQ * D, generator=g),
        torch.randn(2, 20, W, generator=g),
        torch.randn(2, 20, W, generator=g),
    )
    table = torch.tensor([[1, 2, 3], [4, 5, 6]])
    _, pool1, slots1 = paged_attention_saq_ref(
        q, k, v, pool, slots, table, torch.tensor([0, 0]), torch.tensor([20, 9]), torch.tensor([1, 2]),
        num_heads=HQ, num_kv_heads=HKV, scale=0.2, fmt=fmt,
    )  # fmt: skip
    k2 = k.clone()
    k2[1, 9:] = 1e4  # padding of row 1: never written
    _, pool2, slots2 = paged_attention_saq_ref(
        q, k2, v, pool, slots, table, torch.tensor([0, 0]), torch.tensor([20, 9]), torch.tensor([1, 2]),
        num_heads=HQ, num_kv_heads=HKV, scale=0.2, fmt=fmt,
    )  # fmt: skip
    assert torch.equal(pool1, pool2) and torch.equal(slots1, slots2)
    assert not pool1[[0, 7]].any() and not slots1[0].any()  # scratch block/slot and unused block untouched


def test_clipping_lowers_the_error_of_two_bit_groups():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 256, generator=g)
    for dim in (0, -1):
        plain = dequantize_asym(*quantize_asym(x, 2, dim))
        clipped = dequantize_asym(*quantize_asym(x, 2, dim, clip=True))
        assert ((clipped - x) ** 2).mean() < 0.8 * ((plain - x) ** 2).mean()
        # never worse group by group: r = 1 (min..max) is one of the candidates
        assert (((clipped - x) ** 2).sum(dim) <= ((plain - x) ** 2).sum(dim) + 1e-4).all()
