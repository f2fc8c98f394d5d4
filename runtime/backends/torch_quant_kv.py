"""TorchBackend's node functions for quantized KV caches (runtime/backends/torch_cuda.py, part 2).

Each runs a layer's attention node over the device pool, which it updates in place, and returns (o, *the
pool tensors) as the node does. torch_cuda.py's `kv_format_attention` picks one (triton and torch only):
  - int8 / int4 (contract: kernels/kv_quant.py::paged_attention_quant_ref; the module rotates q and k by
    a Hadamard matrix and the node subtracts the layer's calibrated k_mean, read from the graph): triton:
    `TritonQuantAttention` (kernels/attention_triton_quant.py: quantizing write, split-KV decode over the
    codes; prefill over each row's dequantized keys), torch: `paged_attention_quant_torch`;
  - saq (contract: kernels/kv_saq.py::paged_attention_saq_ref; q, k and v rotated, the output rotated back
    by the module's `output`): `SaqAttention`, kernels/attention_triton_saq.py on CUDA (its Triton read
    where it takes the format; attention_kernel torch: its torch read), the spec on the CPU.
They build on the float formats' pieces in torch_cuda.py (the masked attention, TritonAttention's prefill).
"""

from __future__ import annotations

import torch

from kernels.kv_formats import SaqFormat, group_size
from kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from kernels.kv_saq import paged_attention_saq_ref
from runtime.backends.torch_cuda import (
    DECODE_KERNEL_MAX_TOKENS,
    TritonAttention,
    attend_masked,
    closing_rows,
    paged_key_slots,
)


def paged_attention_quant_torch(
    q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens, k_scales, v_scales, k_mean,
    *, num_heads: int, num_kv_heads: int, scale: float, kv_format: str, causal: bool = True,
    sliding_window: int = 0,
):  # fmt: skip
    """paged_attention_quant_ref's semantics, vectorized as paged_attention_torch: k - k_mean and v are
    quantized into their slots (quantize_kv_ref, in place), then every row reads the dequantized keys of
    all its block-table positions, masked. Returns (o, k_cache, v_cache, k_scales, v_scales)."""
    block_size, width = k_cache.shape[1], k.shape[-1]
    group = group_size(kv_format, width // num_kv_heads)
    slots = slot_mapping.reshape(-1)
    for x, codes_pool, scale_pool in ((k - k_mean, k_cache, k_scales), (v, v_cache, v_scales)):
        codes, scales = quantize_kv_ref(x.reshape(-1, width), kv_format, group)
        codes_pool.view(-1, codes_pool.shape[-1]).index_copy_(0, slots, codes)
        scale_pool.view(-1, scale_pool.shape[-1]).index_copy_(0, slots, scales)
    key_slots = paged_key_slots(block_table, block_size)
    keys, values = (
        dequantize_kv_ref(_rows(codes)[key_slots], _rows(scales)[key_slots], kv_format, group)
        for codes, scales in ((k_cache, k_scales), (v_cache, v_scales))
    )
    out = attend_masked(
        q, keys, values, past_lens, total_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale,
        causal=causal, sliding_window=sliding_window,
    )  # fmt: skip
    return out, k_cache, v_cache, k_scales, v_scales


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """A per-token pool [num_blocks, block_size, width] as rows [num_blocks * block_size, width]."""
    return pool.view(-1, pool.shape[-1])


class TritonQuantAttention(TritonAttention):
    """The FlashAttention node over an int8 / int4 pool with kernels/attention_triton_quant.py (CUDA, fp16
    activations), in place (contract: paged_attention_quant_ref). Rows of up to 16 new tokens:
    `paged_attention_quant` (quantizing write, split-KV decode reading the codes). Longer ones: the same
    write, then each row's keys dequantized (smoothed, as the decode kernel sees them) into a packed fp16
    batch for TritonAttention's varlen prefill."""

    def __init__(self) -> None:
        super().__init__()
        from kernels import attention_triton_quant

        self._quant = attention_triton_quant

    def __call__(self, q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens, k_scales,
                 v_scales, k_mean, *, kv_format: str, **attrs):  # fmt: skip
        B, S, _ = q.shape
        pools = (k_cache, v_cache, k_scales, v_scales)
        if S <= DECODE_KERNEL_MAX_TOKENS:
            inputs = (q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens)
            return self._quant.paged_attention_quant(*inputs, k_scales, v_scales, k_mean, kv_format=kv_format,
                                                     **attrs)  # fmt: skip
        D = q.shape[-1] // attrs["num_heads"]
        self._quant.write_kv_cache_quant(k, v, k_mean, *pools, slot_mapping, kv_format=kv_format, head_dim=D)
        plan = self._plan(block_table, past_lens, total_lens, S, k_cache.shape[1])
        group = group_size(kv_format, D)
        keys, values = (
            dequantize_kv_ref(_rows(codes)[plan.key_slots], _rows(scales)[plan.key_slots], kv_format, group)
            .to(q.dtype)
            .view(-1, attrs["num_kv_heads"], D)
            for codes, scales in ((k_cache, k_scales), (v_cache, v_scales))
        )
        return (self._prefill(q, keys, values, plan, attrs), *pools)


class SaqAttention:
    """The FlashAttentionSaq node over a layer's kv_pool / kv_slots, in place (contract:
    paged_attention_saq_ref). On CUDA: kernels/attention_triton_saq.py's `paged_attention_saq`, its Triton
    read kernel where it takes the format (`use_kernel` False: its torch read), the write on the device
    after one copy of the step's lengths and slots to the host (made once per step, for all layers). On
    the CPU: the spec itself, its copies written back into the pool."""

    def __init__(self, device: torch.device, use_kernel: bool | None = None) -> None:
        self._saq = None
        if device.type == "cuda" or use_kernel:  # use_kernel on the CPU: Triton's interpreter (tests)
            from kernels import attention_triton_saq

            self._saq = attention_triton_saq
        self._use_kernel = use_kernel
        self._last: tuple | None = None  # (device inputs..., their host copies) of the last step
        self.in_graph = False  # steps being captured into a CUDA graph: device-only (`graph_step`)

    def graphable(self, fmt: SaqFormat, head_dim: int) -> bool:
        """Whether `graph_step` can run this format: the Triton read takes it."""
        kernel = self._saq is not None and self._use_kernel is not False
        return kernel and self._saq.kernel_supports(fmt, head_dim)

    def __call__(self, q, k, v, kv_pool, kv_slots, block_table, past_lens, total_lens, seq_slots, **attrs):
        inputs = (block_table, past_lens, total_lens, seq_slots)
        if self.in_graph:
            return self.graph_step(q, k, v, kv_pool, kv_slots, *inputs, **attrs)
        if self._saq is None:
            o, pool, slots = paged_attention_saq_ref(q, k, v, kv_pool, kv_slots, *inputs, **attrs)
            kv_pool.copy_(pool)
            kv_slots.copy_(slots)
            return o, kv_pool, kv_slots
        host = self._host(inputs)
        return self._saq.paged_attention_saq(q, k, v, kv_pool, kv_slots, *host, use_kernel=self._use_kernel,
                                             **attrs)  # fmt: skip

    def graph_step(self, q, k, v, kv_pool, kv_slots, block_table, past_lens, total_lens, seq_slots, *, fmt,
                   **attrs):  # fmt: skip
        """A decode step with no host reads (CUDA-graph capturable): the Triton read, then each row's one
        new token into its open stage's row past % stage. The caller guarantees one token per row, and
        closes the stages the step completes afterwards (`close_stages`); padding rows write the scratch
        slot."""
        o = self._saq.flash_attention_decode_saq(q, k, v, kv_pool, kv_slots, block_table, past_lens,
                                                 total_lens, seq_slots, fmt=fmt, **attrs)  # fmt: skip
        tails = self._saq.open_stage_tails(kv_slots, fmt)
        slot, row = seq_slots.long(), (past_lens % fmt.stage).long()
        tails[slot, 0, row] = k[:, 0].to(torch.float16)
        tails[slot, 1, row] = v[:, 0].to(torch.float16)
        return o, kv_pool, kv_slots

    def close_stages(self, pools: list[torch.Tensor], batch, fmt: SaqFormat) -> None:
        """After `graph_step` over every layer: close the stage each row's token completed (its open stage
        is full now), in every layer, as one batch (kernels/attention_triton_saq.close_stages). pools:
        the backend's (kv_pool, kv_slots) per layer; batch: the step's StepBatch (host arrays)."""
        from kernels.kv_saq import _SlotView

        rows = closing_rows(batch, fmt.stage)
        views = [
            _SlotView(pool, slots, int(batch.seq_slots[b]), batch.block_table[b], fmt)
            for pool, slots in zip(pools[0::2], pools[1::2])
            for b in rows
        ]
        if views:
            stages = [int(batch.past_lens[b]) // fmt.stage for b in rows] * (len(pools) // 2)
            k, v = (torch.stack([view.tail(i) for view in views]).float() for i in (0, 1))
            self._saq.close_stages(views, stages, k, v)

    def _host(self, inputs: tuple) -> list[torch.Tensor]:
        """The step's block table, lengths and slots on the host: one device-to-host copy per step."""
        if self._last is None or any(a is not b for a, b in zip(self._last[:4], inputs)):
            flat = torch.cat([x.reshape(-1).to(torch.int32) for x in inputs]).cpu()
            sizes = [x.numel() for x in inputs]
            host = [part.view(x.shape) for part, x in zip(flat.split(sizes), inputs)]
            self._last = (*inputs, host)
        return self._last[4]
