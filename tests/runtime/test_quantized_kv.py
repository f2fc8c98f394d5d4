"""Quantized KV caches (int8, int4) end to end: export, runtime pools and accounting, handoff, accuracy.

Mechanics run on the tiny random model (fast). Accuracy runs on the embedded model, exported with fp32
weights and compute so that only the KV format differs from the baseline, on held-out standard-library
docstrings. The issue's bars, over 20480 tokens (benchmarks/results/kv_accuracy.json): int8 dPPL <= 0.01
(0.0045: met) and mean KL <= 1e-3 (1.8e-4: met); int4 dPPL <= 0.1: NOT met by the per-token int4 here
(0.79), met by the KIVI-style int4 (0.030; test_kivi_int4_accuracy_bar). The test's 2048
tokens are too few for a dPPL of 0.01 (int8 measures 0.017 there), so it checks int8's KL against the bar
and guards the rest against regressions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exporters.onnx_export import ExportOptions
from runtime.artifact import load_artifact
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.kv_cache import bytes_per_token, pool_tensors
from runtime.sampling import SamplingParams
from runtime.sequence import ImportedKV
from tests.conftest import cached_export

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog and keeps running", "1 2 3"]
FORMATS = ["int8", "int4"]


@pytest.fixture(scope="module", params=FORMATS)
def tiny_quantized(request, tmp_path_factory):
    from exporters.checkpoint import open_checkpoint
    from exporters.onnx_export import export_artifact
    from tests.models import write_tiny_gguf

    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    gguf_path = write_tiny_gguf(folder / "tiny.gguf")
    options = ExportOptions(weights="fp", compute="fp32", kv_dtype=request.param, progress=False)
    return export_artifact(open_checkpoint(gguf_path), folder / "artifact", options)


def _engine(path, kernel="auto", **config) -> Engine:
    config.setdefault("block_size", 4)
    return Engine.from_artifact(path, RuntimeConfig(attention_kernel=kernel, **config), verify=False)


def _solo(engine, ids, params):
    return [e.token_id for e in engine.generate(ids, params)]


def test_manifest_pools_and_accounting(tiny_quantized):
    """The manifest names the format; the runtime's pools are exactly the manifest's bytes per token."""
    artifact = load_artifact(tiny_quantized)
    model = artifact.model
    fmt = artifact.kv_format
    assert fmt in FORMATS
    width = model.num_kv_heads * model.head_dim
    pools = pool_tensors(fmt, width, model.head_dim)
    assert [p.name for p in pools][:2] == ["k_cache", "v_cache"] and len(pools) == 4
    per_token = sum(p.width * np.dtype(p.dtype).itemsize for p in pools) * model.num_layers
    assert (
        artifact.kv_bytes_per_token
        == per_token
        == bytes_per_token(fmt, model.num_layers, width, model.head_dim)
    )
    fp16 = bytes_per_token("fp16", model.num_layers, width, model.head_dim)
    assert fp16 / per_token > (
        1.5 if fmt == "int8" else 2.5
    )  # the tiny model's heads are small: scales weigh more
    engine = _engine(tiny_quantized, kv_cache_bytes=1 << 20)
    layout = engine.allocator.layout
    assert layout.bytes_per_token == per_token
    assert engine.stats().kv_bytes_free == (layout.num_blocks - 1) * layout.bytes_per_block
    request = engine.add_request(engine.tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=3))
    engine.step()
    blocks = len(engine.allocator.table(request))
    assert engine.stats().kv_bytes_in_use == blocks * layout.bytes_per_block > 0
    while engine.has_work():
        engine.step()
    assert engine.stats().kv_bytes_in_use == 0 and engine.allocator.num_sequences == 0


def test_native_kernel_equals_function_body(tiny_quantized, native_kernel_available):
    """Both implementations of the op over int8/int4 pools give the same greedy tokens and nearly the
    same logits (they quantize identically; sums are ordered differently)."""
    if not native_kernel_available:
        pytest.skip("the native kernel is not built")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    native, body = _engine(tiny_quantized, "native"), _engine(tiny_quantized, "function")
    assert native.backend.attention_kernel == "native" and body.backend.attention_kernel == "function"
    for text in PROMPTS:
        ids = native.tokenizer.encode(text)
        assert _solo(native, ids, params) == _solo(body, ids, params)


def test_batched_equals_solo_and_frees_kv(tiny_quantized):
    engine = _engine(tiny_quantized, max_batch_size=4, max_step_tokens=24)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = [_solo(engine, ids, params) for ids in prompts]
    request_ids = [engine.add_request(ids, params) for ids in prompts]
    got = {r: [] for r in request_ids}
    while engine.has_work():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    assert [got[r] for r in request_ids] == expected
    assert engine.stats().kv_bytes_in_use == 0


def test_handoff_moves_codes_and_scales(tiny_quantized):
    """Prefill on one engine, export the quantized KV (codes + scales per layer), import on another:
    the same tokens as one engine alone, and the exported bytes are the format's bytes."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    decode = _engine(tiny_quantized)
    ids = decode.tokenizer.encode(PROMPTS[1])
    expected = _solo(decode, ids, params)
    prefill = _engine(tiny_quantized, block_size=8)
    first = list(prefill.generate_kept(ids, dataclasses.replace(params, max_tokens=1)))
    kv = prefill.export_kv(first[0].request_id)
    assert prefill.release_kv(first[0].request_id)
    assert len(kv) == decode.artifact.model.num_layers and all(len(layer) == 4 for layer in kv)
    assert sum(t.nbytes for layer in kv for t in layer) == len(ids) * decode.artifact.kv_bytes_per_token
    assert kv[0][0].dtype == (np.int8 if decode.artifact.kv_format == "int8" else np.uint8)
    request = decode.add_request(ids, params, imported=ImportedKV(first[0].token_id, kv))
    got = []
    while decode.has_work():
        got += [e.token_id for e in decode.step() if e.request_id == request]
    assert got == expected and decode.stats().kv_bytes_in_use == 0


def test_wrong_format_on_import_is_refused(tiny_quantized, tiny_artifact):
    """KV exported in fp32 cannot be imported by an int8/int4 engine: a clear error, nothing leaked."""
    fp = _engine(tiny_artifact)
    ids = fp.tokenizer.encode(PROMPTS[0])
    first = list(fp.generate_kept(ids, SamplingParams(max_tokens=1)))
    kv = fp.export_kv(first[0].request_id)
    quantized = _engine(tiny_quantized)
    with pytest.raises(Exception, match="expected"):
        quantized.add_request(ids, SamplingParams(max_tokens=2), imported=ImportedKV(first[0].token_id, kv))
    assert quantized.stats().kv_bytes_in_use == 0 and quantized.allocator.num_sequences == 0


@pytest.fixture(scope="module")
def smollm2_kv(embedded_gguf):
    def export(kv_dtype: str):
        options = ExportOptions(weights="fp", compute="fp32", kv_dtype=kv_dtype, progress=False)
        return cached_export(embedded_gguf, options, "smollm2")

    return export


@pytest.mark.slow
def test_accuracy_bars(smollm2_fp32, smollm2_kv):
    """dPPL and mean KL vs the fp32 cache on 2 x 1024 held-out tokens, teacher-forced in chunks of
    256 (later chunks read the quantized cache the earlier ones wrote). Measured here: int8 dPPL 0.017,
    KL 1.9e-4; int4 dPPL 0.69, KL 0.053."""
    from benchmarks.kv_accuracy import compare, eval_ids

    engines = {"fp32": Engine.from_artifact(smollm2_fp32, RuntimeConfig(kv_cache_bytes=256 << 20))}
    for fmt in FORMATS:
        engines[fmt] = Engine.from_artifact(smollm2_kv(fmt), RuntimeConfig(kv_cache_bytes=256 << 20))
        assert engines[fmt].artifact.kv_format == fmt
    result = compare(engines, eval_ids(engines["fp32"], 2048), window=1024, chunk=256)
    dppl, kl = result["delta_perplexity"], result["mean_kl"]
    assert kl["int8"] <= 1e-3 and abs(dppl["int8"]) <= 0.03, result
    assert kl["int4"] <= 0.08 and abs(dppl["int4"]) <= 1.0, result
    assert kl["int8"] < kl["int4"], "int4 should lose more than int8"


@pytest.mark.slow
def test_kivi_int4_accuracy_bar(smollm2_fp32, embedded_gguf):
    """The issue's int4 bar (dPPL <= 0.1) on the KIVI-style int4 cache: the SAQ format with one 4-bit stair
    (`--kv-dtype saq --kv-saq "4;stage=64;v_group=32"`: K per channel per 64 tokens, V per token per 32
    channels, the open stage fp16), served by the native kernel. Same 2 x 1024 tokens as above; measured
    here: dPPL -0.017, KL 0.0037; over 20480 tokens (benchmarks/results/kv_accuracy.json) 0.030, KL 0.0020."""
    from benchmarks.kv_accuracy import compare, eval_ids
    from kernels import attention_cpu

    if not attention_cpu.library_path():
        pytest.skip(
            "the SAQ op runs on the native kernel only; build it: python -m kernels.attention_cpu build"
        )
    options = ExportOptions(
        weights="fp", compute="fp32", kv_dtype="saq", kv_saq="4;stage=64;v_group=32", progress=False
    )
    config = RuntimeConfig(kv_cache_bytes=256 << 20)
    engines = {
        "fp32": Engine.from_artifact(smollm2_fp32, config),
        "kivi4": Engine.from_artifact(cached_export(embedded_gguf, options, "smollm2"), config),
    }
    assert engines["kivi4"].artifact.kv_spec.startswith("saq 4;stage=64")
    result = compare(engines, eval_ids(engines["fp32"], 2048), window=1024, chunk=256)
    print("KIVI int4:", result["delta_perplexity"], result["mean_kl"])
    assert abs(result["delta_perplexity"]["kivi4"]) <= 0.1 and result["mean_kl"]["kivi4"] <= 0.01, result
