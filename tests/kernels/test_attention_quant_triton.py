"""The quantized-KV Triton decode kernel and its write path against kernels/kv_quant.py.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel modules
load) at small odd shapes, fp16 only (the interpreter multiplies bf16 dot operands as raw bits; see
test_attention_triton.py); with CUDA the same tests run on the device, plus the ``gpu`` large shapes.

- Write path: the pools' codes and scales equal ``paged_attention_quant_ref``'s bit for bit, outside
  block 0 (the scratch block, which padding tokens write in any order on the GPU).
- Read path: o is held to the FlashAttention rule against the spec on the same (already quantized)
  pool: ``max|out - ref| <= 2 * max|ref_rounded - ref| + atol``, ref in fp32 and ref_rounded the same
  rounded to q's dtype; atol 2e-3 (the kernel rounds probabilities, and int4 keys, to fp16 for the dots).
- The code-to-fp16 conversions (PTX bit tricks on the GPU, casts in the interpreter) equal torch's
  conversion bit for bit, for every byte value.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.attention_triton_quant import (  # noqa: E402
    _int4_to_f16,
    _int8_to_f16,
    flash_attention_decode_quant,
    paged_attention_quant,
    write_kv_cache_quant,
)
from kernels.kv_quant import paged_attention_quant_ref  # noqa: E402
from tests.attention_cases import (  # noqa: E402
    INPUT_NAMES,
    QUANT_INPUT_NAMES,
    caches_match,
    make_case,
    quantized_case,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}
POOL_NAMES = ["k_cache", "v_cache", "k_scale", "v_scale"]


def lowp_case(case: dict, dtype: torch.dtype) -> dict:
    """The quantized case with q, k, v and k_mean in the kernel's dtype (what the reference sees too)."""
    return {**case, **{n: case[n].to(dtype) for n in ("q", "k", "v", "k_mean")}}


def run_reference(case: dict, kv_format: str, *, causal=True, sliding_window=0):
    head_dim = case["q"].shape[-1] // case["num_heads"]
    return paged_attention_quant_ref(
        *(case[n] for n in INPUT_NAMES + QUANT_INPUT_NAMES),
        num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=head_dim**-0.5,
        kv_format=kv_format, causal=causal, sliding_window=sliding_window,
    )  # fmt: skip


def run_kernel(case: dict, kv_format: str, *, causal=True, sliding_window=0, num_splits=None):
    """write_kv_cache_quant, then flash_attention_decode_quant, on device copies: (o, pools)."""
    x = {n: case[n].to(DEVICE) for n in INPUT_NAMES + QUANT_INPUT_NAMES}
    head_dim = case["q"].shape[-1] // case["num_heads"]
    write_kv_cache_quant(
        x["k"], x["v"], x["k_mean"], x["k_cache"], x["v_cache"], x["k_scale"], x["v_scale"],
        x["slot_mapping"], kv_format=kv_format, head_dim=head_dim,
    )  # fmt: skip
    o = flash_attention_decode_quant(
        x["q"], x["k_cache"], x["v_cache"], x["k_scale"], x["v_scale"], x["block_table"], x["past_lens"],
        x["total_lens"], num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], kv_format=kv_format,
        scale=head_dim**-0.5, causal=causal, sliding_window=sliding_window, num_splits=num_splits,
    )  # fmt: skip
    return o, [x[n] for n in POOL_NAMES]


def check(case: dict, kv_format: str, dtype=torch.float16, num_splits=None, **options) -> None:
    case = lowp_case(quantized_case(case, kv_format), dtype)
    ref_o, *ref_pools = run_reference(case, kv_format, **options)
    o, pools = run_kernel(case, kv_format, num_splits=num_splits, **options)
    for name, got, want in zip(POOL_NAMES, pools, ref_pools):
        assert caches_match(got.cpu(), want), f"{name} differs from quantize_kv_ref"
    assert o.dtype == dtype and o.shape == case["q"].shape
    ref32 = run_reference({**case, "q": case["q"].float()}, kv_format, **options)[0]  # o unrounded
    o, ref = o.float().cpu(), ref_o.float()
    for b, n in enumerate(case["new_lens"]):
        error = (o[b, :n] - ref32[b, :n]).abs().max().item() if n else 0.0
        bound = 2 * (ref[b, :n] - ref32[b, :n]).abs().max().item() + ATOL[dtype] if n else 0.0
        assert error <= bound, f"row {b}: max|out - ref| = {error:.3g} > {bound:.3g}"
    assert torch.isfinite(o).all()
    assert (o[case["total_lens"] == 0] == 0).all(), "a row with no keys must give zeros"


# ---------------------------------------------------------------- small shapes (CI, the interpreter)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("new_tokens", [1, 5])
@pytest.mark.parametrize(("head_dim", "gqa"), [(64, 1), (64, 3), (80, 2)])
@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_decode_quant_paged(kv_format, head_dim, gqa, new_tokens, causal):
    """Three rows (past 0, 17, 97) over a shuffled pool; the last row is right-padded when S > 1."""
    if kv_format == "int4" and head_dim == 80:
        pytest.skip("int4 takes head_dim 64 or 128")
    case = make_case(
        seed=head_dim + gqa + new_tokens, past_lens=[0, 17, 97],
        new_lens=[new_tokens, new_tokens, max(new_tokens - 3, 1)],
        num_heads=2 * gqa, num_kv_heads=2, head_dim=head_dim,
    )  # fmt: skip
    check(case, kv_format, causal=causal)


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_decode_quant_split_counts_agree(kv_format, num_splits):
    """Any split count, including splits that see no key and a row with no keys at all (zeros)."""
    case = make_case(seed=11, past_lens=[150, 1, 40, 0], new_lens=[2, 2, 1, 0], num_heads=3, num_kv_heads=1)
    check(case, kv_format, num_splits=num_splits)


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_decode_quant_sliding_window_and_lse(kv_format):
    case = make_case(seed=5, past_lens=[0, 17, 60], new_lens=[3, 3, 3], num_heads=4, num_kv_heads=2)
    check(case, kv_format, sliding_window=8)
    # the log-sum-exp of a split run equals the unsplit one's, and o agrees
    q_case = lowp_case(quantized_case(case, kv_format), torch.float16)
    x = {n: q_case[n].to(DEVICE) for n in INPUT_NAMES + QUANT_INPUT_NAMES}
    args = [x[n] for n in ("q", "k_cache", "v_cache", "k_scale", "v_scale", "block_table", "past_lens")]
    attrs = dict(num_heads=4, num_kv_heads=2, kv_format=kv_format, return_lse=True)
    total = x["past_lens"]  # the pool's keys before this step: every query sees them all (non-causal)
    o1, lse1 = flash_attention_decode_quant(*args, total, causal=False, num_splits=1, **attrs)
    o4, lse4 = flash_attention_decode_quant(*args, total, causal=False, num_splits=4, **attrs)
    assert torch.allclose(lse1, lse4, atol=1e-4) and torch.allclose(o1.float(), o4.float(), atol=2e-3)
    assert torch.isinf(lse1[0]).all() and (o1[0] == 0).all(), "row 0 has no past: -inf and zeros"


def test_write_path_edge_values():
    """All-zero groups (scale 1), exact ties at .5 (half to even), values beyond the group's max after
    the fp16 scale rounds down (clamped): every code and scale as quantize_kv_ref."""
    for kv_format in ("int8", "int4"):
        case = make_case(seed=3, past_lens=[4, 9], new_lens=[4, 4], num_heads=2, num_kv_heads=2)
        case = lowp_case(quantized_case(case, kv_format), torch.float16)
        k = case["k"].clone()
        k[0, 0] = case["k_mean"]  # smoothed row of zeros
        ties = (torch.arange(k.shape[-1]) % 14) * 0.125  # scale 0.25 exactly: x / scale hits .5 ties
        ties[31::32] = 1.75 if kv_format == "int4" else 0.0  # int4 groups of 32: max 1.75 = 7 * 0.25
        ties[63::64] = 31.75 if kv_format == "int8" else ties[63::64]  # int8 heads of 64: 127 * 0.25
        k[0, 1] = (case["k_mean"].float() + ties).half()
        v = case["v"].clone()
        v[1, 0] = 0.0
        v[1, 1] = torch.linspace(-3, 3, v.shape[-1]).half()
        case = {**case, "k": k, "v": v}
        _, *ref_pools = run_reference(case, kv_format)
        _, pools = run_kernel(case, kv_format)
        for name, got, want in zip(POOL_NAMES, pools, ref_pools):
            assert caches_match(got.cpu(), want), f"{kv_format} {name} differs from quantize_kv_ref"


def test_paged_attention_quant_updates_pools_in_place():
    case = make_case(seed=17, past_lens=[0, 5, 33], new_lens=[3, 1, 2], num_heads=6, num_kv_heads=2)
    case = lowp_case(quantized_case(case, "int8"), torch.float16)
    ref_o, *ref_pools = run_reference(case, "int8")
    x = {n: case[n].to(DEVICE) for n in INPUT_NAMES + QUANT_INPUT_NAMES}
    o, *pools = paged_attention_quant(
        *x.values(), num_heads=6, num_kv_heads=2, scale=64**-0.5, kv_format="int8"
    )  # fmt: skip
    assert pools[0].data_ptr() == x["k_cache"].data_ptr()
    for got, want in zip(pools, ref_pools):
        assert caches_match(got.cpu(), want)
    for b, n in enumerate(case["new_lens"]):
        assert (o[b, :n].float().cpu() - ref_o[b, :n].float()).abs().max() <= 4e-3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(kv_format="int2"), "kv_format 'int2'"),
        (dict(k_codes=torch.zeros(9, 16, 64, dtype=torch.uint8)), "k_codes must be torch.int8"),
        (dict(k_scales=torch.zeros(9, 16, 2, dtype=torch.float16)), r"k_scales must be \[num_blocks"),
        (dict(q=torch.zeros(2, 1, 160, dtype=torch.float16), num_heads=2), "head_dim 80 is not one of"),
    ],
)
def test_decode_quant_rejects_bad_inputs(change, message):
    args = dict(
        q=torch.zeros(2, 1, 128, dtype=torch.float16),
        k_codes=torch.zeros(9, 16, 64, dtype=torch.int8),
        v_codes=torch.zeros(9, 16, 64, dtype=torch.int8),
        k_scales=torch.zeros(9, 16, 1, dtype=torch.float16),
        v_scales=torch.zeros(9, 16, 1, dtype=torch.float16),
        block_table=torch.zeros(2, 4, dtype=torch.int32),
        past_lens=torch.zeros(2, dtype=torch.int32),
        total_lens=torch.ones(2, dtype=torch.int32),
        num_heads=2, num_kv_heads=1, kv_format="int8",
    )  # fmt: skip
    args.update(change)
    if "head_dim 80" in message:
        args.update(kv_format="int4", k_codes=torch.zeros(9, 16, 40, dtype=torch.uint8))
    args = {name: x.to(DEVICE) if torch.is_tensor(x) else x for name, x in args.items()}
    with pytest.raises(ValueError, match=message):
        flash_attention_decode_quant(**args)


@triton.jit
def _convert_kernel(CODES, SCALES, OUT8, OUT_EVEN, OUT_ODD, FAST: tl.constexpr, KEEP_LAYOUT: tl.constexpr):
    offs = tl.arange(0, 16)[:, None] * 64 + tl.arange(0, 64)[None, :]
    codes = tl.load(CODES + offs)
    tl.store(OUT8 + offs, _int8_to_f16(codes.to(tl.int8, bitcast=True), FAST))
    even, odd = _int4_to_f16(codes, tl.load(SCALES + offs), FAST, KEEP_LAYOUT)
    tl.store(OUT_EVEN + offs, even)
    tl.store(OUT_ODD + offs, odd)


@pytest.mark.parametrize("keep_layout", [False, True])
def test_code_conversions_are_exact(keep_layout):
    """Every byte, as an int8 code and as two int4 codes times scales of every magnitude (subnormal
    products included), converts as torch does: bit for bit."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.randperm(1024, generator=gen).remainder(256).to(torch.uint8).view(16, 64)
    exponents = torch.randint(-20, 12, (16, 64), generator=gen).float()
    scales = (torch.randn(16, 64, generator=gen) * 2.0**exponents).half()
    outs = [torch.empty(16, 64, dtype=torch.float16, device=DEVICE) for _ in range(3)]
    _convert_kernel[(1,)](codes.to(DEVICE), scales.to(DEVICE), *outs, FAST=DEVICE == "cuda",
                          KEEP_LAYOUT=keep_layout, num_warps=1)  # fmt: skip
    as_int8 = codes.view(torch.int8)
    even = (codes.int() & 15) - 16 * ((codes.int() >> 3) & 1)  # the low nibble, two's complement
    odd = (codes.int() >> 4) - 16 * ((codes.int() >> 7) & 1)
    wants = [as_int8.half(), (even.float() * scales.float()).half(), (odd.float() * scales.float()).half()]
    for name, got, want in zip(("int8", "int4 even", "int4 odd"), outs, wants):
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)), f"{name} codes differ"


# ---------------------------------------------------------------- large shapes (the GPU; CI skips them)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_decode_quant_large(kv_format, num_heads, num_kv_heads, head_dim, dtype):
    case = make_case(
        seed=1, past_lens=[3000, 1, 777, 4095], new_lens=[1, 1, 1, 1], num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16,
    )  # fmt: skip
    check(case, kv_format, dtype)
