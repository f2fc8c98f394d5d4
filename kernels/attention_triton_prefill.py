"""FlashAttention-2 forward (prefill) in Triton: dense or packed variable-length batches.

Contract (``kernels.reference.attention_alibi_ref`` and ``varlen_attention_ref`` are the specs):

- Dense: q [B, Hq, S, D], k and v [B, Hkv, T, D]; o [B, Hq, S, D]; lse [B, Hq, S] (fp32).
- Packed (MosaicBERT-style unpadding, no padding FLOPs): q [total_q, Hq, D], k and v [total_k, Hkv, D],
  ``cu_seqlens_q`` / ``cu_seqlens_k`` [B + 1] int32 (sequence b owns rows cu[b]:cu[b + 1]);
  o [total_q, Hq, D]; lse [Hq, total_q] (fp32, FlashAttention's varlen layout).
- fp16 or bf16 (q, k and v alike); head_dim D in {64, 80, 96, 128} (80 and 96 run in a 128-wide tile
  with the tail masked); Hq a multiple of Hkv, query head h reads KV head h // (Hq // Hkv), and K/V are
  never repeated in memory. The last dimension must be contiguous; other strides are free.
- Positions are bottom-right aligned (FlashAttention >= 2.1): in a sequence with S queries and T keys,
  query i sits at position T - S + i and key j at j. Causal: key j is visible iff j <= T - S + i.
  ``sliding_window`` W > 0: key j is visible only if pos_q - j < W (also without causal).
  ``alibi_slopes`` [Hq] fp32: the score of head h gets -slopes[h] * |pos_q - j| added after scaling.
- A query that sees no key (causal with T < S, or an empty window) outputs zeros and lse = -inf.

Algorithm (FlashAttention-2, Dao 2023): one program owns BLOCK_M queries of one (sequence, head) and
streams BLOCK_N-key tiles of K and V with an online softmax in base 2 (exp2, scale * log2(e) folded in)
and one division at the end. The key range is cut in three: tiles clipped by the window's lower edge
(masked), tiles every query fully sees (no mask arithmetic), and the causal diagonal plus the ragged
end (masked). Tiles no query can see are never loaded. Causal programs run longest-first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which carries batch x heads


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Tile configs by (padded head_dim, causal), tuned on an NVIDIA H200 (sm_90, triton 3.6, torch 2.11) on
# 2026-11-25 by `python -m benchmarks.attention_gpu --tune` (times every config in that script's
# PREFILL_CANDIDATES at fp16, N=8k, and records the winners in benchmarks/results/attention_gpu.json).
# Re-tune on another card with the same command and copy its "configs" here.
PREFILL_CONFIGS = {
    (64, False): PrefillConfig(128, 64, 4, 4),
    (64, True): PrefillConfig(64, 64, 4, 3),
    (128, False): PrefillConfig(128, 128, 8, 3),
    (128, True): PrefillConfig(128, 128, 8, 3),
}
# TRITON_INTERPRET=1 on the CPU: small tiles so that short test sequences still cross tile edges.
INTERPRETER_CONFIG = PrefillConfig(32, 16, 1, 1)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, pos_q, slope2,
    n_start, n_end, seqlen_k, qk_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (acc, m_i, l_i) over key tiles [n_start, n_end), in log2 units."""
    d_ok = offs_d < HEAD_DIM
    for n in range(n_start, n_end, BLOCK_N):
        pos_k = n + offs_n
        k_ptrs = k_base + pos_k[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + pos_k[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            kv_ok = (pos_k < seqlen_k)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_ALIBI:
            s -= slope2 * tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        if MASKED:
            visible = (pos_k < seqlen_k)[None, :]
            if CAUSAL:
                visible &= pos_k[None, :] <= pos_q[:, None]
            if HAS_WINDOW:
                visible &= (pos_q[:, None] - pos_k[None, :]) < window
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may have seen nothing yet: keep exp2 away from (-inf) - (-inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_prefill_kernel(
    Q, K, V, OUT, LSE, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    dense_seqlen_q, dense_seqlen_k, qk_scale, window, NUM_HEADS, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // NUM_HEADS
    h = bh % NUM_HEADS
    if CAUSAL:  # the last query blocks see the most keys: start them first
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = tl.full([], 0, tl.int32)
        k_start = tl.full([], 0, tl.int32)
        seqlen_q, seqlen_k = dense_seqlen_q, dense_seqlen_k
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    kv_h = h // GROUP
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
    k_base = K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_ok, other=0.0)
    shift = seqlen_k - seqlen_q  # bottom-right alignment
    pos_q = offs_m + shift
    first_pos = m0 + shift
    last_pos = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1 + shift
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + h) * 1.4426950408889634

    # Key ranges: [lo, mid_lo) window edge (masked), [mid_lo, mid_hi) unmasked, [mid_hi, hi) masked.
    hi = seqlen_k
    full_hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
        full_hi = tl.minimum(full_hi, first_pos + 1)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    lo = tl.full([], 0, tl.int32)
    full_lo = tl.full([], 0, tl.int32)
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, pos_q, slope2,
            lo, mid_lo, seqlen_k, qk_scale, window,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_ALIBI,
        )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, pos_q, slope2,
        mid_lo, mid_hi, seqlen_k, qk_scale, window,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_ALIBI,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, pos_q, slope2,
        mid_hi, hi, seqlen_k, qk_scale, window,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_ALIBI,
    )  # fmt: skip

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=q_ok)
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
        tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)


def flash_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    sliding_window: int = 0,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    config: PrefillConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward (module docstring). Returns o, or (o, lse) when ``return_lse``.

    ``max_seqlen_q`` sizes the grid of a packed batch; when None it is read from ``cu_seqlens_q``
    (a device-to-host copy). ``max_seqlen_k`` is accepted for FlashAttention API parity and unused.
    ``config`` overrides the tuned tile config (for tuning only).
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_inputs(q, k, v, varlen, cu_seqlens_q, cu_seqlens_k, sliding_window, alibi_slopes)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    head_dim = q.shape[-1]
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    o = torch.empty_like(q)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
        lse = torch.empty(num_heads, q.shape[0], device=q.device, dtype=torch.float32)
        q_strides = (0, q.stride(1), q.stride(0))
        k_strides, v_strides, o_strides = ((0, x.stride(1), x.stride(0)) for x in (k, v, o))
        lse_strides = (0, lse.stride(0))
        seqlen_q, seqlen_k = 0, 0
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
        max_seqlen_q = seqlen_q
        lse = torch.empty(batch, num_heads, seqlen_q, device=q.device, dtype=torch.float32)
        q_strides, k_strides, v_strides, o_strides = (x.stride()[:3] for x in (q, k, v, o))
        lse_strides = lse.stride()[:2]
    if batch * num_heads > MAX_GRID_Y:
        raise ValueError(f"batch x num_heads = {batch * num_heads} exceeds the grid limit {MAX_GRID_Y}")
    if batch == 0 or max_seqlen_q == 0:
        return (o, lse.fill_(float("-inf"))) if return_lse else o
    if config is None:
        config = _pick_config(q, head_dim, causal)
    scale = head_dim**-0.5 if scale is None else scale
    dummy = q.new_empty(1, dtype=torch.int32)
    grid = (triton.cdiv(max_seqlen_q, config.block_m), batch * num_heads)
    _flash_prefill_kernel[grid](
        q, k, v, o, lse,
        alibi_slopes if alibi_slopes is not None else dummy,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        *q_strides, *k_strides, *v_strides, *o_strides, *lse_strides,
        seqlen_q, seqlen_k, scale * LOG2E, sliding_window, num_heads, num_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal, HAS_WINDOW=sliding_window > 0,
        HAS_ALIBI=alibi_slopes is not None, IS_VARLEN=varlen, RETURN_LSE=return_lse,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return (o, lse) if return_lse else o


def _pick_config(q: torch.Tensor, head_dim: int, causal: bool) -> PrefillConfig:
    if not q.is_cuda:
        return INTERPRETER_CONFIG
    return PREFILL_CONFIGS[(triton.next_power_of_2(head_dim), causal)]


def _check_inputs(q, k, v, varlen, cu_seqlens_q, cu_seqlens_k, sliding_window, alibi_slopes) -> None:
    rank = 3 if varlen else 4
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            layout = "[total, H, D] (packed)" if varlen else "[B, H, S, D] (dense)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype must be float16 or bfloat16, got {x.dtype}")
        if x.device != q.device or x.dtype != q.dtype:
            raise ValueError(f"{name} is {x.dtype} on {x.device}, q is {q.dtype} on {q.device}")
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not one of {HEAD_DIMS}")
    if k.shape != v.shape or k.shape[-1] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]}, q has batch {q.shape[0]}")
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is None or cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
                raise ValueError(f"{name} must be a 1-D int32 tensor on {q.device}, got {_describe(cu)}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_seqlens_q.numel()} entries, cu_seqlens_k has {cu_seqlens_k.numel()}"
            )
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0, got {sliding_window}")
    if alibi_slopes is not None and (
        alibi_slopes.shape != (num_heads,)
        or alibi_slopes.dtype != torch.float32
        or alibi_slopes.device != q.device
    ):
        raise ValueError(
            f"alibi_slopes must be float32 [{num_heads}] on {q.device}, got {_describe(alibi_slopes)}"
        )


def _describe(x: torch.Tensor | None) -> str:
    return "None" if x is None else f"{x.dtype} {tuple(x.shape)} on {x.device}"


def alibi_slopes_for(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes (MosaicBERT's construction for non-power-of-two head counts)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    if closest < num_heads:
        extra = [2 ** (-4 * (i + 1) / closest) for i in range(2 * closest)][0::2]
        slopes += extra[: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
