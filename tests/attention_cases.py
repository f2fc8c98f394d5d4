"""Random inputs for the FlashAttention node's contract, shared by the kernel and function-body tests."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from kernels.kv_quant import dequantize_kv_ref, group_size, paged_attention_quant_ref, quantize_kv_ref
from kernels.reference import paged_attention_ref


def make_case(
    *,
    seed: int,
    past_lens: list[int],
    new_lens: list[int],
    num_heads: int = 9,
    num_kv_heads: int = 3,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    kv_dtype: torch.dtype | None = None,
) -> dict:
    """B rows with their own past and new lengths, right-padded to S, over a shuffled paged pool."""
    g = torch.Generator().manual_seed(seed)
    B, S = len(past_lens), max(new_lens)
    kv_width = num_kv_heads * head_dim
    blocks_per_row = [(p + n + block_size - 1) // block_size for p, n in zip(past_lens, new_lens)]
    max_blocks = max(blocks_per_row)
    num_blocks = 1 + sum(blocks_per_row)  # block 0: scratch for padding tokens
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    block_table = torch.zeros(B, max_blocks, dtype=torch.int32)
    slot_mapping = torch.zeros(B, S, dtype=torch.int64)  # padding -> slot 0 of the scratch block
    for b in range(B):
        row = [order.pop() for _ in range(blocks_per_row[b])]
        block_table[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
        for s in range(new_lens[b]):
            p = past_lens[b] + s
            slot_mapping[b, s] = row[p // block_size] * block_size + p % block_size
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return dict(
        q=randn(B, S, num_heads * head_dim),
        k=randn(B, S, kv_width),
        v=randn(B, S, kv_width),
        k_cache=randn(num_blocks, block_size, kv_width).to(kv_dtype or dtype),
        v_cache=randn(num_blocks, block_size, kv_width).to(kv_dtype or dtype),
        block_table=block_table,
        slot_mapping=slot_mapping,
        past_lens=torch.tensor(past_lens, dtype=torch.int32),
        total_lens=torch.tensor([p + n for p, n in zip(past_lens, new_lens)], dtype=torch.int32),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        new_lens=new_lens,
    )


INPUT_NAMES = ["q", "k", "v", "k_cache", "v_cache", "block_table", "slot_mapping", "past_lens", "total_lens"]


def reference(case: dict, *, causal: bool = True, sliding_window: int = 0):
    head_dim = case["q"].shape[-1] // case["num_heads"]
    return paged_attention_ref(
        *(case[n] for n in INPUT_NAMES),
        num_heads=case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        scale=head_dim**-0.5,
        causal=causal,
        sliding_window=sliding_window,
    )


QUANT_INPUT_NAMES = ["k_scale", "v_scale", "k_mean"]


def quantized_case(case: dict, kv_format: str) -> dict:
    """The case with its pools quantized to `kv_format` (kernels/kv_quant.py) and a K channel mean."""
    width = case["k"].shape[-1]
    group = group_size(kv_format, width // case["num_kv_heads"])
    g = torch.Generator().manual_seed(99)
    k_mean = (0.5 * torch.randn(width, generator=g)).to(case["q"].dtype)
    k_codes, k_scale = quantize_kv_ref(case["k_cache"].float() - k_mean.float(), kv_format, group)
    v_codes, v_scale = quantize_kv_ref(case["v_cache"].float(), kv_format, group)
    return {**case, "k_cache": k_codes, "v_cache": v_codes, "k_scale": k_scale, "v_scale": v_scale,
            "k_mean": k_mean, "kv_format": kv_format}  # fmt: skip


def quantized_reference(case: dict, kv_format: str, *, causal: bool = True, sliding_window: int = 0):
    head_dim = case["q"].shape[-1] // case["num_heads"]
    return paged_attention_quant_ref(
        *(case[n] for n in INPUT_NAMES + QUANT_INPUT_NAMES),
        num_heads=case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        scale=head_dim**-0.5,
        kv_format=kv_format,
        causal=causal,
        sliding_window=sliding_window,
    )


def single_node_model(case: dict, *, causal: bool, sliding_window: int, functions=()) -> onnx.ModelProto:
    """A model holding one FlashAttention node; `functions` may carry its body."""
    elem = helper.np_dtype_to_tensor_dtype(case["q"].numpy().dtype)
    kv_elem = helper.np_dtype_to_tensor_dtype(case["k_cache"].numpy().dtype)
    head_dim = case["q"].shape[-1] // case["num_heads"]
    quantized = "kv_format" in case
    kv_format = case.get("kv_format") or {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}[kv_elem]
    extra_in, extra_out = (QUANT_INPUT_NAMES, ["k_scale_out", "v_scale_out"]) if quantized else ([], [])
    node = helper.make_node(
        "FlashAttention",
        INPUT_NAMES + extra_in,
        ["o", "k_cache_out", "v_cache_out"] + extra_out,
        domain="fastattention",
        num_heads=case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        scale=float(head_dim**-0.5),
        causal=int(causal),
        sliding_window=sliding_window,
        kv_format=kv_format,
    )
    types = dict(block_table=TensorProto.INT32, slot_mapping=TensorProto.INT64)
    types.update(past_lens=TensorProto.INT32, total_lens=TensorProto.INT32, k_cache=kv_elem, v_cache=kv_elem)
    types.update(k_scale=TensorProto.FLOAT16, v_scale=TensorProto.FLOAT16)
    inputs = [helper.make_tensor_value_info(n, types.get(n, elem), None) for n in INPUT_NAMES + extra_in]
    outputs = [helper.make_tensor_value_info("o", elem, None)]
    outputs += [helper.make_tensor_value_info(n, kv_elem, None) for n in ("k_cache_out", "v_cache_out")]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT16, None) for n in extra_out]
    graph = helper.make_graph([node], "flash_attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("fastattention", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def feeds(case: dict) -> dict[str, np.ndarray]:
    names = INPUT_NAMES + (QUANT_INPUT_NAMES if "kv_format" in case else [])
    return {n: case[n].numpy() for n in names}


def max_error_on_real_rows(out: torch.Tensor, ref: torch.Tensor, new_lens: list[int]) -> float:
    """max |out - ref| over real (non-padding) query rows."""
    return max(float((out[b, :n].float() - ref[b, :n].float()).abs().max()) for b, n in enumerate(new_lens))


def caches_match(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Pools equal outside block 0, the scratch block that padding tokens write in any order."""
    return torch.equal(out[1:], ref[1:])


def check_quantized_outputs(outputs, case: dict, kv_format: str, *, causal=True, sliding_window=0, atol=1e-5):
    """An implementation's (o, k_codes, v_codes, k_scales, v_scales) against the spec. Quantizing is
    allowed to differ by one code step on rare near-ties (implementations divide or multiply by the
    reciprocal); the attention must then be exact over the pools the implementation wrote."""
    o, *pools = outputs
    expected = quantized_reference(case, kv_format, causal=causal, sliding_window=sliding_window)
    group = group_size(kv_format, case["k"].shape[-1] // case["num_kv_heads"])
    for got, want in zip(pools[2:], expected[3:]):  # scales: exact
        assert caches_match(got, want)
    for got, want, scales in zip(pools[:2], expected[1:3], pools[2:]):
        step = dequantize_kv_ref(got, scales, kv_format, group) - dequantize_kv_ref(
            want, scales, kv_format, group
        )
        codes = (step / scales.float().repeat_interleave(group, -1)).abs()[1:]
        assert codes.max() <= 1.0 + 1e-6 and (codes > 0.5).float().mean() <= 0.01
    keys = dequantize_kv_ref(pools[0], pools[2], kv_format, group)
    values = dequantize_kv_ref(pools[1], pools[3], kv_format, group)
    flat = case["slot_mapping"].reshape(-1).long()
    width = case["k"].shape[-1]
    head_dim = width // case["num_kv_heads"]
    o_ref, _, _ = paged_attention_ref(
        case["q"], keys.view(-1, width)[flat].view_as(case["k"]),
        values.view(-1, width)[flat].view_as(case["v"]),
        keys, values, case["block_table"], case["slot_mapping"], case["past_lens"], case["total_lens"],
        num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=head_dim**-0.5, causal=causal,
        sliding_window=sliding_window,
    )  # fmt: skip
    assert max_error_on_real_rows(o, o_ref, case["new_lens"]) <= atol
