"""Split-KV decode attention in Triton that reads the int8 / int4 KV pool directly, and its write path.

Contract: ``kernels.kv_quant.paged_attention_quant_ref`` (the ``fastattention::FlashAttention`` node with
a quantized pool); formats, scales and the K smoothing are specified bit for bit in kernels/kv_quant.py.

- q [B, S, Hq*D] fp16 or bf16, 1 <= S <= 16 query tokens per row, heads interleaved as
  ``x.view(B, S, Hq, D)``; o [B, S, Hq*D] in q's dtype (or ``out_dtype``).
- Pools, [num_blocks, block_size, .] with the paged layout of kernels/reference.py (block_size a power
  of two): k_codes, v_codes int8 [.., Hkv*D] (int8) or uint8 [.., Hkv*D/2] (int4, two channels per byte,
  low nibble = even channel); k_scales, v_scales fp16 [.., Hkv*D / group] (group D for int8, 32 for int4).
  The keys in the pool are smoothed (k - k_mean); the mean is never added back (softmax ignores it).
- block_table, past_lens, total_lens, causal (bottom-right: query s of row b sits at past_lens[b] + s),
  sliding_window, return_lse: exactly as kernels/attention_triton_decode.py.
- head_dim D in {64, 80, 96, 128} for int8; {64, 128} for int4 (a 32-channel scale group then never
  straddles two heads, and the half-width nibble tiles are powers of two).

No dequantized copy of the pool is made: each program loads a tile of codes and its scales and
dequantizes in registers. int8: Q.K^T runs on the int8 tensor cores over the codes as stored: each q row
is split into two int8 digits, q ~ sq (q_hi + q_lo / 254) with sq = max|q row| / 127 (about 15 bits,
finer than fp16), and scores = (254 q_hi.k + q_lo.k) (exact in int32) * sq / 254 * k_scale per key (the
scale is per token and head, so it leaves the dot); V's per-token scale is folded into the probabilities
before P.V. int4: a byte tile splits into its even and odd channels, each times its group's scale (fp16,
rounded once as the reference's fp32 product); q is held as its even and odd channels, so QK^T is two
half-width dots and P.V fills two half-width accumulators (even and odd output channels). P.V runs in
fp16 with fp32 accumulation.

On the GPU, V codes (and int4 K codes) become fp16 through PTX bit tricks (four codes per 32-bit word in
a few integer and f16x2 instructions) instead of per-code int-to-float conversions, which are
quarter-rate and made the kernels compute-bound; the interpreter, which has no PTX, converts with plain
casts (the same values: every code is exact in fp16). V is converted in its row-major load layout and
reaches the tensor cores as fp16 through ldmatrix.trans: converted in the dot-operand layout
(consecutive keys per thread, a row apart) it would be read from shared memory one byte at a time.

Everything else is the fp16 kernel's algorithm (flash-decoding): a program owns all GROUP*S query rows
of one (row b, KV head) as one tile, streams its split of the keys through an online softmax in base 2,
and ``kernels.attention_triton_decode._decode_merge_kernel`` merges the splits (same partial layout).
A program's first tile starts on a BLOCK_N boundary, so a tile's rows sit at fixed slots of whole pages
and need no mask (keys past the range read block 0's finite codes, with zero scales).

Where the time goes (H100, 2026-11-26; SASS of the 128-key, 4-warp programs tuned before the prefetch
below): the int8 loop issues 747 instructions per warp per tile (160 convert V, 64 are tensor-core ops, 13
barriers; most of the rest is the softmax and scaling of a 16-row tile that holds 4 real rows at GQA 4 and
one query token), int4 1089 (452 convert K and V). At about 0.3 instructions issued per scheduler cycle
these counts bound the time, not bytes (B8 32k: int8 reads 2.5 TB/s, int4 1.3). Tried and slower: every
warp owning its own keys (3-D dots, no cross-warp softmax: 876 instructions at 253 registers, 250-313 us
vs 214); V converted to 1152 + code (dropping the f16x2 subtraction; summing the correction costs what it
saves); and the tiles every row sees in full run in a loop of their own without the mask (10-12% fewer
instructions there, yet int8 only 2.5% faster at B8 32k and 4% slower at B1 8k, int4 7% slower, the fp16
kernel no faster): so the loops are latency-bound rather than issue-bound, and counting instructions does
not predict them. ncu at B8 32k (2026-11-26): int8 reads DRAM at 75% of peak (fp16 86%), 2.9 warps
resident and 0.4 eligible per scheduler; its stall samples are long scoreboard 30%, short scoreboard 22%,
wait 15%, barrier 9% (a quarter of all samples on one barrier behind global-memory data); int4 is short
scoreboard 34% (shared memory and conversion chains) at DRAM 30%. Loading every head's scales of a key as
one 16-byte asynchronous copy (instead of one 2-byte gather per key) and picking the column in registers
made int8 26% slower. The barrier was the loop's head: with the block-table lookup in the same iteration
as the code loads it feeds, Triton issued a tile's copies at the end of the iteration before and waited
for all of them at the top (SASS: the copies at 88-99% of the loop body, `DEPBAR.LE SB0, 0x0` at its head,
for 2 and 3 stages alike), so no copy was in flight while a program computed. The int8 kernel therefore
fetches the next tile's entries one iteration ahead; its copies are then num_stages - 1 tiles deep
(`DEPBAR.LE SB0, 0x2` at 3 stages), which with the retuned tiles (QUANT_DECODE_CONFIGS) gained 4-7% at B8
and B1 32k. Then a quarter of the stall samples sat on one shared-memory store of a scale loaded in the
same iteration (a 2-byte gather is a plain load, not an asynchronous copy, so the store waited out its
whole latency); fetching the next tile's scales a tile ahead too gained another 5-7% (B8 32k 192.5 us,
1.89x the fp16 kernel) The timings of every variant above, with the baseline of the same run, and the ncu
summaries: benchmarks/results/kv_quant_gpu_experiments.json.

``write_kv_cache_quant`` is the write side: one program per new token quantizes its K (after subtracting
k_mean, rounded to the smoothing dtype as the reference's ``k - k_mean`` is) and V rows into their slots,
bit for bit as ``quantize_kv_ref`` (fp32 divisions correctly rounded, round-half-even, no FMA fusion).
``paged_attention_quant`` runs both, like the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention_triton_decode import (
    LOG2E,
    MAX_PARTIAL_ELEMENTS,
    MAX_QUERY_TOKENS,
    MAX_ROWS_PER_PROGRAM,
    _decode_merge_kernel,
    _key_range,
    _program_tile,
    _sm_count,
    _softmax_step,
    _store_result,
    _table_entries,
)
from kernels.kv_formats import INT4_GROUP, KV_QUANT_FORMATS, code_width, group_size

HEAD_DIMS = {"int8": (64, 80, 96, 128), "int4": (64, 128)}
DTYPES = (torch.float16, torch.bfloat16)
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 half to even
Q_LO_STEPS = tl.constexpr(254)  # int8 decode: q's second int8 digit, in steps of 1/254 of the first's


@dataclass(frozen=True)
class QuantDecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 3  # the split count aims at one wave of this many programs per SM
    maxnreg: int | None = None  # register cap per thread (None: the compiler's choice)


# Tile configs by format, tuned on an NVIDIA H100 80GB HBM3 (sm_90, triton 3.6, torch 2.11) by
# `python -m benchmarks.kv_quant_gpu --decode-only` (times QUANT_CANDIDATES at B=8, N=32k, 32/8 heads of
# 128, and records them in benchmarks/results/kv_quant_gpu.json). Re-tune on another card with the same
# command. The kernels are latency-bound (module docstring), so occupancy and copies in flight pay:
# register caps (int4 240.3 us at 168, three programs per SM, vs 268.8 us uncapped), splits for one full
# wave. int8, 2026-11-26 (same card), with the next tile's block-table entries and scales fetched a tile
# ahead: 64-key tiles of 2 warps, 3 deep, 4 programs per SM (55 KB of shared memory each) take 192.5-194.0
# us at B8 32k, 55.8 at B8 8k, 32.5 at B1 32k, 14.7 at B1 8k, against 204-206 / 59.4-59.8 / 35.0-35.2 /
# 15.6 with the entries alone fetched ahead and 214.8 / 61.8 / 37.7 / 15.5 with neither (then 128-key
# tiles of 4 warps, 2 deep, were best); 1-warp programs of 32 keys, 128-key tiles and 4-deep pipelines
# were all slower. The same prefetch made int4 28-57% slower (its scales are per byte, [keys, groups, 1];
# loaded as one 8-byte row per key and carried ahead instead, still 6-25% slower at B8) and the fp16
# kernel 4-20% slower at B8, so they keep the lookup in the loop. Earlier (2026-11-26, 26
# configs): 8 warps, 256-key tiles and 4 programs of 128 keys per SM were 10-60% slower; int4 64-key
# tiles of 2 warps at 8 programs per SM tie at B8 32k and lose at B1 8k (17.8 vs 16.3 us) and B8 8k (73.5
# vs 69.2).
QUANT_DECODE_CONFIGS = {
    "int8": QuantDecodeConfig(64, 2, 3, programs_per_sm=4),
    "int4": QuantDecodeConfig(128, 4, 3, programs_per_sm=3, maxnreg=168),
}
QUANT_CANDIDATES = {
    "int8": [
        QuantDecodeConfig(64, 2, 3, 4),
        QuantDecodeConfig(32, 1, 3, 7),
        QuantDecodeConfig(128, 4, 3, 2, 128),
        QuantDecodeConfig(128, 4, 2, 3, 128),
    ],
    "int4": [
        QuantDecodeConfig(128, 4, 3, 3, 168),
        QuantDecodeConfig(128, 4, 4, 3, 168),
        QuantDecodeConfig(128, 4, 3, 3),
    ],
}
INTERPRETER_CONFIG = QuantDecodeConfig(16, 1, 1, 4)  # 4 programs on the interpreter's 4 "SMs": tests split


# ---------------------------------------------------------------- codes to fp16

# int8 codes -> fp16, four per 32-bit word (the FasterTransformer trick): x ^ 0x80 is x + 128 as an
# unsigned byte; under the fp16 exponent of 1024 (high byte 0x64) it reads 1024 + x + 128, and an f16x2
# subtraction of 1152 leaves x, exactly. Output pairs: (code 0, code 1), (code 2, code 3) of the word.
S8_TO_F16_ASM = tl.constexpr("""{
.reg .b32 t, m;
xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64806480;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
sub.rn.f16x2 $0, $0, m;
sub.rn.f16x2 $1, $1, m;
}""")
# int4 bytes -> (even channel * scale, odd channel * scale) fp16, four bytes per word: bytes 0-1 and 2-3
# are spread to the 16-bit halves of y0 and y1; a nibble n (two's complement) masked under 1024's exponent
# and xor-ed with 8 reads 1024 + n + 8 (low nibble: subtract 1032) or 1024 + 16 (n + 8) (high nibble:
# times 1/16, minus 72), both exact; times the bytes' scales ($5, $6, in pairs) rounds once, as the
# reference's fp32 product rounded to fp16. $0, $1: even channels of bytes 0-3; $2, $3: odd channels.
U4X2_TO_F16_ASM = tl.constexpr("""{
.reg .b32 y0, y1, lo, hi, sixteenth;
prmt.b32 y0, $4, 0, 0x4140;
prmt.b32 y1, $4, 0, 0x4342;
mov.b32 lo, 0x64086408;
mov.b32 hi, 0xd480d480;
mov.b32 sixteenth, 0x2c002c00;
lop3.b32 $0, y0, 0x000f000f, 0x64086408, 0x6a;
lop3.b32 $1, y1, 0x000f000f, 0x64086408, 0x6a;
lop3.b32 $2, y0, 0x00f000f0, 0x64806480, 0x6a;
lop3.b32 $3, y1, 0x00f000f0, 0x64806480, 0x6a;
sub.rn.f16x2 $0, $0, lo;
sub.rn.f16x2 $1, $1, lo;
fma.rn.f16x2 $2, $2, sixteenth, hi;
fma.rn.f16x2 $3, $3, sixteenth, hi;
mul.rn.f16x2 $0, $0, $5;
mul.rn.f16x2 $1, $1, $6;
mul.rn.f16x2 $2, $2, $5;
mul.rn.f16x2 $3, $3, $6;
}""")


@triton.jit
def _int8_to_f16(codes, FAST: tl.constexpr):
    """int8 V codes -> fp16, exact. FAST: the PTX above (the interpreter has none), marked impure so that
    Triton converts in the load's row-major layout and moves fp16 to the dot operand (ldmatrix.trans)
    rather than hoisting the conversion behind that move (module docstring)."""
    if FAST:
        return tl.inline_asm_elementwise(S8_TO_F16_ASM, "=r,=r,r", [codes], dtype=tl.float16, is_pure=False,
                                         pack=4)  # fmt: skip
    return codes.to(tl.float16)


@triton.jit
def _int4_to_f16(byte, scale, FAST: tl.constexpr, KEEP_LAYOUT: tl.constexpr):
    """uint8 bytes, fp16 scales of their shape -> (even channel, odd channel) * scale, fp16 rounded once.
    KEEP_LAYOUT (for V) marks the asm impure, as in _int8_to_f16; K's is hoisted into its dot operand."""
    if FAST:
        return tl.inline_asm_elementwise(U4X2_TO_F16_ASM, "=r,=r,=r,=r,r,r,r", [byte, scale],
                                         dtype=(tl.float16, tl.float16), is_pure=not KEEP_LAYOUT,
                                         pack=4)  # fmt: skip
    byte = byte.to(tl.int32)
    scale = scale.to(tl.float32)
    even = (((byte & 15) ^ 8) - 8).to(tl.float32) * scale
    odd = ((((byte >> 4) & 15) ^ 8) - 8).to(tl.float32) * scale
    return even.to(tl.float16), odd.to(tl.float16)


# ---------------------------------------------------------------- the read kernels


@triton.jit
def _decode_int8_kernel(
    Q, K_CODES, V_CODES, K_SCALES, V_SCALES, BLOCK_TABLE, PAST_LENS, TOTAL_LENS, OUT, LSE, O_PART, M_PART,
    L_PART, stride_qb, stride_qs, stride_kb, stride_kt, stride_vb, stride_vt, stride_ksb, stride_kst,
    stride_vsb, stride_vst, stride_tb, stride_ob, stride_os,
    seq_q, kv_per_split, qk_scale, window, NUM_KV_HEADS, NUM_ROW_TILES,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    b, kv_h, split, row_tile, rows, s_idx, head, row_ok = _program_tile(
        seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP, BLOCK_R
    )
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_offs = b64 * stride_qb + s_idx[:, None] * stride_qs + head[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q_hi, q_lo, row_scale = _split_q(q)
    row_scale = row_scale * qk_scale
    start, end, past = _key_range(PAST_LENS, TOTAL_LENS, b, split, seq_q, kv_per_split, window, CAUSAL,
                                  HAS_WINDOW)  # fmt: skip
    start = start // BLOCK_N * BLOCK_N  # tile-aligned: the keys this adds before a window's are masked
    pos_q = past + s_idx

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    table = BLOCK_TABLE + b64 * stride_tb
    offs_n = tl.arange(0, BLOCK_N)
    # tile row i: page block_table[(n + i) // PAGE_SIZE], slot n % PAGE_SIZE + i % PAGE_SIZE (n aligned)
    k_tile = (offs_n % PAGE_SIZE)[:, None] * stride_kt + kv_h * HEAD_DIM + offs_d[None, :]
    v_tile = (offs_n % PAGE_SIZE)[:, None] * stride_vt + kv_h * HEAD_DIM + offs_d[None, :]
    # the next tile's block-table entries and scales are fetched one iteration ahead, so that the code
    # copies pipeline and the scale gathers' latency is hidden (module docstring, "where the time goes")
    strides = (stride_ksb, stride_kst, stride_vsb, stride_vst)
    block = _table_entries(table, start + offs_n, end, PAGE_SIZE)
    k_scale, v_scale = _int8_scales(K_SCALES, V_SCALES, block, start, offs_n, end, kv_h, strides, PAGE_SIZE)
    for n in range(start, end, BLOCK_N):
        pos_k = n + offs_n
        k_ok = pos_k < end
        first = n % PAGE_SIZE
        block_next = _table_entries(table, pos_k + BLOCK_N, end, PAGE_SIZE)
        k_scale_next, v_scale_next = _int8_scales(
            K_SCALES, V_SCALES, block_next, n + BLOCK_N, offs_n, end, kv_h, strides, PAGE_SIZE
        )
        k = _load_codes(K_CODES + block * stride_kb + first * stride_kt, k_tile, d_ok, HEAD_DIM, BLOCK_D)
        v = _load_codes(V_CODES + block * stride_vb + first * stride_vt, v_tile, d_ok, HEAD_DIM, BLOCK_D)
        s = (tl.dot(q_hi, tl.trans(k)) * Q_LO_STEPS + tl.dot(q_lo, tl.trans(k))).to(tl.float32)
        s = s * row_scale[:, None] * k_scale.to(tl.float32)[None, :]
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL, HAS_WINDOW)
        p_scaled = (p * v_scale.to(tl.float32)[None, :]).to(tl.float16)
        acc = tl.dot(p_scaled, _int8_to_f16(v, FAST), acc * alpha[:, None])
        block, k_scale, v_scale = block_next, k_scale_next, v_scale_next

    _store_result(acc, offs_d, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split, rows,
                  s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP,
                  HEAD_DIM, BLOCK_D, BLOCK_R, SPLIT, RETURN_LSE, True)  # fmt: skip


@triton.jit
def _int8_scales(K_SCALES, V_SCALES, block, n, offs_n, end, kv_h, strides, PAGE_SIZE: tl.constexpr):
    """Head kv_h's K and V scales of the keys n + offs_n (n tile-aligned) in their blocks, 0 from `end` on;
    strides: the scale pools' (block, slot) strides, K's then V's."""
    stride_ksb, stride_kst, stride_vsb, stride_vst = strides
    k_ok = n + offs_n < end
    slot = n % PAGE_SIZE + offs_n % PAGE_SIZE
    k_scale = tl.load(K_SCALES + block * stride_ksb + slot * stride_kst + kv_h, mask=k_ok, other=0.0)
    v_scale = tl.load(V_SCALES + block * stride_vsb + slot * stride_vst + kv_h, mask=k_ok, other=0.0)
    return k_scale, v_scale


@triton.jit
def _split_q(q):
    """q [R, D] fp32 -> (q_hi, q_lo int8, row scale sq / Q_LO_STEPS) with q ~ sq (q_hi + q_lo / Q_LO_STEPS),
    sq = max|q row| / 127: q to about 15 bits, finer than fp16, so that Q.K^T runs on the int8 tensor
    cores over the codes as stored; Q_LO_STEPS q_hi.k + q_lo.k stays below 2**31 for D <= 128."""
    sq = tl.max(tl.abs(q), 1) / 127.0
    sq = tl.where(sq > 0.0, sq, 1.0)
    x = q / sq[:, None]
    hi = (x + ROUND_MAGIC) - ROUND_MAGIC
    lo = ((x - hi) * Q_LO_STEPS + ROUND_MAGIC) - ROUND_MAGIC
    lo = tl.minimum(tl.maximum(lo, -127.0), 127.0)
    return hi.to(tl.int8), lo.to(tl.int8), sq / Q_LO_STEPS


@triton.jit
def _load_codes(row_ptr, tile, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """int8 codes at row_ptr[:, None] + tile, rows unmasked (module docstring); channels past HEAD_DIM
    (80, 96 in a tile of 128) masked."""
    if HEAD_DIM == BLOCK_D:
        return tl.load(row_ptr[:, None] + tile)
    return tl.load(row_ptr[:, None] + tile, mask=d_ok[None, :], other=0)


@triton.jit
def _decode_int4_kernel(
    Q, K_CODES, V_CODES, K_SCALES, V_SCALES, BLOCK_TABLE, PAST_LENS, TOTAL_LENS, OUT, LSE, O_PART, M_PART,
    L_PART, stride_qb, stride_qs, stride_kb, stride_kt, stride_vb, stride_vt, stride_ksb, stride_kst,
    stride_vsb, stride_vst, stride_tb, stride_ob, stride_os,
    seq_q, kv_per_split, qk_scale, window, NUM_KV_HEADS, NUM_ROW_TILES,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr, FAST: tl.constexpr, SCALE_GROUP: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = HEAD_DIM // 2
    GROUPS: tl.constexpr = HEAD_DIM // SCALE_GROUP  # scale groups per head
    GROUP_BYTES: tl.constexpr = SCALE_GROUP // 2
    b, kv_h, split, row_tile, rows, s_idx, head, row_ok = _program_tile(
        seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP, BLOCK_R
    )
    offs_j = tl.arange(0, HALF)  # byte j of a head holds channels 2j (low nibble) and 2j + 1
    b64 = b.to(tl.int64)
    q_row = Q + b64 * stride_qb + s_idx[:, None] * stride_qs + head[:, None] * HEAD_DIM
    q_even = tl.load(q_row + 2 * offs_j[None, :], mask=row_ok[:, None], other=0.0)
    q_odd = tl.load(q_row + 2 * offs_j[None, :] + 1, mask=row_ok[:, None], other=0.0)
    start, end, past = _key_range(PAST_LENS, TOTAL_LENS, b, split, seq_q, kv_per_split, window, CAUSAL,
                                  HAS_WINDOW)  # fmt: skip
    start = start // BLOCK_N * BLOCK_N  # tile-aligned: the keys this adds before a window's are masked
    pos_q = past + s_idx

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_R, HALF], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_R, HALF], dtype=tl.float32)
    table = BLOCK_TABLE + b64 * stride_tb
    offs_n = tl.arange(0, BLOCK_N)
    # bytes as [BLOCK_N, GROUPS, GROUP_BYTES]: a byte's scale is then a broadcast along the last axis
    groups = tl.arange(0, GROUPS)[None, :, None]
    bytes_3d = kv_h * HALF + groups * GROUP_BYTES + tl.arange(0, GROUP_BYTES)[None, None, :]
    k_tile = (offs_n % PAGE_SIZE)[:, None, None] * stride_kt + bytes_3d
    v_tile = (offs_n % PAGE_SIZE)[:, None, None] * stride_vt + bytes_3d
    k_scale_cols = kv_h * GROUPS + groups
    # V's with their contiguity hidden from Triton: they then load one per thread, in the layout of the V
    # bytes (a thread's 16 bytes are one group), instead of four per thread, which moved the V
    # conversion into a layout that stores fp16 to shared memory two bytes at a time
    v_scale_cols = kv_h * GROUPS + groups * 3 // 3
    for n in range(start, end, BLOCK_N):
        pos_k = n + offs_n
        k_ok = pos_k < end
        block = _table_entries(table, pos_k, end, PAGE_SIZE)
        first = n % PAGE_SIZE
        slot = first + offs_n % PAGE_SIZE
        k_bytes = tl.load((K_CODES + block * stride_kb + first * stride_kt)[:, None, None] + k_tile)
        v_bytes = tl.load((V_CODES + block * stride_vb + first * stride_vt)[:, None, None] + v_tile)
        k_scale = tl.load((K_SCALES + block * stride_ksb + slot * stride_kst)[:, None, None] + k_scale_cols,
                          mask=k_ok[:, None, None], other=0.0)  # fmt: skip
        v_scale = tl.load((V_SCALES + block * stride_vsb + slot * stride_vst)[:, None, None] + v_scale_cols,
                          mask=k_ok[:, None, None], other=0.0)  # fmt: skip
        k_even, k_odd = _int4_to_f16(k_bytes, k_scale, FAST, False)
        s = tl.dot(q_even, tl.trans(tl.reshape(k_even, (BLOCK_N, HALF)).to(q_even.dtype)))
        s = tl.dot(q_odd, tl.trans(tl.reshape(k_odd, (BLOCK_N, HALF)).to(q_odd.dtype)), s) * qk_scale
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL, HAS_WINDOW)
        p = p.to(tl.float16)
        v_even, v_odd = _int4_to_f16(v_bytes, v_scale, FAST, True)
        acc_even = tl.dot(p, tl.reshape(v_even, (BLOCK_N, HALF)), acc_even * alpha[:, None])
        acc_odd = tl.dot(p, tl.reshape(v_odd, (BLOCK_N, HALF)), acc_odd * alpha[:, None])

    _store_result(acc_even, 2 * offs_j, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile,
                  split, rows, s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES,
                  GROUP, HEAD_DIM, BLOCK_D, BLOCK_R, SPLIT, RETURN_LSE, True)  # fmt: skip
    _store_result(acc_odd, 2 * offs_j + 1, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile,
                  split, rows, s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES,
                  GROUP, HEAD_DIM, BLOCK_D, BLOCK_R, SPLIT, RETURN_LSE, False)  # fmt: skip


# ---------------------------------------------------------------- the write kernel


@triton.jit
def _round_half_even(y):
    return (y + ROUND_MAGIC) - ROUND_MAGIC  # launched with enable_fp_fusion=False: no FMA with the product


@triton.jit
def _group_inverse(amax, QMAX: tl.constexpr):
    """amax [G] fp32 -> (fp32 reciprocal of the scale, scale fp16 [G]), as quantize_kv_ref."""
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)).to(tl.float16)
    scale = tl.where(scale == 0.0, 1.0, scale).to(tl.float16)
    return tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale.to(tl.float32)), scale


@triton.jit
def _codes(x, inverse, QMAX: tl.constexpr):
    """x [G, C] fp32, inverse [G] -> int32 codes in [-QMAX, QMAX]."""
    codes = _round_half_even(x * inverse[:, None])
    return tl.minimum(tl.maximum(codes, -QMAX * 1.0), QMAX * 1.0).to(tl.int32)


@triton.jit
def _write_quant_kernel(
    X, MEAN, CODES, SCALES, SLOTS, stride_x, stride_c, stride_s, num_groups,
    BITS: tl.constexpr, QMAX: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_MEAN: tl.constexpr, SMOOTH_DTYPE: tl.constexpr,
):  # fmt: skip
    """One program per new token: its row of W = num_groups * GROUP_SIZE channels into slot SLOTS[t]."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    g = tl.arange(0, BLOCK_G)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    ok = (g < num_groups) & (c < (GROUP_SIZE if BITS == 8 else GROUP_SIZE // 2))
    step: tl.constexpr = 1 if BITS == 8 else 2  # int4: c walks channel pairs (2c, 2c + 1) of the group
    first = g * GROUP_SIZE + step * c
    x = tl.load(X + t * stride_x + first, mask=ok, other=0.0).to(tl.float32)
    if HAS_MEAN:  # the reference's k - k_mean, rounded to its result dtype
        x = (x - tl.load(MEAN + first, mask=ok, other=0.0).to(tl.float32)).to(SMOOTH_DTYPE).to(tl.float32)
    if BITS == 8:
        inverse, scale = _group_inverse(tl.max(tl.abs(x), 1), QMAX)
        tl.store(CODES + slot * stride_c + first, _codes(x, inverse, QMAX).to(tl.int8), mask=ok)
    else:
        x_odd = tl.load(X + t * stride_x + first + 1, mask=ok, other=0.0).to(tl.float32)
        if HAS_MEAN:
            mean_odd = tl.load(MEAN + first + 1, mask=ok, other=0.0).to(tl.float32)
            x_odd = (x_odd - mean_odd).to(SMOOTH_DTYPE).to(tl.float32)
        inverse, scale = _group_inverse(tl.maximum(tl.max(tl.abs(x), 1), tl.max(tl.abs(x_odd), 1)), QMAX)
        even, odd = _codes(x, inverse, QMAX), _codes(x_odd, inverse, QMAX)
        byte = ((even & 15) | ((odd & 15) << 4)).to(tl.uint8)
        tl.store(CODES + slot * stride_c + g * (GROUP_SIZE // 2) + c, byte, mask=ok)
    tl.store(SCALES + slot * stride_s + g, scale[:, None], mask=g < num_groups)


# ---------------------------------------------------------------- launchers


def flash_attention_decode_quant(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    kv_format: str,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = 0,
    num_splits: int | None = None,
    config: QuantDecodeConfig | None = None,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the quantized paged pool (module docstring); returns o [B, S, Hq*D], or
    (o, lse [B, S, Hq] fp32) when ``return_lse``. ``num_splits`` None fills one wave of
    ``config.programs_per_sm`` programs per SM; 1 disables the merge step. ``config`` overrides the tuned
    one (QUANT_DECODE_CONFIGS)."""
    _check_inputs(q, k_codes, v_codes, k_scales, v_scales, block_table, past_lens, total_lens, num_heads,
                  num_kv_heads, kv_format, sliding_window)  # fmt: skip
    block_table = block_table.contiguous()
    batch, seq_q, _ = q.shape
    page_size = k_codes.shape[1]
    head_dim = q.shape[2] // num_heads
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype or q.dtype)
    lse = torch.empty((batch, seq_q, num_heads) if return_lse else (1,), device=q.device, dtype=torch.float32)
    if batch == 0:
        return (o, lse) if return_lse else o
    if config is None:
        config = QUANT_DECODE_CONFIGS[kv_format] if q.is_cuda else INTERPRETER_CONFIG
    rows = group * seq_q
    block_r = max(16, min(triton.next_power_of_2(rows), MAX_ROWS_PER_PROGRAM))
    row_tiles = triton.cdiv(rows, block_r)
    max_keys = block_table.shape[1] * page_size
    programs = batch * num_kv_heads * row_tiles
    if num_splits is None:
        num_splits = _num_splits(programs, max_keys, config, block_d, q.device)
    kv_per_split = triton.cdiv(triton.cdiv(max_keys, max(num_splits, 1)), config.block_n) * config.block_n
    num_splits = max(1, triton.cdiv(max_keys, kv_per_split))
    if triton.next_power_of_2(num_splits) * block_d > MAX_PARTIAL_ELEMENTS:
        raise ValueError(
            f"num_splits {num_splits} is over {MAX_PARTIAL_ELEMENTS // block_d} for head_dim {head_dim}"
        )
    rows_padded = row_tiles * block_r
    split = num_splits > 1
    part_shape = (batch * num_kv_heads * rows_padded, num_splits) if split else (1, 1)
    o_part = torch.empty(*part_shape, block_d, device=q.device, dtype=torch.float32)
    m_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    l_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    scale = head_dim**-0.5 if scale is None else scale
    kernel, extra = _decode_int8_kernel, {"FAST": q.is_cuda}
    if kv_format == "int4":
        kernel, extra = _decode_int4_kernel, {"FAST": q.is_cuda, "SCALE_GROUP": INT4_GROUP}
    if config.maxnreg is not None and q.is_cuda:
        extra["maxnreg"] = config.maxnreg
    kernel[(programs, num_splits)](
        q, k_codes, v_codes, k_scales, v_scales, block_table, past_lens, total_lens, o, lse, o_part, m_part,
        l_part, q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), v_codes.stride(0),
        v_codes.stride(1), k_scales.stride(0), k_scales.stride(1), v_scales.stride(0), v_scales.stride(1),
        block_table.stride(0), o.stride(0), o.stride(1),
        seq_q, kv_per_split, scale * LOG2E, sliding_window, num_kv_heads, row_tiles,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=config.block_n,
        PAGE_SIZE=page_size, CAUSAL=causal, HAS_WINDOW=sliding_window > 0, SPLIT=split, RETURN_LSE=return_lse,
        num_warps=config.num_warps, num_stages=config.num_stages, **extra,
    )  # fmt: skip
    if split:
        _decode_merge_kernel[(batch * num_kv_heads, rows)](
            o_part, m_part, l_part, o, lse, o.stride(0), o.stride(1), num_splits, num_kv_heads, rows_padded,
            seq_q, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), RETURN_LSE=return_lse,
            num_warps=4 if q.is_cuda else 1,
        )  # fmt: skip
    return (o, lse) if return_lse else o


def _num_splits(programs: int, max_keys: int, config: QuantDecodeConfig, block_d: int, device) -> int:
    """The most splits that keep programs * splits within one wave of config.programs_per_sm per SM (a
    second, partial wave would double the time), none shorter than one key tile."""
    wanted = config.programs_per_sm * _sm_count(device) // programs
    return max(1, min(wanted, triton.cdiv(max_keys, config.block_n), MAX_PARTIAL_ELEMENTS // block_d))


def write_kv_cache_quant(
    k: torch.Tensor,
    v: torch.Tensor,
    k_mean: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_format: str,
    head_dim: int,
) -> None:
    """Quantize this step's k - k_mean and v [B, S, Hkv*D] into the pools at ``slot_mapping`` [B, S]
    (in place), bit for bit as kernels/kv_quant.py::quantize_kv_ref."""
    if kv_format not in KV_QUANT_FORMATS:
        raise ValueError(f"kv_format {kv_format!r} is not one of {', '.join(KV_QUANT_FORMATS)}")
    width = k.shape[-1]
    group = group_size(kv_format, head_dim)
    if v.shape != k.shape or k.shape[:2] != slot_mapping.shape or k_mean.shape != (width,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, k_mean {tuple(k_mean.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)} do not fit")  # fmt: skip
    if (
        width % group
        or k_codes.shape[-1] != code_width(kv_format, width)
        or k_scales.shape[-1] != width // group
    ):
        raise ValueError(f"pools {tuple(k_codes.shape)} / {tuple(k_scales.shape)} do not hold {kv_format} "
                         f"rows of width {width} (scale groups of {group})")  # fmt: skip
    tokens = slot_mapping.numel()
    if tokens == 0:
        return
    bits, qmax = KV_QUANT_FORMATS[kv_format]
    slots = slot_mapping.reshape(-1).to(torch.int64)
    smooth = torch.promote_types(k.dtype, k_mean.dtype)
    block_c = triton.next_power_of_2(group if bits == 8 else group // 2)
    for x, mean, codes, scales in ((k, k_mean, k_codes, k_scales), (v, None, v_codes, v_scales)):
        rows = x.reshape(tokens, width)
        _write_quant_kernel[(tokens,)](
            rows, rows if mean is None else mean, codes, scales, slots, rows.stride(0), codes.stride(1),
            scales.stride(1), width // group,
            BITS=bits, QMAX=qmax, GROUP_SIZE=group, BLOCK_G=triton.next_power_of_2(width // group),
            BLOCK_C=block_c, HAS_MEAN=mean is not None, SMOOTH_DTYPE=_TL_DTYPES[smooth],
            num_warps=4 if k.is_cuda else 1, enable_fp_fusion=False,
        )  # fmt: skip


def paged_attention_quant(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    k_mean: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    kv_format: str,
    causal: bool = True,
    sliding_window: int = 0,
):
    """The node over a quantized pool (paged_attention_quant_ref), pools updated in place:
    (o, k_cache, v_cache, k_scales, v_scales)."""
    head_dim = q.shape[-1] // num_heads
    write_kv_cache_quant(k, v, k_mean, k_cache, v_cache, k_scales, v_scales, slot_mapping,
                         kv_format=kv_format, head_dim=head_dim)  # fmt: skip
    o = flash_attention_decode_quant(
        q, k_cache, v_cache, k_scales, v_scales, block_table, past_lens, total_lens, num_heads=num_heads,
        num_kv_heads=num_kv_heads, kv_format=kv_format, scale=scale, causal=causal,
        sliding_window=sliding_window,
    )  # fmt: skip
    return o, k_cache, v_cache, k_scales, v_scales


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_inputs(q, k_codes, v_codes, k_scales, v_scales, block_table, past_lens, total_lens, num_heads,
                  num_kv_heads, kv_format, sliding_window) -> None:  # fmt: skip
    if kv_format not in KV_QUANT_FORMATS:
        raise ValueError(f"kv_format {kv_format!r} is not one of {', '.join(KV_QUANT_FORMATS)}")
    if q.dim() != 3 or q.dtype not in DTYPES or q.stride(2) != 1:
        raise ValueError(f"q must be float16/bfloat16 [B, S, Hq*D] with a contiguous last axis, got "
                         f"{q.dtype} {tuple(q.shape)}")  # fmt: skip
    if not 1 <= q.shape[1] <= MAX_QUERY_TOKENS:
        raise ValueError(f"q has {q.shape[1]} query tokens per row; decode takes 1 to {MAX_QUERY_TOKENS}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads or q.shape[2] % num_heads:
        raise ValueError(
            f"num_heads {num_heads} / num_kv_heads {num_kv_heads} do not fit q width {q.shape[2]}"
        )
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0, got {sliding_window}")
    head_dim = q.shape[2] // num_heads
    if head_dim not in HEAD_DIMS[kv_format]:
        raise ValueError(f"head_dim {head_dim} is not one of {HEAD_DIMS[kv_format]} for {kv_format}")
    width = num_kv_heads * head_dim
    page = k_codes.shape[1] if k_codes.dim() == 3 else 0
    group = group_size(kv_format, head_dim)
    expected = {
        "k_codes": (k_codes, CODE_DTYPES[kv_format], code_width(kv_format, width)),
        "v_codes": (v_codes, CODE_DTYPES[kv_format], code_width(kv_format, width)),
        "k_scales": (k_scales, torch.float16, width // group),
        "v_scales": (v_scales, torch.float16, width // group),
    }
    for name, (x, dtype, cols) in expected.items():
        if x.dim() != 3 or x.shape[1:] != (page, cols) or x.shape[0] != k_codes.shape[0] or x.stride(2) != 1:
            raise ValueError(f"{name} must be [num_blocks, block_size, {cols}] with a contiguous last axis, "
                             f"got {tuple(x.shape)}")  # fmt: skip
        if x.dtype != dtype or x.device != q.device:
            raise ValueError(f"{name} must be {dtype} on {q.device}, got {x.dtype} on {x.device}")
    if page == 0 or page & (page - 1):
        raise ValueError(f"block_size {page} must be a power of two")
    batch = q.shape[0]
    for name, x, rank in (
        ("block_table", block_table, 2),
        ("past_lens", past_lens, 1),
        ("total_lens", total_lens, 1),
    ):
        if x.dtype != torch.int32 or x.dim() != rank or x.shape[0] != batch or x.device != q.device:
            raise ValueError(f"{name} must be int32 with {batch} rows on {q.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")  # fmt: skip
