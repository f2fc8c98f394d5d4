"""The ONNX function body of `fastattention::FlashAttention`: the portable fallback.

When no kernel for the custom op is registered, ONNX Runtime inlines this body, so the model runs
unchanged on any execution provider. It spells out the contract of `kernels/reference.py` with
standard opset-23 ops: ScatterND writes the new K/V into the flat pool, Gather follows each row's
block table, a boolean mask encodes lengths, causality and the sliding window, and one
`Attention` node (3-D inputs, native GQA) does the rest. It materializes each row's keys, so it
is slower than a kernel; it is the reference graph, not the fast path.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from exporters.model import ATTENTION_DOMAIN, ATTENTION_OP

INPUTS = ["q", "k", "v", "k_cache", "v_cache", "block_table", "slot_mapping", "past_lens", "total_lens"]
OUTPUTS = ["o", "k_cache_out", "v_cache_out"]
ATTRIBUTES = ["num_heads", "num_kv_heads", "scale", "causal", "sliding_window", "kv_format"]


def _const_ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_ints=values)


def _attr_const(name: str, attr: str, kind: int) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute `attr`."""
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[kind]
    node = helper.make_node("Constant", [], [name])
    ref = onnx.AttributeProto(name=field, ref_attr_name=attr, type=kind)
    node.attribute.append(ref)
    return node


def _ref_attr(name: str, attr: str, kind: int) -> onnx.AttributeProto:
    return onnx.AttributeProto(name=name, ref_attr_name=attr, type=kind)


def _write_pool(prefix: str) -> list[onnx.NodeProto]:
    """{prefix}_cache_out = the pool with {prefix}'s rows scattered to (block, offset) of slot_mapping.

    ScatterND writes straight into the node's output, so when the runtime binds one buffer as the
    pool's input and output, ONNX Runtime updates it in place instead of copying the whole pool.
    """
    make = helper.make_node
    return [
        make("Reshape", [prefix, "flat_shape"], [f"{prefix}_rows_q"]),
        make("CastLike", [f"{prefix}_rows_q", f"{prefix}_cache"], [f"{prefix}_rows"]),  # to the KV format
        make("ScatterND", [f"{prefix}_cache", "slots", f"{prefix}_rows"], [f"{prefix}_cache_out"]),
        make("Gather", [f"{prefix}_cache_out", "block_table"], [f"{prefix}_blocks"], axis=0),
        make("Reshape", [f"{prefix}_blocks", "row_shape"], [f"{prefix}_keys_kv"]),
        make("CastLike", [f"{prefix}_keys_kv", "q"], [f"{prefix}_keys"]),  # back to q's type
    ]


def _mask() -> list[onnx.NodeProto]:
    """visible [B, 1, S, T] from past_lens, total_lens, causal and sliding_window."""
    INT, make = onnx.AttributeProto.INT, helper.make_node
    return [
        make("Shape", ["q"], ["s_dim"], start=1, end=2),
        make("Shape", ["k_keys"], ["t_dim"], start=1, end=2),
        make("Squeeze", ["s_dim"], ["s_len"]),
        make("Squeeze", ["t_dim"], ["t_len"]),
        helper.make_node(
            "Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])
        ),
        helper.make_node(
            "Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])
        ),
        make("Range", ["zero", "s_len", "one"], ["query_index"]),
        make("Range", ["zero", "t_len", "one"], ["key_index"]),
        _const_ints("axes_12", [1, 2]),
        _const_ints("axes_01", [0, 1]),
        _const_ints("axes_02", [0, 2]),
        _const_ints("axes_1", [1]),
        make("Cast", ["past_lens"], ["past64"], to=TensorProto.INT64),
        make("Cast", ["total_lens"], ["total64"], to=TensorProto.INT64),
        make("Unsqueeze", ["past64", "axes_12"], ["past_b"]),  # [B, 1, 1]
        make("Unsqueeze", ["total64", "axes_12"], ["total_b"]),
        make("Unsqueeze", ["query_index", "axes_02"], ["query_b"]),  # [1, S, 1]
        make("Unsqueeze", ["key_index", "axes_01"], ["key_b"]),  # [1, 1, T]
        make("Add", ["past_b", "query_b"], ["pos"]),  # [B, S, 1]
        make("Less", ["key_b", "total_b"], ["in_row"]),
        make("LessOrEqual", ["key_b", "pos"], ["before_query"]),
        _attr_const("causal_attr", "causal", INT),
        make("Equal", ["causal_attr", "zero"], ["not_causal"]),
        make("Or", ["before_query", "not_causal"], ["causal_ok"]),
        _attr_const("window", "sliding_window", INT),
        make("Sub", ["pos", "key_b"], ["distance"]),
        make("Less", ["distance", "window"], ["in_window"]),
        make("LessOrEqual", ["window", "zero"], ["no_window"]),
        make("Or", ["in_window", "no_window"], ["window_ok"]),
        make("And", ["in_row", "causal_ok"], ["visible_a"]),
        make("And", ["visible_a", "window_ok"], ["visible"]),
        make("Unsqueeze", ["visible", "axes_1"], ["mask"]),
    ]


def flash_attention_function(opset: int = 23) -> onnx.FunctionProto:
    """The FunctionProto to put in `ModelProto.functions` of a model using the op."""
    INT, FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT
    shapes = [
        helper.make_node("Shape", ["k_cache"], ["block_size"], start=1, end=2),
        helper.make_node("Shape", ["k_cache"], ["width"], start=2),
        _const_ints("minus_one", [-1]),
        _const_ints("keep_minus_one", [0, -1]),
        helper.make_node("Concat", ["minus_one", "width"], ["flat_shape"], axis=0),
        helper.make_node("Concat", ["keep_minus_one", "width"], ["row_shape"], axis=0),
        _const_ints("slot_shape", [-1, 1]),
        helper.make_node("Reshape", ["slot_mapping", "slot_shape"], ["slot_column"]),
        helper.make_node("Div", ["slot_column", "block_size"], ["slot_block"]),
        helper.make_node("Mod", ["slot_column", "block_size"], ["slot_offset"]),
        helper.make_node("Concat", ["slot_block", "slot_offset"], ["slots"], axis=1),  # [B*S, 2]
    ]
    attention = helper.make_node("Attention", ["q", "k_keys", "v_keys", "mask"], ["o_attention"])
    attention.attribute.extend(
        [
            _ref_attr("q_num_heads", "num_heads", INT),
            _ref_attr("kv_num_heads", "num_kv_heads", INT),
            _ref_attr("scale", "scale", FLOAT),
        ]
    )
    # o takes q's shape explicitly: ORT's shape inference inside a function body does not see the
    # head counts (attribute references) and would infer a wrong hidden size for o
    reshape = [
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Reshape", ["o_attention", "q_shape"], ["o"]),
    ]
    nodes = shapes + _write_pool("k") + _write_pool("v") + _mask() + [attention] + reshape
    return helper.make_function(
        ATTENTION_DOMAIN,
        ATTENTION_OP,
        INPUTS,
        OUTPUTS,
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=ATTRIBUTES,
    )
