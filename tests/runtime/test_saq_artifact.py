"""An exported SAQ artifact (the tiny random model, `export-model --kv-dtype saq`) served by the engine:
its manifest as the exporter writes it, its graph's inputs (seq_slots) fed from StepBatch, its pools
allocated per `per`, KV handoff between engines.

The native FlashAttentionSaq kernel is not needed: `EvaluatorBackend` is OrtBackend's twin on ONNX's
reference evaluator, the node bound to its spec (kernels/kv_saq.paged_attention_saq_ref). It checks the
runtime around the node, not a kernel; a real session over the same artifact is the lead's end-to-end.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

from kernels.kv_formats import SaqFormat
from runtime.artifact import Artifact, load_artifact
from runtime.backends.onnxruntime import StepBatch
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.kv_cache import KVCacheLayout
from runtime.sampling import SamplingParams
from runtime.sequence import ImportedKV
from tests.saq_reference_ops import SAQ_REFERENCE_OPS

SPEC = "8:1,4:1,2;stage=8;v_group=16"  # 8-token stages: a 30-token prompt reaches the paged bottom stair
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 28, 17, 9, 4029, 100, 2, 7, 41000, 33, 12, 5, 77, 18],
    [(97 * i + 11) % 49152 for i in range(30)],
    [5, 6, 7],
]


class EvaluatorBackend:
    """OrtBackend's contract on the reference evaluator: pools per `per`, seq_slots fed when the graph
    takes it, each step's pool outputs written back into the pools."""

    attention_kernel = "reference-evaluator"

    def __init__(self, artifact: Artifact, config: RuntimeConfig, layout: KVCacheLayout) -> None:
        self.graph = ReferenceEvaluator(str(artifact.model_file), new_ops=SAQ_REFERENCE_OPS)
        pool = artifact.pool_tensors()
        self.layout = layout
        self._names = [f"{t.name}.{i}" for i in range(artifact.model.num_layers) for t in pool]
        self._arrays = [
            np.zeros(t.shape(layout), t.dtype) for _ in range(artifact.model.num_layers) for t in pool
        ]
        self._seq_slots = "seq_slots" in self.graph.input_names

    def run(self, batch: StepBatch) -> np.ndarray:
        feeds = batch.feeds(seq_slots=self._seq_slots) | dict(zip(self._names, self._arrays))
        logits, *pools = self.graph.run(None, feeds)
        for array, new in zip(self._arrays, pools):
            array[...] = new
        return logits

    def cache_arrays(self) -> list[np.ndarray]:
        return self._arrays


@pytest.fixture(scope="module")
def saq_artifact(tmp_path_factory):
    from exporters.checkpoint import open_checkpoint
    from exporters.onnx_export import ExportOptions, export_artifact
    from tests.models import write_tiny_gguf

    folder = tmp_path_factory.mktemp("tiny-saq")
    options = ExportOptions(weights="fp", compute="fp32", kv_dtype="saq", kv_saq=SPEC, progress=False)
    return export_artifact(
        open_checkpoint(write_tiny_gguf(folder / "tiny.gguf")), folder / "artifact", options
    )


def _engine(path, monkeypatch, **config) -> Engine:
    monkeypatch.setattr("runtime.engine.OrtBackend", EvaluatorBackend)
    config = {"max_batch_size": 3, "max_step_tokens": 48, "kv_cache_bytes": 1 << 20, **config}
    return Engine.from_artifact(path, RuntimeConfig(**config), verify=False)


def _solo(engine, ids, params):
    return [e.token_id for e in engine.generate(ids, params)]


def test_the_exported_manifest_is_read(saq_artifact):
    artifact = load_artifact(saq_artifact)
    width = artifact.model.num_kv_heads * artifact.model.head_dim
    assert artifact.kv_format == "saq" and artifact.saq == SaqFormat.parse(SPEC, width)
    assert artifact.block_size == 8 and [t.per for t in artifact.pool_tensors()] == ["block", "slot"]
    assert artifact.manifest["kv_cache"]["pool"][0].startswith("kv_pool: ")


def test_batched_equals_solo_and_handoff_continues_exactly(saq_artifact, monkeypatch):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    decode = _engine(saq_artifact, monkeypatch)
    assert decode.allocator.layout.block_size == 8 and decode.allocator.layout.num_slots == 7
    expected = [_solo(decode, ids, params) for ids in PROMPTS]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)
    request_ids = [decode.add_request(ids, params) for ids in PROMPTS]
    got = {r: [] for r in request_ids}
    while decode.has_work():
        for event in decode.step():
            got[event.request_id].append(event.token_id)
    assert [got[r] for r in request_ids] == expected
    prefill = _engine(saq_artifact, monkeypatch, max_batch_size=1)
    first = list(prefill.generate_kept(PROMPTS[1], dataclasses.replace(params, max_tokens=1)))
    kv = prefill.export_kv(first[0].request_id)
    assert prefill.release_kv(first[0].request_id) and prefill.stats().kv_bytes_in_use == 0
    assert [a.shape[0] for a in kv[0]] == [1, 1] and kv[0][0][0].any()  # stage 0 alone is on the bottom stair
    squatter = decode.add_request(PROMPTS[2], SamplingParams(max_tokens=30, ignore_eos=True))
    decode.step()  # it holds slot 1 and the lowest blocks: the import lands elsewhere
    request = decode.add_request(PROMPTS[1], params, imported=ImportedKV(first[0].token_id, kv))
    handed = []
    while decode.has_work():
        handed += [e.token_id for e in decode.step() if e.request_id == request]
    assert handed == expected[1] and squatter not in got
    assert decode.stats().kv_bytes_in_use == 0 and decode.allocator.free_slots == 6
