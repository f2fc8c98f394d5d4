"""Random inputs for the FlashAttention node's contract, shared by the kernel and function-body tests."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

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


def single_node_model(case: dict, *, causal: bool, sliding_window: int, functions=()) -> onnx.ModelProto:
    """A model holding one FlashAttention node; `functions` may carry its body."""
    elem = helper.np_dtype_to_tensor_dtype(case["q"].numpy().dtype)
    kv_elem = helper.np_dtype_to_tensor_dtype(case["k_cache"].numpy().dtype)
    head_dim = case["q"].shape[-1] // case["num_heads"]
    node = helper.make_node(
        "FlashAttention",
        INPUT_NAMES,
        ["o", "k_cache_out", "v_cache_out"],
        domain="fastattention",
        num_heads=case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        scale=float(head_dim**-0.5),
        causal=int(causal),
        sliding_window=sliding_window,
        kv_format={TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}[kv_elem],
    )
    types = dict(block_table=TensorProto.INT32, slot_mapping=TensorProto.INT64)
    types.update(past_lens=TensorProto.INT32, total_lens=TensorProto.INT32, k_cache=kv_elem, v_cache=kv_elem)
    inputs = [helper.make_tensor_value_info(n, types.get(n, elem), None) for n in INPUT_NAMES]
    outputs = [helper.make_tensor_value_info("o", elem, None)]
    outputs += [helper.make_tensor_value_info(n, kv_elem, None) for n in ("k_cache_out", "v_cache_out")]
    graph = helper.make_graph([node], "flash_attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("fastattention", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def feeds(case: dict) -> dict[str, np.ndarray]:
    return {n: case[n].numpy() for n in INPUT_NAMES}


def max_error_on_real_rows(out: torch.Tensor, ref: torch.Tensor, new_lens: list[int]) -> float:
    """max |out - ref| over real (non-padding) query rows."""
    return max(float((out[b, :n].float() - ref[b, :n].float()).abs().max()) for b, n in enumerate(new_lens))


def caches_match(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Pools equal outside block 0, the scratch block that padding tokens write in any order."""
    return torch.equal(out[1:], ref[1:])
