"""The native CPU kernel of fastattention::FlashAttention against the fp32 reference (kernels/reference.py).

The module fixture builds the library (`python -m kernels.attention_cpu build`) if needed. If it cannot
be built (no g++, no npm, no network), the tests skip with the reason. When the CI environment variable
is set, they fail instead.

Tolerances: fp32 must be within 1e-5 of the reference. fp16 must be within 2x the error of the
reference itself run on fp16-rounded inputs, plus 1e-3. Pools must match the reference's exactly
(outside the scratch block, which padding tokens write in any order).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

from kernels import attention_cpu
from tests.attention_cases import (
    INPUT_NAMES,
    caches_match,
    feeds,
    make_case,
    max_error_on_real_rows,
    reference,
    single_node_model,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def library():
    try:
        return attention_cpu.build_library()
    except attention_cpu.BuildError as error:
        if os.environ.get("CI"):
            pytest.fail(f"the FlashAttention CPU kernel could not be built: {error}")
        pytest.skip(f"the FlashAttention CPU kernel could not be built: {error}")


def make_session(case: dict, *, causal: bool = True, sliding_window: int = 0, threads: int = 1, **attrs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    assert attention_cpu.register(options)
    model = single_node_model(case, causal=causal, sliding_window=sliding_window)
    node = model.graph.node[0]
    kept = [attribute for attribute in node.attribute if attribute.name not in attrs]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value) for name, value in attrs.items()])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_against_reference(dtype: torch.dtype, *, causal: bool, sliding_window: int, threads: int, **shape):
    """Run the kernel on a fresh random case and hold it to the tolerance rule of the module docstring."""
    ref_fp32 = reference(
        make_case(dtype=torch.float32, **shape), causal=causal, sliding_window=sliding_window
    )
    case = make_case(dtype=dtype, **shape)  # the same draws, rounded to dtype
    ref = reference(case, causal=causal, sliding_window=sliding_window)
    new_lens = case["new_lens"]
    tolerance = 1e-5
    if dtype == torch.float16:
        tolerance = 2 * max_error_on_real_rows(ref[0], ref_fp32[0], new_lens) + 1e-3
    session = make_session(case, causal=causal, sliding_window=sliding_window, threads=threads)
    o, k_cache, v_cache = (torch.from_numpy(x) for x in session.run(None, feeds(case)))
    assert o.dtype == dtype
    error = max_error_on_real_rows(o, ref_fp32[0], new_lens)
    assert error <= tolerance, f"max|out - ref_fp32| = {error:.3g} > {tolerance:.3g}"
    assert torch.isfinite(o.float()).all(), "padding queries must still be finite"
    assert caches_match(k_cache, ref[1]) and caches_match(v_cache, ref[2])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("new_tokens", [1, 17, 97])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference(dtype, head_dim, gqa, new_tokens, causal, threads):
    """Three rows of different past lengths; with S > 1 the last is right-padded."""
    check_against_reference(
        dtype,
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
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sliding_window(dtype, new_tokens, sliding_window, causal):
    check_against_reference(
        dtype,
        causal=causal,
        sliding_window=sliding_window,
        threads=2,
        seed=sliding_window + new_tokens,
        past_lens=[0, 5, 130],
        new_lens=[new_tokens, new_tokens, max(new_tokens - 7, 1)],
    )


@pytest.mark.parametrize("sliding_window", [0, 300])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_long_decode_splits_keys(dtype, threads, sliding_window):
    """Few rows with long pasts: the kernel splits the keys across items and merges the softmaxes."""
    check_against_reference(
        dtype,
        causal=True,
        sliding_window=sliding_window,
        threads=threads,
        seed=11,
        past_lens=[3000, 700],
        new_lens=[1, 1],
    )


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


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_updates_pool_in_place_with_io_binding(dtype):
    """Each pool bound as input and output: the kernel writes into the caller's buffer, no new pool."""
    case = make_case(seed=3, past_lens=[0, 5, 130], new_lens=[17, 1, 9], dtype=dtype)
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
    "attrs,message",
    [
        (dict(num_heads=5), r"num_heads=5 is not a multiple of num_kv_heads=3"),
        (dict(kv_format="fp16"), r"kv_format 'fp16' does not match the fp32 KV cache"),
        (dict(sliding_window=-1), r"sliding_window must be >= 0"),
    ],
    ids=["gqa", "kv-format", "window"],
)
def test_bad_attributes_fail_session_creation(attrs, message):
    case = make_case(seed=8, past_lens=[0], new_lens=[3])
    with pytest.raises(RuntimeException, match=message):
        make_session(case, **attrs)
