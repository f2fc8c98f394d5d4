"""export-model on tiny random checkpoints: GGUF and HF readers, carried blocks, manifest, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from gguf import GGMLQuantizationType as QT

from exporters import cli
from exporters.checkpoint import CheckpointError, open_checkpoint
from exporters.model import Llama
from exporters.onnx_export import ExportOptions, export_artifact, plan_weights
from runtime.artifact import load_artifact, sha256_file
from runtime.backends.onnxruntime import OrtBackend, StepBatch
from runtime.config import RuntimeConfig
from runtime.kv_cache import KVCacheLayout
from tests.models import write_tiny_gguf, write_tiny_hf_dir, write_unsupported_type_gguf


def _prefill_logits(artifact_dir, ids: list[int], kernel: str = "function") -> np.ndarray:
    """All-position logits of one prompt through the exported graph."""
    artifact = load_artifact(artifact_dir)
    layout = KVCacheLayout(
        num_blocks=1 + -(-len(ids) // 16), block_size=16, bytes_per_token=artifact.kv_bytes_per_token
    )
    backend = OrtBackend(artifact, RuntimeConfig(attention_kernel=kernel), layout)
    n = len(ids)
    table = np.arange(1, layout.num_blocks, dtype=np.int32)
    positions = np.arange(n)
    batch = StepBatch(
        input_ids=np.array([ids]),
        position_ids=positions[None],
        slot_mapping=(table[positions // 16].astype(np.int64) * 16 + positions % 16)[None],
        block_table=table[None],
        past_lens=np.zeros(1, np.int32),
        total_lens=np.array([n], np.int32),
        logit_positions=positions[None],
    )
    return backend.run(batch)[0]


def _reference_logits(checkpoint_path, ids: list[int]) -> np.ndarray:
    checkpoint = open_checkpoint(checkpoint_path)
    plan = plan_weights(checkpoint, ExportOptions(weights="fp", compute="fp32", progress=False))
    with torch.no_grad():
        return Llama(checkpoint.config, plan.tensors).eval().forward_dense(torch.tensor([ids]))[0].numpy()


IDS = [1, 504, 3458, 282, 4649, 314, 28, 17, 9, 4029, 100, 2, 7, 41000, 33, 12, 5, 77, 18]


MIXED = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.BF16, QT.Q5_1, QT.F32)  # 14 matrices: each type twice


def test_gguf_types_export_exactly_with_a_complete_manifest(tmp_path):
    """Carried blocks (Q4_0, Q4_1) and dequantized types match the gguf-dequantized reference."""
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=MIXED)
    out = export_artifact(
        open_checkpoint(gguf_path), tmp_path / "art", ExportOptions(compute="fp32", progress=False)
    )
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    # 8-bit blocks are carried only with int8 compute (fp32 compute would be slow): the Q8_0 embedding
    # is gathered from its blocks, Q8_0 matrices and the tied head are dequantized, Q5_1 too
    assert manifest["weights"]["carried_blocks"] == {"Q4_0": 2, "Q4_1": 2, "Q8_0": 1}
    requantized = manifest["weights"]["requantized"]
    assert requantized["layers.0.v"] == "Q8_0 dequantized to fp32"  # the third matrix of layer 0
    assert requantized["layers.0.up"] == "Q5_1 dequantized to fp32"
    assert "tied Q8_0 table" in requantized["lm_head"] and len(requantized) == 5
    files = {p.name for p in out.iterdir()} - {"manifest.yaml"}
    assert set(manifest["files"]) == files == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name)
    assert manifest["kv_cache"]["format"] == "fp32" and manifest["graph"]["opset"] == 23
    json.loads((out / "tokenizer.json").read_text())
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "FlashAttention" for n in graph.graph.node) == 2
    ours, ref = _prefill_logits(out, IDS), _reference_logits(gguf_path, IDS)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_int8_compute_carries_8bit_blocks(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=QT.Q8_0)
    out = export_artifact(open_checkpoint(gguf_path), tmp_path / "art", ExportOptions(progress=False))
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["weights"]["carried_blocks"] == {"Q8_0": 15} and manifest["weights"]["requantized"] == {}
    ours, ref = _prefill_logits(out, IDS), _reference_logits(gguf_path, IDS)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()  # activations are rounded to int8


def test_hf_directory_equals_gguf_f32(tmp_path):
    """The same weights as an F32 GGUF (rows permuted for RoPE) and as an HF directory: same logits."""
    hf = write_tiny_hf_dir(tmp_path / "hf")
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=QT.F32, embed_type=QT.F32)
    a = export_artifact(open_checkpoint(hf), tmp_path / "a", ExportOptions(progress=False))
    b = export_artifact(open_checkpoint(gguf_path), tmp_path / "b", ExportOptions(progress=False))
    np.testing.assert_allclose(_prefill_logits(a, IDS), _prefill_logits(b, IDS), atol=1e-4)
    manifest = yaml.safe_load((a / "manifest.yaml").read_text())
    assert manifest["tokenizer"]["eos_token_ids"] == [2]
    assert "<|im_start|>" in manifest["tokenizer"]["chat_template"]


def test_int4_weights_requantize_and_say_so(tmp_path):
    hf = write_tiny_hf_dir(tmp_path / "hf")
    out = export_artifact(
        open_checkpoint(hf), tmp_path / "art", ExportOptions(weights="int4", progress=False)
    )
    requantized = yaml.safe_load((out / "manifest.yaml").read_text())["weights"]["requantized"]
    assert requantized["layers.0.q"] == "F32 -> 4-bit blocks of 32"
    assert requantized["embed"] == "F32 -> 8-bit blocks of 32"
    assert requantized["lm_head"] == "tied Q8_0 table -> 4-bit blocks of 32 for the head"  # the 8-bit embed
    ours, ref = _prefill_logits(out, IDS), _reference_logits(hf, IDS)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.6  # a random tiny model is fragile at 4 bits


def test_fp16_kv_cache_under_fp32_activations(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=QT.F16, embed_type=QT.F16)
    options = ExportOptions(kv_dtype="fp16", weights="fp", progress=False)
    out = export_artifact(open_checkpoint(gguf_path), tmp_path / "art", options)
    artifact = load_artifact(out)
    assert artifact.kv_format == "fp16" and artifact.dtype == "fp32"
    assert artifact.kv_bytes_per_token == 2 * 2 * 2 * 32  # K and V, 2 layers, 2 KV heads x 16, 2 bytes
    ours, ref = _prefill_logits(out, IDS), _reference_logits(gguf_path, IDS)
    assert np.abs(ours - ref).max() <= 0.01 * np.abs(ref).max()


def test_fp16_export_runs_close_to_fp32(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=QT.F16, embed_type=QT.F16)
    out = export_artifact(
        open_checkpoint(gguf_path), tmp_path / "art", ExportOptions(dtype="fp16", progress=False)
    )
    assert load_artifact(out).kv_format == "fp16"
    ours, ref = _prefill_logits(out, IDS), _reference_logits(gguf_path, IDS)
    assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()


# -- bad input: a clear message, exit status 2, nothing half-written ------------------------------


def _run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv + ["--quiet"])
    return code, capsys.readouterr().err


def _assert_nothing_written(parent, name="art"):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary export left behind"


def test_missing_checkpoint(tmp_path, capsys):
    code, err = _run_cli([str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "art")], capsys)
    assert code == 2 and "no such file" in err
    _assert_nothing_written(tmp_path)


def test_truncated_gguf(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = _run_cli([str(path), "--out", str(tmp_path / "art")], capsys)
    assert code == 2 and "truncated" in err
    _assert_nothing_written(tmp_path)


def test_unsupported_quant_type(tmp_path, capsys):
    path = write_unsupported_type_gguf(tmp_path / "tiny.gguf", QT.Q8_1)
    code, err = _run_cli([str(path), "--out", str(tmp_path / "art")], capsys)
    assert code == 2 and "Q8_1" in err and "blk.0." in err
    _assert_nothing_written(tmp_path)


def test_unsupported_architecture(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="falcon")
    code, err = _run_cli([str(path), "--out", str(tmp_path / "art")], capsys)
    assert code == 2 and "architecture 'falcon' is not supported" in err
    _assert_nothing_written(tmp_path)


def test_missing_tensor(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", drop=("blk.1.ffn_up.weight",))
    code, err = _run_cli([str(path), "--out", str(tmp_path / "art")], capsys)
    assert code == 2 and "blk.1.ffn_up.weight" in err and "missing" in err
    _assert_nothing_written(tmp_path)


def test_hf_directory_errors(tmp_path):
    hf = write_tiny_hf_dir(tmp_path / "hf", architecture="GPT2LMHeadModel")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        open_checkpoint(hf)
    (hf / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        open_checkpoint(hf)


def test_existing_output_is_kept_unless_forced(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "art"
    assert _run_cli([str(path), "--out", str(out)], capsys)[0] == 0
    before = sha256_file(out / "manifest.yaml")
    code, err = _run_cli([str(path), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and sha256_file(out / "manifest.yaml") == before
    assert _run_cli([str(path), "--out", str(out), "--force", "--weights", "fp"], capsys)[0] == 0
    assert yaml.safe_load((out / "manifest.yaml").read_text())["weights"]["mode"] == "fp"


def test_int4_turns_q4_1_minimums_into_integer_zero_points(tmp_path):
    """--weights int4 drops Q4_1's per-block minimum for MatMulNBits' own zero points: the graph
    computes exactly the shifted blocks (checked against the eager module built from them)."""
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", matrix_type=QT.Q4_1)
    checkpoint = open_checkpoint(gguf_path)
    options = ExportOptions(weights="int4", compute="fp32", progress=False)
    out = export_artifact(checkpoint, tmp_path / "art", options)
    requantized = yaml.safe_load((out / "manifest.yaml").read_text())["weights"]["requantized"]
    assert requantized["layers.1.down"] == "Q4_1 -> 4-bit blocks with integer zero points"
    plan = plan_weights(checkpoint, options)
    q = plan.tensors["layers.0.q"]
    assert q.mins is None and q.zero_point.shape == q.scales.shape
    shift = np.abs(q.dequantize() - checkpoint.float_tensor("layers.0.q"))
    shift = shift.reshape(q.scales.shape[0], -1, 32).max(-1)
    assert (shift <= q.scales / 2 + 1e-6).mean() > 0.95  # a block moves by at most half a step unless clipped
    with torch.no_grad():
        shifted = Llama(checkpoint.config, plan.tensors).eval().forward_dense(torch.tensor([IDS]))[0].numpy()
    ours = _prefill_logits(out, IDS)
    assert np.abs(ours - shifted).max() <= 1e-4 * max(1.0, np.abs(shifted).max())
    ref = _reference_logits(gguf_path, IDS)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.6
