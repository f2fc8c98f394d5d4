"""A toy SAQ model for the runtime and service tests, without the exporter or the native kernel.

`write_artifact` writes an artifact directory whose manifest describes an SAQ KV cache (the graph is a
placeholder, or a hand-built probe); `SpecBackend` stands in for OrtBackend: two attention layers whose
attention is the spec itself (kernels.kv_saq.paged_attention_saq_ref) over the engine's real pools, so
the block tables, slots and lengths the engine hands out are the ones the kernel contract reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kernels.kv_formats import SaqFormat
from kernels.kv_saq import paged_attention_saq_ref
from runtime.artifact import Artifact, write_manifest
from runtime.backends.onnxruntime import StepBatch
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.kv_cache import KVCacheLayout

VOCAB, LAYERS, KV_HEADS, HEAD_DIM = 64, 2, 2, 16
WIDTH = KV_HEADS * HEAD_DIM
SAQ = "8:1,4:1,2;stage=8;v_group=16"  # short stairs: a few dozen tokens reach the paged bottom stair


def saq_kv_cache(text: str = SAQ, **overrides) -> dict:
    fmt = SaqFormat.parse(text, WIDTH)
    entry = {
        "format": "saq",
        "saq": fmt.text(),
        "stage": fmt.stage,
        "stairs": fmt.stairs_text,
        "v_group": fmt.v_group,
        "block_bytes": fmt.block_bytes,
        "slot_bytes": fmt.slot_bytes,
    }
    return {**entry, **overrides}


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def write_artifact(folder: Path, kv_cache: dict, op: str = "FlashAttentionSaq", graph: bytes = b"") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(graph or b"no graph: the tests fake the backend")
    write_tokenizer(folder / "tokenizer.json")
    model = dict(
        name="toy", num_layers=LAYERS, num_heads=KV_HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        vocab_size=VOCAB, max_position_embeddings=256, sliding_window=0,
    )  # fmt: skip
    body = {
        "model": model,
        "graph": {
            "file": "model.onnx",
            "dtype": "fp32",
            "attention_op": {"domain": "fastattention", "name": op, "version": 1},
        },
        "kv_cache": kv_cache,
        "tokenizer": {"file": "tokenizer.json", "eos_token_ids": []},
    }  # fmt: skip
    write_manifest(folder, body)
    return folder


class SpecBackend:
    """Two attention layers over the engine's SAQ pools (numpy, OrtBackend's shapes), the attention being
    kernels.kv_saq.paged_attention_saq_ref: x = E[token]; per layer q, k, v = x Wq, x Wk, x Wv,
    x += attention(q, k, v) Wo; logits = x R. The next token depends on every cached stage."""

    attention_kernel = "spec"

    def __init__(self, artifact: Artifact, config: RuntimeConfig, layout: KVCacheLayout) -> None:
        self.layout, self.fmt = layout, artifact.saq
        self._arrays = [
            np.zeros(t.shape(layout), t.dtype) for _ in range(LAYERS) for t in artifact.pool_tensors()
        ]
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(VOCAB, WIDTH, generator=g)
        self.weights = [torch.randn(4, WIDTH, WIDTH, generator=g) / WIDTH**0.5 for _ in range(LAYERS)]
        self.head = torch.randn(WIDTH, VOCAB, generator=g)

    def run(self, batch: StepBatch) -> np.ndarray:
        x = self.embed[torch.from_numpy(batch.input_ids)]
        lens = [
            torch.from_numpy(a)
            for a in (batch.block_table, batch.past_lens, batch.total_lens, batch.seq_slots)
        ]
        for layer, (wq, wk, wv, wo) in enumerate(self.weights):
            pool, slots = self._arrays[2 * layer : 2 * layer + 2]
            o, pool_out, slots_out = paged_attention_saq_ref(
                x @ wq, x @ wk, x @ wv, torch.from_numpy(pool), torch.from_numpy(slots), *lens,
                num_heads=KV_HEADS, num_kv_heads=KV_HEADS, scale=HEAD_DIM**-0.5, fmt=self.fmt,
            )  # fmt: skip
            pool[...], slots[...] = pool_out.numpy(), slots_out.numpy()
            x = x + o @ wo
        rows = torch.arange(len(x))[:, None]
        return (x[rows, torch.from_numpy(batch.logit_positions)] @ self.head).numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        return self._arrays


def spec_engine(path: Path, monkeypatch, **config) -> Engine:
    """An engine over `SpecBackend` (patched in for OrtBackend while the test runs)."""
    monkeypatch.setattr("runtime.engine.OrtBackend", SpecBackend)
    config = {
        "max_batch_size": 3,
        "max_step_tokens": 64,
        "kv_cache_bytes": 1 << 20,
        "block_size": 4,
        **config,
    }
    return Engine.from_artifact(path, RuntimeConfig(**config))
