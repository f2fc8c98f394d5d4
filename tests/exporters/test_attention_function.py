"""The function body (the portable fallback) against the fp32 reference, with no kernel registered."""

import onnxruntime as ort
import pytest
import torch

from exporters.attention_function import flash_attention_function
from tests.attention_cases import (
    caches_match,
    feeds,
    make_case,
    max_error_on_real_rows,
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
