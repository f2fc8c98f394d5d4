"""TorchBackend (runtime/backends/torch_cuda.py) against the ONNX Runtime backend on the same artifact.

CPU (CI): on the tiny random model, logits within 1e-4 of OrtBackend's over a batched prefill and decode
steps with equal KV pools, and equal greedy tokens through the Engine, KV handoff included; the loader on
quantized exports against the reference module built from the same blocks; both attention functions
against paged_attention_ref (the Triton one in Triton's interpreter).

GPU (marked `gpu`): on the embedded model, fp32 greedy tokens over 32 steps on several prompts equal the
onnxruntime engine's; fp16 top-1 agreement with the fp32 reference >= 99% over 256 teacher-forced
positions of each of several texts; CUDA-graph decode gives the same tokens as eager. Where the embedded
model's package is not installed (a GPU machine without it), they run on a random mid-size model exported
here, and print that they did.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.checkpoint import ModelConfig, TokenizerSpec
from exporters.cli import embedded_model_path
from runtime.artifact import load_artifact
from runtime.backends.onnxruntime import OrtBackend, StepBatch
from runtime.backends.torch_cuda import TorchBackend, TritonAttention, paged_attention_torch
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.errors import ConfigError, EdgeError
from runtime.kv_cache import KVCacheLayout
from runtime.sampling import SamplingParams
from runtime.sequence import ImportedKV
from runtime.tokenizer import Tokenizer
from tests.attention_cases import INPUT_NAMES, caches_match, make_case, max_error_on_real_rows, reference

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module loads (as tests/kernels does)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog and keeps running", "1 2 3", "Zürich"]
GPU_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Les trois couleurs du drapeau français sont",
]
TEXTS = ["README.md", "runtime/engine.py", "kernels/reference.py", "benchmarks/README.md"]  # teacher forcing
CPU = dict(backend="torch", device="cpu")


def step_batch(rows: list[tuple[list[int], int, np.ndarray]], block_size: int, all_logits: bool = False):
    """Right-padded [B, S] inputs of (new tokens, past length, block table) rows, as the engine builds them;
    logits for every position of each row (repeating its last one) or for its last one."""
    B, S = len(rows), max(len(tokens) for tokens, _, _ in rows)
    width = max(len(table) for _, _, table in rows)
    arrays = dict(input_ids=np.zeros((B, S), np.int64), position_ids=np.zeros((B, S), np.int64))
    arrays |= dict(slot_mapping=np.zeros((B, S), np.int64), block_table=np.zeros((B, width), np.int32))
    for b, (tokens, past, table) in enumerate(rows):
        positions = np.arange(past, past + len(tokens))
        arrays["input_ids"][b, : len(tokens)] = tokens
        arrays["position_ids"][b, : len(tokens)] = positions
        arrays["slot_mapping"][b, : len(tokens)] = (
            table[positions // block_size] * block_size + positions % block_size
        )
        arrays["block_table"][b, : len(table)] = table
    counts = np.array([len(tokens) for tokens, _, _ in rows])
    past = np.array([p for _, p, _ in rows], np.int32)
    last = counts[:, None] - 1
    logit_positions = np.minimum(np.arange(S)[None], last) if all_logits else last
    return StepBatch(**arrays, past_lens=past, total_lens=past + counts.astype(np.int32),
                     logit_positions=logit_positions.astype(np.int64))  # fmt: skip


def block_tables(lengths: list[int], block_size: int) -> list[np.ndarray]:
    """Consecutive blocks for each row after the scratch block 0."""
    counts = [-(-n // block_size) for n in lengths]
    starts = np.cumsum([1] + counts[:-1])
    return [np.arange(s, s + c, dtype=np.int32) for s, c in zip(starts, counts)]


def generate_batched(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    request_ids = [engine.add_request(ids, params) for ids in prompts]
    got = {r: [] for r in request_ids}
    while engine.has_work():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    return [got[r] for r in request_ids]


# -- CPU ------------------------------------------------------------------------------------------


def test_logits_and_pool_match_onnxruntime_over_prefill_and_decode(tiny_artifact):
    artifact = load_artifact(tiny_artifact, verify=False)
    block, steps = 4, 4
    layout = KVCacheLayout(num_blocks=24, block_size=block, bytes_per_token=artifact.kv_bytes_per_token)
    ours = TorchBackend(artifact, RuntimeConfig(**CPU), layout)
    theirs = OrtBackend(artifact, RuntimeConfig(), layout)
    assert ours.attention_kernel == "torch"
    prompts = [[5, 17, 300, 4001, 9, 12, 77], list(range(1000, 1013)), [42, 43, 44]]
    tables = block_tables([len(p) + steps for p in prompts], block)
    batch = step_batch([(p, 0, t) for p, t in zip(prompts, tables)], block, all_logits=True)
    expected, got = theirs.run(batch), ours.run(batch)
    errors = [np.abs(got - expected).max()]
    lens = [len(p) for p in prompts]
    last = expected[np.arange(len(prompts)), np.array(lens) - 1]  # [B, V]
    for _ in range(steps):
        rows = [([int(t)], n, table) for t, n, table in zip(last.argmax(-1), lens, tables)]
        expected, got = theirs.run(step_batch(rows, block)), ours.run(step_batch(rows, block))
        errors.append(np.abs(got - expected).max())
        lens, last = [n + 1 for n in lens], expected[:, 0]
    assert max(errors) <= 1e-4, f"max abs logit error per step {errors}"
    for pool, reference_pool in zip(ours.cache_tensors(), theirs.cache_arrays()):
        np.testing.assert_allclose(pool[1:].numpy(), reference_pool[1:], atol=1e-5)  # block 0: scratch


@pytest.fixture(scope="module")
def engines(tiny_artifact):
    """The tiny model on onnxruntime and on torch (CPU), with chunked prefill and mixed batches."""
    config = dict(max_batch_size=4, max_step_tokens=24, block_size=4, kv_cache_bytes=2**20)
    return (
        Engine.from_artifact(tiny_artifact, RuntimeConfig(**config), verify=False),
        Engine.from_artifact(tiny_artifact, RuntimeConfig(**CPU, **config), verify=False),
    )


def test_engine_greedy_tokens_equal_onnxruntime(engines):
    theirs, ours = engines
    prompts = [theirs.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert generate_batched(ours, prompts, params) == generate_batched(theirs, prompts, params)
    assert ours.stats().kv_bytes_in_use == 0


def test_kv_handoff_between_backends(engines):
    """Prefill on one backend, export its KV, import it on the other: the same tokens as one engine alone."""
    theirs, ours = engines
    ids = theirs.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [e.token_id for e in theirs.generate(ids, params)]
    exports = {}
    for name, engine in (("ort", theirs), ("torch", ours)):
        first = list(engine.generate_kept(ids, dataclasses.replace(params, max_tokens=1)))
        assert [e.token_id for e in first] == expected[:1]
        exports[name] = engine.export_kv(first[0].request_id)
        assert engine.release_kv(first[0].request_id)
    for (k, v), (k_ref, v_ref) in zip(exports["torch"], exports["ort"]):
        assert k.dtype == k_ref.dtype and k.shape == k_ref.shape
        np.testing.assert_allclose(k, k_ref, atol=1e-5)
        np.testing.assert_allclose(v, v_ref, atol=1e-5)
    for source, target in (("ort", ours), ("torch", theirs)):
        request = target.add_request(ids, params, imported=ImportedKV(expected[0], exports[source]))
        got = []
        while target.has_work():
            got += [e.token_id for e in target.step() if e.request_id == request]
        assert got == expected, f"KV from {source}"


@pytest.mark.parametrize(
    "matrix_types, compute",
    [("Q4_1", "fp32"), (("Q4_0", "Q8_0", "Q4_1"), "int8")],
    ids=["q4_1-dequantized-head", "mixed-blocks-shared-8bit-head"],
)
def test_quantized_artifact_matches_reference_module(tmp_path, matrix_types, compute):
    """MatMulNBits blocks (fused or per projection, with Q4_1 minimums) and the Q8_0 embedding load to the
    weights the reference module computes with, from the same GGUF blocks."""
    from gguf import GGMLQuantizationType as QT

    from exporters.checkpoint import open_checkpoint
    from exporters.model import Llama
    from exporters.onnx_export import ExportOptions, export_artifact, plan_weights
    from tests.models import write_tiny_gguf

    types = tuple(QT[t] for t in ((matrix_types,) if isinstance(matrix_types, str) else matrix_types))
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=types)
    options = ExportOptions(compute=compute, progress=False)
    artifact = load_artifact(export_artifact(open_checkpoint(gguf_path), tmp_path / "artifact", options))
    assert artifact.manifest["weights"]["carried_blocks"]
    checkpoint = open_checkpoint(gguf_path)
    ids = [7, 300, 12000, 5, 5, 81, 2048, 49000, 3, 640, 1, 77]
    with torch.no_grad():
        reference_module = Llama(checkpoint.config, plan_weights(checkpoint, options).tensors).eval()
        expected = reference_module.forward_dense(torch.tensor([ids]))[0].numpy()
    layout = KVCacheLayout(num_blocks=4, block_size=16, bytes_per_token=artifact.kv_bytes_per_token)
    backend = TorchBackend(artifact, RuntimeConfig(**CPU), layout)
    table = np.array([2, 3], np.int32)
    got = [backend.run(step_batch([(ids[:8], 0, table)], 16, all_logits=True))[0]]
    got += [backend.run(step_batch([([t], 8 + i, table)], 16))[0] for i, t in enumerate(ids[8:])]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


CASES = [
    dict(past_lens=[0, 17, 40], new_lens=[1, 1, 1]),  # decode
    dict(past_lens=[3, 30], new_lens=[5, 2]),  # a few tokens per row: still the decode kernel
    dict(past_lens=[0, 7, 33], new_lens=[20, 13, 1]),  # prefill, a chunk after a past, a decode row
]


@pytest.mark.parametrize("sliding_window", [0, 7])
@pytest.mark.parametrize("case", CASES, ids=["decode", "multi-token", "prefill"])
def test_torch_attention_matches_reference(case, sliding_window):
    case = make_case(seed=1, **case)
    ref_o, ref_k, ref_v = reference(case, sliding_window=sliding_window)
    inputs = [case[name].clone() for name in INPUT_NAMES]
    attrs = dict(num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=64**-0.5)
    o, k_cache, v_cache = paged_attention_torch(*inputs, **attrs, sliding_window=sliding_window)
    assert max_error_on_real_rows(o, ref_o, case["new_lens"]) <= 1e-5
    assert caches_match(k_cache, ref_k) and caches_match(v_cache, ref_v)
    assert k_cache is inputs[3] and v_cache is inputs[4]  # in place


@pytest.mark.parametrize("sliding_window", [0, 7])
@pytest.mark.parametrize("case", CASES, ids=["decode", "multi-token", "prefill"])
def test_triton_attention_matches_reference(case, sliding_window):
    """fp16 on the GPU, or in Triton's interpreter; FlashAttention's tolerance rule (2x the error of the
    spec run on the fp16-rounded inputs, + 1e-3)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(seed=2, **case)
    ref_o, _, _ = reference(case, sliding_window=sliding_window)
    low = {
        **case,
        **{n: case[n].half().float() if case[n].is_floating_point() else case[n] for n in INPUT_NAMES},
    }
    low_o = reference(low, sliding_window=sliding_window)[0].half()
    inputs = [(case[n].half() if case[n].is_floating_point() else case[n]).to(device) for n in INPUT_NAMES]
    attrs = dict(num_heads=case["num_heads"], num_kv_heads=case["num_kv_heads"], scale=64**-0.5, causal=True)
    o, k_cache, _ = TritonAttention()(*inputs, **attrs, sliding_window=sliding_window)
    error = max_error_on_real_rows(o.cpu(), ref_o, case["new_lens"])
    assert error <= 2 * max_error_on_real_rows(low_o, ref_o, case["new_lens"]) + 1e-3
    assert caches_match(k_cache.cpu(), reference(low, sliding_window=sliding_window)[1].half())


def test_config_checks():
    with pytest.raises(ConfigError, match="backend: 'tensorrt' is not one of"):
        RuntimeConfig(backend="tensorrt")
    with pytest.raises(ConfigError, match="compute_dtype"):
        RuntimeConfig(compute_dtype="int8")


# -- GPU ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GpuModel:
    path: Path
    embedded: bool
    prompts: list[list[int]]  # for greedy generation
    texts: list[list[int]]  # 256 + 1 tokens each, for teacher forcing


class RandomCheckpoint:
    """Random float weights shaped like SmolLM2 but shallower, read by export_artifact like a checkpoint
    (a WordLevel tokenizer "t0".."tV-1"): the GPU tests' model where the embedded one is not installed."""

    def __init__(self, num_layers: int = 4, seed: int = 0) -> None:
        self.config = ModelConfig("llama", num_layers, 576, 1536, 9, 3, 64, 49152, 1e5, 1e-5, 2048, True)
        c, rng = self.config, np.random.default_rng(seed)
        shapes = dict(
            q=(576, 576), k=(192, 576), v=(192, 576), o=(576, 576), gate=(1536, 576), up=(1536, 576)
        )
        shapes |= dict(down=(576, 1536))
        self.weights = {"embed": rng.standard_normal((c.vocab_size, c.hidden_size), np.float32)}
        self.weights["final_norm"] = 1 + 0.1 * rng.standard_normal(c.hidden_size, np.float32)
        for i in range(num_layers):
            for name, (n, k) in shapes.items():
                self.weights[f"layers.{i}.{name}"] = rng.standard_normal((n, k), np.float32) * k**-0.5
            for name in ("attn_norm", "mlp_norm"):
                self.weights[f"layers.{i}.{name}"] = 1 + 0.1 * rng.standard_normal(c.hidden_size, np.float32)

    def tokenizer_spec(self) -> TokenizerSpec:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(self.config.vocab_size)}, "t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return TokenizerSpec(tokenizer.to_str(), None, None, (), False)

    def tensor_type(self, name: str) -> str:
        return "F32"

    def float_tensor(self, name: str) -> np.ndarray:
        return self.weights[name]

    def quant_blocks(self, name: str) -> None:
        return None


@pytest.fixture(scope="module")
def gpu_model(request, tmp_path_factory) -> GpuModel:
    try:
        embedded_model_path()
    except EdgeError:
        from exporters.onnx_export import ExportOptions, export_artifact

        print("\nthe embedded model's package is not installed: GPU tests run on a random 4-layer model")
        out = tmp_path_factory.mktemp("random") / "artifact"
        export_artifact(RandomCheckpoint(), out, ExportOptions(weights="fp", compute="fp32", progress=False))
        rng = np.random.default_rng(1)
        prompts = [rng.integers(0, 49152, n).tolist() for n in (5, 11, 17, 29)]
        return GpuModel(out, False, prompts, [rng.integers(0, 49152, 257).tolist() for _ in TEXTS])
    path = request.getfixturevalue("smollm2_fp32")
    tokenizer = Tokenizer.from_file(load_artifact(path, verify=False).tokenizer_file)
    texts = [tokenizer.encode((ROOT / name).read_text())[:257] for name in TEXTS]
    return GpuModel(path, True, [tokenizer.encode(p) for p in GPU_PROMPTS], texts)


@pytest.mark.gpu
def test_fp32_greedy_tokens_equal_onnxruntime(gpu_model):
    config = dict(max_batch_size=4, kv_cache_bytes=64 * 2**20, max_seq_len=512)
    theirs = Engine.from_artifact(gpu_model.path, RuntimeConfig(**config), verify=False)
    cuda = RuntimeConfig(backend="torch", device="cuda", compute_dtype="fp32", **config)
    ours = Engine.from_artifact(gpu_model.path, cuda, verify=False)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    expected = generate_batched(theirs, gpu_model.prompts, params)
    got = generate_batched(ours, gpu_model.prompts, params)
    print(f"\nfp32 greedy, embedded model {gpu_model.embedded}: {sum(a == b for a, b in zip(got, expected))}"
          f"/{len(expected)} prompts equal over 32 tokens")  # fmt: skip
    assert got == expected
    assert ours.backend._graphs.graphs, "decode steps did not replay CUDA graphs"


@pytest.mark.gpu
def test_fp16_top1_agreement_with_fp32(gpu_model):
    """Teacher forcing over 256 positions per text; fp16 runs it in three chunks (prefill kernel, the
    decode kernel on 10 tokens, the prefill kernel after a past); fp32 on the GPU must match ORT's logits."""
    artifact = load_artifact(gpu_model.path, verify=False)
    layout = KVCacheLayout(num_blocks=17, block_size=16, bytes_per_token=artifact.kv_bytes_per_token)
    reference_backend = OrtBackend(artifact, RuntimeConfig(), layout)
    fp32 = TorchBackend(artifact, RuntimeConfig(backend="torch", device="cuda", compute_dtype="fp32"), layout)
    fp16 = TorchBackend(artifact, RuntimeConfig(backend="torch", device="cuda", compute_dtype="fp16"), layout)
    assert fp16.attention_kernel == "triton"
    table = np.arange(1, 17, dtype=np.int32)
    agree, total, fp32_error = 0, 0, 0.0
    for tokens in gpu_model.texts:
        assert len(tokens) == 257
        reference_logits = reference_backend.run(step_batch([(tokens[:256], 0, table)], 16, all_logits=True))[
            0
        ]
        full = fp32.run(step_batch([(tokens[:256], 0, table)], 16, all_logits=True))[0]
        fp32_error = max(fp32_error, float(np.abs(full - reference_logits).max()))
        chunks = [(0, 100), (100, 110), (110, 256)]
        ours = [fp16.run(step_batch([(tokens[a:b], a, table)], 16, all_logits=True))[0] for a, b in chunks]
        agree += int((np.concatenate(ours).argmax(-1) == reference_logits.argmax(-1)).sum())
        total += 256
    print(f"\nfp16 top-1 agreement with fp32 (embedded model {gpu_model.embedded}): {agree}/{total} "
          f"= {agree / total:.4f}; fp32 GPU vs ORT max |logit diff| {fp32_error:.2e}")  # fmt: skip
    assert fp32_error <= 1e-2  # cuBLAS and MLAS sum in different orders; a bug shows as >> 0.1
    assert agree / total >= 0.99


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(gpu_model):
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    tokens, engines = {}, {}
    for graphs in (True, False):
        config = RuntimeConfig(
            backend="torch", device="cuda", compute_dtype="fp16", cuda_graphs=graphs,
            max_batch_size=4, kv_cache_bytes=64 * 2**20, max_seq_len=512,
        )  # fmt: skip
        engines[graphs] = Engine.from_artifact(gpu_model.path, config, verify=False)
        tokens[graphs] = generate_batched(
            engines[graphs], gpu_model.prompts[:3], params
        )  # 3 rows: padded to 4
    assert 4 in engines[True].backend._graphs.graphs  # 3 rows padded to the graph of 4
    assert tokens[True] == tokens[False]
