"""The torch backend with FastAttention's kernel variants chosen by `attention_kernel` (runtime/config.py).

CPU (CI): on the tiny model in fp32, `npu` and `offload` (with a GPU budget of 6 blocks, so rows straddle
the device and host tiers) give the logits of the `torch` kernel (the spec, <= 1e-4) over a prefill and
decode steps, and the engine's greedy tokens; the choice is logged when the backend loads; wrong choices
fail with ConfigError naming the fix.
GPU (marked `gpu`): on a random 2-layer model with 64-dim heads in fp16, `volta`, `offload` and `npu`
agree with `triton` on the top-1 token over a prefill and decode steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.artifact import load_artifact
from runtime.backends.torch_cuda import OFFLOAD_TILE_TOKENS, TorchBackend
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.errors import ConfigError
from runtime.kv_cache import KVCacheLayout
from runtime.sampling import SamplingParams
from tests.runtime.test_torch_backend import block_tables, generate_batched, step_batch

CPU = dict(backend="torch", device="cpu")


def offload_budget(block_size: int, width: int, num_layers: int, itemsize: int, device_blocks: int) -> int:
    """kv_gpu_bytes that leaves `device_blocks` blocks on the device next to the staging tiles."""
    staging = 2 * 2 * (OFFLOAD_TILE_TOKENS // block_size) * block_size * width * itemsize
    return staging + device_blocks * 2 * num_layers * block_size * width * itemsize


def run_steps(backend: TorchBackend, block: int, prompts: list[list[int]], steps: int) -> np.ndarray:
    """Batched prefill (every position's logits), then `steps` greedy decode steps: logits stacked."""
    tables = block_tables([len(p) + steps for p in prompts], block)
    out = backend.run(step_batch([(p, 0, t) for p, t in zip(prompts, tables)], block, all_logits=True))
    lens = [len(p) for p in prompts]
    logits = [out.reshape(-1, out.shape[-1])]
    last = out[np.arange(len(prompts)), np.array(lens) - 1]
    for _ in range(steps):
        rows = [([int(t)], n, table) for t, n, table in zip(last.argmax(-1), lens, tables)]
        out = backend.run(step_batch(rows, block))
        logits.append(out[:, 0])
        lens, last = [n + 1 for n in lens], out[:, 0]
    return np.concatenate(logits)


@pytest.mark.parametrize("kernel", ["npu", "offload"])
def test_variant_logits_equal_the_spec_kernel(tiny_artifact, kernel):
    artifact = load_artifact(tiny_artifact, verify=False)
    block = 4
    layout = KVCacheLayout(num_blocks=24, block_size=block, bytes_per_token=artifact.kv_bytes_per_token)
    width = artifact.model.num_kv_heads * artifact.model.head_dim
    budget = offload_budget(block, width, artifact.model.num_layers, 4, device_blocks=6)
    config = RuntimeConfig(**CPU, attention_kernel=kernel, kv_gpu_bytes=budget)
    ours = TorchBackend(artifact, config, layout)
    spec = TorchBackend(artifact, RuntimeConfig(**CPU, attention_kernel="torch"), layout)
    assert ours.attention_kernel == kernel
    if kernel == "offload":
        assert ours.cache_tensors()[0].shape[0] == 6  # the other 18 blocks are host memory
    prompts = [[5, 17, 300, 4001, 9, 12, 77], list(range(1000, 1013)), [42, 43, 44]]
    got, expected = run_steps(ours, block, prompts, 4), run_steps(spec, block, prompts, 4)
    assert (
        float(np.abs(got - expected).max()) <= 1e-4
    )  # logits ~10: fp32 summation order (as test_torch_backend)


def test_offload_engine_tokens_equal_the_spec_engine(tiny_artifact):
    settings = dict(**CPU, max_batch_size=4, max_step_tokens=24, block_size=4, kv_cache_bytes=2**18)
    budget = offload_budget(4, 32, 2, 4, device_blocks=8)
    engines = [
        Engine.from_artifact(
            tiny_artifact, RuntimeConfig(**settings, attention_kernel=k, kv_gpu_bytes=budget)
        )
        for k in ("torch", "offload")
    ]
    prompts = [
        engines[0].tokenizer.encode(p) for p in ("Hello there", "A longer prompt that spans blocks", "1 2")
    ]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert generate_batched(engines[1], prompts, params) == generate_batched(engines[0], prompts, params)


def test_kernel_choice_is_logged_at_load(tiny_artifact, caplog):
    artifact = load_artifact(tiny_artifact, verify=False)
    layout = KVCacheLayout(num_blocks=8, block_size=4, bytes_per_token=artifact.kv_bytes_per_token)
    for kernel in ("npu", "offload"):
        caplog.clear()
        with caplog.at_level("INFO", logger="runtime.backends.torch_cuda"):
            TorchBackend(artifact, RuntimeConfig(**CPU, attention_kernel=kernel), layout)
        assert f"attention {kernel}," in caplog.text


def test_kernel_choice_errors(tiny_artifact):
    with pytest.raises(ConfigError, match="need backend: torch"):
        RuntimeConfig(attention_kernel="npu")
    artifact = load_artifact(tiny_artifact, verify=False)
    layout = KVCacheLayout(num_blocks=8, block_size=4, bytes_per_token=artifact.kv_bytes_per_token)
    with pytest.raises(ConfigError, match="volta needs device: cuda and compute_dtype: fp16"):
        TorchBackend(artifact, RuntimeConfig(**CPU, attention_kernel="volta"), layout)
    offload = TorchBackend(artifact, RuntimeConfig(**CPU, attention_kernel="offload"), layout)
    with pytest.raises(ConfigError, match="KV export/import is not supported"):
        offload.cache_arrays()


@pytest.mark.gpu
def test_gpu_variants_agree_with_triton(tmp_path):
    from exporters.onnx_export import ExportOptions, export_artifact
    from tests.runtime.test_torch_backend import RandomCheckpoint

    path = export_artifact(
        RandomCheckpoint(num_layers=2), tmp_path / "a", ExportOptions(weights="fp", progress=False)
    )
    artifact = load_artifact(path, verify=False)
    block = 16
    layout = KVCacheLayout(num_blocks=64, block_size=block, bytes_per_token=artifact.kv_bytes_per_token)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 49152, n).tolist() for n in (300, 37, 120)]
    budget = offload_budget(block, 3 * 64, 2, 2, device_blocks=12)
    results = {}
    for kernel in ("triton", "volta", "offload", "npu"):
        config = RuntimeConfig(backend="torch", device="cuda", compute_dtype="fp16", attention_kernel=kernel,
                               kv_gpu_bytes=budget)  # fmt: skip
        results[kernel] = run_steps(TorchBackend(artifact, config, layout), block, prompts, 8)
    for kernel in ("volta", "offload", "npu"):
        agree = float((results[kernel].argmax(-1) == results["triton"].argmax(-1)).mean())
        diff = float(np.abs(results[kernel] - results["triton"]).max())
        print(f"\n{kernel} vs triton: top-1 agreement {agree:.4f}, max |logit diff| {diff:.3g}")
        assert agree >= 0.98
