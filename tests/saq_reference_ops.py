"""ONNX reference-evaluator ops for running an exported SAQ graph without onnxruntime or our kernel: the
graph's RMS norm, and FlashAttentionSaq bound to its spec (kernels.kv_saq.paged_attention_saq_ref).
Pass `SAQ_REFERENCE_OPS` as `new_ops` to onnx.reference.ReferenceEvaluator."""

from __future__ import annotations

import numpy as np
import torch
from onnx.reference.op_run import OpRun

from kernels.kv_formats import SaqFormat
from kernels.kv_saq import paged_attention_saq_ref


class SimplifiedLayerNormalization(OpRun):
    """ONNX Runtime's RMS norm (the graph's norms), for the reference evaluator."""

    op_domain = ""

    def _run(self, x, weight, axis=-1, epsilon=1e-5, stash_type=1):
        xf = x.astype(np.float32)
        return ((xf / np.sqrt((xf * xf).mean(axis, keepdims=True) + epsilon) * weight).astype(x.dtype),)


class FlashAttentionSaq(OpRun):
    """The node bound to its spec."""

    op_domain = "fastattention"

    def _run(self, q, k, v, pool, slots, table, slot_mapping, past, total, seq_slots, **attrs):
        t = torch.from_numpy
        o, pool, slots = paged_attention_saq_ref(
            t(q), t(k), t(v), t(pool), t(slots), t(table), t(past), t(total), t(seq_slots),
            num_heads=attrs["num_heads"], num_kv_heads=attrs["num_kv_heads"], scale=attrs["scale"],
            fmt=SaqFormat.parse(attrs["saq"], k.shape[-1]), causal=bool(attrs["causal"]),
            sliding_window=attrs["sliding_window"],
        )  # fmt: skip
        return o.numpy(), pool.numpy(), slots.numpy()


SAQ_REFERENCE_OPS = [SimplifiedLayerNormalization, FlashAttentionSaq]
