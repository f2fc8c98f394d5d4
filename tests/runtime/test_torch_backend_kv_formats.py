"""TorchBackend over quantized (int8, int4) and SAQ KV caches, against the ONNX Runtime backend.

CPU (CI), on the tiny random model exported with each format: logits within 2e-2 of OrtBackend's (measured
2e-3 int8, 1e-5 int4, 6e-4 SAQ on a logit scale of 26; a wrong k_mean gives 0.16, an SAQ output left
rotated 5.6) over a batched prefill and ten decode steps that close SAQ stages, with pools that agree
byte for byte but for rare rounding flips (<= 0.2% of bytes, measured <= 0.06%; the same wrong k_mean moves
0.8%); equal greedy tokens through the Engine; KV handoff between the two backends both ways. ONNX Runtime
runs the native kernel (an SAQ graph has no function body: those cases skip without it). The node
functions against their specs: `paged_attention_quant_torch` exactly, `TritonQuantAttention` (Triton's
interpreter without CUDA) by FlashAttention's tolerance rule, decode and prefill rows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from runtime.artifact import load_artifact
from runtime.backends.onnxruntime import OrtBackend
from runtime.backends.torch_cuda import TorchBackend
from runtime.backends.torch_quant_kv import paged_attention_quant_torch
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.errors import ConfigError
from runtime.kv_cache import layout_for_pool, num_slots_for
from runtime.sampling import SamplingParams
from runtime.sequence import ImportedKV
from tests.attention_cases import (
    INPUT_NAMES,
    QUANT_INPUT_NAMES,
    caches_match,
    make_case,
    max_error_on_real_rows,
    quantized_case,
    quantized_reference,
)
from tests.runtime.test_torch_backend import block_tables, generate_batched, step_batch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module loads (as tests/kernels does)

FORMATS = ["int8", "int4", "saq"]
SAQ_SPEC = "8:1,4:1,2;stage=8;v_group=16;sink=1;clip=2"  # 8-token stages: prompts reach the bottom stair
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 28, 17, 9, 4029, 100, 2, 7, 41000, 33, 12, 5, 77, 18],
    [(97 * i + 11) % 49152 for i in range(30)],
    [5, 6, 7],
]
CPU = dict(backend="torch", device="cpu")


@pytest.fixture(scope="module", params=FORMATS)
def artifact_path(request, tmp_path_factory, native_kernel_available):
    from exporters.checkpoint import open_checkpoint
    from exporters.onnx_export import ExportOptions, export_artifact
    from tests.models import write_tiny_gguf

    if request.param == "saq" and not native_kernel_available:
        pytest.skip("an SAQ graph runs on ONNX Runtime only with the native kernel (not built)")
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    saq = dict(kv_saq=SAQ_SPEC) if request.param == "saq" else {}
    options = ExportOptions(weights="fp", compute="fp32", kv_dtype=request.param, progress=False, **saq)
    return export_artifact(
        open_checkpoint(write_tiny_gguf(folder / "tiny.gguf")), folder / "artifact", options
    )


def _backends(path):
    artifact = load_artifact(path, verify=False)
    pool = artifact.pool_tensors()
    block = artifact.block_size or 4
    layout = layout_for_pool(1 << 20, block, pool, artifact.model.num_layers, num_slots_for(pool, 3))
    ours = TorchBackend(artifact, RuntimeConfig(**CPU), layout)
    theirs = OrtBackend(artifact, RuntimeConfig(), layout)
    return artifact, block, ours, theirs


def test_logits_and_pools_match_onnxruntime(artifact_path):
    artifact, block, ours, theirs = _backends(artifact_path)
    assert ours.attention_kernel == "torch"
    steps, prompts = 10, PROMPTS  # SAQ: 30 + 10 tokens close stages 0-4; stage 1 reaches the bottom stair
    tables = block_tables([len(p) + steps for p in prompts], block)

    def batch(rows, all_logits=False):  # rows 0, 1, 2 own slots 1, 2, 3 (slot 0: scratch)
        seq_slots = np.arange(1, len(rows) + 1, dtype=np.int32)
        return dataclasses.replace(step_batch(rows, block, all_logits), seq_slots=seq_slots)

    first = batch([(p, 0, t) for p, t in zip(prompts, tables)], all_logits=True)
    expected, got = theirs.run(first), ours.run(first)
    errors = [np.abs(got - expected).max()]
    lens = [len(p) for p in prompts]
    last = expected[np.arange(len(prompts)), np.array(lens) - 1]
    for _ in range(steps):
        rows = [([int(t)], n, table) for t, n, table in zip(last.argmax(-1), lens, tables)]
        expected, got = theirs.run(batch(rows)), ours.run(batch(rows))
        errors.append(np.abs(got - expected).max())
        lens, last = [n + 1 for n in lens], expected[:, 0]
    assert max(errors) <= 2e-2, f"max abs logit error per step {errors}"
    pools = ours.cache_tensors()
    assert [(p.shape, p.dtype) for p in pools] == [
        (t.shape, torch.from_numpy(t[:0]).dtype) for t in theirs.cache_arrays()
    ]
    for pool, reference_pool in zip(pools, theirs.cache_arrays()):  # row 0: scratch block or slot
        differ = (pool[1:].numpy() != reference_pool[1:]).mean()
        assert differ <= 2e-3, f"{differ:.2%} of the pool's bytes differ"


@pytest.fixture(scope="module")
def engines(artifact_path):
    """The format on onnxruntime and on torch (CPU), with chunked prefill and mixed batches."""
    config = dict(max_batch_size=3, max_step_tokens=24, block_size=4, kv_cache_bytes=1 << 20)
    return (
        Engine.from_artifact(artifact_path, RuntimeConfig(**config), verify=False),
        Engine.from_artifact(artifact_path, RuntimeConfig(**CPU, **config), verify=False),
    )


def test_engine_greedy_tokens_equal_onnxruntime(engines):
    theirs, ours = engines
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert generate_batched(ours, PROMPTS, params) == generate_batched(theirs, PROMPTS, params)
    assert ours.stats().kv_bytes_in_use == 0 and ours.allocator.free_slots == theirs.allocator.free_slots


def test_kv_handoff_between_backends(engines):
    """Prefill on one backend, export its KV (codes and scales; SAQ records and slot), import it on the
    other: the same tokens as one engine alone, and nearly the same bytes from both."""
    theirs, ours = engines
    ids = PROMPTS[1]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [e.token_id for e in theirs.generate(ids, params)]
    assert [e.token_id for e in ours.generate(ids, params)] == expected  # and both pools saw the same steps:
    exports = {}  # SAQ: the bottom-stair records (none at 30 tokens) and the slot's bytes in use
    for name, engine in (("ort", theirs), ("torch", ours)):
        first = list(engine.generate_kept(ids, dataclasses.replace(params, max_tokens=1)))
        assert [e.token_id for e in first] == expected[:1]
        exports[name] = engine.export_kv(first[0].request_id)
        assert engine.release_kv(first[0].request_id)
    for layer, reference_layer in zip(exports["torch"], exports["ort"]):
        for array, reference in zip(layer, reference_layer):
            assert array.dtype == reference.dtype and array.shape == reference.shape
            assert array.size == 0 or (array != reference).mean() <= 2e-3
    for source, target in (("ort", ours), ("torch", theirs)):
        request = target.add_request(ids, params, imported=ImportedKV(expected[0], exports[source]))
        got = []
        while target.has_work():
            got += [e.token_id for e in target.step() if e.request_id == request]
        assert got == expected, f"KV from {source}"
        assert target.stats().kv_bytes_in_use == 0


def test_kernels_for_float_pools_only_are_refused(artifact_path):
    artifact = load_artifact(artifact_path, verify=False)
    pool = artifact.pool_tensors()
    layout = layout_for_pool(1 << 20, artifact.block_size or 4, pool, artifact.model.num_layers, 7)
    with pytest.raises(
        ConfigError, match=f"attention_kernel: npu reads float KV pools only; a {artifact.kv_format}"
    ):
        TorchBackend(artifact, RuntimeConfig(**CPU, attention_kernel="npu"), layout)


# -- the node functions against their specs ---------------------------------------------------------

CASES = [
    dict(past_lens=[0, 17, 40], new_lens=[1, 1, 1]),  # decode
    dict(past_lens=[3, 30], new_lens=[5, 2]),  # a few tokens per row
    dict(past_lens=[0, 7, 33], new_lens=[20, 13, 1]),  # prefill, a chunk after a past, a decode row
]
IDS = ["decode", "multi-token", "prefill"]


def _quant_inputs(case: dict, device="cpu") -> list[torch.Tensor]:
    return [case[n].clone().to(device) for n in INPUT_NAMES + QUANT_INPUT_NAMES]


@pytest.mark.parametrize("sliding_window", [0, 7])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_quant_torch_attention_matches_spec(kv_format, case, sliding_window):
    case = quantized_case(make_case(seed=3, **case), kv_format)
    ref_o, *ref_pools = quantized_reference(case, kv_format, sliding_window=sliding_window)
    inputs = _quant_inputs(case)
    attrs = dict(num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=64**-0.5)
    o, *pools = paged_attention_quant_torch(
        *inputs, **attrs, kv_format=kv_format, sliding_window=sliding_window
    )
    assert max_error_on_real_rows(o, ref_o, case["new_lens"]) <= 1e-5
    assert all(caches_match(got, want) for got, want in zip(pools, ref_pools))
    assert all(got is given for got, given in zip(pools, inputs[3:5] + inputs[9:11]))  # in place


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_triton_quant_attention_matches_spec(kv_format, case):
    """fp16, on the GPU or in Triton's interpreter: pools bit for bit, o within 2x the error of the spec's
    own fp16 rounding + 2e-3 (kernels/attention_triton_quant.py's rule)."""
    pytest.importorskip("triton")
    from runtime.backends.torch_quant_kv import TritonQuantAttention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = quantized_case(make_case(seed=4, **case), kv_format)
    case = {**case, **{n: case[n].half() for n in ("q", "k", "v", "k_mean")}}
    ref_o, *ref_pools = quantized_reference(case, kv_format)
    ref32 = quantized_reference({**case, "q": case["q"].float()}, kv_format)[0]
    attrs = dict(num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=64**-0.5, causal=True)
    o, *pools = TritonQuantAttention()(
        *_quant_inputs(case, device), **attrs, kv_format=kv_format, sliding_window=0
    )
    assert all(caches_match(got.cpu(), want) for got, want in zip(pools, ref_pools))
    error = max_error_on_real_rows(o.cpu(), ref32, case["new_lens"])
    assert error <= 2 * max_error_on_real_rows(ref_o, ref32, case["new_lens"]) + 2e-3


# -- SAQ decode steps from CUDA graphs --------------------------------------------------------------


SAQ_GRAPH_CASES = {  # format, each row's past length
    # row 0's token completes stage 4 (stages 3 and 2 step down), row 1's stage 2 (stage 1 steps down,
    # sink stage 0 stays), row 2 stays in its open stage
    "sink": ("8:1,4:1,2;stage=16;v_group=32;sink=1;clip=2", [79, 47, 5]),
    # token sinks: row 1's token completes stage 0 (its first 3 rows to the sink rows)
    "token-sinks": ("8:1,4:1,2;stage=16;v_group=32;sink_tokens=3;clip=2", [79, 15, 5]),
}


def _saq_decode_case(seed: int, spec: str, past: list[int]):
    """One layer's cache of three rows (16-token stages, 8:1,4:1,2: sinks, rings and bottom records) of
    `past` tokens and a step of one new token per row plus a padding row (scratch slot 0, past 0, total 1,
    scratch blocks)."""
    from kernels.kv_formats import SaqFormat
    from kernels.kv_saq import paged_attention_saq_ref

    torch.manual_seed(seed)
    heads, kv_heads, head_dim = 4, 2, 32
    fmt = SaqFormat.parse(spec, kv_heads * head_dim)
    pool = torch.zeros(12, fmt.block_bytes, dtype=torch.uint8)
    slots = torch.zeros(5, fmt.slot_bytes, dtype=torch.uint8)
    table = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 10, 0, 0, 0]], dtype=torch.int32)
    seq_slots = torch.tensor([1, 2, 3], dtype=torch.int32)
    attrs = dict(num_heads=heads, num_kv_heads=kv_heads, scale=head_dim**-0.5, fmt=fmt)
    width = kv_heads * head_dim
    for b, n in enumerate(past):  # fill each row's cache through the spec (stages close on the way)
        q = torch.randn(1, n, heads * head_dim)
        k, v = torch.randn(2, 1, n, width) * torch.linspace(0.3, 3, width)
        zero = torch.zeros(1, dtype=torch.int32)
        _, pool, slots = paged_attention_saq_ref(q, k, v, pool, slots, table[b : b + 1], zero, zero + n,
                                                 seq_slots[b : b + 1], **attrs)  # fmt: skip
    past_lens = torch.tensor(past + [0], dtype=torch.int32)
    inputs = (
        torch.randn(4, 1, heads * head_dim),
        torch.randn(4, 1, width) * torch.linspace(0.3, 3, width),
        torch.randn(4, 1, width),
        pool,
        slots,
        torch.cat([table, torch.zeros(1, 5, dtype=torch.int32)]),
        past_lens,
        past_lens + 1,
        torch.cat([seq_slots, torch.zeros(1, dtype=torch.int32)]),
    )
    return inputs, attrs


@pytest.mark.parametrize("case", SAQ_GRAPH_CASES)
def test_saq_graph_step_and_batched_close_equal_the_spec(case):
    """What a CUDA graph of an SAQ decode step runs, layer by layer (SaqAttention.graph_step: the Triton
    read, the interpreter on the CPU, and the open-stage write with no host read), then the stages the
    step completed closed in one batch over both layers and rows (close_stages): each layer's output and
    cache are the spec's (open stages and token sinks byte for byte; records bar clipping near-ties, <= 1%
    of bytes)."""
    pytest.importorskip("triton")
    from kernels.kv_saq import paged_attention_saq_ref
    from runtime.backends.onnxruntime import StepBatch
    from runtime.backends.torch_cuda import closes_stage
    from runtime.backends.torch_quant_kv import SaqAttention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = [_saq_decode_case(seed, *SAQ_GRAPH_CASES[case]) for seed in (5, 6)]
    fmt = layers[0][1]["fmt"]
    attention = SaqAttention(torch.device(device), use_kernel=True)
    assert attention.graphable(fmt, 32)
    attention.in_graph = True
    pools, references = [], []
    for inputs, attrs in layers:
        references.append(paged_attention_saq_ref(*[x.clone() for x in inputs], **attrs))
        o, pool, slots = attention(*[x.clone().to(device) for x in inputs], causal=True, sliding_window=0,
                                   **attrs)  # fmt: skip
        ref = references[-1][0][:3]  # the kernel's fp16 dots: FlashAttention's rule, ATOL as its tests'
        assert (o[:3].cpu().float() - ref).abs().max() <= 2 * (ref.half().float() - ref).abs().max() + 4e-3
        pools += [pool, slots]
    *_, table, past, total, seq_slots = (x.numpy() for x in layers[0][0])
    batch = StepBatch(*[np.zeros((4, 1), np.int64)] * 3, table, past, total, np.zeros((4, 1), np.int64),
                      seq_slots)  # fmt: skip
    assert closes_stage(batch, fmt.stage)
    assert not closes_stage(dataclasses.replace(batch, past_lens=past + 1, total_lens=past + 2), fmt.stage)
    attention.close_stages(pools, batch, fmt)
    tails, records = 2 * fmt.tail_bytes, fmt.sink_offset
    for (_, ref_pool, ref_slots), pool, slots in zip(references, pools[0::2], pools[1::2]):
        pool, slots = pool.cpu(), slots[1:].cpu()  # slot 0: scratch (the padding row)
        for b, n in enumerate(total[:3] % fmt.stage):  # the open stages' rows in use (the rest: unread)
            got, want = (x[seq_slots[b] - 1, :tails].view(torch.float16).view(2, fmt.stage, -1)[:, :n]
                         for x in (slots, ref_slots[1:]))  # fmt: skip
            assert torch.equal(got, want)
        assert torch.equal(slots[:, tails:records], ref_slots[1:, tails:records]), "token sinks differ"
        differ = (pool != ref_pool).sum() + (slots[:, records:] != ref_slots[1:, records:]).sum()
        assert differ <= 0.01 * (pool.numel() + slots[:, records:].numel()), f"{differ} record bytes differ"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", FORMATS)
def test_cuda_graph_decode_equals_eager(tmp_path, kv_format):
    """A random model of SmolLM2's shapes (heads of 64: the Triton kernels take them), fp16 compute: greedy
    tokens with decode steps replayed from CUDA graphs equal eager steps'. SAQ with 16-token stages: a
    stage closes every 16 steps of a row, after the graph, in one batch over layers and rows."""
    from exporters.onnx_export import ExportOptions, export_artifact
    from tests.runtime.test_torch_backend import RandomCheckpoint

    saq = dict(kv_saq="8:1,4:1,2;stage=16;v_group=64;sink=1;clip=2") if kv_format == "saq" else {}
    options = ExportOptions(weights="fp", compute="fp32", kv_dtype=kv_format, progress=False, **saq)
    path = export_artifact(RandomCheckpoint(), tmp_path / "artifact", options)
    prompts = [PROMPTS[0], PROMPTS[1], list(range(1, 17))]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    tokens, engines = {}, {}
    for graphs in (True, False):
        config = RuntimeConfig(backend="torch", device="cuda", compute_dtype="fp16", cuda_graphs=graphs,
                               max_batch_size=4, kv_cache_bytes=256 << 20, max_seq_len=256)  # fmt: skip
        engines[graphs] = Engine.from_artifact(path, config, verify=False)
        tokens[graphs] = generate_batched(engines[graphs], prompts, params)
    assert engines[True].backend._graphs.graphs, "no decode step replayed a CUDA graph"
    assert tokens[True] == tokens[False]
