"""The Triton attention kernels (prefill and split-KV decode) against the fp32 specs in kernels/reference.py.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below, before the
kernel modules define their kernels) at small odd shapes; the module skips when triton is not
installed. With CUDA the same tests run on the device, and so do the large shapes marked ``gpu``.

bf16 runs on the GPU only: Triton's interpreter (3.6, 3.7.1 and 3.9 alike) multiplies the bf16 operands
of tl.dot as raw uint16 bit patterns, so bf16 cases skip there; fp16 is exact in it. The interpreter
needs triton >= 3.7 with numpy 2.4 (3.6's fails on loops with computed bounds); 3.7.1 is the one used.

Tolerance (FlashAttention's rule, as in test_attention_cpu.py): with ref = the spec on fp32 inputs and
lowp = the spec on the inputs rounded to the kernel's dtype, its output rounded too,
``max|out - ref| <= 2 * max|lowp - ref| + atol`` (atol 1e-3 fp16, 4e-3 bf16). The log-sum-exp must be
within 1e-3 of the spec's on the same rounded inputs. Queries that see no key must give 0 and -inf.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels.attention_triton_decode import flash_attention_decode, paged_attention, write_kv_cache  # noqa: E402
from kernels.attention_triton_prefill import alibi_slopes_for, flash_attention_prefill  # noqa: E402
from kernels.reference import attention_alibi_ref, varlen_attention_ref  # noqa: E402
from tests.attention_cases import INPUT_NAMES, caches_match, make_case, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


def skip_if_interpreted(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter's tl.dot is wrong for bf16 (module docstring)")


def assert_matches(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype) -> None:
    """The module's rule; lowp is the spec's output on rounded inputs, rounded to dtype."""
    out, ref, lowp = out.float().cpu(), ref.float().cpu(), lowp.to(dtype).float().cpu()
    assert torch.isfinite(out).all(), "output has non-finite values"
    error = max_abs(out - ref)
    tolerance = 2 * max_abs(lowp - ref) + ATOL[dtype]
    assert error <= tolerance, f"max|out - ref_fp32| = {error:.3g} > {tolerance:.3g}"


def max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def check(out, lse, spec, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """Hold (out, lse) to the module's rule; ``spec(*inputs)`` returns (o, lse) in the inputs' dtype."""
    ref, _ = spec(*(x.float().to(DEVICE) for x in inputs))
    lowp, lowp_lse = spec(*(x.to(dtype).float().to(DEVICE) for x in inputs))
    assert_matches(out, ref, lowp, dtype)
    if lse is not None:
        lse, lowp_lse = lse.cpu(), lowp_lse.cpu()
        assert torch.equal(torch.isfinite(lse), torch.isfinite(lowp_lse)), (
            "lse = -inf exactly where no key is seen"
        )
        seen = torch.isfinite(lowp_lse)
        assert max_abs(lse[seen] - lowp_lse[seen]) <= 1e-3


def randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def run_dense(*, seed, batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype, alibi=False, **options):
    g = torch.Generator().manual_seed(seed)
    q = randn(batch, num_heads, seq_q, head_dim, generator=g)
    k = randn(batch, num_kv_heads, seq_k, head_dim, generator=g)
    v = randn(batch, num_kv_heads, seq_k, head_dim, generator=g)
    if alibi:
        options["alibi_slopes"] = alibi_slopes_for(num_heads).to(DEVICE)
    device_inputs = (x.to(dtype).to(DEVICE) for x in (q, k, v))
    out, lse = flash_attention_prefill(*device_inputs, return_lse=True, **options)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]

    def spec(q, k, v):
        return attention_alibi_ref(q, k, v, **options)

    check(out, lse, spec, (q, k, v), dtype)


# ---------------------------------------------------------------- prefill, small shapes (CI)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq_len", [1, 17, 97])
@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prefill_dense(dtype, head_dim, gqa, seq_len, causal):
    skip_if_interpreted(dtype)
    run_dense(
        seed=seq_len + gqa + head_dim,
        batch=2,
        seq_q=seq_len,
        seq_k=seq_len,
        num_heads=2 * gqa,
        num_kv_heads=2,
        head_dim=head_dim,
        dtype=dtype,
        causal=causal,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("seq_q", "seq_k"), [(17, 97), (97, 17), (1, 97)])
def test_prefill_bottom_right_alignment(seq_q, seq_k, causal):
    """With T > S queries sit at the end; with T < S the first S - T causal queries see nothing."""
    run_dense(
        seed=seq_q * seq_k,
        batch=1,
        seq_q=seq_q,
        seq_k=seq_k,
        num_heads=3,
        num_kv_heads=1,
        head_dim=64,
        dtype=torch.float16,
        causal=causal,
    )


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sliding_window", [0, 1, 8, 40])
def test_prefill_window_and_alibi(sliding_window, causal, alibi):
    run_dense(
        seed=sliding_window + 7 * alibi,
        batch=1,
        seq_q=97,
        seq_k=97,
        num_heads=3,
        num_kv_heads=1,
        head_dim=64,
        dtype=torch.float16,
        causal=causal,
        sliding_window=sliding_window,
        alibi=alibi,
    )


def run_varlen(*, seed, lens_q, lens_k, num_heads, num_kv_heads, head_dim, dtype, alibi=False, **options):
    g = torch.Generator().manual_seed(seed)
    q = randn(sum(lens_q), num_heads, head_dim, generator=g)
    k = randn(sum(lens_k), num_kv_heads, head_dim, generator=g)
    v = randn(sum(lens_k), num_kv_heads, head_dim, generator=g)
    cu_q, cu_k = (torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).int() for lens in (lens_q, lens_k))
    slopes = alibi_slopes_for(num_heads).to(DEVICE) if alibi else None
    out, lse = flash_attention_prefill(
        *(x.to(dtype).to(DEVICE) for x in (q, k, v)),
        cu_seqlens_q=cu_q.to(DEVICE),
        cu_seqlens_k=cu_k.to(DEVICE),
        alibi_slopes=slopes,
        return_lse=True,
        **options,
    )
    assert out.shape == q.shape and lse.shape == (num_heads, q.shape[0])

    def spec(q, k, v):
        return varlen_attention_ref(q, k, v, cu_q, cu_k, alibi_slopes=slopes, **options)

    check(out, lse, spec, (q, k, v), dtype)


@pytest.mark.parametrize(
    ("causal", "sliding_window", "alibi"),
    [(True, 0, False), (False, 0, False), (True, 9, True), (False, 9, True)],
    ids=["causal", "full", "causal-window-alibi", "full-window-alibi"],
)
def test_prefill_varlen(causal, sliding_window, alibi):
    """Packed rows of lengths 1, 17, 0 and 40 queries over 5, 17, 3 and 97 keys."""
    run_varlen(
        seed=3,
        lens_q=[1, 17, 0, 40],
        lens_k=[5, 17, 3, 97],
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
        dtype=torch.float16,
        causal=causal,
        sliding_window=sliding_window,
        alibi=alibi,
    )


def test_prefill_strided_inputs_and_scale():
    """q/k/v as [B, S, H, D] memory viewed as [B, H, S, D], and an explicit scale."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (randn(2, 33, heads, 64, generator=g).half() for heads in (4, 2, 2))
    views = [x.to(DEVICE).transpose(1, 2) for x in (q, k, v)]
    out = flash_attention_prefill(*views, causal=True, scale=0.3)
    ref, _ = attention_alibi_ref(*(x.float().transpose(1, 2) for x in (q, k, v)), scale=0.3, causal=True)
    lowp, _ = attention_alibi_ref(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.3, causal=True)
    assert_matches(out, ref, lowp, torch.float16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(q=torch.zeros(1, 2, 4, 72, dtype=torch.float16)), "head_dim 72"),
        (
            dict(
                k=torch.zeros(1, 3, 4, 64, dtype=torch.float16),
                v=torch.zeros(1, 3, 4, 64, dtype=torch.float16),
            ),
            "not a multiple of num_kv_heads 3",
        ),
        (dict(q=torch.zeros(1, 2, 4, 64, dtype=torch.float32)), "float16 or bfloat16"),
        (dict(sliding_window=-1), "sliding_window must be >= 0"),
        (dict(alibi_slopes=torch.zeros(3)), "alibi_slopes must be float32 \\[2\\]"),
    ],
)
def test_prefill_rejects_bad_inputs(change, message):
    args = {name: torch.zeros(1, 2, 4, 64, dtype=torch.float16) for name in ("q", "k", "v")}
    args.update(change)
    q, k, v = (args.pop(name).to(DEVICE) for name in ("q", "k", "v"))
    if "alibi_slopes" in args:
        args["alibi_slopes"] = args["alibi_slopes"].to(DEVICE)
    with pytest.raises(ValueError, match=message):
        flash_attention_prefill(q, k, v, causal=True, **args)


# ---------------------------------------------------------------- decode, small shapes (CI)


def run_decode(case: dict, dtype: torch.dtype, *, causal=True, sliding_window=0, num_splits=None) -> None:
    """Write the step's K/V, then decode; hold o to the rule on real rows (padding rows: finite only)."""
    head_dim = case["q"].shape[-1] // case["num_heads"]
    ref_fp32 = reference(case, causal=causal, sliding_window=sliding_window)[0]
    lowp_case = {**case, **{n: case[n].to(dtype) for n in ("q", "k", "v", "k_cache", "v_cache")}}
    lowp = reference(lowp_case, causal=causal, sliding_window=sliding_window)[0]
    q, k, v, k_cache, v_cache, block_table, slots, past, total = (
        lowp_case[n].to(DEVICE) for n in INPUT_NAMES
    )
    write_kv_cache(k, v, k_cache, v_cache, slots)
    out = flash_attention_decode(
        q,
        k_cache,
        v_cache,
        block_table,
        past,
        total,
        num_heads=case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        scale=head_dim**-0.5,
        causal=causal,
        sliding_window=sliding_window,
        num_splits=num_splits,
    )
    assert out.dtype == dtype and out.shape == q.shape
    for b, n in enumerate(case["new_lens"]):
        assert_matches(out[b, :n], ref_fp32[b, :n], lowp[b, :n], dtype)
    assert torch.isfinite(out.float()).all()
    assert (out[(case["total_lens"] == 0).to(DEVICE)] == 0).all(), "a row with no keys must give zeros"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("new_tokens", [1, 4, 16])
@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_paged(dtype, head_dim, gqa, new_tokens, causal):
    """Three rows (past 0, 17, 97) over a shuffled pool; with S > 1 the last row is right-padded."""
    skip_if_interpreted(dtype)
    case = make_case(
        seed=head_dim + gqa + new_tokens,
        past_lens=[0, 17, 97],
        new_lens=[new_tokens, new_tokens, max(new_tokens - 3, 1)],
        num_heads=2 * gqa,
        num_kv_heads=2,
        head_dim=head_dim,
    )
    run_decode(case, dtype, causal=causal)


@pytest.mark.parametrize("new_tokens", [1, 16])
@pytest.mark.parametrize("sliding_window", [1, 8, 40])
def test_decode_sliding_window(sliding_window, new_tokens):
    case = make_case(
        seed=sliding_window, past_lens=[0, 17, 97], new_lens=[new_tokens] * 3, num_heads=6, num_kv_heads=2
    )
    run_decode(case, torch.float16, sliding_window=sliding_window)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_decode_split_counts_agree(num_splits):
    """Any split count gives the same answer, including splits that see no key of a row and a row with
    no keys at all (total_lens 0: zeros)."""
    case = make_case(seed=11, past_lens=[300, 1, 40, 0], new_lens=[2, 2, 1, 0], num_heads=3, num_kv_heads=1)
    run_decode(case, torch.float16, num_splits=num_splits)


def test_decode_contiguous_cache_and_many_rows_per_kv_head():
    """A contiguous cache (row b owns blocks 1 + 3b .. 3 + 3b, in order) and GROUP * S = 128 rows per KV
    head, cut into two row tiles."""
    g = torch.Generator().manual_seed(13)
    past, block_size, width = [30, 50], 32, 64
    case = dict(
        q=torch.randn(2, 16, 8 * 64, generator=g),
        k=torch.randn(2, 16, width, generator=g),
        v=torch.randn(2, 16, width, generator=g),
        k_cache=torch.randn(7, block_size, width, generator=g),
        v_cache=torch.randn(7, block_size, width, generator=g),
        block_table=(torch.arange(6, dtype=torch.int32) + 1).view(2, 3),
        slot_mapping=torch.stack([(1 + 3 * b) * block_size + past[b] + torch.arange(16) for b in range(2)]),
        past_lens=torch.tensor(past, dtype=torch.int32),
        total_lens=torch.tensor(past, dtype=torch.int32) + 16,
        num_heads=8,
        num_kv_heads=1,
        new_lens=[16, 16],
    )
    run_decode(case, torch.float16)


def test_paged_attention_updates_pools_in_place():
    case = make_case(seed=17, past_lens=[0, 5, 33], new_lens=[3, 1, 2], num_heads=6, num_kv_heads=2)
    ref_o, ref_k, ref_v = reference(case)
    inputs = {
        n: case[n].half().to(DEVICE) if case[n].is_floating_point() else case[n].to(DEVICE)
        for n in INPUT_NAMES
    }
    o, k_cache, v_cache = paged_attention(
        *inputs.values(), num_heads=6, num_kv_heads=2, scale=64**-0.5, causal=True
    )
    assert k_cache.data_ptr() == inputs["k_cache"].data_ptr()
    assert caches_match(k_cache.cpu(), ref_k.half()) and caches_match(v_cache.cpu(), ref_v.half())
    lowp = reference({**case, **{n: case[n].half() for n in ("q", "k", "v", "k_cache", "v_cache")}})[0]
    for b, n in enumerate(case["new_lens"]):
        assert_matches(o[b, :n], ref_o[b, :n], lowp[b, :n], torch.float16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(q=torch.zeros(2, 17, 128, dtype=torch.float16)), "17 query tokens"),
        (dict(num_heads=3), "do not fit q width"),
        (dict(block_table=torch.zeros(2, 4, dtype=torch.int64)), "block_table must be int32"),
        (dict(k_cache=torch.zeros(9, 12, 64, dtype=torch.float16)), "power-of-two block_size"),
    ],
)
def test_decode_rejects_bad_inputs(change, message):
    half = dict(dtype=torch.float16)
    args = dict(
        q=torch.zeros(2, 1, 128, **half),
        k_cache=torch.zeros(9, 16, 64, **half),
        v_cache=torch.zeros(9, 16, 64, **half),
        block_table=torch.zeros(2, 4, dtype=torch.int32),
        past_lens=torch.zeros(2, dtype=torch.int32),
        total_lens=torch.ones(2, dtype=torch.int32),
        num_heads=2,
        num_kv_heads=1,
    )
    args.update(change)
    args = {name: x.to(DEVICE) if torch.is_tensor(x) else x for name, x in args.items()}
    with pytest.raises(ValueError, match=message):
        flash_attention_decode(**args)


# ---------------------------------------------------------------- large shapes (the GPU; CI skips them)

LARGE_HEADS = [(32, 8, 128), (16, 16, 64), (9, 3, 64), (12, 4, 80), (8, 2, 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), LARGE_HEADS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prefill_large(dtype, num_heads, num_kv_heads, head_dim, causal):
    run_dense(
        seed=head_dim + num_heads,
        batch=2,
        seq_q=1537,
        seq_k=1537,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        causal=causal,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prefill_large_prefix_window_alibi(dtype):
    """1025 queries after a 1024-token prefix, window 300, ALiBi, 32/8 heads of 128."""
    run_dense(
        seed=2,
        batch=2,
        seq_q=1025,
        seq_k=2049,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=dtype,
        causal=True,
        sliding_window=300,
        alibi=True,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prefill_large_varlen(dtype, causal):
    g = torch.Generator().manual_seed(4)
    lens = torch.randint(1, 2000, (6,), generator=g).tolist()
    run_varlen(
        seed=4,
        lens_q=lens,
        lens_k=lens,
        num_heads=16,
        num_kv_heads=4,
        head_dim=128,
        dtype=dtype,
        causal=causal,
        alibi=True,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("new_tokens", [1, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (12, 4, 80)])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_large(dtype, num_heads, num_kv_heads, head_dim, new_tokens):
    """Rows of 8000, 1, 3000 and 5555 past tokens over a shuffled pool of 16-token blocks."""
    case = make_case(
        seed=num_heads + new_tokens,
        past_lens=[8000, 1, 3000, 5555],
        new_lens=[new_tokens, new_tokens, max(new_tokens - 5, 1), new_tokens],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )
    run_decode(case, dtype)
