"""The SageAttention2-style prefill (kernels/attention_sage.py) against kernels/reference.py::attention_ref.

The bar (issue 6): output cosine similarity >= 0.999 against fp16 attention, per (batch, head), and
relative L1 <= 2e-2 with fp16 P.V, 5e-2 with FP8 P.V (research/kernels.md §4 proposes 1e-2; on this
test's random inputs, whose outputs are averages of random values near 0, the fp16 path measures
0.009-0.012 at cosine >= 0.9999, and e4m3's 3 mantissa bits put the FP8 path at 0.03-0.04 on an H100,
cosine >= 0.999).
Without CUDA the kernels run in Triton's interpreter, which has no FP8: the CPU runs the int8 Q.K +
fp16 P.V path at small odd shapes; the device runs both paths and the ``gpu`` large shapes. Queries
that see no key (causal, S > T) must give zeros.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels.attention_sage import fp8_supported, quantize_per_block, sage_attention  # noqa: E402
from kernels.reference import attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_REL_L1 = {"fp16": 2e-2, "fp8": 5e-2}
PV_PATHS = ["fp16"] + (["fp8"] if fp8_supported(torch.device(DEVICE)) else [])


def make_inputs(seed, batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype=torch.float16):
    """Random q, k, v with a per-channel offset on K (what the smoothing removes) and a few large
    channels, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, seq_q, head_dim, generator=g)
    k = torch.randn(batch, num_kv_heads, seq_k, head_dim, generator=g)
    k = k + 3 * torch.randn(1, num_kv_heads, 1, head_dim, generator=g)
    v = torch.randn(batch, num_kv_heads, seq_k, head_dim, generator=g)
    return [x.to(dtype) for x in (q, k, v)]


def assert_close_to_fp16(out, q, k, v, *, causal, max_rel_l1=2e-2):
    """Cosine >= 0.999 and relative L1 <= max_rel_l1 per (batch, head) against the fp32 spec."""
    ref = attention_ref(*(x.float().cpu() for x in (q, k, v)), causal=causal).nan_to_num(0.0)
    out = out.float().cpu()
    assert torch.isfinite(out).all()
    seen = ref.abs().sum(-1) > 0  # rows that see at least one key
    assert (out[~seen] == 0).all(), "a query that sees no key must give zeros"
    a, b = out.flatten(2), ref.flatten(2)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    rel_l1 = (a - b).abs().sum(-1) / b.abs().sum(-1)
    assert cosine.min() >= 0.999, f"cosine {cosine.min():.5f} < 0.999"
    assert rel_l1.max() <= max_rel_l1, f"relative L1 {rel_l1.max():.4f} > {max_rel_l1}"


@pytest.mark.parametrize("pv", PV_PATHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("seq_q", "seq_k"), [(97, 97), (17, 97), (1, 17), (40, 33)])
@pytest.mark.parametrize("gqa", [1, 3])
def test_sage_matches_fp16_attention(gqa, seq_q, seq_k, causal, pv):
    q, k, v = make_inputs(seq_q + gqa, 1, 2 * gqa, 2, seq_q, seq_k, 64)
    out = sage_attention(*(x.to(DEVICE) for x in (q, k, v)), causal=causal, pv=pv)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_fp16(out, q, k, v, causal=causal, max_rel_l1=MAX_REL_L1[pv])


def test_quantize_per_block_round_trip():
    """codes * scale reproduces (x - mean) * multiplier within half a step, per block of rows; padding
    rows are zero."""
    q, k, _ = make_inputs(1, 2, 2, 2, 37, 37, 64)
    mean = k.float().mean(dim=2)
    codes, scales = quantize_per_block(k.to(DEVICE), 16, mean=mean.to(DEVICE), multiplier=0.5)
    codes, scales = codes.cpu(), scales.cpu()
    assert codes.shape == (2, 2, 48, 64) and scales.shape == (2, 2, 3)
    x = (k.float() - mean[:, :, None]) * 0.5
    back = codes[:, :, :37].float() * scales.repeat_interleave(16, dim=2)[:, :, :37, None]
    assert ((back - x).abs() <= scales.repeat_interleave(16, dim=2)[:, :, :37, None] * 0.5 + 1e-6).all()
    assert (codes[:, :, 37:] == 0).all() and codes.abs().max() == 127


def test_sage_rejects_bad_inputs():
    q, k, v = (torch.zeros(1, 2, 8, 80, dtype=torch.float16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="head_dim 80"):
        sage_attention(q, k, v)
    with pytest.raises(ValueError, match="not a multiple"):
        sage_attention(torch.zeros(1, 3, 8, 64, dtype=torch.float16, device=DEVICE), k[..., :64], v[..., :64])
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="pv='fp8' needs"):
            sage_attention(q[..., :64], k[..., :64], v[..., :64], pv="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("pv", PV_PATHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sage_large(dtype, num_heads, num_kv_heads, head_dim, causal, pv):
    q, k, v = make_inputs(7, 2, num_heads, num_kv_heads, 1500, 2048, head_dim, dtype)
    out = sage_attention(*(x.to(DEVICE) for x in (q, k, v)), causal=causal, pv=pv)
    assert_close_to_fp16(out, q, k, v, causal=causal, max_rel_l1=MAX_REL_L1[pv])
