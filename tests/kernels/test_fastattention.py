"""FastAttention's kernel variants against the fp32 specs in kernels/reference.py.

- Volta tiles (kernels/attention_volta.py): every config's static shared-memory bound and its recorded
  sm_70 compile fit 96 KB; bf16 is refused; prefill and decode match the specs in Triton's interpreter
  (on the GPU when there is one) with FlashAttention's tolerance rule (test_attention_triton.py).
- The decode kernel's log-sum-exp output (used to merge partial results) matches the spec's.
- Offload (kernels/attention_offload.py): merging partial results through the log-sum-exp equals attention
  over all keys (CPU); the two-tier pool matches paged_attention_ref with the fp32 torch partial (CPU) and
  with the Triton decode kernel; on the GPU, long rows with most blocks on the host equal the all-on-GPU
  kernel's result.
- NPU-style (kernels/attention_npu.py): dense attention with causal / full / sliding window / GQA at odd
  lengths, tile masks cut from the compressed mask, and the node contract.

Every variant of the FlashAttention node also runs the same reference cases (``test_node_variant``).
Inputs are fresh random normals at odd lengths; fp32 variants must be within 1e-5 of the spec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module loads

from kernels import attention_npu, attention_offload  # noqa: E402
from kernels.reference import attention_alibi_ref  # noqa: E402
from tests.attention_cases import INPUT_NAMES, caches_match, make_case, max_error_on_real_rows, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]
CASES = [
    dict(past_lens=[0, 17, 97], new_lens=[1, 1, 1]),  # decode
    dict(past_lens=[3, 70], new_lens=[5, 16]),  # a few tokens per row
    dict(past_lens=[0, 7, 33], new_lens=[20, 13, 1]),  # prefill, a chunk after a past, a decode row
]
CASE_IDS = ["decode", "multi-token", "prefill"]


def fp16_tolerance(out, ref, lowp) -> None:
    """FlashAttention's rule: max|out - ref| <= 2 max|lowp - ref| + 1e-3 (lowp: the spec on fp16 inputs)."""
    error = float((out.float().cpu() - ref.float()).abs().max())
    bound = 2 * float((lowp.half().float() - ref.float()).abs().max()) + 1e-3
    assert error <= bound, f"max|out - ref_fp32| = {error:.3g} > {bound:.3g}"


# -- the node contract, every variant ------------------------------------------------------------------


def offload_split(case: dict, gpu_blocks: int, tile_blocks: int = 2, device: str = "cpu"):
    """The case's pool cut in two tiers: blocks >= gpu_blocks go to (pinned) host pools."""
    k_cache, v_cache = case["k_cache"], case["v_cache"]
    host = [attention_offload.host_pool(k_cache.shape[0] - gpu_blocks, *k_cache.shape[1:], k_cache.dtype)
            for _ in range(2)]  # fmt: skip
    host[0].copy_(k_cache[gpu_blocks:])
    host[1].copy_(v_cache[gpu_blocks:])
    stream = attention_offload.HostKVStream(
        tile_blocks=tile_blocks, block_size=k_cache.shape[1], width=k_cache.shape[2], dtype=k_cache.dtype,
        device=device,
    )  # fmt: skip
    return k_cache[:gpu_blocks].clone().to(device), v_cache[:gpu_blocks].clone().to(device), *host, stream


def run_variant(variant: str, case: dict, sliding_window: int):
    """(o, k pool, v pool) of one variant of the node on the case (pools back in one piece, on the CPU)."""
    attrs = dict(num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=64**-0.5, causal=True)
    attrs["sliding_window"] = sliding_window
    inputs = [case[n].clone() for n in INPUT_NAMES]
    if variant == "npu":
        return attention_npu.paged_attention_npu(*inputs, **attrs)
    if (
        variant == "offload"
    ):  # fp32 partials from the spec; on a GPU through the side stream and pinned copies
        k_dev, v_dev, host_k, host_v, stream = offload_split(case, gpu_blocks=4, device=DEVICE)
        q, k, v, _, _, *rest = (x.to(DEVICE) for x in inputs)
        o, k_dev, v_dev = attention_offload.paged_attention_offload(
            q, k, v, k_dev, v_dev, host_k, host_v, *rest, stream=stream,
            partial=attention_offload.partial_attention_torch, **attrs,
        )  # fmt: skip
        return o.cpu(), torch.cat([k_dev.cpu(), host_k]), torch.cat([v_dev.cpu(), host_v])
    assert variant == "volta"
    from kernels import attention_volta
    from runtime.backends.torch_cuda import TritonAttention

    device_inputs = [(x.half() if x.is_floating_point() else x).to(DEVICE) for x in inputs]
    o, k_cache, v_cache = TritonAttention(attention_volta)(*device_inputs, **attrs)
    return o.cpu(), k_cache.cpu(), v_cache.cpu()


@pytest.mark.parametrize("sliding_window", [0, 7])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("variant", ["npu", "offload", "volta"])
def test_node_variant(variant, case, sliding_window):
    """The FlashAttention node's reference cases (as test_torch_backend.py runs them for triton/torch)."""
    if variant == "volta":
        pytest.importorskip("triton")
    case = make_case(seed=5, **case)
    ref_o, ref_k, ref_v = reference(case, sliding_window=sliding_window)
    o, k_cache, v_cache = run_variant(variant, case, sliding_window)
    if variant == "volta":
        low = {**case, **{n: case[n].half().float() for n in ("q", "k", "v", "k_cache", "v_cache")}}
        low_o, low_k, _ = reference(low, sliding_window=sliding_window)
        for b, n in enumerate(case["new_lens"]):
            fp16_tolerance(o[b, :n], ref_o[b, :n], low_o[b, :n])
        assert caches_match(k_cache, low_k.half())
        return
    assert max_error_on_real_rows(o, ref_o, case["new_lens"]) <= 1e-5
    assert caches_match(k_cache, ref_k) and caches_match(v_cache, ref_v)


# -- Volta tiles --------------------------------------------------------------------------------------


def test_volta_configs_fit_96kb_and_match_the_sm70_record():
    from kernels import attention_volta as volta

    bounds = volta.check_configs()
    assert max(bounds.values()) <= volta.SMEM_LIMIT_BYTES
    record = json.loads((ROOT / "benchmarks/results/fastattention_volta_sm70.json").read_text())
    configs = {f"prefill_d{d}": c for d, c in volta.VOLTA_PREFILL_CONFIGS.items()}
    configs |= {f"decode_d{d}": c for d, c in volta.VOLTA_DECODE_CONFIGS.items()}
    assert set(record["configs"]) == set(configs), "re-run `python -m kernels.attention_volta --report ...`"
    for name, config in configs.items():
        entry = record["configs"][name]
        assert entry["config"] == config.__dict__, f"{name} changed since the sm70 compile record"
        assert entry["compiled_shared_bytes"] <= min(volta.SMEM_LIMIT_BYTES, bounds[name])


def test_volta_refuses_bf16():
    pytest.importorskip("triton")
    from kernels import attention_volta

    x = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="float16 on Volta"):
        attention_volta.flash_attention_prefill(x, x, x, causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    ("seq_q", "seq_k", "gqa", "head_dim"), [(97, 97, 3, 64), (17, 97, 1, 80), (1, 17, 2, 128)]
)
def test_volta_prefill(seq_q, seq_k, gqa, head_dim, causal):
    pytest.importorskip("triton")
    from kernels import attention_volta

    g = torch.Generator().manual_seed(seq_q + head_dim)
    q = torch.randn(2, 2 * gqa, seq_q, head_dim, generator=g)
    k, v = (torch.randn(2, 2, seq_k, head_dim, generator=g) for _ in range(2))
    out, lse = attention_volta.flash_attention_prefill(
        *(x.half().to(DEVICE) for x in (q, k, v)), causal=causal, sliding_window=40, return_lse=True
    )
    ref, _ = attention_alibi_ref(q, k, v, causal=causal, sliding_window=40)
    lowp, lowp_lse = attention_alibi_ref(
        *(x.half().float() for x in (q, k, v)), causal=causal, sliding_window=40
    )
    fp16_tolerance(out, ref, lowp)
    seen = torch.isfinite(lowp_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    assert float((lse.cpu()[seen] - lowp_lse[seen]).abs().max()) <= 1e-3


# -- the decode kernel's log-sum-exp -----------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_lse_matches_spec(num_splits):
    """o (fp32 out) and lse against the fp32 partial spec on fp16-rounded inputs; a row with no keys."""
    pytest.importorskip("triton")
    from kernels.attention_triton_decode import flash_attention_decode, write_kv_cache

    case = make_case(seed=7, past_lens=[40, 0, 9], new_lens=[3, 0, 2], num_heads=6, num_kv_heads=2)
    low = {n: case[n].half() if case[n].is_floating_point() else case[n] for n in INPUT_NAMES}
    write_kv_cache(*(low[n] for n in ("k", "v", "k_cache", "v_cache", "slot_mapping")))
    read = [low[n] for n in ("q", "k_cache", "v_cache", "block_table", "past_lens", "total_lens")]
    attrs = dict(num_heads=6, num_kv_heads=2, scale=64**-0.5, causal=True, sliding_window=0)
    o, lse = flash_attention_decode(*(x.to(DEVICE) for x in read), **attrs, num_splits=num_splits,
                                    return_lse=True, out_dtype=torch.float32)  # fmt: skip
    spec_o, spec_lse = attention_offload.partial_attention_torch(
        *(x.float() for x in read[:3]), *read[3:], **attrs
    )
    assert o.dtype == torch.float32 and lse.shape == (3, 3, 6)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(spec_lse))
    real = torch.isfinite(spec_lse)
    assert float((lse.cpu()[real] - spec_lse[real]).abs().max()) <= 1e-3
    assert float((o.cpu() - spec_o).abs().max()) <= 2e-3


# -- offload ------------------------------------------------------------------------------------------


def test_merge_partials_equals_attention_over_all_keys():
    """Keys cut at random points (one piece empty): merged partials = attention over all of them."""
    g = torch.Generator().manual_seed(3)
    case = make_case(seed=9, past_lens=[61, 30], new_lens=[4, 4], num_heads=4, num_kv_heads=2, block_size=8)
    q, k_cache, v_cache, table = case["q"], case["k_cache"], case["v_cache"], case["block_table"]
    past, total = case["past_lens"], case["total_lens"]
    attrs = dict(num_heads=4, num_kv_heads=2, scale=0.2, causal=True, sliding_window=0)
    whole = attention_offload.partial_attention_torch(q, k_cache, v_cache, table, past, total, **attrs)
    o = torch.zeros_like(whole[0])
    lse = torch.full_like(whole[1], float("-inf"))
    cuts = [0, 8, 8, int(torch.randint(9, 40, (1,), generator=g)) // 8 * 8, 72]  # block-aligned; [8, 8) empty
    for start, end in zip(cuts, cuts[1:]):
        cols = table[:, start // 8 : -(-end // 8)] if end > start else table[:, :1]
        part_total = (total.clamp(max=end) - start).clamp(min=0).int()
        part = attention_offload.partial_attention_torch(
            q, k_cache, v_cache, cols, past - start, part_total, **attrs
        )
        o, lse = attention_offload.merge_partials(o, lse, *part)
    assert float((o - whole[0]).abs().max()) <= 1e-5
    assert float((lse - whole[1]).abs().max()) <= 1e-5


def test_offload_plan_runs():
    """Tiers cut runs, host runs are consecutive host rows of at most tile_blocks, window-dead runs drop."""
    import numpy as np

    table, step = np.array([[1, 2, 6, 7, 8, 9, 3, 12]]), (np.array([[120]]), np.array([120]), np.array([121]))
    options = dict(gpu_blocks=5, block_size=16, tile_blocks=3, device=torch.device("cpu"))
    plan = attention_offload.plan_offload(table, *step, sliding_window=0, **options)
    spans = [(r.start, r.end, r.on_host, r.first_block) for r in plan.runs]
    assert spans == [(0, 32, False, -1), (96, 112, False, -1), (32, 80, True, 1), (80, 96, True, 4),
                     (112, 121, True, 7)]  # fmt: skip
    windowed = attention_offload.plan_offload(table, *step, sliding_window=30, **options)
    assert [(r.start, r.end) for r in windowed.runs] == [(96, 112), (80, 96), (112, 121)]  # keys > 90 seen


def test_offload_with_the_triton_decode_kernel():
    """The two-tier pool with the Triton decode kernel's partials (fp16), against the spec."""
    pytest.importorskip("triton")
    case = make_case(seed=13, past_lens=[50, 3], new_lens=[2, 1], num_heads=6, num_kv_heads=2)
    ref_o = reference(case, sliding_window=9)[0]
    low = {n: case[n].half() if case[n].is_floating_point() else case[n] for n in INPUT_NAMES}
    low_o = reference(
        {**case, **{n: x.float() for n, x in low.items() if x.is_floating_point()}}, sliding_window=9
    )[0]
    k_dev, v_dev, host_k, host_v, stream = offload_split({**case, **low}, gpu_blocks=3, device=DEVICE)
    q, k, v, _, _, *rest = (low[n].to(DEVICE) for n in INPUT_NAMES)
    o, _, _ = attention_offload.paged_attention_offload(
        q, k, v, k_dev, v_dev, host_k, host_v, *rest, stream=stream, num_heads=6, num_kv_heads=2,
        scale=64**-0.5, sliding_window=9,
    )  # fmt: skip
    for b, n in enumerate(case["new_lens"]):
        fp16_tolerance(o[b, :n], ref_o[b, :n], low_o[b, :n])


@pytest.mark.gpu
@pytest.mark.parametrize("new_tokens", [1, 4])
def test_offload_equals_all_on_gpu(new_tokens):
    """Rows of 6000-9000 keys, 3/4 of the pool on the host, streamed in 64-block tiles: the same output
    as the all-on-GPU split-KV kernel (fp16 both; partials merged in fp32)."""
    from kernels.attention_triton_decode import paged_attention

    case = make_case(seed=21, past_lens=[9000, 6000, 37], new_lens=[new_tokens] * 3, num_heads=32,
                     num_kv_heads=8, head_dim=128, dtype=torch.float16)  # fmt: skip
    gpu_blocks = case["k_cache"].shape[0] // 4
    k_dev, v_dev, host_k, host_v, stream = offload_split(case, gpu_blocks, tile_blocks=64, device="cuda")
    inputs = [case[n].cuda() for n in INPUT_NAMES]
    attrs = dict(num_heads=32, num_kv_heads=8, scale=128**-0.5)
    expected, _, _ = paged_attention(*inputs, **attrs)
    q, k, v, _, _, *rest = inputs
    got, _, _ = attention_offload.paged_attention_offload(q, k, v, k_dev, v_dev, host_k, host_v, *rest,
                                                          stream=stream, **attrs)  # fmt: skip
    assert float((got.float() - expected.float()).abs().max()) <= 2e-3
    ref_o = reference({**case, **{n: case[n].float() for n in ("q", "k", "v", "k_cache", "v_cache")}})[0]
    fp16_tolerance(got.cpu(), ref_o, expected.cpu())


# -- NPU-style ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sliding_window", [0, 1, 8, 40])
@pytest.mark.parametrize(("seq_q", "seq_k"), [(1, 1), (17, 17), (97, 97), (17, 97), (97, 17), (200, 333)])
def test_npu_dense(seq_q, seq_k, sliding_window, causal):
    """Small tiles (32 x 48 outer, 8-row stripes) so every shape crosses tile edges; GQA 3."""
    g = torch.Generator().manual_seed(seq_q * seq_k + sliding_window)
    q = torch.randn(2, 6, seq_q, 64, generator=g)
    k, v = (torch.randn(2, 2, seq_k, 64, generator=g) for _ in range(2))
    options = dict(causal=causal, sliding_window=sliding_window)
    ref, ref_lse = attention_alibi_ref(q, k, v, **options)
    out, lse = attention_npu.npu_attention(
        q, k, v, **options, block_m=32, block_n=48, stripe=8, return_lse=True
    )
    assert float((out - ref).abs().max()) <= 1e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    seen = torch.isfinite(ref_lse)
    assert float((lse[seen] - ref_lse[seen]).abs().max()) <= 1e-5


def test_npu_default_tiles_and_fp16():
    """The default 128 x 1024 tiles over 1500 keys, fp16 in and out."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 300, 64, generator=g)
    k, v = (torch.randn(1, 1, 1500, 64, generator=g) for _ in range(2))
    out = attention_npu.npu_attention(q.half(), k.half(), v.half(), sliding_window=700)
    ref, _ = attention_alibi_ref(q, k, v, sliding_window=700)
    lowp, _ = attention_alibi_ref(q.half().float(), k.half().float(), v.half().float(), sliding_window=700)
    assert out.dtype == torch.float16
    fp16_tolerance(out, ref, lowp)


def test_npu_tile_masks_are_slices_of_one_small_mask():
    """Every tile's mask equals the tile of the N x N mask it stands for; the compressed one is
    (block_m + block_n)^2 bytes whatever N is."""
    block_m, block_n, S, T, window = 16, 24, 70, 100, 30
    mask = attention_npu.CompressedCausalMask(block_m, block_n)
    assert mask.nbytes == (block_m + block_n) ** 2
    pos = torch.arange(S)[:, None] + T - S
    key = torch.arange(T)[None, :]
    full = (key <= pos) & (pos - key < window)
    for r0 in range(0, S, block_m):
        for c0 in range(0, T, block_n):
            rows, cols = min(block_m, S - r0), min(block_n, T - c0)
            tile = attention_npu.tile_visibility(mask, rows, cols, T - S + r0, c0, True, window)
            expected = full[r0 : r0 + rows, c0 : c0 + cols]
            if tile is None:
                assert expected.all()
            elif tile is False:
                assert not expected.any()
            else:
                assert torch.equal(tile, expected)
