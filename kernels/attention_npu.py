"""NPU-style attention: two-level tiling and tiling-mask (FastAttention's Ascend design), plain torch ops.

Contract: ``kernels.reference.attention_ref`` (dense) and ``paged_attention_ref`` (the FlashAttention node,
through ``paged_attention_npu``). q [B, Hq, S, D], k and v [B, Hkv, T, D]; query head h reads KV head
h // (Hq // Hkv) and K/V are never repeated in memory. Causal masking is bottom-right aligned (query i
sits at position T - S + i); ``sliding_window`` W > 0 also hides keys with pos - j >= W. A query that sees
no key outputs zeros (and lse = -inf). Any dtype in, computed in fp32, returned in q's dtype; any torch
device (CPU and CUDA here; on Ascend, torch_npu runs the same ops).

Two-level tiling (after CANN FlashAttentionScore's Cube/Vector split; the paper's own tile sizes are not
public). Level 1, the matrix unit: one outer block of ``block_m`` queries x ``block_n`` keys (128 x 1024)
gives S = Q K^T in one matmul, and P V in one matmul. Level 2, the vector unit: S is processed in stripes of
``stripe`` rows (16 x 1024), each masked, max-reduced, exponentiated and summed on its own, so the vector
working set stays small while the online-softmax rescale happens once per 1024 keys (FlashAttention-2 on a
GPU rescales every 64-128 keys). Outer blocks that no query can see are skipped; blocks every query fully
sees take no mask at all.

Tiling-mask. No [S, T] mask is ever built. ``CompressedCausalMask`` holds one lower-triangular boolean
M of (block_m + block_n)^2 entries, M[a, b] = (b <= a). A tile whose first query sits at position p and
first key at c has the causal mask ``visible[i, j] = (j - i <= p - c)``, which is a slice of M at an offset
set by delta = p - c; the sliding window's edge is the complement of another slice (delta - W). So mask
memory is O((block_m + block_n)^2), 1.3 MB for 128 x 1024, whatever N is.
"""

from __future__ import annotations

import torch

BLOCK_M = 128  # queries per outer block (matrix-unit tile)
BLOCK_N = 1024  # keys per outer block
STRIPE = 16  # query rows per inner stripe (vector-unit softmax)


class CompressedCausalMask:
    """One (block_m + block_n)^2 lower-triangular mask; every tile's mask is a slice of it."""

    def __init__(self, block_m: int, block_n: int, device: torch.device | str = "cpu") -> None:
        size = block_m + block_n
        self.mask = torch.ones(size, size, dtype=torch.bool, device=device).tril()  # M[a, b] = b <= a

    @property
    def nbytes(self) -> int:
        return self.mask.numel() * self.mask.element_size()

    def upto(self, rows: int, cols: int, delta: int) -> torch.Tensor:
        """[rows, cols] bool, (i, j) -> j - i <= delta, for a tile that is neither all-true nor all-false."""
        y = max(0, -delta)
        x = delta + y
        if x + rows > self.mask.shape[0] or y + cols > self.mask.shape[1]:
            raise ValueError(f"tile {rows}x{cols} at delta {delta} is outside the compressed mask")
        return self.mask[x : x + rows, y : y + cols]


def tile_visibility(mask: CompressedCausalMask, rows, cols, first_pos, c0, causal, window):
    """The tile's mask: None (every key visible to every query), False (nothing visible) or [rows, cols]."""
    delta = first_pos - c0  # key j of the tile is visible to query i iff j - i <= delta (causal)
    visible = None
    if causal:
        if delta < -(rows - 1):
            return False
        if delta < cols - 1:
            visible = mask.upto(rows, cols, delta)
    if window > 0:
        edge = delta - window  # hidden iff j - i <= edge
        if edge >= cols - 1:
            return False
        if edge >= -(rows - 1):
            outside = ~mask.upto(rows, cols, edge)
            visible = outside if visible is None else visible & outside
    return visible


def npu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = 0,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    stripe: int = STRIPE,
    return_lse: bool = False,
    full_mask: torch.Tensor | None = None,
):
    """Two-level tiled attention with tiling masks (module docstring): o [B, Hq, S, D], or (o, lse).

    ``full_mask`` [S, T] bool (benchmark baseline only): cut tile masks from this materialized mask
    instead of the compressed one, everything else unchanged.
    """
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if Hq % Hkv or k.shape != v.shape or k.shape[0] != B or k.shape[-1] != D:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit GQA")
    if sliding_window < 0 or min(block_m, block_n, stripe) < 1:
        raise ValueError(f"sliding_window {sliding_window} must be >= 0 and tiles >= 1")
    scale = D**-0.5 if scale is None else scale
    mask = CompressedCausalMask(block_m, block_n, q.device) if full_mask is None else None
    qg = q.reshape(B, Hkv, Hq // Hkv, S, D)
    out = torch.empty(B, Hkv, Hq // Hkv, S, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hkv, Hq // Hkv, S, dtype=torch.float32, device=q.device)
    for r0 in range(0, S, block_m):
        rows = min(block_m, S - r0)
        first_pos = T - S + r0
        lo, hi = 0, T
        if causal:
            hi = min(T, first_pos + rows)
        if sliding_window > 0:
            lo = max(0, first_pos - sliding_window + 1)
        q_rows = qg[..., r0 : r0 + rows, :].float() * scale
        acc, m, l_sum = _row_block(
            q_rows, k, v, mask, full_mask, first_pos, r0, lo, hi, block_n, stripe, causal, sliding_window
        )
        seen = l_sum > 0
        out[..., r0 : r0 + rows, :] = acc / torch.where(seen, l_sum, 1.0).unsqueeze(-1)
        lse[..., r0 : r0 + rows] = torch.where(seen, m + torch.log(torch.where(seen, l_sum, 1.0)), -torch.inf)
    o = out.reshape(B, Hq, S, D).to(q.dtype)
    return (o, lse.reshape(B, Hq, S)) if return_lse else o


def _row_block(qs, k, v, mask, full_mask, first_pos, r0, lo, hi, block_n, stripe, causal, window):
    """One block of query rows (already scaled) over keys [lo, hi): (acc, running max, running sum)."""
    B, Hkv, G, rows, D = qs.shape
    m = torch.full((B, Hkv, G, rows), float("-inf"), device=qs.device)
    l_sum = torch.zeros(B, Hkv, G, rows, device=qs.device)
    acc = torch.zeros(B, Hkv, G, rows, D, device=qs.device)
    for c0 in range(lo // block_n * block_n, hi, block_n):
        cols = min(block_n, k.shape[2] - c0)
        if full_mask is None:
            visible = tile_visibility(mask, rows, cols, first_pos, c0, causal, window)
        else:
            visible = full_mask[r0 : r0 + rows, c0 : c0 + cols]
        if visible is False:
            continue
        k_blk, v_blk = k[:, :, c0 : c0 + cols].float(), v[:, :, c0 : c0 + cols].float()
        s = torch.einsum("bhgid,bhjd->bhgij", qs, k_blk)  # level 1: the outer block, one matmul
        p = torch.empty_like(s)
        alpha = torch.empty_like(m)
        for i0 in range(0, rows, stripe):  # level 2: the softmax in row stripes
            i1 = min(rows, i0 + stripe)
            st = s[..., i0:i1, :]
            if visible is not None:
                st = st.masked_fill(~visible[i0:i1], float("-inf"))
            m_old = m[..., i0:i1]
            m_new = torch.maximum(m_old, st.amax(-1))
            m_use = torch.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            p[..., i0:i1, :] = torch.exp(st - m_use.unsqueeze(-1))
            alpha[..., i0:i1] = torch.exp(m_old - m_use)
            l_sum[..., i0:i1] = l_sum[..., i0:i1] * alpha[..., i0:i1] + p[..., i0:i1, :].sum(-1)
            m[..., i0:i1] = m_new
        acc = acc * alpha.unsqueeze(-1) + torch.einsum("bhgij,bhjd->bhgid", p, v_blk)  # level 1: P V
    return acc, m, l_sum


def paged_attention_npu(
    q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens,
    *, num_heads: int, num_kv_heads: int, scale: float, causal: bool = True, sliding_window: int = 0,
):  # fmt: skip
    """The FlashAttention node (paged_attention_ref) with ``npu_attention`` per row; pools updated in place.

    Each row's keys are gathered from the pool and its real queries (total - past of them) attend with
    bottom-right alignment, which puts query s at position past + s. Padding queries get zeros.
    """
    B, S, _ = q.shape
    _, block_size, width = k_cache.shape
    D = width // num_kv_heads
    slots = slot_mapping.reshape(-1)
    k_cache.view(-1, width).index_copy_(0, slots, k.reshape(-1, width).to(k_cache.dtype))
    v_cache.view(-1, width).index_copy_(0, slots, v.reshape(-1, width).to(v_cache.dtype))
    out = torch.zeros_like(q)
    past, total = past_lens.tolist(), total_lens.tolist()
    for b in range(B):
        n_new = total[b] - past[b]
        if n_new <= 0:
            continue
        pos = torch.arange(total[b], device=q.device)
        key_slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
        keys = k_cache.view(-1, num_kv_heads, D)[key_slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, T, D]
        values = v_cache.view(-1, num_kv_heads, D)[key_slots].transpose(0, 1).unsqueeze(0)
        qb = q[b, :n_new].view(n_new, num_heads, D).transpose(0, 1).unsqueeze(0)  # [1, Hq, S_b, D]
        ob = npu_attention(qb, keys, values, scale=scale, causal=causal, sliding_window=sliding_window)
        out[b, :n_new] = ob[0].transpose(0, 1).reshape(n_new, num_heads * D).to(q.dtype)
    return out, k_cache, v_cache
