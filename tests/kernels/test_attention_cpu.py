"""The native CPU kernel of fastattention::FlashAttention against the fp32 reference (kernels/reference.py).

The module fixture builds the library (`python -m kernels.attention_cpu build`) if needed. If it cannot
be built (no g++, no npm, no network), the tests skip with the reason. When the CI environment variable
is set, they fail instead.

Three type variants: fp32 (activations and KV cache), fp16 (both), and fp32 activations over an fp16 KV
cache ("fp32-kv16": fp16 storage, fp32 math; the new K/V are rounded to fp16 as they are written).

Tolerances: fp32 must be within 1e-5 of the reference. fp16 must be within 2x the error of the
reference itself run on fp16-rounded inputs, plus 1e-3. fp32-kv16 must be within 1e-5 of the reference
run on the same numbers: fp32 q/k/v with fp16 caches, so the reference rounds the caches and the new K/V
exactly as the kernel does and then does fp32 math (the rounding error itself is not the kernel's).
Pools must match the reference's exactly (outside the scratch block, which padding tokens write in any
order).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

from kernels import attention_cpu
from tests.attention_cases import (
    INPUT_NAMES,
    caches_match,
    check_quantized_outputs,
    feeds,
    make_case,
    max_error_on_real_rows,
    quantized_case,
    reference,
    single_node_model,
)

# id -> (activation dtype, KV cache dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "fp32-kv16": (torch.float32, torch.float16),
}
KV_FORMATS = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}


@pytest.fixture(scope="module", autouse=True)
def library():
    try:
        return attention_cpu.build_library()
    except attention_cpu.BuildError as error:
        if os.environ.get("CI"):
            pytest.fail(f"the FlashAttention CPU kernel could not be built: {error}")
        pytest.skip(f"the FlashAttention CPU kernel could not be built: {error}")


def with_cache_dtype(case: dict, kv_dtype: torch.dtype) -> dict:
    """The case with its pools cast to kv_dtype (the activations keep theirs)."""
    return {**case, "k_cache": case["k_cache"].to(kv_dtype), "v_cache": case["v_cache"].to(kv_dtype)}


def make_session(case: dict, *, causal: bool = True, sliding_window: int = 0, threads: int = 1, **attrs):
    """A session of one FlashAttention node typed after the case: pools (and kv_format) from its caches."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    assert attention_cpu.register(options)
    model = single_node_model(case, causal=causal, sliding_window=sliding_window)
    kv_elem = helper.np_dtype_to_tensor_dtype(case["k_cache"].numpy().dtype)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("k_cache", "v_cache")):
            value.type.tensor_type.elem_type = kv_elem
    attrs.setdefault("kv_format", KV_FORMATS[kv_elem])
    node = model.graph.node[0]
    kept = [attribute for attribute in node.attribute if attribute.name not in attrs]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value) for name, value in attrs.items()])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_against_reference(
    dtypes: tuple[torch.dtype, torch.dtype], *, causal: bool, sliding_window: int, threads: int, **shape
):
    """Run the kernel on a fresh random case and hold it to the tolerance rule of the module docstring."""
    dtype, kv_dtype = dtypes
    ref_fp32 = reference(
        make_case(dtype=torch.float32, **shape), causal=causal, sliding_window=sliding_window
    )
    case = with_cache_dtype(make_case(dtype=dtype, **shape), kv_dtype)  # the same draws, rounded
    ref = reference(case, causal=causal, sliding_window=sliding_window)
    new_lens = case["new_lens"]
    expected, tolerance = ref_fp32[0], 1e-5
    if dtype == torch.float16:
        tolerance = 2 * max_error_on_real_rows(ref[0], ref_fp32[0], new_lens) + 1e-3
    elif kv_dtype == torch.float16:
        expected = ref[0]  # fp32 math on the fp16-rounded cache, as the kernel does it
    session = make_session(case, causal=causal, sliding_window=sliding_window, threads=threads)
    o, k_cache, v_cache = (torch.from_numpy(x) for x in session.run(None, feeds(case)))
    assert o.dtype == dtype and k_cache.dtype == kv_dtype
    error = max_error_on_real_rows(o, expected, new_lens)
    assert error <= tolerance, f"max|out - ref| = {error:.3g} > {tolerance:.3g}"
    assert torch.isfinite(o.float()).all(), "padding queries must still be finite"
    assert caches_match(k_cache, ref[1]) and caches_match(v_cache, ref[2])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("new_tokens", [1, 17, 97])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference(dtypes, head_dim, gqa, new_tokens, causal, threads):
    """Three rows of different past lengths; with S > 1 the last is right-padded."""
    check_against_reference(
        dtypes,
        causal=causal,
        sliding_window=0,
        threads=threads,
        seed=head_dim + gqa + new_tokens,
        past_lens=[0, 5, 130],
        new_lens=[new_tokens, new_tokens, max(new_tokens - 7, 1)],
        num_heads=2 * gqa,
        num_kv_heads=2,
        head_dim=head_dim,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sliding_window", [1, 8, 40])
@pytest.mark.parametrize("new_tokens", [1, 17, 97])
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_sliding_window(dtypes, new_tokens, sliding_window, causal):
    check_against_reference(
        dtypes,
        causal=causal,
        sliding_window=sliding_window,
        threads=2,
        seed=sliding_window + new_tokens,
        past_lens=[0, 5, 130],
        new_lens=[new_tokens, new_tokens, max(new_tokens - 7, 1)],
    )


@pytest.mark.parametrize("sliding_window", [0, 300])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_long_decode_splits_keys(dtypes, threads, sliding_window):
    """Few rows with long pasts: the kernel splits the keys across items and merges the softmaxes."""
    check_against_reference(
        dtypes,
        causal=True,
        sliding_window=sliding_window,
        threads=threads,
        seed=11,
        past_lens=[3000, 700],
        new_lens=[1, 1],
    )


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(12, 1, 40, 5), (7, 7, 24, 16), (14, 2, 8, 3), (16, 2, 64, 1)],
    ids=["gqa12-d40-bs5", "mha-d24", "gqa7-d8-bs3", "gqa8-bs1"],
)
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_decode_odd_shapes(dtypes, num_heads, num_kv_heads, head_dim, block_size):
    """Decode with head_dim not a multiple of the SIMD width, groups above 8 and odd block sizes, over
    rows of uneven lengths (one long enough to be split)."""
    check_against_reference(
        dtypes,
        causal=True,
        sliding_window=0,
        threads=2,
        seed=num_heads + head_dim,
        past_lens=[0, 1, 63, 1500, 200],
        new_lens=[1, 1, 1, 1, 1],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
    )


def quantized_session(case: dict, *, causal: bool = True, sliding_window: int = 0, threads: int = 2):
    """A session of one FlashAttention node over quantized pools (codes + fp16 scales + K mean)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    assert attention_cpu.register(options)
    model = single_node_model(case, causal=causal, sliding_window=sliding_window)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@pytest.mark.parametrize(
    "past_lens,new_lens,num_heads,num_kv_heads,head_dim,block_size",
    [
        ([0, 5, 130], [17, 17, 10], 6, 2, 64, 16),  # prefill over a past, padded row
        ([0, 1, 63, 1500, 200], [1, 1, 1, 1, 1], 8, 2, 64, 16),  # decode, one row long enough to split
        ([3, 700], [1, 97], 4, 4, 128, 5),  # MHA, D 128, odd block size, mixed batch
        ([40, 9], [1, 3], 12, 1, 32, 3),  # group of 12, D 32 (one int4 group per head)
    ],
    ids=["prefill", "decode-split", "mha-d128-bs5", "gqa12-d32"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_quantized_cache_matches_spec(kv_format, past_lens, new_lens, num_heads, num_kv_heads, head_dim,
                                      block_size, threads):  # fmt: skip
    """int8/int4 pools: the kernel quantizes new K/V as kernels/kv_quant.py specifies (scales exactly,
    codes up to one step on rare near-ties) and attends over the codes it wrote within 1e-5."""
    base = make_case(seed=head_dim + len(past_lens), past_lens=past_lens, new_lens=new_lens,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     block_size=block_size)  # fmt: skip
    case = quantized_case(base, kv_format)
    session = quantized_session(case, threads=threads)
    outputs = [torch.from_numpy(x) for x in session.run(None, feeds(case))]
    assert outputs[1].dtype == (torch.int8 if kv_format == "int8" else torch.uint8)
    check_quantized_outputs(outputs, case, kv_format)


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_quantized_cache_sliding_window_and_full(kv_format):
    case = quantized_case(make_case(seed=5, past_lens=[0, 60], new_lens=[9, 1]), kv_format)
    for causal, window in ((True, 8), (False, 0)):
        outputs = [
            torch.from_numpy(x)
            for x in quantized_session(case, causal=causal, sliding_window=window).run(None, feeds(case))
        ]
        check_quantized_outputs(outputs, case, kv_format, causal=causal, sliding_window=window)


def test_calls_of_different_shapes_reuse_scratch():
    """One session, one thread: long split decode, prefill, then short decode. Each call must not see the
    buffers (split pieces, partial softmaxes) that the previous one left behind."""
    shapes = [
        dict(seed=13, past_lens=[2500, 900], new_lens=[1, 1]),
        dict(seed=14, past_lens=[0, 40, 7], new_lens=[70, 33, 1]),
        dict(seed=15, past_lens=[3], new_lens=[1]),
        dict(seed=16, past_lens=[1200, 0, 333], new_lens=[1, 1, 1]),
    ]
    session = make_session(make_case(**shapes[0]), threads=2)
    for shape in shapes:
        case = make_case(**shape)
        o, k_cache, v_cache = (torch.from_numpy(x) for x in session.run(None, feeds(case)))
        o_ref, k_ref, v_ref = reference(case)
        assert max_error_on_real_rows(o, o_ref, case["new_lens"]) <= 1e-5, shape
        assert caches_match(k_cache, k_ref) and caches_match(v_cache, v_ref)


@pytest.mark.parametrize("new_tokens", [1, 17])
def test_idle_row_outputs_zeros(new_tokens):
    """A row with no new token (an idle slot of a decode batch): all its queries are padding."""
    case = make_case(seed=12, past_lens=[40, 9, 130], new_lens=[new_tokens, 0, new_tokens])
    o, k_cache, v_cache = (torch.from_numpy(x) for x in make_session(case, threads=2).run(None, feeds(case)))
    o_ref, k_ref, v_ref = reference(case)
    assert torch.count_nonzero(o[1]) == 0
    assert max_error_on_real_rows(o[0::2], o_ref[0::2], case["new_lens"][0::2]) <= 1e-5
    assert caches_match(k_cache, k_ref) and caches_match(v_cache, v_ref)


def bind_pools(session, case: dict, k_out: ort.OrtValue, v_out: ort.OrtValue, pools: dict) -> ort.IOBinding:
    binding = session.io_binding()
    for name in INPUT_NAMES:
        if name in pools:
            binding.bind_ortvalue_input(name, pools[name])
        else:
            binding.bind_cpu_input(name, case[name].numpy())
    binding.bind_output("o", "cpu")
    binding.bind_ortvalue_output("k_cache_out", k_out)
    binding.bind_ortvalue_output("v_cache_out", v_out)
    return binding


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_updates_pool_in_place_with_io_binding(dtypes):
    """Each pool bound as input and output: the kernel writes into the caller's buffer, no new pool."""
    dtype, kv_dtype = dtypes
    case = with_cache_dtype(
        make_case(seed=3, past_lens=[0, 5, 130], new_lens=[17, 1, 9], dtype=dtype), kv_dtype
    )
    arrays = {name: case[name].numpy().copy() for name in ("k_cache", "v_cache")}
    pools = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    session = make_session(case, threads=2)
    binding = bind_pools(session, case, pools["k_cache"], pools["v_cache"], pools)
    for _ in range(2):  # the second call rewrites the same slots: still in place, still right
        session.run_with_iobinding(binding)
        o, k_out, v_out = binding.get_outputs()
        assert k_out.data_ptr() == arrays["k_cache"].ctypes.data
        assert v_out.data_ptr() == arrays["v_cache"].ctypes.data
        o_ref, k_ref, v_ref = reference(case)
        assert caches_match(torch.from_numpy(arrays["k_cache"]), k_ref)
        assert caches_match(torch.from_numpy(arrays["v_cache"]), v_ref)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        assert max_error_on_real_rows(torch.from_numpy(o.numpy()), o_ref, case["new_lens"]) <= tolerance


def test_copies_pool_when_output_is_another_buffer():
    """Output pools bound to other buffers: the input pools stay untouched, the outputs hold the update."""
    case = make_case(seed=4, past_lens=[0, 5, 130], new_lens=[17, 1, 9])
    inputs = {
        name: ort.OrtValue.ortvalue_from_numpy(case[name].numpy().copy()) for name in ("k_cache", "v_cache")
    }
    garbage = {name: np.full_like(case[name].numpy(), np.nan) for name in ("k_cache", "v_cache")}
    outputs = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in garbage.items()}
    session = make_session(case)
    session.run_with_iobinding(bind_pools(session, case, outputs["k_cache"], outputs["v_cache"], inputs))
    _, k_ref, v_ref = reference(case)
    assert np.array_equal(inputs["k_cache"].numpy(), case["k_cache"].numpy())
    assert caches_match(torch.from_numpy(garbage["k_cache"]), k_ref)
    assert caches_match(torch.from_numpy(garbage["v_cache"]), v_ref)


def test_bad_slot_is_an_error_and_leaves_the_pool_alone():
    case = make_case(seed=5, past_lens=[0, 5, 130], new_lens=[17, 1, 9])
    case["slot_mapping"][1, 0] = case["k_cache"].shape[0] * case["k_cache"].shape[1]
    arrays = {name: case[name].numpy().copy() for name in ("k_cache", "v_cache")}
    pools = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    session = make_session(case)
    message = r"slot_mapping\[1, 0\] = 208 is out of range \[0, 208\)"
    with pytest.raises(InvalidArgument, match=message):
        session.run(None, feeds(case))
    binding = bind_pools(session, case, pools["k_cache"], pools["v_cache"], pools)
    with pytest.raises((InvalidArgument, RuntimeError), match=message):  # IO binding wraps it in RuntimeError
        session.run_with_iobinding(binding)
    assert np.array_equal(arrays["k_cache"], case["k_cache"].numpy())


def _narrow_block_table(case: dict) -> None:
    case["block_table"] = case["block_table"][:, :1].contiguous()


def _bad_block(case: dict) -> None:
    case["block_table"][2, 3] = 1000


def _total_beyond_new_tokens(case: dict) -> None:
    case["total_lens"][0] = 18


def _total_below_past(case: dict) -> None:
    case["total_lens"][1] = 4


def _wrong_kv_width(case: dict) -> None:
    case["k"] = case["k"][..., :-1].contiguous()


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (_narrow_block_table, r"block_table too narrow: total_lens\[0\] = 17 needs 2 blocks"),
        (
            _total_beyond_new_tokens,
            r"total_lens\[0\] = 18 is not past_lens \+ new tokens: it must lie in \[0, 17\]",
        ),
        (_bad_block, r"block_table\[2, 3\] = 1000 is out of range \[0, 13\)"),
        (_total_below_past, r"total_lens\[1\] = 4 is not past_lens \+ new tokens: it must lie in \[5, 22\]"),
        (_wrong_kv_width, r"k shape \[3, 17, 191\] != \[B, S, num_kv_heads \* head_dim\]"),
    ],
    ids=["narrow-table", "total-beyond-new-tokens", "bad-block", "total-below-past", "kv-width"],
)
def test_bad_inputs_are_errors(corrupt, message):
    case = make_case(seed=6, past_lens=[0, 5, 130], new_lens=[17, 1, 9])
    session = make_session(case)
    corrupt(case)
    with pytest.raises(InvalidArgument, match=message):
        session.run(None, feeds(case))


@pytest.mark.parametrize(
    "attrs,kv_dtype,message",
    [
        (dict(num_heads=5), torch.float32, r"num_heads=5 is not a multiple of num_kv_heads=3"),
        (dict(kv_format="fp16"), torch.float32, r"kv_format 'fp16' does not match the fp32 KV cache"),
        (dict(kv_format="fp32"), torch.float16, r"kv_format 'fp32' does not match the fp16 KV cache"),
        (dict(sliding_window=-1), torch.float32, r"sliding_window must be >= 0"),
    ],
    ids=["gqa", "kv-format", "kv-format-fp16-cache", "window"],
)
def test_bad_attributes_fail_session_creation(attrs, kv_dtype, message):
    case = with_cache_dtype(make_case(seed=8, past_lens=[0], new_lens=[3]), kv_dtype)
    with pytest.raises(RuntimeException, match=message):
        make_session(case, **attrs)
