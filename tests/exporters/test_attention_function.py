"""The function body (the portable fallback) against the fp32 reference, with no kernel registered."""

import onnxruntime as ort
import pytest
import torch

from exporters.attention_function import flash_attention_function
from tests.attention_cases import (
    caches_match,
    check_quantized_outputs,
    feeds,
    make_case,
    max_error_on_real_rows,
    quantized_case,
    reference,
    single_node_model,
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sliding_window", [0, 7])
@pytest.mark.parametrize(
    "past_lens,new_lens",
    [([0], [17]), ([5, 130, 0], [1, 1, 1]), ([0, 33, 3], [97, 1, 20])],
)
def test_function_body_matches_reference(causal, sliding_window, past_lens, new_lens):
    case = make_case(seed=len(past_lens) + sum(new_lens), past_lens=past_lens, new_lens=new_lens)
    model = single_node_model(
        case, causal=causal, sliding_window=sliding_window, functions=[flash_attention_function()]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    o, k_cache, v_cache = (torch.from_numpy(x) for x in session.run(None, feeds(case)))
    o_ref, k_ref, v_ref = reference(case, causal=causal, sliding_window=sliding_window)
    assert max_error_on_real_rows(o, o_ref, case["new_lens"]) <= 1e-5
    assert caches_match(k_cache, k_ref) and caches_match(v_cache, v_ref)


@pytest.mark.parametrize("q_dtype,kv_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_function_body_with_fp16_cache(q_dtype, kv_dtype):
    """fp16 KV storage under fp32 or fp16 activations: new K/V are rounded to fp16 on the way in."""
    case = make_case(seed=3, past_lens=[5, 40], new_lens=[3, 1], dtype=q_dtype, kv_dtype=kv_dtype)
    model = single_node_model(case, causal=True, sliding_window=0, functions=[flash_attention_function()])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    o, k_cache, v_cache = (torch.from_numpy(x) for x in session.run(None, feeds(case)))
    assert k_cache.dtype == torch.float16 and o.dtype == q_dtype
    o_ref, k_ref, v_ref = reference(case)
    assert caches_match(k_cache, k_ref) and caches_match(v_cache, v_ref)
    assert max_error_on_real_rows(o, o_ref, case["new_lens"]) <= (1e-5 if q_dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@pytest.mark.parametrize("past_lens,new_lens", [([0], [17]), ([5, 40, 0], [1, 1, 3])])
def test_function_body_with_quantized_cache(kv_format, past_lens, new_lens):
    """Quantized pools: the body matches paged_attention_quant_ref (codes and scales exactly)."""
    case = quantized_case(make_case(seed=7, past_lens=past_lens, new_lens=new_lens), kv_format)
    model = single_node_model(
        case, causal=True, sliding_window=0, functions=[flash_attention_function(kv_format=kv_format)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(x) for x in session.run(None, feeds(case))]
    check_quantized_outputs(outputs, case, kv_format)
