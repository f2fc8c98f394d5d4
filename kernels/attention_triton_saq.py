"""The SAQ staircase KV cache on the GPU: a Triton split-KV attention kernel that reads the staircase's
records directly, the write path (closing stages, the cascade, the clipping search) as torch ops on
the device, and the node ``paged_attention_saq`` (attend, then write).

Contract: ``kernels.kv_saq.paged_attention_saq_ref`` (the ``fastattention::FlashAttentionSaq`` node);
the byte layout is ``kernels.kv_formats.SaqFormat``'s.

- q [B, S, Hq*D] fp16, bf16 or fp32, heads interleaved as ``x.view(B, S, Hq, D)``; k, v [B, S, W]
  (W = Hkv*D = fmt.width): row b's first total - past tokens are new (positions past..total-1), the
  rest padding (read by no key, never written). o [B, S, Hq*D] in q's dtype.
- kv_pool uint8 [NB, fmt.block_bytes] (bottom-stair records, logical stage j of row b in block
  block_table[b, j]), kv_slots uint8 [NS, fmt.slot_bytes] (row b's slot seq_slots[b]: the open stage's
  fp16 K and V, the token sinks' fp16 K and V rows, the sink records, the upper stairs' rings), both
  contiguous.
- block_table [B, max_blocks], past_lens, total_lens, seq_slots [B]: int32. Causal is bottom-right:
  query s of row b sits at past + s and sees keys j <= past + s, j < total; sliding window W > 0:
  also past + s - j < W. A query that sees no key outputs zeros.
- Read before write: positions < past come from the cache as it was before this call, positions
  >= past from k/v rounded to fp16 (what the open stage will hold).

Read kernel (``flash_attention_decode_saq``). One program per (row b, KV head, row tile, split) owns the GROUP
query heads of that KV head for the row's S tokens as one tile (GQA packing, as
kernels/attention_triton_decode.py) and streams its split of the key positions; splits are whole stages. Each
closed stage is read where the format keeps it, at the width its age gives it (SaqFormat.stair_of_age; sinks
at the top stair's): the sink records and the upper stairs' rings in the slot, the bottom stair in the paged
pool through the block table. Every stair is its own loop with its width as a constexpr, so a tile's
dequantization has no branch. Heads of 128 channels are split into quarter heads by channel % 4
(``_sub_tiles``): q, each record's k_lo / k_scale and the accumulator are held as 4 sub-tiles of channels 4j +
i, and one word of BITS / 2 bytes per token row (4 channels) is loaded once per sub-tile and shifted by i *
BITS, so the codes are never re-interleaved: scores are the sum of the 4 sub-tiles' dots, each sub-tile of V
gives its own output channels (stored strided). Smaller heads load each channel's byte and shift its code out
(first channel in the low bits). K = code * k_scale + k_lo per channel of the stage, V = code * v_scale + v_lo
per token and group, in fp16 (a fused multiply-add on the GPU: the exact value rounded once) for fp16 dots
with fp32 accumulation. The open stage's rows come from the slot's fp16 tail (positions < past), the new
tokens from k/v. Token sinks (fmt.sink_tokens = N): once stage 0 has closed, positions < N come from the
slot's fp16 sink rows (an fp16 run like the open stage's) and the stair loops skip them (stage 0's record
holds stand-ins there; H100, triton 3.6, 2026-11-26: the default format's read unchanged, 8:1,4:7,2 with
sink_tokens=1 instead of sink=1 38 vs 41 us at B=1 and 138 vs 143 us at B=8, 8k tokens, 32/8 heads of 128).
The online softmax, the key range and the partial store are the fp16 decode kernel's helpers;
``_decode_merge_kernel`` merges the splits. Split counts depend on shapes only: the read kernel can be
captured in a CUDA graph. Any S works: S > ~16 (a prefill chunk) runs GROUP*S rows as row tiles of 64 that
each re-read their keys (bounded by the tile's last query when causal); fine for chunks, not a prefill kernel.
Heads of 32, 64 or 128 channels, at most 4 stairs, and V groups that a head's channels divide or that divide a
head; other formats use ``attention_saq_torch``.

Write path (``write_kv_saq``): torch on the device, after one read of the lengths to the host (a stage
closes once per `stage` tokens of a row; the tail write is one indexed copy). Closing a stage is the
spec's ``_SlotView.close``: stages leaving a stair move one down (bottom first), re-quantized from their
dequantized values, then the new stage is encoded at the top stair (stage 0 with token sinks: its first
N rows copied to the sink rows, the record encoded from ``sink_stand_in``'s rows). Clipped stairs search
all ratios of SAQ_CLIP_RATIOS at once (``quantize_device``); sums run in another order than the spec's
loop, so a near-tie may pick another ratio (the spec allows it; tests compare with a tolerance there).

GPU-only bug, fixed (2026-11-25, H100, triton 3.6): codes below 8 bits were unpacked by loading a row's
bytes and interleaving the bit fields back with tl.join + tl.reshape. In the kernels compiled for some
formats ("8:1,4:2,2;stage=8", "4:2,2;stage=8;sink=2", "8:1,4:1,2;stage=16"; not "8:1,4:1,2;stage=8" nor
the default format) that put channels in the wrong place: max errors of 1 to 4 for every row reading a
closed stage, with any split count, 1 or 4 warps, pipelined or not, while the interpreter (exact
join/reshape) passed. All masked loads have ``other``, so masked-off garbage was not it. On the same
cache and read, swapping only ``_unpack_codes`` for the per-channel version fixed every case. The
per-channel byte loads made the read 2.9-3.8x slower than the join version at D=128; the quarter-head
split (no join, one word load per row and quarter head) brought D=128 back to 72 us at B=1, 32k tokens
(H100; per-channel 295 us, join 77.6 us, fp16 kernel 53.7 us). At D=64 the 16-channel quarter dots were
slower than per-channel loads (33.5 vs 31.6 us B=1, 216 vs 157 us B=8, 32k), so D=64 stays per-channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.attention_triton_decode import (
    LOG2E,
    MAX_ROWS_PER_PROGRAM,
    DecodeConfig,
    _decode_merge_kernel,
    _key_range,
    _num_splits,
    _program_tile,
    _softmax_step,
    _store_result,
)
from kernels.kv_formats import SAQ_CLIP_RATIOS, SaqFormat
from kernels.kv_saq import _pack, _SlotView, _unpack, sink_stand_in

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_STAIRS = 4  # three upper stairs (constexpr parameters of the kernel) and the bottom one

# Tile configs by head_dim (block_n / num_warps / num_stages). Chosen from a sweep on an NVIDIA H200
# (sm_90, triton 3.6, torch 2.11) on 2026-11-26, default format, CUDA graphs, us per call at B=1 / B=8,
# N=32k: D=128 (32/8 heads): 128/4/3 68.0 / 457.4, 64/4/3 73.6 / 620.5, 32/4/3 87.1 / 521.7; D=64 (9/3
# heads): 64/4/2 31.0 / 155.6, 64/4/3 31.8 / 167.7, 128/4/3 35.3 / 170.5. `python -m benchmarks.kv_saq_gpu`
# re-times SAQ_CANDIDATES at B=1, N=32k and records them in benchmarks/results/kv_saq_gpu.json; re-tune on
# another card with it and copy the best configs here (128/8 needs more shared memory than sm_90 has at
# D=128). 32 is untuned. The GPU tests run these configs against the spec.
SAQ_DECODE_CONFIGS = {32: DecodeConfig(64, 4, 3), 64: DecodeConfig(64, 4, 2), 128: DecodeConfig(128, 4, 3)}
SAQ_CANDIDATES = [
    DecodeConfig(*c) for c in ((32, 4, 3), (64, 4, 3), (64, 4, 2), (128, 4, 3), (64, 8, 3), (128, 8, 3))
]
INTERPRETER_CONFIG = DecodeConfig(16, 1, 1)


# ---------------------------------------------------------------------------------------------- kernel


@triton.jit
def _unpack_codes(ROW, row_ok, i: tl.constexpr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  SUB: tl.constexpr):  # fmt: skip
    """Codes (fp16) of channels SUB * j + i, j < HEAD_DIM / SUB, of one head: [BLOCK_N, HEAD_DIM / SUB];
    ROW [BLOCK_N, 1] points at each token row's first byte of the head. Packed along channels, first
    channel in the low bits. SUB = 4: one word of BITS / 2 bytes (uint8, uint16, uint32) holds channels
    4j .. 4j + 3 at bits 0, BITS, 2 BITS, 3 BITS (little-endian), so sub-tile i is word j shifted by
    i * BITS: one contiguous load per sub-tile, no tl.join / tl.reshape (on the H100, triton 3.6, the
    join-and-reshape unpack put channels in the wrong place in some tile shapes: module docstring).
    SUB = 1 (heads of 32 channels: a quarter head would be a dot below 16): each channel's byte is
    loaded and its bits shifted out."""
    MASK: tl.constexpr = (1 << BITS) - 1
    j = tl.arange(0, HEAD_DIM // SUB)[None, :]
    if SUB == 4:
        if BITS == 2:
            word = tl.load(ROW + j, mask=row_ok[:, None], other=0)
        elif BITS == 4:
            word = tl.load(ROW.to(tl.pointer_type(tl.uint16)) + j, mask=row_ok[:, None], other=0)
        else:
            word = tl.load(ROW.to(tl.pointer_type(tl.uint32)) + j, mask=row_ok[:, None], other=0)
        return ((word >> (i * BITS)) & MASK).to(tl.float16)
    if BITS == 8:
        return tl.load(ROW + j, mask=row_ok[:, None], other=0).to(tl.float16)
    byte = tl.load(ROW + j * BITS // 8, mask=row_ok[:, None], other=0)
    shift = ((j * BITS) % 8).to(tl.uint8)
    return ((byte >> shift) & MASK).to(tl.float16)


@triton.jit
def _record_sub_tile(REC, rec16, k_rows, row_ok, v_lo, v_scale, kv_h, i: tl.constexpr, BITS: tl.constexpr,
                     STAGE: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                     SUB: tl.constexpr):  # fmt: skip
    """K and V [BLOCK_N, HEAD_DIM / SUB] (fp16) of channels SUB * j + i: code * scale + lo in fp16 (a
    fused multiply-add on the GPU: the exact value rounded once)."""
    ROW_BYTES: tl.constexpr = WIDTH * BITS // 8
    c = kv_h * HEAD_DIM + SUB * tl.arange(0, HEAD_DIM // SUB) + i
    k_lo = tl.load(rec16 + c)
    k_scale = tl.load(rec16 + WIDTH + c)
    k = _unpack_codes(k_rows, row_ok, i, BITS, HEAD_DIM, SUB) * k_scale[None, :] + k_lo[None, :]
    v = _unpack_codes(k_rows + STAGE * ROW_BYTES, row_ok, i, BITS, HEAD_DIM, SUB) * v_scale + v_lo
    return k, v


@triton.jit
def _record_v_params(rec16, r, row_ok, kv_h, STAGE: tl.constexpr, WIDTH: tl.constexpr, V_GROUP: tl.constexpr,
                     HEAD_GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, SUB: tl.constexpr,
                     BLOCK_N: tl.constexpr):  # fmt: skip
    """V's lo and scale [BLOCK_N, HEAD_DIM / SUB] (fp16) for every sub-tile: column j holds channels
    SUB * j + i, all in group j // (channels of a group / SUB) of the head (SUB divides a group)."""
    GROUPS: tl.constexpr = WIDTH // V_GROUP  # V groups per token
    g = r[:, None] * GROUPS + (kv_h * HEAD_DIM) // V_GROUP + tl.arange(0, HEAD_GROUPS)[None, :]
    v_lo = tl.load(rec16 + 2 * WIDTH + g, mask=row_ok[:, None], other=0.0)
    v_scale = tl.load(rec16 + 2 * WIDTH + STAGE * GROUPS + g, mask=row_ok[:, None], other=0.0)
    COLUMNS: tl.constexpr = HEAD_DIM // SUB // HEAD_GROUPS  # a group's columns in a sub-tile
    v_lo = tl.reshape(tl.broadcast_to(v_lo[:, :, None], (BLOCK_N, HEAD_GROUPS, COLUMNS)),
                      (BLOCK_N, HEAD_DIM // SUB))  # fmt: skip
    v_scale = tl.reshape(tl.broadcast_to(v_scale[:, :, None], (BLOCK_N, HEAD_GROUPS, COLUMNS)),
                         (BLOCK_N, HEAD_DIM // SUB))  # fmt: skip
    return v_lo, v_scale


@triton.jit
def _attend_tile(s, v0, v1, v2, v3, acc0, acc1, acc2, acc3, m_i, l_i, pos_k, k_ok, pos_q, qk_scale, window,
                 SUB: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """One key tile's scores s (the sum of the sub-tiles' dots) through the online softmax, then P.V into
    each sub-tile's accumulator (acc_i, V sub-tile v_i: channels SUB * j + i; acc1..3 unused when SUB = 1)."""
    p, alpha, m_i, l_i = _softmax_step(s * qk_scale, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL,
                                       HAS_WINDOW)  # fmt: skip
    p = p.to(tl.float16)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
    if SUB == 4:
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None])
        acc3 = tl.dot(p, v3, acc3 * alpha[:, None])
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _stair_run(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, j_lo, j_hi, p_lo, p_hi, BASE, TABLE,
               kv_h, qk_scale, window, OFFSET: tl.constexpr, COUNT: tl.constexpr, IN_POOL: tl.constexpr,
               BITS: tl.constexpr, STAGE: tl.constexpr, WIDTH: tl.constexpr, V_GROUP: tl.constexpr,
               HEAD_GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Stream the keys at positions [p_lo, p_hi) of logical stages [j_lo, j_hi), all on one stair at
    BITS, through the online softmax. Stage j's record: pool block TABLE[j] (IN_POOL; BASE the pool),
    else entry j % COUNT of the array at byte OFFSET of the slot (BASE). q_i and acc_i hold channels
    SUB * j + i (acc1..3 unused when SUB = 1): scores are the sum of the sub-tiles' dots."""
    REC_BYTES: tl.constexpr = 4 * WIDTH + 4 * STAGE * (WIDTH // V_GROUP) + STAGE * WIDTH * BITS // 4
    K_CODES: tl.constexpr = 4 * WIDTH + 4 * STAGE * (WIDTH // V_GROUP)  # byte offset (record_fields)
    TILES: tl.constexpr = (STAGE + BLOCK_N - 1) // BLOCK_N
    for t in range(j_lo * TILES, j_hi * TILES):
        j = t // TILES
        r = (t % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        pos_k = j * STAGE + r
        k_ok = (r < STAGE) & (pos_k >= p_lo) & (pos_k < p_hi)
        if IN_POOL:
            rec = BASE + tl.load(TABLE + j).to(tl.int64) * REC_BYTES
        else:
            rec = BASE + OFFSET + (j % COUNT) * REC_BYTES
        rec16 = rec.to(tl.pointer_type(tl.float16))
        row_ok = r < STAGE
        k_rows = rec + K_CODES + kv_h * (HEAD_DIM * BITS // 8) + r[:, None] * (WIDTH * BITS // 8)
        v_lo, v_scale = _record_v_params(rec16, r, row_ok, kv_h, STAGE, WIDTH, V_GROUP, HEAD_GROUPS, HEAD_DIM,
                                         SUB, BLOCK_N)  # fmt: skip
        k0, v0 = _record_sub_tile(rec, rec16, k_rows, row_ok, v_lo, v_scale, kv_h, 0, BITS, STAGE, WIDTH,
                                  HEAD_DIM, SUB)  # fmt: skip
        s = tl.dot(q0, tl.trans(k0))
        v1, v2, v3 = v0, v0, v0  # unused when SUB = 1
        if SUB == 4:
            k1, v1 = _record_sub_tile(rec, rec16, k_rows, row_ok, v_lo, v_scale, kv_h, 1, BITS, STAGE, WIDTH,
                                      HEAD_DIM, SUB)  # fmt: skip
            s = tl.dot(q1, tl.trans(k1), s)
            k2, v2 = _record_sub_tile(rec, rec16, k_rows, row_ok, v_lo, v_scale, kv_h, 2, BITS, STAGE, WIDTH,
                                      HEAD_DIM, SUB)  # fmt: skip
            s = tl.dot(q2, tl.trans(k2), s)
            k3, v3 = _record_sub_tile(rec, rec16, k_rows, row_ok, v_lo, v_scale, kv_h, 3, BITS, STAGE, WIDTH,
                                      HEAD_DIM, SUB)  # fmt: skip
            s = tl.dot(q3, tl.trans(k3), s)
        acc0, acc1, acc2, acc3, m_i, l_i = _attend_tile(
            s, v0, v1, v2, v3, acc0, acc1, acc2, acc3, m_i, l_i, pos_k, k_ok, pos_q, qk_scale, window, SUB,
            CAUSAL, HAS_WINDOW)  # fmt: skip
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _open_sub_tile(TAIL, K_NEW, V_NEW, stride_ks, stride_vs, tail_row, new_row, old, new, kv_h,
                   i: tl.constexpr, STAGE: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                   SUB: tl.constexpr):  # fmt: skip
    """K and V [BLOCK_N, HEAD_DIM / SUB] (fp16) of channels SUB * j + i past the closed stages: the
    slot's fp16 tail where `old`, the new tokens (rounded to fp16) where `new`."""
    col = kv_h * HEAD_DIM + SUB * tl.arange(0, HEAD_DIM // SUB)[None, :] + i
    k = tl.load(TAIL + tail_row + col, mask=old, other=0.0)
    v = tl.load(TAIL + tail_row + STAGE * WIDTH + col, mask=old, other=0.0)
    k = tl.where(old, k, tl.load(K_NEW + new_row * stride_ks + col, mask=new, other=0.0).to(tl.float16))
    v = tl.where(old, v, tl.load(V_NEW + new_row * stride_vs + col, mask=new, other=0.0).to(tl.float16))
    return k, v


@triton.jit
def _open_run(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, p_lo, p_hi, past, closed, TAIL, K_NEW,
              V_NEW, stride_ks, stride_vs, kv_h, qk_scale, window, STAGE: tl.constexpr, WIDTH: tl.constexpr,
              HEAD_DIM: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Keys [p_lo, p_hi) past the closed stages: the slot's fp16 tail (TAIL: K rows, then V rows) below
    past, the new tokens (K_NEW, V_NEW: row b's k and v, rounded to fp16) from past on."""
    for n in range(p_lo, p_hi, BLOCK_N):
        pos_k = n + tl.arange(0, BLOCK_N)
        k_ok = pos_k < p_hi
        old = (k_ok & (pos_k < past))[:, None]
        new = (k_ok & (pos_k >= past))[:, None]
        tail_row = (pos_k - closed * STAGE)[:, None] * WIDTH
        new_row = (pos_k - past)[:, None]
        k0, v0 = _open_sub_tile(TAIL, K_NEW, V_NEW, stride_ks, stride_vs, tail_row, new_row, old, new,
                                kv_h, 0, STAGE, WIDTH, HEAD_DIM, SUB)  # fmt: skip
        s = tl.dot(q0, tl.trans(k0))
        v1, v2, v3 = v0, v0, v0  # unused when SUB = 1
        if SUB == 4:
            k1, v1 = _open_sub_tile(TAIL, K_NEW, V_NEW, stride_ks, stride_vs, tail_row, new_row, old, new,
                                    kv_h, 1, STAGE, WIDTH, HEAD_DIM, SUB)  # fmt: skip
            s = tl.dot(q1, tl.trans(k1), s)
            k2, v2 = _open_sub_tile(TAIL, K_NEW, V_NEW, stride_ks, stride_vs, tail_row, new_row, old, new,
                                    kv_h, 2, STAGE, WIDTH, HEAD_DIM, SUB)  # fmt: skip
            s = tl.dot(q2, tl.trans(k2), s)
            k3, v3 = _open_sub_tile(TAIL, K_NEW, V_NEW, stride_ks, stride_vs, tail_row, new_row, old, new,
                                    kv_h, 3, STAGE, WIDTH, HEAD_DIM, SUB)  # fmt: skip
            s = tl.dot(q3, tl.trans(k3), s)
        acc0, acc1, acc2, acc3, m_i, l_i = _attend_tile(
            s, v0, v1, v2, v3, acc0, acc1, acc2, acc3, m_i, l_i, pos_k, k_ok, pos_q, qk_scale, window, SUB,
            CAUSAL, HAS_WINDOW)  # fmt: skip
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _saq_decode_kernel(
    Q, K_NEW, V_NEW, POOL, SLOTS, BLOCK_TABLE, PAST_LENS, TOTAL_LENS, SEQ_SLOTS, OUT, LSE, O_PART, M_PART,
    L_PART, stride_qb, stride_qs, stride_kb, stride_ks, stride_vb, stride_vs, stride_tb, stride_ob, stride_os,
    slot_bytes, seq_q, kv_per_split, qk_scale, window, NUM_KV_HEADS, NUM_ROW_TILES,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SUB: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, STAGE: tl.constexpr, WIDTH: tl.constexpr, V_GROUP: tl.constexpr,
    HEAD_GROUPS: tl.constexpr, SINK: tl.constexpr, SINK_OFFSET: tl.constexpr,
    SINK_TOKENS: tl.constexpr, SINK_ROWS_OFFSET: tl.constexpr, SINK_BLOCK_N: tl.constexpr,
    BITS0: tl.constexpr, COUNT0: tl.constexpr, RING0: tl.constexpr,
    BITS1: tl.constexpr, COUNT1: tl.constexpr, RING1: tl.constexpr,
    BITS2: tl.constexpr, COUNT2: tl.constexpr, RING2: tl.constexpr, BOTTOM_BITS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    b, kv_h, split, row_tile, rows, s_idx, head, row_ok = _program_tile(
        seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP, BLOCK_R
    )
    # sub-tile i: channels SUB * j + i (SUB = 1: the whole head in acc0, q0)
    cols = SUB * tl.arange(0, HEAD_DIM // SUB)
    b64 = b.to(tl.int64)
    q_row = Q + b64 * stride_qb + s_idx[:, None] * stride_qs + head[:, None] * HEAD_DIM + cols[None, :]
    q0 = tl.load(q_row, mask=row_ok[:, None], other=0.0).to(tl.float16)
    q1, q2, q3 = q0, q0, q0  # unused when SUB = 1
    if SUB == 4:
        q1 = tl.load(q_row + 1, mask=row_ok[:, None], other=0.0).to(tl.float16)
        q2 = tl.load(q_row + 2, mask=row_ok[:, None], other=0.0).to(tl.float16)
        q3 = tl.load(q_row + 3, mask=row_ok[:, None], other=0.0).to(tl.float16)
    tile_q = tl.minimum(seq_q, ((row_tile + 1) * BLOCK_R - 1) // GROUP + 1)  # queries up to the tile's last
    start, end, past = _key_range(PAST_LENS, TOTAL_LENS, b, split, tile_q, kv_per_split, window, CAUSAL,
                                  HAS_WINDOW)  # fmt: skip
    pos_q = past + s_idx

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_R, HEAD_DIM // SUB], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_R, HEAD_DIM // SUB], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, HEAD_DIM // SUB], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_R, HEAD_DIM // SUB], dtype=tl.float32)
    slot = SLOTS + tl.load(SEQ_SLOTS + b).to(tl.int64) * slot_bytes
    table = BLOCK_TABLE + b64 * stride_tb
    closed = past // STAGE  # closed stages before this call's write
    c_hi = tl.minimum(end, closed * STAGE)  # this split's closed keys: [start, c_hi)
    j_lo = start // STAGE
    j_hi = tl.where(c_hi > start, (c_hi + STAGE - 1) // STAGE, j_lo)
    r_lo = start  # the records' keys: [r_lo, c_hi)
    if SINK_TOKENS > 0:
        # token sinks: once stage 0 has closed, positions < SINK_TOKENS are the slot's fp16 sink rows (K
        # rows, then V rows: an open run of SINK_TOKENS rows at closed = 0, all below past, in tiles of
        # SINK_BLOCK_N); the stairs skip them
        r_lo = tl.maximum(start, SINK_TOKENS)
        sink_rows = (slot + SINK_ROWS_OFFSET).to(tl.pointer_type(tl.float16))
        acc0, acc1, acc2, acc3, m_i, l_i = _open_run(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, start, tl.minimum(c_hi, SINK_TOKENS),
            past, 0, sink_rows, K_NEW, V_NEW, stride_ks, stride_vs, kv_h, qk_scale, window, SINK_TOKENS,
            WIDTH, HEAD_DIM, SUB, SINK_BLOCK_N, CAUSAL, HAS_WINDOW)  # fmt: skip
    # stair i holds the stages aged AGE_i .. AGE_i + COUNTi - 1 (AGE_i: the counts above it), i.e. logical
    # stages [closed - AGE_i - COUNTi, closed - AGE_i); sinks (< SINK) keep their records; the bottom the rest
    AGE1: tl.constexpr = COUNT0
    AGE2: tl.constexpr = COUNT0 + COUNT1
    AGE3: tl.constexpr = COUNT0 + COUNT1 + COUNT2
    if SINK > 0:
        lo = j_lo
        hi = tl.minimum(j_hi, SINK)
        acc0, acc1, acc2, acc3, m_i, l_i = _stair_run(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, lo, hi, r_lo, c_hi, slot, table, kv_h,
            qk_scale, window, SINK_OFFSET, SINK, False, BITS0, STAGE, WIDTH, V_GROUP, HEAD_GROUPS, HEAD_DIM,
            SUB, BLOCK_N, CAUSAL, HAS_WINDOW)  # fmt: skip
    if COUNT0 > 0:
        lo = tl.maximum(tl.maximum(closed - AGE1, SINK), j_lo)
        hi = tl.minimum(closed, j_hi)
        acc0, acc1, acc2, acc3, m_i, l_i = _stair_run(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, lo, hi, r_lo, c_hi, slot, table, kv_h,
            qk_scale, window, RING0, COUNT0, False, BITS0, STAGE, WIDTH, V_GROUP, HEAD_GROUPS, HEAD_DIM,
            SUB, BLOCK_N, CAUSAL, HAS_WINDOW)  # fmt: skip
    if COUNT1 > 0:
        lo = tl.maximum(tl.maximum(closed - AGE2, SINK), j_lo)
        hi = tl.minimum(closed - AGE1, j_hi)
        acc0, acc1, acc2, acc3, m_i, l_i = _stair_run(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, lo, hi, r_lo, c_hi, slot, table, kv_h,
            qk_scale, window, RING1, COUNT1, False, BITS1, STAGE, WIDTH, V_GROUP, HEAD_GROUPS, HEAD_DIM,
            SUB, BLOCK_N, CAUSAL, HAS_WINDOW)  # fmt: skip
    if COUNT2 > 0:
        lo = tl.maximum(tl.maximum(closed - AGE3, SINK), j_lo)
        hi = tl.minimum(closed - AGE2, j_hi)
        acc0, acc1, acc2, acc3, m_i, l_i = _stair_run(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, lo, hi, r_lo, c_hi, slot, table, kv_h,
            qk_scale, window, RING2, COUNT2, False, BITS2, STAGE, WIDTH, V_GROUP, HEAD_GROUPS, HEAD_DIM,
            SUB, BLOCK_N, CAUSAL, HAS_WINDOW)  # fmt: skip
    lo = tl.maximum(SINK, j_lo)
    hi = tl.minimum(closed - AGE3, j_hi)
    acc0, acc1, acc2, acc3, m_i, l_i = _stair_run(
        acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, lo, hi, r_lo, c_hi, POOL, table, kv_h,
        qk_scale, window, 0, 1, True, BOTTOM_BITS, STAGE, WIDTH, V_GROUP, HEAD_GROUPS, HEAD_DIM, SUB, BLOCK_N,
        CAUSAL, HAS_WINDOW)  # fmt: skip
    tail = slot.to(tl.pointer_type(tl.float16))
    k_new, v_new = K_NEW + b64 * stride_kb, V_NEW + b64 * stride_vb
    acc0, acc1, acc2, acc3, m_i, l_i = _open_run(
        acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, pos_q, tl.maximum(start, closed * STAGE), end, past,
        closed, tail, k_new, v_new, stride_ks, stride_vs, kv_h, qk_scale, window, STAGE, WIDTH, HEAD_DIM, SUB,
        BLOCK_N, CAUSAL, HAS_WINDOW)  # fmt: skip

    # each sub-tile to its output channels (strided stores); the first call also stores the row stats
    _store_result(acc0, cols, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split, rows,
                  s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP,
                  HEAD_DIM, HEAD_DIM, BLOCK_R, SPLIT, False, True)  # fmt: skip
    if SUB == 4:
        _store_result(acc1, cols + 1, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split,
                      rows, s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES,
                      GROUP, HEAD_DIM, HEAD_DIM, BLOCK_R, SPLIT, False, False)  # fmt: skip
        _store_result(acc2, cols + 2, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split,
                      rows, s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES,
                      GROUP, HEAD_DIM, HEAD_DIM, BLOCK_R, SPLIT, False, False)  # fmt: skip
        _store_result(acc3, cols + 3, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split,
                      rows, s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES,
                      GROUP, HEAD_DIM, HEAD_DIM, BLOCK_R, SPLIT, False, False)  # fmt: skip


# ---------------------------------------------------------------------------------------------- read


def kernel_supports(fmt: SaqFormat, head_dim: int) -> bool:
    """Whether ``flash_attention_decode_saq`` takes this format and head size (else: attention_saq_torch)."""
    return (
        head_dim in HEAD_DIMS
        and len(fmt.stairs) <= MAX_STAIRS
        and (head_dim % fmt.v_group == 0 or fmt.v_group % head_dim == 0)
    )


def flash_attention_decode_saq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    seq_slots: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    fmt: SaqFormat,
    causal: bool = True,
    sliding_window: int = 0,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """The node's read (module docstring): o [B, S, Hq*D] over the cache as it is (nothing written).
    ``num_splits`` None picks the split count from the shapes; ``config`` overrides the tile config."""
    _check_inputs(q, k, v, kv_pool, kv_slots, block_table, past_lens, total_lens, seq_slots, num_heads,
                  num_kv_heads, fmt, sliding_window)  # fmt: skip
    block_table = block_table.contiguous()
    batch, seq_q, _ = q.shape
    head_dim = q.shape[2] // num_heads
    group = num_heads // num_kv_heads
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if batch == 0:
        return o
    if config is None:
        config = SAQ_DECODE_CONFIGS[head_dim] if q.is_cuda else INTERPRETER_CONFIG
    block_n = min(config.block_n, max(16, triton.next_power_of_2(fmt.stage)))
    rows = group * seq_q
    block_r = max(16, min(triton.next_power_of_2(rows), MAX_ROWS_PER_PROGRAM))
    row_tiles = triton.cdiv(rows, block_r)
    max_keys = (block_table.shape[1] + 1) * fmt.stage  # total // stage <= max_blocks
    programs = batch * num_kv_heads * row_tiles
    if num_splits is None:
        num_splits = _num_splits(programs, max_keys, fmt.stage, head_dim, q.device)
    kv_per_split = triton.cdiv(triton.cdiv(max_keys, max(num_splits, 1)), fmt.stage) * fmt.stage
    num_splits = max(1, triton.cdiv(max_keys, kv_per_split))
    rows_padded = row_tiles * block_r
    split = num_splits > 1
    part_shape = (batch * num_kv_heads * rows_padded, num_splits) if split else (1, 1)
    o_part = torch.empty(*part_shape, head_dim, device=q.device, dtype=torch.float32)
    m_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    l_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    _saq_decode_kernel[(programs, num_splits)](
        q, k, v, kv_pool, kv_slots, block_table, past_lens, total_lens, seq_slots, o, o_part, o_part, m_part,
        l_part, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        block_table.stride(0), o.stride(0), o.stride(1), kv_slots.stride(0),
        seq_q, kv_per_split, scale * LOG2E, sliding_window, num_kv_heads, row_tiles,
        GROUP=group, HEAD_DIM=head_dim, SUB=_sub_tiles(fmt, head_dim), BLOCK_R=block_r, BLOCK_N=block_n,
        SINK_BLOCK_N=min(block_n, max(16, triton.next_power_of_2(fmt.sink_tokens))),  # dots take >= 16
        **_format_constants(fmt, head_dim),
        CAUSAL=causal, HAS_WINDOW=sliding_window > 0, SPLIT=split,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split:
        _decode_merge_kernel[(batch * num_kv_heads, rows)](
            o_part, m_part, l_part, o, o_part, o.stride(0), o.stride(1), num_splits, num_kv_heads,
            rows_padded, seq_q, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_dim,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), RETURN_LSE=False,
            num_warps=4 if q.is_cuda else 1,
        )  # fmt: skip
    return o


def _sub_tiles(fmt: SaqFormat, head_dim: int) -> int:
    """4: q, the codes and the accumulator split into quarter heads by channel % 4 (one word load per
    token row and quarter head: _unpack_codes) for heads of 128 and V groups of a multiple of 4
    channels. Else 1 (each channel's byte loaded and shifted): quarter heads of 8 channels (D=32) would
    be dots below 16, and at D=64 the 16-channel dots were slower than the per-channel loads (H100,
    2026-11-25: 33.5 vs 31.6 us at B=1, 216 vs 157 us at B=8, 32k tokens, 9/3 heads)."""
    return 4 if head_dim >= 128 and min(fmt.v_group, head_dim) % 4 == 0 else 1


def _format_constants(fmt: SaqFormat, head_dim: int) -> dict:
    """The kernel's constexprs: the layout, and (bits, count, ring offset) of up to 3 upper stairs."""
    upper = [(bits, count, fmt.ring_offset(i)) for i, (bits, count) in enumerate(fmt.stairs[:-1])]
    upper += [(fmt.stairs[0][0], 0, 0)] * (MAX_STAIRS - 1 - len(upper))
    constants = dict(
        STAGE=fmt.stage, WIDTH=fmt.width, V_GROUP=fmt.v_group, HEAD_GROUPS=max(head_dim // fmt.v_group, 1),
        SINK=fmt.sink, SINK_OFFSET=fmt.sink_offset, SINK_TOKENS=fmt.sink_tokens,
        SINK_ROWS_OFFSET=fmt.sink_rows_offset, BOTTOM_BITS=fmt.stairs[-1][0],
    )  # fmt: skip
    for i, (bits, count, ring) in enumerate(upper):
        constants.update({f"BITS{i}": bits, f"COUNT{i}": count, f"RING{i}": ring})
    constants["BITS0"] = fmt.stairs[0][0]  # also the sinks' width
    return constants


def attention_saq_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    seq_slots: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    fmt: SaqFormat,
    causal: bool = True,
    sliding_window: int = 0,
) -> torch.Tensor:
    """The node's read in torch on q's device, for what the kernel does not take: each row's cache
    dequantized to fp32 (the spec's _SlotView.keys_values, stage by stage), then attention."""
    batch, seq_q, _ = q.shape
    head_dim = q.shape[-1] // num_heads
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, seq_q, num_heads * head_dim, device=q.device, dtype=torch.float32)
    table = block_table.cpu()
    for b, (past, total, slot) in enumerate(zip(*_host_lists(past_lens, total_lens, seq_slots))):
        if total == 0:
            continue
        view = _SlotView(kv_pool, kv_slots, slot, table[b], fmt)
        old_k, old_v = view.keys_values(past // fmt.stage, past)
        heads = [
            torch.cat([old, new[b, : total - past].half().float()])
            .view(total, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
            for old, new in ((old_k, k), (old_v, v))
        ]  # fmt: skip
        pos = torch.arange(seq_q, device=q.device).view(seq_q, 1) + past
        key = torch.arange(total, device=q.device).view(1, total)
        visible = torch.ones(seq_q, total, dtype=torch.bool, device=q.device)
        if causal:
            visible &= key <= pos
        if sliding_window > 0:
            visible &= pos - key < sliding_window
        qb = q[b].float().view(seq_q, num_heads, head_dim).transpose(0, 1)
        ob = F.scaled_dot_product_attention(qb, *heads, attn_mask=visible, scale=scale).nan_to_num(0.0)
        out[b] = ob.transpose(0, 1).reshape(seq_q, num_heads * head_dim)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------- write


def quantize_device(
    x: torch.Tensor, bits: int, dim: int, clip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels.kv_saq.quantize_asym on x's device: (codes uint8, lo fp16, scale fp16), lo/scale keeping
    `dim` as 1. Two differences in how, none in what: the clipping search tries every ratio at once (a
    leading axis of len(SAQ_CLIP_RATIOS); the first, largest, ratio of least error wins, as the spec's
    strict improvement), and the range is divided by `levels` held in a device tensor: on CUDA, torch
    divides by a Python number as a multiplication by its fp32 reciprocal, which can round an fp16 scale
    differently from the spec's division (seen on an H100)."""
    levels = (1 << bits) - 1
    xf = x.float()
    dim = dim % x.dim() + 1
    ratios = torch.tensor(SAQ_CLIP_RATIOS if clip else (1.0,), dtype=torch.float32, device=x.device)
    ratios = ratios.view(-1, *[1] * x.dim())
    low, high = xf.amin(dim - 1, keepdim=True), xf.amax(dim - 1, keepdim=True)
    lo = (low * ratios).half()
    scale = ((high * ratios - lo.float()) / torch.tensor(float(levels), device=x.device)).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((xf - lo.float()) / scale.float()).clamp(0, levels)
    if not clip:
        return codes[0].to(torch.uint8), lo[0], scale[0]
    err = ((lo.float() + codes * scale.float() - xf) ** 2).sum(dim, keepdim=True)
    best = err.argmin(0, keepdim=True)
    pick = lambda t: t.gather(0, best.expand(1, *t.shape[1:]))[0]  # noqa: E731
    return pick(codes).to(torch.uint8), pick(lo), pick(scale)


def encode_record_device(k: torch.Tensor, v: torch.Tensor, fmt: SaqFormat, bits: int) -> torch.Tensor:
    """kernels.kv_saq.encode_record on k's device: one closed stage (K, V float [stage, width]) -> its
    record, uint8 [fmt.record_bytes(bits)]."""
    return encode_records_device(k[None], v[None], fmt, bits)[0]


def encode_records_device(k: torch.Tensor, v: torch.Tensor, fmt: SaqFormat, bits: int) -> torch.Tensor:
    """N closed stages at once (K, V float [N, stage, width]) -> their records, uint8 [N, record_bytes]:
    encode_record of each, in one set of tensor ops (a stage close batched over layers and rows)."""
    clip, n = fmt.clipped(bits), k.shape[0]
    k_codes, k_lo, k_scale = quantize_device(k, bits, -2, clip)
    v_codes, v_lo, v_scale = quantize_device(v.unflatten(-1, (-1, fmt.v_group)), bits, -1, clip)
    parts = dict(
        k_lo=k_lo, k_scale=k_scale, v_lo=v_lo, v_scale=v_scale,
        k_codes=_pack(k_codes, bits), v_codes=_pack(v_codes.flatten(-2), bits),
    )  # fmt: skip
    records = torch.cat([parts[name].reshape(n, -1).view(torch.uint8) for name in fmt.record_fields(bits)], 1)
    assert records.shape[1] == fmt.record_bytes(bits)
    return records


def decode_records_device(
    records: torch.Tensor, fmt: SaqFormat, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.kv_saq.decode_record of N records at once: uint8 [N, record_bytes] -> (K, V) float32
    [N, stage, width], lo + code * scale."""
    n, S, W, g = records.shape[0], fmt.stage, fmt.width, fmt.v_group
    fields = fmt.record_fields(bits)
    field = lambda name: records[:, fields[name][0] : sum(fields[name])]  # noqa: E731
    half = lambda name: field(name).contiguous().view(torch.float16).float()  # noqa: E731
    k_codes = _unpack(field("k_codes").reshape(n, S, -1), bits).float()
    v_codes = _unpack(field("v_codes").reshape(n, S, -1), bits).float().view(n, S, W // g, g)
    k = half("k_lo")[:, None] + k_codes * half("k_scale")[:, None]
    v_lo, v_scale = (half(name).view(n, S, W // g, 1) for name in ("v_lo", "v_scale"))
    return k, (v_lo + v_codes * v_scale).flatten(-2)


def close_stage(view: _SlotView, stage: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """kernels.kv_saq._SlotView.close on the device: logical stage `stage` closes with (k, v) [stage,
    width]; the stages leaving a stair move one down, bottom first, re-quantized from what they hold
    (equal widths copy bytes); sinks stay. Then the new stage is encoded at the top stair (stage 0 with
    token sinks: its first sink_tokens rows to the sink rows, the record from sink_stand_in's rows)."""
    close_stages([view], [stage], k[None], v[None])


def close_stages(views: list[_SlotView], stages: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """close_stage for N sequences or layers at once (views[i] closes its logical stage stages[i] with
    k[i], v[i], [stage, width]): each stair's moves and the new stages are re-quantized in one batch.
    Every view is another (layer, sequence): one stage closes per view. k and v are only read (they
    may not alias the slots' sink rows or records)."""
    fmt = views[0].fmt
    first_age = [sum(count for _, count in fmt.stairs[:i]) for i in range(len(fmt.stairs))]
    for i in range(len(fmt.stairs) - 2, -1, -1):
        moves = [(view, j - first_age[i] - fmt.stairs[i][1]) for view, j in zip(views, stages)]
        moves = [(view, leaving) for view, leaving in moves if leaving >= fmt.sink]
        if not moves:
            continue
        src = [view.record(i, leaving) for view, leaving in moves]
        dst = [view.record(i + 1, leaving) for view, leaving in moves]
        (bits, _), (low, _) = fmt.stairs[i], fmt.stairs[i + 1]
        if bits != low:
            src = encode_records_device(*decode_records_device(torch.stack(src), fmt, bits), fmt, low)
        for target, record in zip(dst, src):
            target.copy_(record)
    k, v = _keep_token_sinks(views, stages, k, v)
    for view, j, record in zip(views, stages, encode_records_device(k, v, fmt, fmt.stairs[0][0])):
        view.record(0, j).copy_(record)


def _keep_token_sinks(
    views: list[_SlotView], stages: list[int], k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The views closing stage 0 copy its first sink_tokens rows of k and v into their sink rows (fp16);
    returns the rows to encode: k, v with kernels.kv_saq.sink_stand_in applied to those stages, new
    tensors (the caller's k, v are left as they are)."""
    n = views[0].fmt.sink_tokens
    first = [i for i, j in enumerate(stages) if j == 0]
    if not n or not first:
        return k, v
    k, v = k.clone(), v.clone()
    for i in first:
        views[i].sink_rows(0).copy_(k[i, :n])
        views[i].sink_rows(1).copy_(v[i, :n])
        k[i], v[i] = sink_stand_in(k[i], n), sink_stand_in(v[i], n)
    return k, v


def open_stage_tails(kv_slots: torch.Tensor, fmt: SaqFormat) -> torch.Tensor:
    """Every slot's open stage as a view: fp16 [num_slots, 2 (K, V), stage, width] (SaqFormat layout)."""
    return kv_slots.view(torch.float16)[:, : 2 * fmt.stage * fmt.width].view(-1, 2, fmt.stage, fmt.width)


def write_kv_saq(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    seq_slots: torch.Tensor,
    *,
    fmt: SaqFormat,
) -> None:
    """The node's write (paged_attention_saq_ref), in place: per row, the open stage's rows and the new
    tokens form one run from position (past // stage) * stage; every stage it completes closes, the
    rest becomes the tail. Reads the lengths on the host (one sync when they live on the device)."""
    stage = fmt.stage
    tails = open_stage_tails(kv_slots, fmt)
    table = None
    tail_rows = []  # (slot, tail row, b, s): new tokens that stay in the open stage
    for b, (past, total, slot) in enumerate(zip(*_host_lists(past_lens, total_lens, seq_slots))):
        first, closed = past // stage, total // stage
        if closed > first:
            table = block_table.cpu() if table is None else table
            view = _SlotView(kv_pool, kv_slots, slot, table[b], fmt)
            old = past - first * stage  # the open stage's rows: the run's first
            run = [torch.cat([tails[slot, i, :old].float(), x[b, : total - past].half().float()]) for i, x in
                   enumerate((k, v))]  # fmt: skip
            for j in range(first, closed):
                rows = slice((j - first) * stage, (j - first + 1) * stage)
                close_stage(view, j, run[0][rows], run[1][rows])
        for position in range(max(past, closed * stage), total):
            tail_rows.append((slot, position - closed * stage, b, position - past))
    if tail_rows:
        slot, row, b, s = torch.tensor(tail_rows, device=k.device).T
        tails[slot, 0, row] = k[b, s].half()
        tails[slot, 1, row] = v[b, s].half()


# ---------------------------------------------------------------------------------------------- node


def paged_attention_saq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    seq_slots: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    fmt: SaqFormat,
    causal: bool = True,
    sliding_window: int = 0,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FlashAttentionSaq node (paged_attention_saq_ref): attend, then write; the cache is updated in
    place: (o, kv_pool, kv_slots). ``use_kernel`` None: the Triton kernel on CUDA tensors when
    ``kernel_supports`` the format, else attention_saq_torch. The lengths and slots may be given on the
    host (no sync) or on the device."""
    head_dim = q.shape[-1] // num_heads
    if use_kernel is None:
        use_kernel = q.is_cuda and kernel_supports(fmt, head_dim)
    lens = [x.to(q.device, torch.int32) for x in (block_table, past_lens, total_lens, seq_slots)]
    attend = flash_attention_decode_saq if use_kernel else attention_saq_torch
    o = attend(q, k, v, kv_pool, kv_slots, *lens, num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale,
               fmt=fmt, causal=causal, sliding_window=sliding_window)  # fmt: skip
    write_kv_saq(k, v, kv_pool, kv_slots, block_table, past_lens, total_lens, seq_slots, fmt=fmt)
    return o, kv_pool, kv_slots


def _host_lists(*tensors: torch.Tensor) -> list[list[int]]:
    """The lengths and slots as Python ints: one device-to-host copy for all of them."""
    if tensors[0].is_cuda:
        return torch.stack([t.to(torch.int64) for t in tensors]).tolist()
    return [t.tolist() for t in tensors]


def _check_inputs(q, k, v, kv_pool, kv_slots, block_table, past_lens, total_lens, seq_slots, num_heads,
                  num_kv_heads, fmt, sliding_window) -> None:  # fmt: skip
    if q.dim() != 3 or q.dtype not in DTYPES or q.stride(2) != 1:
        raise ValueError(f"q must be float16/bfloat16/float32 [B, S, Hq*D] with a contiguous last axis, got "
                         f"{q.dtype} {tuple(q.shape)}")  # fmt: skip
    if num_kv_heads <= 0 or num_heads % num_kv_heads or q.shape[2] % num_heads:
        raise ValueError(f"num_heads {num_heads} / num_kv_heads {num_kv_heads} do not fit q width "
                         f"{q.shape[2]}")  # fmt: skip
    head_dim = q.shape[2] // num_heads
    if fmt.width != num_kv_heads * head_dim:
        raise ValueError(f"SAQ format width {fmt.width} is not num_kv_heads * head_dim = "
                         f"{num_kv_heads * head_dim}")  # fmt: skip
    if not kernel_supports(fmt, head_dim):
        raise ValueError(f"the SAQ kernel takes head_dim in {HEAD_DIMS} (got {head_dim}), at most "
                         f"{MAX_STAIRS} stairs and V groups aligned with heads (got {fmt.text()}); use "
                         "attention_saq_torch")  # fmt: skip
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0, got {sliding_window}")
    batch, seq_q, _ = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape != (batch, seq_q, fmt.width) or x.stride(2) != 1 or x.device != q.device:
            raise ValueError(f"{name} must be [{batch}, {seq_q}, {fmt.width}] on {q.device} with a "
                             f"contiguous last axis, got {tuple(x.shape)} on {x.device}")  # fmt: skip
    for name, x, cols in (("kv_pool", kv_pool, fmt.block_bytes), ("kv_slots", kv_slots, fmt.slot_bytes)):
        if x.dtype != torch.uint8 or x.dim() != 2 or x.shape[1] != cols or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous uint8 [N, {cols}] for {fmt.text()}, got {x.dtype} "
                             f"{tuple(x.shape)}")  # fmt: skip
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    for name, x, rank in (("block_table", block_table, 2), ("past_lens", past_lens, 1),
                          ("total_lens", total_lens, 1), ("seq_slots", seq_slots, 1)):  # fmt: skip
        if x.dtype != torch.int32 or x.dim() != rank or x.shape[0] != batch or x.device != q.device:
            raise ValueError(f"{name} must be int32 with {batch} rows on {q.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")  # fmt: skip
