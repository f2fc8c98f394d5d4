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
dequantizes in registers. int8: scores = (q . codes) * k_scale per key (the scale is per token and
head, so it leaves the dot), and V's per-token scale is folded into the probabilities before P.V.
int4: a byte tile [BLOCK_N, D/2] splits into its even and odd channels, each scaled by its group's scale;
q is held as its even and odd channels, so QK^T is two half-width dots and P.V fills two half-width
accumulators (even and odd output channels). P.V runs in fp16 with fp32 accumulation.

Everything else is the fp16 kernel's algorithm (flash-decoding): a program owns all GROUP*S query rows
of one (row b, KV head) as one tile, streams its split of the keys through an online softmax in base 2,
and ``kernels.attention_triton_decode._decode_merge_kernel`` merges the splits (same partial layout).

``write_kv_cache_quant`` is the write side: one program per new token quantizes its K (after subtracting
k_mean, rounded to the smoothing dtype as the reference's ``k - k_mean`` is) and V rows into their slots,
bit for bit as ``quantize_kv_ref`` (fp32 divisions correctly rounded, round-half-even, no FMA fusion).
``paged_attention_quant`` runs both, like the node.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_triton_decode import (
    LOG2E,
    MAX_QUERY_TOKENS,
    MAX_ROWS_PER_PROGRAM,
    DecodeConfig,
    _decode_merge_kernel,
    _key_range,
    _num_splits,
    _softmax_step,
    _store_result,
)
from kernels.kv_formats import INT4_GROUP, KV_QUANT_FORMATS, code_width, group_size

HEAD_DIMS = {"int8": (64, 80, 96, 128), "int4": (64, 128)}
DTYPES = (torch.float16, torch.bfloat16)
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 half to even

# Tile configs by format, tuned on an NVIDIA H100 80GB HBM3 (sm_90, triton 3.6, torch 2.11) on 2026-11-25
# by `python -m benchmarks.kv_quant_gpu` (times QUANT_CANDIDATES at B=1, N=32k, 32/8 heads of 128, and
# records them in benchmarks/results/kv_quant_gpu.json). Re-tune on another card with the same command.
QUANT_DECODE_CONFIGS = {"int8": DecodeConfig(128, 4, 4), "int4": DecodeConfig(128, 4, 4)}
QUANT_CANDIDATES = [DecodeConfig(n, w, s) for n in (64, 128) for w in (4, 8) for s in (3, 4)]
INTERPRETER_CONFIG = DecodeConfig(16, 1, 1)


# ---------------------------------------------------------------- shared pieces of the two read kernels


@triton.jit
def _unpack_int4(byte):
    """uint8 -> (even channel, odd channel) as int32 in [-8, 7] (two's complement nibbles)."""
    byte = byte.to(tl.int32)
    return ((byte & 15) ^ 8) - 8, (((byte >> 4) & 15) ^ 8) - 8


# ---------------------------------------------------------------- the read kernels


@triton.jit
def _decode_int8_kernel(
    Q, K_CODES, V_CODES, K_SCALES, V_SCALES, BLOCK_TABLE, PAST_LENS, TOTAL_LENS, OUT, LSE, O_PART, M_PART,
    L_PART, stride_qb, stride_qs, stride_kb, stride_kt, stride_vb, stride_vt, stride_ksb, stride_kst,
    stride_vsb, stride_vst, stride_tb, stride_ob, stride_os,
    seq_q, kv_per_split, qk_scale, window, NUM_KV_HEADS, NUM_ROW_TILES,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_tile = pid % NUM_ROW_TILES
    kv_h = (pid // NUM_ROW_TILES) % NUM_KV_HEADS
    b = pid // (NUM_ROW_TILES * NUM_KV_HEADS)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # row = s * GROUP + g
    s_idx = rows // GROUP
    head = kv_h * GROUP + rows % GROUP
    row_ok = s_idx < seq_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_offs = b64 * stride_qb + s_idx[:, None] * stride_qs + head[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    start, end, past = _key_range(PAST_LENS, TOTAL_LENS, b, split, seq_q, kv_per_split, window, CAUSAL,
                                  HAS_WINDOW)  # fmt: skip
    pos_q = past + s_idx

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    table = BLOCK_TABLE + b64 * stride_tb
    col = kv_h * HEAD_DIM + offs_d[None, :]
    for n in range(start, end, BLOCK_N):
        pos_k = n + tl.arange(0, BLOCK_N)
        k_ok = pos_k < end
        block = tl.load(table + pos_k // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = pos_k % PAGE_SIZE
        kv_ok = k_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K_CODES + block[:, None] * stride_kb + slot[:, None] * stride_kt + col, mask=kv_ok, other=0
        )
        v = tl.load(
            V_CODES + block[:, None] * stride_vb + slot[:, None] * stride_vt + col, mask=kv_ok, other=0
        )
        k_scale = tl.load(K_SCALES + block * stride_ksb + slot * stride_kst + kv_h, mask=k_ok, other=0.0)
        v_scale = tl.load(V_SCALES + block * stride_vsb + slot * stride_vst + kv_h, mask=k_ok, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * (k_scale.to(tl.float32) * qk_scale)[None, :]
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL, HAS_WINDOW)
        p_scaled = (p * v_scale.to(tl.float32)[None, :]).to(tl.float16)
        acc = tl.dot(p_scaled, v.to(tl.float16), acc * alpha[:, None])

    _store_result(acc, offs_d, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split, rows,
                  s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP,
                  HEAD_DIM, BLOCK_D, BLOCK_R, SPLIT, RETURN_LSE, True)  # fmt: skip


@triton.jit
def _decode_int4_kernel(
    Q, K_CODES, V_CODES, K_SCALES, V_SCALES, BLOCK_TABLE, PAST_LENS, TOTAL_LENS, OUT, LSE, O_PART, M_PART,
    L_PART, stride_qb, stride_qs, stride_kb, stride_kt, stride_vb, stride_vt, stride_ksb, stride_kst,
    stride_vsb, stride_vst, stride_tb, stride_ob, stride_os,
    seq_q, kv_per_split, qk_scale, window, NUM_KV_HEADS, NUM_ROW_TILES,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr, SCALE_GROUP: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = HEAD_DIM // 2
    GROUPS: tl.constexpr = HEAD_DIM // SCALE_GROUP  # scale groups per head
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_tile = pid % NUM_ROW_TILES
    kv_h = (pid // NUM_ROW_TILES) % NUM_KV_HEADS
    b = pid // (NUM_ROW_TILES * NUM_KV_HEADS)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    s_idx = rows // GROUP
    head = kv_h * GROUP + rows % GROUP
    row_ok = s_idx < seq_q
    offs_j = tl.arange(0, HALF)  # byte j of a head holds channels 2j (low nibble) and 2j + 1
    offs_g = tl.arange(0, GROUPS)
    b64 = b.to(tl.int64)
    q_row = Q + b64 * stride_qb + s_idx[:, None] * stride_qs + head[:, None] * HEAD_DIM
    q_even = tl.load(q_row + 2 * offs_j[None, :], mask=row_ok[:, None], other=0.0)
    q_odd = tl.load(q_row + 2 * offs_j[None, :] + 1, mask=row_ok[:, None], other=0.0)
    start, end, past = _key_range(PAST_LENS, TOTAL_LENS, b, split, seq_q, kv_per_split, window, CAUSAL,
                                  HAS_WINDOW)  # fmt: skip
    pos_q = past + s_idx

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_R, HALF], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_R, HALF], dtype=tl.float32)
    table = BLOCK_TABLE + b64 * stride_tb
    byte_col = kv_h * HALF + offs_j[None, :]
    scale_col = kv_h * GROUPS + offs_g[None, :]
    for n in range(start, end, BLOCK_N):
        pos_k = n + tl.arange(0, BLOCK_N)
        k_ok = pos_k < end
        block = tl.load(table + pos_k // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = pos_k % PAGE_SIZE
        k_bytes = tl.load(K_CODES + block[:, None] * stride_kb + slot[:, None] * stride_kt + byte_col,
                          mask=k_ok[:, None], other=0)  # fmt: skip
        v_bytes = tl.load(V_CODES + block[:, None] * stride_vb + slot[:, None] * stride_vt + byte_col,
                          mask=k_ok[:, None], other=0)  # fmt: skip
        k_scale = tl.load(K_SCALES + block[:, None] * stride_ksb + slot[:, None] * stride_kst + scale_col,
                          mask=k_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
        v_scale = tl.load(V_SCALES + block[:, None] * stride_vsb + slot[:, None] * stride_vst + scale_col,
                          mask=k_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
        # [BLOCK_N, GROUPS] -> [BLOCK_N, HALF]: byte j's scale is its group's, j // (SCALE_GROUP / 2)
        k_scale = tl.reshape(tl.broadcast_to(k_scale[:, :, None], (BLOCK_N, GROUPS, SCALE_GROUP // 2)),
                             (BLOCK_N, HALF))  # fmt: skip
        v_scale = tl.reshape(tl.broadcast_to(v_scale[:, :, None], (BLOCK_N, GROUPS, SCALE_GROUP // 2)),
                             (BLOCK_N, HALF))  # fmt: skip
        k_even, k_odd = _unpack_int4(k_bytes)
        s = tl.dot(q_even, tl.trans((k_even.to(tl.float32) * k_scale).to(q_even.dtype)))
        s = tl.dot(q_odd, tl.trans((k_odd.to(tl.float32) * k_scale).to(q_odd.dtype)), s) * qk_scale
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL, HAS_WINDOW)
        p = p.to(tl.float16)
        v_even, v_odd = _unpack_int4(v_bytes)
        acc_even = tl.dot(p, (v_even.to(tl.float32) * v_scale).to(tl.float16), acc_even * alpha[:, None])
        acc_odd = tl.dot(p, (v_odd.to(tl.float32) * v_scale).to(tl.float16), acc_odd * alpha[:, None])

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
    config: DecodeConfig | None = None,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the quantized paged pool (module docstring); returns o [B, S, Hq*D], or
    (o, lse [B, S, Hq] fp32) when ``return_lse``. ``num_splits``/``config`` as flash_attention_decode."""
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
        num_splits = _num_splits(programs, max_keys, config.block_n, block_d, q.device)
    kv_per_split = triton.cdiv(triton.cdiv(max_keys, max(num_splits, 1)), config.block_n) * config.block_n
    num_splits = max(1, triton.cdiv(max_keys, kv_per_split))
    rows_padded = row_tiles * block_r
    split = num_splits > 1
    part_shape = (batch * num_kv_heads * rows_padded, num_splits) if split else (1, 1)
    o_part = torch.empty(*part_shape, block_d, device=q.device, dtype=torch.float32)
    m_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    l_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    scale = head_dim**-0.5 if scale is None else scale
    kernel, extra = _decode_int8_kernel, {}
    if kv_format == "int4":
        kernel, extra = _decode_int4_kernel, {"SCALE_GROUP": INT4_GROUP}
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
