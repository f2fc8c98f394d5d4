"""SageAttention2-style prefill in Triton: int8 Q.K^T with per-block scales and K smoothing, FP8 P.V.

Contract: ``kernels.reference.attention_ref`` up to quantization error (the bar: output cosine
similarity >= 0.999 against fp16 attention, tests/kernels/test_attention_sage.py).

- q [B, Hq, S, D], k and v [B, Hkv, T, D], fp16 or bf16, last axis contiguous; o [B, Hq, S, D] in q's
  dtype. head_dim D in {64, 128}; Hq a multiple of Hkv (query head h reads KV head h // (Hq // Hkv)).
- Causal masking is bottom-right aligned, as attention_ref: query i sees keys j <= T - S + i. A query
  that sees no key outputs zeros.

Algorithm (SageAttention 1/2, thu-ml/SageAttention; research/kernels.md §1.5):
1. K is smoothed by its mean over the sequence, per (batch, KV head, channel): q.(k - m) differs from
   q.k by the same amount for every key of a query, which softmax ignores, and the outlier channels
   that share one int8 scale shrink. Nothing is added back.
2. Q (with sm_scale * log2(e) folded in) and the smoothed K are quantized to int8 per block of
   BLOCK_M query rows / BLOCK_N key rows of one head: scale = max|x| / 127, round half to even.
3. The attention kernel computes S = (q_i8 . k_i8^T) in int32 on the tensor cores, times the two block
   scales, and runs FlashAttention-2's online softmax in base 2.
4. P.V: ``pv="fp8"`` (sm89+; the default there): V is quantized to FP8 e4m3 per channel (scale =
   max_t |v| / 448, per batch, KV head and channel) and stored transposed (keys contiguous, the
   K-major operand Hopper's FP8 MMA wants); P in [0, 1] is scaled by 448 into e4m3; each key tile's
   P.V runs in FP8 with an fp32 result that is added to an fp32 accumulator (SageAttention2's two-level
   accumulation: the MMA's own partial sums never span more than one tile). ``pv="fp16"`` (elsewhere,
   and Triton's interpreter, which has no FP8): P.V in q's dtype with fp32 accumulation ("8+16").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8 e4m3fn
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 half to even


@dataclass(frozen=True)
class SageConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# D=128 tuned on an NVIDIA H100 80GB HBM3 (sm_90, triton 3.6) on 2026-11-25 by `python -m
# benchmarks.kv_quant_gpu` (SAGE_CANDIDATES, FP8 P.V, N=8k non-causal; see kv_quant_gpu.json); D=64 untuned.
SAGE_CONFIGS = {64: SageConfig(128, 64, 4, 3), 128: SageConfig(128, 128, 8, 3)}
SAGE_CANDIDATES = [SageConfig(128, 64, 4, 3), SageConfig(128, 64, 8, 3), SageConfig(128, 128, 8, 3),
                   SageConfig(128, 128, 8, 2)]  # fmt: skip
INTERPRETER_CONFIG = SageConfig(32, 16, 1, 1)


@triton.jit
def _quantize_blocks_kernel(
    X, MEAN, CODES, SCALES, stride_xb, stride_xh, stride_xs, seq, multiplier, NUM_HEADS, NUM_BLOCKS,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MEAN: tl.constexpr,
):  # fmt: skip
    """Program (block, b * H + h): rows [block * BLOCK, +BLOCK) of head h -> int8 codes, one fp32 scale.
    CODES [B, H, NUM_BLOCKS * BLOCK, D] (padding rows 0), SCALES [B, H, NUM_BLOCKS]."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    ok = (rows < seq)[:, None]
    b, h = bh // NUM_HEADS, bh % NUM_HEADS
    x = tl.load(
        X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + cols[None, :], mask=ok, other=0.0
    )
    x = x.to(tl.float32)
    if HAS_MEAN:
        x = tl.where(ok, x - tl.load(MEAN + bh * HEAD_DIM + cols)[None, :], 0.0)
    x = x * multiplier
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
    codes = (x * (1.0 / scale) + ROUND_MAGIC) - ROUND_MAGIC
    out_rows = bh * NUM_BLOCKS * BLOCK + rows
    tl.store(CODES + out_rows[:, None] * HEAD_DIM + cols[None, :], codes.to(tl.int8))
    tl.store(SCALES + bh * NUM_BLOCKS + blk, scale)


@triton.jit
def _attend(acc, m_i, l_i, q, q_scale, K_CODES, K_SCALES, V, stride_vn, stride_vd, lo, hi, rows, offs_n,
            offs_d, seq_k, offset, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
            CAUSAL: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    """Key tiles [lo, hi) of one head (lo a multiple of BLOCK_N); MASKED tiles mask the causal edge and
    the keys >= seq_k. K_CODES and K_SCALES point at the head; V at the head's first key."""
    for n in range(lo, hi, BLOCK_N):
        keys = n + offs_n
        k = tl.load(K_CODES + keys[:, None] * HEAD_DIM + offs_d[None, :])  # padded: always in bounds
        k_scale = tl.load(K_SCALES + n // BLOCK_N)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * (q_scale * k_scale)
        if MASKED:
            visible = keys[None, :] < seq_k
            if CAUSAL:
                visible &= keys[None, :] <= rows[:, None] + offset
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if FP8:  # V is e4m3 with keys contiguous (padded); P scaled into e4m3's range
            v = tl.load(v_ptrs)
            pv = tl.dot((p * 448.0).to(tl.float8e4nv), v)
        else:
            v = tl.load(v_ptrs, mask=(keys < seq_k)[:, None], other=0.0)
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv  # two-level: each tile's MMA sum joins the fp32 accumulator
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sage_attention_kernel(
    Q_CODES, Q_SCALES, K_CODES, K_SCALES, V, V_SCALES, OUT,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_os,
    seq_q, seq_k, NUM_HEADS, NUM_KV_HEADS, NUM_Q_BLOCKS, NUM_K_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    blk = NUM_Q_BLOCKS - 1 - tl.program_id(0)  # longest causal rows first
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // NUM_HEADS, bh % NUM_HEADS
    bkv = b * NUM_KV_HEADS + h // (NUM_HEADS // NUM_KV_HEADS)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q_CODES + (bh * NUM_Q_BLOCKS * BLOCK_M + rows[:, None]) * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(Q_SCALES + bh * NUM_Q_BLOCKS + blk)
    k_codes = K_CODES + bkv * NUM_K_BLOCKS * BLOCK_N * HEAD_DIM
    k_scales = K_SCALES + bkv * NUM_K_BLOCKS
    v = V + b * stride_vb + (h // (NUM_HEADS // NUM_KV_HEADS)) * stride_vh
    offset = seq_k - seq_q  # bottom-right: query row i sits at key position i + offset
    hi = seq_k
    full = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(seq_k, blk * BLOCK_M + BLOCK_M + offset)
        full = tl.minimum(full, tl.maximum(blk * BLOCK_M + offset + 1, 0) // BLOCK_N * BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_scale, k_codes, k_scales, v, stride_vn, stride_vd, 0,
                            full, rows, offs_n, offs_d, seq_k, offset, HEAD_DIM, BLOCK_N, False, CAUSAL,
                            FP8)  # fmt: skip
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_scale, k_codes, k_scales, v, stride_vn, stride_vd, full,
                            hi, rows, offs_n, offs_d, seq_k, offset, HEAD_DIM, BLOCK_N, True, CAUSAL,
                            FP8)  # fmt: skip
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if FP8:
        out = out * (tl.load(V_SCALES + bkv * HEAD_DIM + offs_d) / 448.0)[None, :]
    o_ptrs = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(rows < seq_q)[:, None])


def sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    pv: str | None = None,
    config: SageConfig | None = None,
) -> torch.Tensor:
    """Quantized attention (module docstring): o [B, Hq, S, D] in q's dtype. ``pv``: "fp8" or "fp16"
    (None: fp8 on CUDA cards of compute capability 8.9 and up, else fp16)."""
    _check_inputs(q, k, v)
    pv = pv or ("fp8" if fp8_supported(q.device) else "fp16")
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"pv must be 'fp8' or 'fp16', got {pv!r}")
    if pv == "fp8" and not fp8_supported(q.device):
        raise ValueError(f"pv='fp8' needs a CUDA card of compute capability 8.9 or later, not {q.device}")
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    if config is None:
        config = SAGE_CONFIGS[head_dim] if q.is_cuda else INTERPRETER_CONFIG
    o = torch.empty_like(q)
    if batch * num_heads * seq_q == 0:
        return o
    scale = head_dim**-0.5 if scale is None else scale
    q_codes, q_scales = quantize_per_block(q, config.block_m, multiplier=scale * LOG2E)
    k_mean = k.float().mean(dim=2)  # [B, Hkv, D]: the smoothing
    k_codes, k_scales = quantize_per_block(k, config.block_n, mean=k_mean)
    if pv == "fp8":
        v, v_scales = quantize_v_fp8(v, config.block_n)
        strides = (
            v.stride(0),
            v.stride(1),
            v.stride(3),
            v.stride(2),
        )  # logical [B, H, T, D] view of [.., D, T]
    else:
        v_scales = q_scales  # unused
        strides = v.stride()
    num_q_blocks = q_codes.shape[2] // config.block_m
    _sage_attention_kernel[(num_q_blocks, batch * num_heads)](
        q_codes, q_scales, k_codes, k_scales, v, v_scales, o, *strides, o.stride(0), o.stride(1), o.stride(2),
        seq_q, seq_k, num_heads, num_kv_heads, num_q_blocks, k_codes.shape[2] // config.block_n,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal, FP8=pv == "fp8",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return o


def quantize_per_block(
    x: torch.Tensor, block: int, *, mean: torch.Tensor | None = None, multiplier: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] -> (codes int8 [B, H, N padded to `block`, D], scales fp32 [B, H, N / block]):
    (x - mean) * multiplier = codes * scale per block of rows. mean [B, H, D] fp32 or None."""
    batch, heads, seq, head_dim = x.shape
    num_blocks = triton.cdiv(seq, block)
    codes = torch.empty(batch, heads, num_blocks * block, head_dim, device=x.device, dtype=torch.int8)
    scales = torch.empty(batch, heads, num_blocks, device=x.device, dtype=torch.float32)
    _quantize_blocks_kernel[(num_blocks, batch * heads)](
        x, x if mean is None else mean.contiguous(), codes, scales, x.stride(0), x.stride(1), x.stride(2),
        seq, multiplier, heads, num_blocks, BLOCK=block, HEAD_DIM=head_dim, HAS_MEAN=mean is not None,
        num_warps=4 if x.is_cuda else 1,
    )  # fmt: skip
    return codes, scales


def quantize_v_fp8(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, H, T, D] -> (e4m3 codes [B, H, D, T padded to `block`] (keys contiguous), scales fp32
    [B, H, D]): v = codes * scale per channel, scale = max_t |v| / 448."""
    scales = v.abs().amax(dim=2).float().clamp_min(1e-6) / FP8_MAX
    padded = triton.cdiv(v.shape[2], block) * block
    codes = torch.zeros(*v.shape[:2], v.shape[3], padded, device=v.device, dtype=torch.float8_e4m3fn)
    codes[..., : v.shape[2]] = (v.float() / scales[:, :, None, :]).transpose(2, 3).to(torch.float8_e4m3fn)
    return codes, scales


def fp8_supported(device: torch.device) -> bool:
    """Triton's FP8 tl.dot needs compute capability 8.9 (Ada) or 9.0 (Hopper) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q [B, Hq, S, D], k and v [B, Hkv, T, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, num_heads, _, head_dim = q.shape
    if head_dim not in HEAD_DIMS or k.shape[3] != head_dim or k.shape[0] != batch:
        raise ValueError(f"head_dim {head_dim} (k: {k.shape[3]}) must be one of {HEAD_DIMS}, batch alike")
    if k.shape[1] == 0 or num_heads % k.shape[1]:
        raise ValueError(f"{num_heads} query heads are not a multiple of {k.shape[1]} KV heads")
    if any(x.stride(3) != 1 for x in (q, k, v)):
        raise ValueError("q, k and v need a contiguous last axis")
