"""Quantized KV formats: the fp32 specification every kernel and the graph's function body match.

Formats (the attention op's `kv_format` attribute, the manifest's `kv_cache.format`):

    int8   codes int8 [.., W], one scale per token per group of `group` channels (group = head_dim)
    int4   codes packed two per byte uint8 [.., W // 2] (low nibble = even channel, two's complement),
           one scale per token per group of 32 channels

K is smoothed first: a static per-channel mean (calibrated at export, per layer) is subtracted
before quantizing. That mean is never added back: it shifts every score of a query by the same
amount, which softmax ignores (q.(k - m) = q.k - q.m). V is quantized as it is. Scales are fp16,
stored beside the codes: symmetric, scale = fp16(max|x| / qmax) over the group (qmax 127 or 7), codes =
round-half-even(x * fp32(1 / scale)) clamped to [-qmax, qmax]; an all-zero group has scale 1. Quantization
happens when a token is written (no re-quantization later), so a cache never re-reads lost precision.
"""

from __future__ import annotations

import torch

from kernels.kv_formats import KV_QUANT_FORMATS, code_width, group_size
from kernels.reference import paged_attention_ref

__all__ = ["KV_QUANT_FORMATS", "code_width", "group_size", "quantize_kv_ref", "dequantize_kv_ref"]


def quantize_kv_ref(x: torch.Tensor, kv_format: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., W] float -> (codes, scales [..., W // group] fp16)."""
    bits, qmax = KV_QUANT_FORMATS[kv_format]
    xf = x.float().unflatten(-1, (-1, group))
    scale = (xf.abs().amax(-1) / qmax).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inverse = 1.0 / scale.float().unsqueeze(-1)  # multiply by the fp32 reciprocal: cheap, and every
    codes = (
        torch.round(xf * inverse).clamp(-qmax, qmax).to(torch.int8).flatten(-2)
    )  # kernel agrees bit for bit
    if bits == 4:
        nibbles = codes.to(torch.uint8) & 0x0F
        codes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return codes, scale


def dequantize_kv_ref(codes: torch.Tensor, scales: torch.Tensor, kv_format: str, group: int) -> torch.Tensor:
    """(codes, scales) -> [..., W] float32."""
    if KV_QUANT_FORMATS[kv_format][0] == 4:
        low = (codes & 0x0F).to(torch.int8)
        high = (codes >> 4).to(torch.int8)
        signed = torch.stack([low, high], dim=-1).flatten(-2)
        codes = torch.where(signed > 7, signed - 16, signed)
    values = codes.float().unflatten(-1, (-1, group)) * scales.float().unsqueeze(-1)
    return values.flatten(-2)


def paged_attention_quant_ref(
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
    """The FlashAttention node with a quantized pool. Pools: k_cache/v_cache codes [NB, BS, code width],
    k_scales/v_scales fp16 [NB, BS, W // group]; k_mean [W] (the layer's calibrated K channel means).
    New K/V are quantized into their slots, then attention runs over the dequantized (smoothed) keys.
    Returns (o, k_cache, v_cache, k_scales, v_scales), the pools updated (copies)."""
    width = k.shape[-1]
    group = group_size(kv_format, width // num_kv_heads)
    pools = [t.clone() for t in (k_cache, v_cache, k_scales, v_scales)]
    flat = slot_mapping.reshape(-1).long()
    for x, codes_pool, scale_pool in ((k - k_mean, pools[0], pools[2]), (v, pools[1], pools[3])):
        codes, scales = quantize_kv_ref(x.reshape(-1, width), kv_format, group)
        codes_pool.view(-1, codes_pool.shape[-1])[flat] = codes
        scale_pool.view(-1, scale_pool.shape[-1])[flat] = scales
    keys = dequantize_kv_ref(pools[0], pools[2], kv_format, group)
    values = dequantize_kv_ref(pools[1], pools[3], kv_format, group)
    # the written slots already hold the quantized new tokens: re-writing them (as k_smoothed) is a no-op
    o, _, _ = paged_attention_ref(
        q, keys.view(-1, width)[flat].view_as(k), values.view(-1, width)[flat].view_as(v), keys, values,
        block_table, slot_mapping, past_lens, total_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
        scale=scale, causal=causal, sliding_window=sliding_window,
    )  # fmt: skip
    return (o, *pools)
