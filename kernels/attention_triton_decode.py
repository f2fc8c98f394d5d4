"""Split-KV decode attention (flash-decoding) in Triton over the paged KV pool.

Contract: ``kernels.reference.paged_attention_ref`` (the ``fastattention::FlashAttention`` node), read
side only; ``write_kv_cache`` does the write side and ``paged_attention`` runs both, like the node.

- q [B, S, Hq*D] with 1 <= S <= 16 query tokens per row, heads interleaved as ``x.view(B, S, Hq, D)``;
  o [B, S, Hq*D] in q's dtype.
- k_cache, v_cache [num_blocks, block_size, Hkv*D], the same dtype as q (fp16 or bf16); block_size a
  power of two. A contiguous cache is the special case block_table[b] = b * max_blocks + arange.
- block_table [B, max_blocks] int32: row b's key position p lives in block
  ``block_table[b, p // block_size]`` at offset ``p % block_size``.
- past_lens, total_lens [B] int32: query s of row b sits at position past_lens[b] + s and sees keys
  j < total_lens[b]; causal: also j <= past_lens[b] + s; sliding window W > 0: past_lens[b] + s - j < W.
  A query that sees no key outputs zeros. head_dim D in {64, 80, 96, 128}; Hq a multiple of Hkv.
- ``return_lse``: also the log-sum-exp of each query's scaled scores, lse [B, S, Hq] fp32 (natural log;
  -inf where no key is seen), so partial results over disjoint key ranges merge exactly
  (``kernels.attention_offload.merge_partials``). ``out_dtype`` (e.g. fp32) keeps partials unrounded.

Algorithm (flash-decoding, Dao et al. 2023): program (row b, KV head, split) owns every query head of
that KV group for all S tokens of the row, as one tile of GROUP*S rows (padded to >= 16 for the tensor
cores), so each K/V byte is read once per row. It streams its share of the row's keys through an online
softmax (base 2) and writes an unnormalised partial output with its running max and sum; a second
kernel merges the splits. The split count only depends on shapes (never on values on the device), so
the call can be captured in a CUDA graph. With one split the first kernel writes o directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (torch.float16, torch.bfloat16)
MAX_QUERY_TOKENS = 16
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # read inside kernels: Triton only allows constexpr globals there


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int


# Tile configs by padded head_dim, tuned on an NVIDIA H200 (sm_90, triton 3.6) on 2026-11-25 by
# `python -m benchmarks.attention_gpu --tune` (DECODE_CANDIDATES at fp16, B=1, N=32k, 16-token blocks).
# Re-tune on another card with the same command and copy its "configs" here.
DECODE_CONFIGS = {64: DecodeConfig(64, 4, 3), 128: DecodeConfig(64, 4, 4)}
INTERPRETER_CONFIG = DecodeConfig(16, 1, 1)
MAX_ROWS_PER_PROGRAM = 64  # GROUP*S rows beyond this are cut into several row tiles
SPLITS_PER_SM = 2  # the heuristic aims at this many programs per SM
MAX_PARTIAL_ELEMENTS = 8192  # next_pow2(num_splits) * padded head_dim: what the merge holds at once


@triton.jit
def _program_tile(seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tile a decode program owns, from its ids (grid: row b x KV head x row tile, then key split):
    (b, kv_h, split, row_tile, rows, s_idx, head, row_ok). Its BLOCK_R rows are row = s * GROUP + g (query
    token s_idx, query head `head`); row_ok: a real token (rows past seq_q pad the tile)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_tile = pid % NUM_ROW_TILES
    kv_h = (pid // NUM_ROW_TILES) % NUM_KV_HEADS
    b = pid // (NUM_ROW_TILES * NUM_KV_HEADS)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    s_idx = rows // GROUP
    head = kv_h * GROUP + rows % GROUP
    return b, kv_h, split, row_tile, rows, s_idx, head, s_idx < seq_q


@triton.jit
def _key_range(PAST_LENS, TOTAL_LENS, b, split, seq_q, kv_per_split, window, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr):  # fmt: skip
    """This split's keys [start, end) of row b, and the row's past length."""
    past = tl.load(PAST_LENS + b)
    hi = tl.load(TOTAL_LENS + b)
    if CAUSAL:
        hi = tl.minimum(hi, past + seq_q)
    start = split * kv_per_split
    if HAS_WINDOW:
        start = tl.maximum(start, past - window + 1)
    end = tl.minimum((split + 1) * kv_per_split, hi)
    return start, end, past


@triton.jit
def _table_entries(table, pos_k, end, PAGE_SIZE: tl.constexpr):
    """The pool block of each key position (block 0 from `end` on), int64."""
    return tl.load(table + pos_k // PAGE_SIZE, mask=pos_k < end, other=0).to(tl.int64)


@triton.jit
def _softmax_step(s, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Mask a tile of base-2 scores and advance the online softmax: (p, alpha, m_new, l_new)."""
    visible = k_ok[None, :]
    if CAUSAL:
        visible &= pos_k[None, :] <= pos_q[:, None]
    if HAS_WINDOW:
        visible &= (pos_q[:, None] - pos_k[None, :]) < window
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _store_result(acc, cols, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split,
                  rows, s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                  SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr, STORE_STATS: tl.constexpr):  # fmt: skip
    """acc holds output channels ``cols`` of the tile: a partial (the merge kernel's layout) or o. The
    call with STORE_STATS also writes the rows' running max and sum (or the lse). The quantized kernels
    (kernels/attention_triton_quant.py) store their two half-width int4 accumulators with two calls."""
    col_ok = cols < HEAD_DIM
    if SPLIT:
        num_splits = tl.num_programs(1)
        part_row = ((b64 * NUM_KV_HEADS + kv_h) * NUM_ROW_TILES * BLOCK_R + rows) * num_splits + split
        tl.store(O_PART + part_row[:, None] * BLOCK_D + cols[None, :], acc, mask=row_ok[:, None])
        if STORE_STATS:
            tl.store(M_PART + part_row, m_i, mask=row_ok)
            tl.store(L_PART + part_row, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_offs = b64 * stride_ob + s_idx[:, None] * stride_os + head[:, None] * HEAD_DIM + cols[None, :]
        tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if RETURN_LSE and STORE_STATS:  # lse [B, S, Hq]
            seen = l_i > 0.0
            lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
            tl.store(LSE + (b64 * seq_q + s_idx) * (NUM_KV_HEADS * GROUP) + head, lse, mask=row_ok)


@triton.jit
def _decode_split_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLE, PAST_LENS, TOTAL_LENS, OUT, LSE, O_PART, M_PART, L_PART,
    stride_qb, stride_qs, stride_kb, stride_kt, stride_vb, stride_vt, stride_tb, stride_ob, stride_os,
    seq_q, kv_per_split, qk_scale, window, NUM_KV_HEADS, NUM_ROW_TILES,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr,
):  # fmt: skip
    b, kv_h, split, row_tile, rows, s_idx, head, row_ok = _program_tile(
        seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP, BLOCK_R
    )
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
    for n in range(start, end, BLOCK_N):
        pos_k = n + tl.arange(0, BLOCK_N)
        k_ok = pos_k < end
        block = _table_entries(table, pos_k, end, PAGE_SIZE)
        slot = pos_k % PAGE_SIZE
        kv_ok = k_ok[:, None] & d_ok[None, :]
        col = kv_h * HEAD_DIM + offs_d[None, :]
        k = tl.load(
            K_CACHE + block[:, None] * stride_kb + slot[:, None] * stride_kt + col, mask=kv_ok, other=0.0
        )
        v = tl.load(
            V_CACHE + block[:, None] * stride_vb + slot[:, None] * stride_vt + col, mask=kv_ok, other=0.0
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, pos_k, k_ok, pos_q, window, CAUSAL, HAS_WINDOW)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])

    _store_result(acc, offs_d, m_i, l_i, OUT, LSE, O_PART, M_PART, L_PART, b64, kv_h, row_tile, split, rows,
                  s_idx, head, row_ok, stride_ob, stride_os, seq_q, NUM_KV_HEADS, NUM_ROW_TILES, GROUP,
                  HEAD_DIM, BLOCK_D, BLOCK_R, SPLIT, RETURN_LSE, True)  # fmt: skip


@triton.jit
def _decode_merge_kernel(
    O_PART, M_PART, L_PART, OUT, LSE, stride_ob, stride_os, num_splits, NUM_KV_HEADS, ROWS_PADDED, seq_q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):  # fmt: skip
    """One program per (row b, KV head, tile row): merge its num_splits partial outputs."""
    pid = tl.program_id(0)
    row = tl.program_id(1)  # s * GROUP + g
    kv_h = pid % NUM_KV_HEADS
    b = pid // NUM_KV_HEADS
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    part_row = (pid.to(tl.int64) * ROWS_PADDED + row) * num_splits + splits
    m = tl.load(M_PART + part_row, mask=split_ok, other=float("-inf"))
    l_part = tl.load(L_PART + part_row, mask=split_ok, other=0.0)
    acc = tl.load(O_PART + part_row[:, None] * BLOCK_D + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(l_part * weight, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    s_idx = row // GROUP
    head = kv_h * GROUP + row % GROUP
    o_offs = b.to(tl.int64) * stride_ob + s_idx * stride_os + head * HEAD_DIM + offs_d
    tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if RETURN_LSE:
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        seen = total > 0.0
        lse = tl.where(seen, (m_use + tl.math.log2(tl.where(seen, total, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + (b.to(tl.int64) * seq_q + s_idx) * (NUM_KV_HEADS * GROUP) + head, lse)


def flash_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = 0,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the paged pool (module docstring); returns o [B, S, Hq*D] (in ``out_dtype``,
    default q's), or (o, lse [B, S, Hq] fp32) when ``return_lse``.

    ``num_splits`` None picks the split count from the shapes and the SM count; 1 disables the merge
    step. ``config`` overrides the tuned tile config (tuning, and the Volta variant's tiles).
    """
    _check_inputs(q, k_cache, v_cache, block_table, past_lens, total_lens, num_heads, num_kv_heads)
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0, got {sliding_window}")
    block_table = block_table.contiguous()
    batch, seq_q, _ = q.shape
    _, page_size, _ = k_cache.shape
    head_dim = q.shape[2] // num_heads
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype or q.dtype)
    lse = torch.empty((batch, seq_q, num_heads) if return_lse else (1,), device=q.device, dtype=torch.float32)
    if batch == 0:
        return (o, lse) if return_lse else o
    if config is None:
        config = DECODE_CONFIGS[block_d] if q.is_cuda else INTERPRETER_CONFIG
    rows = group * seq_q
    block_r = max(16, min(triton.next_power_of_2(rows), MAX_ROWS_PER_PROGRAM))
    row_tiles = triton.cdiv(rows, block_r)
    max_keys = block_table.shape[1] * page_size
    programs = batch * num_kv_heads * row_tiles
    if num_splits is None:
        num_splits = _num_splits(programs, max_keys, config.block_n, block_d, q.device)
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
    _decode_split_kernel[(programs, num_splits)](
        q, k_cache, v_cache, block_table, past_lens, total_lens, o, lse, o_part, m_part, l_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_table.stride(0), o.stride(0), o.stride(1),
        seq_q, kv_per_split, scale * LOG2E, sliding_window, num_kv_heads, row_tiles,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=config.block_n,
        PAGE_SIZE=page_size, CAUSAL=causal, HAS_WINDOW=sliding_window > 0, SPLIT=split, RETURN_LSE=return_lse,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split:
        _decode_merge_kernel[(batch * num_kv_heads, rows)](
            o_part, m_part, l_part, o, lse, o.stride(0), o.stride(1), num_splits, num_kv_heads, rows_padded,
            seq_q, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), RETURN_LSE=return_lse,
            num_warps=4 if q.is_cuda else 1,
        )  # fmt: skip
    return (o, lse) if return_lse else o


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's k, v [B, S, Hkv*D] into the pools at ``slot_mapping`` [B, S] (in place)."""
    width = k_cache.shape[-1]
    if k.shape[-1] != width or v.shape != k.shape or k.shape[:2] != slot_mapping.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping {tuple(slot_mapping.shape)} "
                         f"do not fit pools of width {width}")  # fmt: skip
    slots = slot_mapping.reshape(-1).long()
    k_cache.view(-1, width).index_copy_(0, slots, k.reshape(-1, width).to(k_cache.dtype))
    v_cache.view(-1, width).index_copy_(0, slots, v.reshape(-1, width).to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    causal: bool = True,
    sliding_window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FlashAttention node (paged_attention_ref), pools updated in place: (o, k_cache, v_cache)."""
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    o = flash_attention_decode(
        q, k_cache, v_cache, block_table, past_lens, total_lens,
        num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, causal=causal,
        sliding_window=sliding_window,
    )  # fmt: skip
    return o, k_cache, v_cache


def _num_splits(programs: int, max_keys: int, block_n: int, block_d: int, device: torch.device) -> int:
    """Enough splits for SPLITS_PER_SM programs per SM, none shorter than one key tile."""
    if programs >= SPLITS_PER_SM * _sm_count(device):
        return 1
    wanted = triton.cdiv(SPLITS_PER_SM * _sm_count(device), programs)
    return max(1, min(wanted, triton.cdiv(max_keys, block_n), MAX_PARTIAL_ELEMENTS // block_d))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few "SMs", so that small test shapes still split
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_inputs(q, k_cache, v_cache, block_table, past_lens, total_lens, num_heads, num_kv_heads) -> None:
    if q.dim() != 3 or q.dtype not in DTYPES:
        raise ValueError(f"q must be float16/bfloat16 [B, S, Hq*D], got {q.dtype} {tuple(q.shape)}")
    if not 1 <= q.shape[1] <= MAX_QUERY_TOKENS:
        raise ValueError(f"q has {q.shape[1]} query tokens per row; decode takes 1 to {MAX_QUERY_TOKENS}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads or q.shape[2] % num_heads:
        raise ValueError(
            f"num_heads {num_heads} / num_kv_heads {num_kv_heads} do not fit q width {q.shape[2]}"
        )
    head_dim = q.shape[2] // num_heads
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not one of {HEAD_DIMS}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[2] != num_kv_heads * head_dim or cache.stride(2) != 1:
            raise ValueError(f"{name} must be [num_blocks, block_size, {num_kv_heads * head_dim}] with a "
                             f"contiguous last axis, got {tuple(cache.shape)}")  # fmt: skip
        if cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"{name} is {cache.dtype} on {cache.device}, q is {q.dtype} on {q.device}")
    page_size = k_cache.shape[1]
    if v_cache.shape != k_cache.shape or page_size & (page_size - 1):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match, "
                         f"with a power-of-two block_size")  # fmt: skip
    if q.stride(2) != 1:
        raise ValueError("q's last axis must be contiguous")
    batch = q.shape[0]
    for name, x, rank in (
        ("block_table", block_table, 2),
        ("past_lens", past_lens, 1),
        ("total_lens", total_lens, 1),
    ):
        if x.dtype != torch.int32 or x.dim() != rank or x.shape[0] != batch or x.device != q.device:
            raise ValueError(f"{name} must be int32 with {batch} rows on {q.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")  # fmt: skip
