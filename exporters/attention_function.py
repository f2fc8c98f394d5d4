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
from kernels.kv_formats import KV_QUANT_FORMATS, group_size

INPUTS = ["q", "k", "v", "k_cache", "v_cache", "block_table", "slot_mapping", "past_lens", "total_lens"]
OUTPUTS = ["o", "k_cache_out", "v_cache_out"]
QUANT_INPUTS = ["k_scale", "v_scale", "k_mean"]  # quantized formats (kernels/kv_quant.py) add these
QUANT_OUTPUTS = ["k_scale_out", "v_scale_out"]
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


def _write_quantized_pool(prefix: str, kv_format: str, group: int) -> list[onnx.NodeProto]:
    """As _write_pool, for the quantized formats of kernels/kv_quant.py: quantize the new rows per
    token and group (K smoothed by k_mean first), scatter codes and scales, gather and dequantize."""
    make = helper.make_node
    bits, qmax = KV_QUANT_FORMATS[kv_format]
    p = prefix
    source = f"{p}_smoothed" if p == "k" else p
    nodes = [make("Sub", ["k", "k_mean"], ["k_smoothed"])] if p == "k" else []
    nodes += [
        make("Reshape", [source, "flat_shape"], [f"{p}_rows"]),
        make("Reshape", [f"{p}_rows", "group_shape"], [f"{p}_groups"]),  # [N, G, group]
        make("Abs", [f"{p}_groups"], [f"{p}_abs"]),
        make("ReduceMax", [f"{p}_abs", "last_axis"], [f"{p}_amax"], keepdims=1),
        make("Div", [f"{p}_amax", "qmax"], [f"{p}_scale_raw"]),
        make("Cast", [f"{p}_scale_raw"], [f"{p}_scale16"], to=TensorProto.FLOAT16),
        make("Equal", [f"{p}_scale16", "zero16"], [f"{p}_scale_zero"]),
        make("Where", [f"{p}_scale_zero", "one16", f"{p}_scale16"], [f"{p}_scale_q"]),  # [N, G, 1]
        make("CastLike", [f"{p}_scale_q", f"{p}_groups"], [f"{p}_scale_f"]),
        make("Reciprocal", [f"{p}_scale_f"], [f"{p}_inverse"]),
        make("Mul", [f"{p}_groups", f"{p}_inverse"], [f"{p}_ratio"]),
        make("Round", [f"{p}_ratio"], [f"{p}_rounded"]),
        make("Clip", [f"{p}_rounded", "neg_qmax", "qmax"], [f"{p}_clipped"]),
        make("Reshape", [f"{p}_clipped", "flat_shape"], [f"{p}_code_values"]),  # [N, W]
        make("Reshape", [f"{p}_scale_q", "keep_minus_one"], [f"{p}_scale_rows"]),  # [N, G]
    ]
    if bits == 8:
        nodes.append(make("Cast", [f"{p}_code_values"], [f"{p}_codes"], to=TensorProto.INT8))
    else:  # two's complement nibbles, even channel in the low nibble
        nodes += [
            make("Cast", [f"{p}_code_values"], [f"{p}_ints"], to=TensorProto.INT32),
            make("Add", [f"{p}_ints", "sixteen"], [f"{p}_shifted"]),
            make("Mod", [f"{p}_shifted", "sixteen"], [f"{p}_nibbles"]),
            make("Reshape", [f"{p}_nibbles", "pair_shape"], [f"{p}_pairs"]),  # [N, W/2, 2]
            make("Split", [f"{p}_pairs"], [f"{p}_low", f"{p}_high"], axis=-1, num_outputs=2),
            make("Mul", [f"{p}_high", "sixteen"], [f"{p}_high_shifted"]),
            make("Add", [f"{p}_low", f"{p}_high_shifted"], [f"{p}_bytes"]),
            make("Reshape", [f"{p}_bytes", "keep_minus_one"], [f"{p}_bytes_rows"]),
            make("Cast", [f"{p}_bytes_rows"], [f"{p}_codes"], to=TensorProto.UINT8),
        ]
    nodes += [
        make("ScatterND", [f"{p}_cache", "slots", f"{p}_codes"], [f"{p}_cache_out"]),
        make("ScatterND", [f"{p}_scale", "slots", f"{p}_scale_rows"], [f"{p}_scale_out"]),
        make("Gather", [f"{p}_cache_out", "block_table"], [f"{p}_code_blocks"], axis=0),
        make("Reshape", [f"{p}_code_blocks", "keep_zero_minus_one_cw"], [f"{p}_key_codes"]),  # [B, T, CW]
        make("Gather", [f"{p}_scale_out", "block_table"], [f"{p}_scale_blocks"], axis=0),
        make("Reshape", [f"{p}_scale_blocks", "keep_zero_minus_one_g"], [f"{p}_key_scales16"]),  # [B, T, G]
        make("CastLike", [f"{p}_key_scales16", "q"], [f"{p}_key_scales"]),
        make("Unsqueeze", [f"{p}_key_scales", "last_axis"], [f"{p}_key_scales_column"]),
    ]
    if bits == 8:
        nodes.append(make("CastLike", [f"{p}_key_codes", "q"], [f"{p}_key_values"]))
    else:
        nodes += [
            make("Cast", [f"{p}_key_codes"], [f"{p}_key_u"], to=TensorProto.INT32),
            make("Mod", [f"{p}_key_u", "sixteen"], [f"{p}_key_low"]),
            make("Div", [f"{p}_key_u", "sixteen"], [f"{p}_key_high"]),
            make("Unsqueeze", [f"{p}_key_low", "last_axis"], [f"{p}_key_low1"]),
            make("Unsqueeze", [f"{p}_key_high", "last_axis"], [f"{p}_key_high1"]),
            make("Concat", [f"{p}_key_low1", f"{p}_key_high1"], [f"{p}_key_nibbles"], axis=-1),
            make("Reshape", [f"{p}_key_nibbles", "keep_zero_minus_one_w"], [f"{p}_key_unsigned"]),
            make("Greater", [f"{p}_key_unsigned", "seven"], [f"{p}_key_negative"]),
            make("Sub", [f"{p}_key_unsigned", "sixteen"], [f"{p}_key_minus"]),
            make("Where", [f"{p}_key_negative", f"{p}_key_minus", f"{p}_key_unsigned"], [f"{p}_key_signed"]),
            make("CastLike", [f"{p}_key_signed", "q"], [f"{p}_key_values"]),
        ]
    nodes += [
        make("Reshape", [f"{p}_key_values", "key_group_shape"], [f"{p}_key_groups"]),  # [B, T, G, group]
        make("Mul", [f"{p}_key_groups", f"{p}_key_scales_column"], [f"{p}_key_scaled"]),
        make("Reshape", [f"{p}_key_scaled", "keep_zero_minus_one_w"], [f"{p}_keys"]),
    ]
    return nodes


def _quant_constants(kv_format: str, group: int) -> list[onnx.NodeProto]:
    qmax = float(KV_QUANT_FORMATS[kv_format][1])
    scalar = lambda name, kind, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, kind, [], [value])
    )
    return [
        scalar("qmax", TensorProto.FLOAT, qmax),
        scalar("neg_qmax", TensorProto.FLOAT, -qmax),
        scalar("zero16", TensorProto.FLOAT16, 0.0),
        scalar("one16", TensorProto.FLOAT16, 1.0),
        scalar("sixteen", TensorProto.INT32, 16),
        scalar("seven", TensorProto.INT32, 7),
        _const_ints("last_axis", [-1]),
        _const_ints("group_shape", [0, -1, group]),
        _const_ints("pair_shape", [0, -1, 2]),
        _const_ints("keep_zero_minus_one_w", [0, 0, -1]),
        helper.make_node("Shape", ["k_cache"], ["code_width"], start=2),
        helper.make_node("Shape", ["k_scale"], ["groups"], start=2),
        helper.make_node("Concat", ["keep_minus_one", "code_width"], ["keep_zero_minus_one_cw"], axis=0),
        helper.make_node("Concat", ["keep_minus_one", "groups"], ["keep_zero_minus_one_g"], axis=0),
        _const_ints("key_group_shape", [0, 0, -1, group]),
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


def flash_attention_function(
    opset: int = 23, kv_format: str = "fp32", head_dim: int = 64
) -> onnx.FunctionProto:
    """The FunctionProto to put in `ModelProto.functions` of a model using the op. A model has one KV
    format, so the body is built for it (quantized formats take QUANT_INPUTS/QUANT_OUTPUTS too)."""
    INT, FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT
    quantized = kv_format in KV_QUANT_FORMATS
    shapes = [
        helper.make_node("Shape", ["k_cache"], ["block_size"], start=1, end=2),
        helper.make_node("Shape", ["k"], ["width"], start=2),
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
    if quantized:
        group = group_size(kv_format, head_dim)
        pools = _quant_constants(kv_format, group)
        pools += _write_quantized_pool("k", kv_format, group) + _write_quantized_pool("v", kv_format, group)
    else:
        pools = _write_pool("k") + _write_pool("v")
    nodes = shapes + pools + _mask() + [attention] + reshape
    return helper.make_function(
        ATTENTION_DOMAIN,
        ATTENTION_OP,
        INPUTS + (QUANT_INPUTS if quantized else []),
        OUTPUTS + (QUANT_OUTPUTS if quantized else []),
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=ATTRIBUTES,
    )
