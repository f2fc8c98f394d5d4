"""fp32 specifications of the attention ops. Every fast kernel is tested against these.

Two ops:

``attention_ref(q, k, v, *, scale, causal, sliding_window)``
    Dense attention. q [B, Hq, S, D], k/v [B, Hkv, T, D], Hq a multiple of Hkv (GQA: query head h
    reads KV head h // (Hq // Hkv)). Causal masking is bottom-right aligned: query i sits at
    absolute position T - S + i and sees keys j <= T - S + i (with T == S this is the usual
    lower triangle). ``sliding_window`` W > 0 additionally hides keys with pos - j >= W.

``paged_attention_ref(...)``
    The contract of the ``fastattention::FlashAttention`` node in our ONNX graphs (version 1).
    Inputs, with B rows of S query tokens (rows shorter than S are right-padded):

    - q [B, S, Hq*D]; k, v [B, S, Hkv*D]: this step's projections, heads interleaved as in
      ``x.view(B, S, H, D)``.
    - k_cache, v_cache [num_blocks, block_size, Hkv*D]: the paged KV pool, shared by all rows.
    - block_table [B, max_blocks] int32: row b's logical KV position p lives in block
      ``block_table[b, p // block_size]`` at offset ``p % block_size``.
    - slot_mapping [B, S] int64: flat pool slot (block * block_size + offset) where token (b, s)'s
      K and V are written. Padding tokens point at a scratch slot the runtime never reads.
    - past_lens [B] int32: tokens already in row b's cache; query s sits at position past_lens[b] + s.
    - total_lens [B] int32: valid keys of row b after this step (past + real new tokens).

    Semantics: first write every new K/V into its slot, then row b query s attends over keys
    j < total_lens[b], and when causal only j <= past_lens[b] + s, and with a sliding window W > 0
    only past_lens[b] + s - j < W. A query that sees no key outputs zeros. Outputs: o [B, S, Hq*D]
    and the updated pools (the runtime binds each pool as both input and output, so kernels update
    it in place). Padded queries produce finite values that callers ignore.

``attention_alibi_ref`` and ``varlen_attention_ref`` extend ``attention_ref`` with ALiBi, the
log-sum-exp and packed variable-length batches: the specs of the Triton prefill kernel.
"""

import torch


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Dense GQA attention in fp32; returns [B, Hq, S, D] in q's dtype."""
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf = q.float().view(B, Hkv, group, S, D)
    scores = torch.einsum("bhgsd,bhtd->bhgst", qf, k.float()) * scale
    pos = torch.arange(S).view(S, 1) + (T - S)
    key = torch.arange(T).view(1, T)
    visible = torch.ones(S, T, dtype=torch.bool)
    if causal:
        visible &= key <= pos
    if sliding_window > 0:
        visible &= pos - key < sliding_window
    scores = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgst,bhtd->bhgsd", scores, v.float())
    return out.reshape(B, Hq, S, D).to(q.dtype)


def paged_attention_ref(
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
    """The FlashAttention node's contract (module docstring); returns (o, k_cache, v_cache)."""
    B, S, _ = q.shape
    num_blocks, block_size, kv_width = k_cache.shape
    D = kv_width // num_kv_heads
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    flat = slot_mapping.reshape(-1).long()
    k_cache.view(-1, kv_width)[flat] = k.reshape(-1, kv_width).to(k_cache.dtype)
    v_cache.view(-1, kv_width)[flat] = v.reshape(-1, kv_width).to(v_cache.dtype)
    out = torch.zeros(B, S, num_heads * D, dtype=torch.float32)
    for b in range(B):
        n_keys = int(total_lens[b])
        positions = torch.arange(n_keys)
        slots = block_table[b, positions // block_size].long() * block_size + positions % block_size
        keys = k_cache.view(-1, num_kv_heads, D)[slots].float().transpose(0, 1)  # [Hkv, T, D]
        values = v_cache.view(-1, num_kv_heads, D)[slots].float().transpose(0, 1)
        qb = q[b].float().view(S, num_heads, D).transpose(0, 1)  # [Hq, S, D]
        qb = qb.reshape(num_kv_heads, num_heads // num_kv_heads, S, D)
        scores = torch.einsum("hgsd,htd->hgst", qb, keys) * scale
        pos = torch.arange(S).view(S, 1) + int(past_lens[b])
        key = positions.view(1, n_keys)
        visible = torch.ones(S, n_keys, dtype=torch.bool)
        if causal:
            visible &= key <= pos
        if sliding_window > 0:
            visible &= pos - key < sliding_window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        ob = torch.einsum("hgst,htd->hgsd", probs, values).reshape(num_heads, S, D)
        out[b] = ob.transpose(0, 1).reshape(S, num_heads * D)
    return out.to(q.dtype), k_cache, v_cache


def attention_alibi_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int = 0,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_ref`` plus ALiBi and the log-sum-exp: (o [B, Hq, S, D] in q's dtype, lse [B, Hq, S]).

    ALiBi: head h's scaled score gets ``-alibi_slopes[h] * |pos_q - j|`` added (positions as in
    attention_ref; with causal this is -slope * (pos_q - j)). lse = log(sum_j exp(score_j)) over the
    visible keys. A query that sees no key outputs zeros and lse = -inf (attention_ref gives NaN there).
    """
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qf = q.float().view(B, Hkv, Hq // Hkv, S, D)
    scores = torch.einsum("bhgsd,bhtd->bhgst", qf, k.float()) * scale
    pos = torch.arange(S, device=q.device).view(S, 1) + (T - S)
    key = torch.arange(T, device=q.device).view(1, T)
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.float().view(1, Hkv, Hq // Hkv, 1, 1) * (pos - key).abs()
    visible = torch.ones(S, T, dtype=torch.bool, device=q.device)
    if causal:
        visible &= key <= pos
    if sliding_window > 0:
        visible &= pos - key < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgst,bhtd->bhgsd", probs, v.float())
    return out.reshape(B, Hq, S, D).to(q.dtype), scores.logsumexp(dim=-1).reshape(B, Hq, S)


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed batches: q [total_q, Hq, D], k/v [total_k, Hkv, D], sequence b in rows cu[b]:cu[b + 1].

    Each sequence goes through ``attention_alibi_ref(**options)`` on its own (so causal is bottom-right
    within the sequence). Returns (o [total_q, Hq, D], lse [Hq, total_q]).
    """
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        dense = (x[rows].transpose(0, 1).unsqueeze(0) for x, rows in ((q, qs), (k, ks), (v, ks)))
        o, lse = attention_alibi_ref(*dense, **options)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)
