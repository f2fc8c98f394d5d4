"""export-model --kv-dtype saq on the tiny random model: the graph's node and I/O, the manifest, the eager
model over SAQ pools against the fp32-pool model, and bad --kv-saq specs.

The native kernel for FlashAttentionSaq is not part of these tests: the graph is not run under
onnxruntime here. `test_graph_computes_the_eager_model` runs it with ONNX's reference evaluator instead,
the node bound to its spec (kernels/kv_saq.paged_attention_saq_ref): that checks the graph around the
node (rotations, names, seq_slots), not a kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx.reference import ReferenceEvaluator

from exporters import cli
from exporters.checkpoint import open_checkpoint
from exporters.model import Attention, Llama, hadamard
from exporters.onnx_export import ExportOptions, _saq_manifest, export_artifact, plan_weights
from kernels.kv_formats import SaqFormat
from tests.models import TINY, write_tiny_gguf
from tests.saq_reference_ops import SAQ_REFERENCE_OPS

SPEC = "8:1,4:1,2;stage=8;v_group=16"  # tiny: 8-token stages, so 32 tokens reach the 2-bit stair
WIDTH = TINY["kv_heads"] * TINY["head_dim"]
PROMPT = [1, 504, 3458, 282, 4649, 314, 28, 17, 9, 4029, 100, 2, 7, 41000, 33, 12, 5, 77, 18]
DECODED = [3, 901, 44, 12000, 8, 650, 71, 2301, 19, 5, 888, 40, 7001]  # teacher-forced decode steps
STEP_INPUTS = ["input_ids", "position_ids", "slot_mapping", "block_table", "past_lens", "total_lens"]
STEP_INPUTS += ["logit_positions"]
NODE_INPUTS = ["block_table", "slot_mapping", "past_lens", "total_lens", "seq_slots"]
OPTIONS = dict(weights="fp", compute="fp32", progress=False)  # plain MatMuls: only the KV format differs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-saq")
    checkpoint = open_checkpoint(write_tiny_gguf(folder / "tiny.gguf"))
    plan = plan_weights(checkpoint, ExportOptions(**OPTIONS))
    return folder, checkpoint, plan.tensors


@pytest.fixture(scope="module")
def saq_artifact(tiny):
    folder, checkpoint, _ = tiny
    options = ExportOptions(kv_dtype="saq", kv_saq=SPEC, **OPTIONS)
    return export_artifact(checkpoint, folder / "artifact", options)


def _pools(model: Llama, num_blocks: int, num_slots: int = 3) -> list[torch.Tensor]:
    """Zeroed per-layer pools: [kv_pool, kv_slots] (SAQ) or [k_cache, v_cache] (fp32, blocks of 8)."""
    c = model.config
    if model.saq is None:
        return [torch.zeros(num_blocks, 8, c.num_kv_heads * c.head_dim) for _ in range(2 * c.num_layers)]
    fmt = model.saq
    pool = (
        torch.zeros(num_blocks, fmt.block_bytes, dtype=torch.uint8),
        torch.zeros(num_slots, fmt.slot_bytes, dtype=torch.uint8),
    )
    return [t.clone() for _ in range(c.num_layers) for t in pool]


@torch.no_grad()
def _run(model: Llama, steps: list[list[int]]) -> torch.Tensor:
    """One sequence (slot 1, blocks 1..) stepped through `steps` (prefill, then decodes): logits of
    every position [T, V]."""
    total = sum(map(len, steps))
    table = torch.arange(1, 2 + total // 8, dtype=torch.int32)
    caches, past, logits = _pools(model, len(table) + 1), 0, []
    for ids in steps:
        n = len(ids)
        positions = torch.arange(past, past + n)
        slot_mapping = table[positions // 8].long() * 8 + positions % 8
        out, caches = model(
            torch.tensor([ids]), positions[None], slot_mapping[None], table[None],
            torch.tensor([past], dtype=torch.int32), torch.tensor([past + n], dtype=torch.int32),
            torch.arange(n)[None], caches, None if model.saq is None else torch.ones(1, dtype=torch.int32),
        )  # fmt: skip
        logits.append(out[0])
        past += n
    return torch.cat(logits)


# -- the graph and the manifest ------------------------------------------------------------------


def test_graph_has_one_saq_node_per_layer(saq_artifact):
    fmt = SaqFormat.parse(SPEC, WIDTH)
    graph = onnx.load(str(saq_artifact / "model.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.domain == "fastattention"]
    assert [n.op_type for n in nodes] == ["FlashAttentionSaq"] * TINY["num_layers"]
    for i, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {
            "num_heads": TINY["heads"], "num_kv_heads": TINY["kv_heads"], "scale": TINY["head_dim"] ** -0.5,
            "causal": 1, "sliding_window": 0, "kv_format": b"saq", "saq": fmt.text().encode(),
        }  # fmt: skip
        assert list(node.input[3:]) == [f"kv_pool.{i}", f"kv_slots.{i}", *NODE_INPUTS]
        assert list(node.output[1:]) == [f"kv_pool.{i}.out", f"kv_slots.{i}.out"]
    inputs = {v.name: v.type.tensor_type for v in graph.input}
    shape = {name: [d.dim_param or d.dim_value for d in t.shape.dim] for name, t in inputs.items()}
    assert shape["kv_pool.1"] == ["num_blocks", fmt.block_bytes] and shape["kv_slots.0"] == [
        "num_slots",
        fmt.slot_bytes,
    ]
    assert inputs["kv_pool.0"].elem_type == inputs["kv_slots.1"].elem_type == onnx.TensorProto.UINT8
    assert shape["seq_slots"] == ["batch"] and inputs["seq_slots"].elem_type == onnx.TensorProto.INT32
    assert list(inputs)[7:] == ["kv_pool.0", "kv_slots.0", "kv_pool.1", "kv_slots.1", "seq_slots"]
    assert [v.name for v in graph.output] == [
        "logits",
        "kv_pool.0.out",
        "kv_slots.0.out",
        "kv_pool.1.out",
        "kv_slots.1.out",
    ]
    model = onnx.load(str(saq_artifact / "model.onnx"), load_external_data=False)
    assert not model.functions  # no body: an SAQ artifact needs our kernels
    assert {(o.domain, o.version) for o in model.opset_import} >= {("fastattention", 1)}


def test_manifest_describes_the_staircase(saq_artifact):
    fmt = SaqFormat.parse(SPEC, WIDTH)
    manifest = yaml.safe_load((saq_artifact / "manifest.yaml").read_text())
    kv = manifest["kv_cache"]
    assert kv["format"] == "saq" and kv["saq"] == fmt.text() and SaqFormat.parse(kv["saq"], WIDTH) == fmt
    assert (kv["stage"], kv["stairs"], kv["v_group"]) == (8, "8:1,4:1,2", 16)
    assert (kv["block_bytes"], kv["slot_bytes"]) == (fmt.block_bytes, fmt.slot_bytes)
    assert kv["pool"] == [
        f"kv_pool: [num_blocks, {fmt.block_bytes}] uint8",
        f"kv_slots: [num_slots, {fmt.slot_bytes}] uint8",
    ]
    assert kv["rotation"] == "hadamard q,k,v" and kv["spec"] == "kernels/kv_saq.py"
    assert "k_mean_calibration" not in kv  # SAQ quantizes K per channel: no calibrated means
    graph = manifest["graph"]
    assert graph["attention_op"] == {"domain": "fastattention", "name": "FlashAttentionSaq", "version": 1}
    assert graph["inputs"][7:] == ["kv_pool.{layer}", "kv_slots.{layer}", "seq_slots"]
    assert graph["outputs"] == ["logits", "kv_pool.{layer}.out", "kv_slots.{layer}.out"]


def test_graph_computes_the_eager_model(tiny, saq_artifact):
    """Two sequences in slots 2 and 1 (padded rows), prefilled together, then a mixed step (a decode and
    a chunk that closes a stage), then a decode each. The exported graph, fed its own pool outputs and
    its node bound to the spec, gives the eager module's logits (fed the eager pools)."""
    _, checkpoint, weights = tiny
    model = Llama(checkpoint.config, weights, kv_format="saq", kv_saq=SPEC).eval()
    graph = ReferenceEvaluator(str(saq_artifact / "model.onnx"), new_ops=SAQ_REFERENCE_OPS)
    names = [f"{name}.{i}" for i in range(TINY["num_layers"]) for name in ("kv_pool", "kv_slots")]
    caches = _pools(model, num_blocks=9)
    graph_caches = [c.numpy() for c in caches]
    table = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.int32)
    seq_slots = torch.tensor([2, 1], dtype=torch.int32)
    steps = [  # (ids per row, padded; past_lens; total_lens)
        ([PROMPT[:11], PROMPT[11:16] + [0] * 6], [0, 0], [11, 5]),
        ([PROMPT[11:12] + [0] * 3, PROMPT[16:19] + DECODED[:1]], [11, 5], [12, 9]),
        ([DECODED[1:2], DECODED[2:3]], [12, 9], [13, 10]),
    ]
    for ids, past, total in steps:
        S = len(ids[0])
        positions = torch.tensor(past)[:, None] + torch.arange(S)
        inputs = (
            torch.tensor(ids), positions, torch.zeros(2, S, dtype=torch.int64), table,
            torch.tensor(past, dtype=torch.int32), torch.tensor(total, dtype=torch.int32),
            torch.arange(S).expand(2, S),
        )  # fmt: skip
        with torch.no_grad():
            expected, caches = model(*inputs, caches, seq_slots)
        feeds = dict(zip(STEP_INPUTS, (t.numpy() for t in inputs))) | {"seq_slots": seq_slots.numpy()}
        logits, *graph_caches = graph.run(None, feeds | dict(zip(names, graph_caches)))
        for b in range(2):
            n = total[b] - past[b]
            np.testing.assert_allclose(logits[b, :n], expected[b, :n].numpy(), atol=1e-3, rtol=1e-4)
    for got, want in zip(graph_caches, caches):
        assert got.shape == want.shape and (got != want.numpy()).mean() < 0.01  # a code may flip
    assert all(
        c[0].count_nonzero() == 0 and c[1:].count_nonzero() > 0 for c in caches[1::2]
    )  # slot 0: scratch


# -- the eager model over SAQ pools --------------------------------------------------------------


def test_rotation_of_q_k_v_keeps_the_model(tiny):
    """q, k and v are rotated per head by H (rows of the plain model's, times H) and o is rotated back:
    the dense forward is the plain model's, and a prefill (attention over the new tokens, fp16) too."""
    _, checkpoint, weights = tiny
    plain = Llama(checkpoint.config, weights).eval()
    saq = Llama(checkpoint.config, weights, kv_format="saq", kv_saq=SPEC).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        x = plain.embed(ids)
        rope = plain._rope(torch.arange(len(PROMPT))[None])
        h = hadamard(TINY["head_dim"])
        for rotated, unrotated in zip(
            saq.layers[0].attn.project(x, rope), plain.layers[0].attn.project(x, rope)
        ):
            expected = (unrotated.unflatten(-1, (-1, TINY["head_dim"])) @ h).flatten(-2)
            torch.testing.assert_close(rotated, expected, atol=1e-5, rtol=1e-5)
            assert (rotated - unrotated).abs().max() > 0.1  # the rotation is not the identity
        dense = plain.forward_dense(ids)
        torch.testing.assert_close(saq.forward_dense(ids), dense, atol=1e-4, rtol=1e-4)
    prefill = _run(saq, [PROMPT])
    assert (prefill - dense[0]).abs().max() <= 1e-3 * dense.abs().max()  # K/V rounded to fp16, nothing else


def test_decode_over_the_staircase_stays_close_to_fp32_pools(tiny):
    """Prefill 19 tokens, then 13 decode steps (32 tokens: stages on the 8-, 4- and 2-bit stairs).
    Logits against the fp32-pool model: within fp16 rounding for the prompt, within a few percent for
    the first decode steps (8- and 4-bit stages), error ordered by width; an all-8-bit staircase stays
    near fp throughout. Measured: 2.7e-4 prompt; 8:1,4:1,2 first three steps <= 0.024, 8-bit <= 0.003."""
    _, checkpoint, weights = tiny
    steps = [PROMPT] + [[t] for t in DECODED]
    ref = _run(Llama(checkpoint.config, weights).eval(), steps)
    scale = ref.abs().max()

    def error(spec: str) -> torch.Tensor:  # per position, relative to the largest logit
        model = Llama(checkpoint.config, weights, kv_format="saq", kv_saq=spec).eval()
        return (_run(model, steps) - ref).abs().amax(-1) / scale

    mixed, all8, all2 = error(SPEC), error("8;stage=8;v_group=16"), error("2;stage=8;v_group=16")
    n = len(PROMPT)
    assert mixed[:n].max() <= 1e-3 and all8[:n].max() <= 1e-3  # the prompt reads no closed stage
    assert mixed[n : n + 3].max() <= 0.05
    assert all8[n:].max() <= 0.01
    assert all8[n:].mean() < mixed[n:].mean() < all2[n:].mean()


def test_head_dim_not_a_power_of_two_is_not_rotated(tiny):
    _, checkpoint, _ = tiny
    config = dataclasses.replace(checkpoint.config, head_dim=12)
    rng = np.random.default_rng(0)
    hidden = config.hidden_size
    weights = {
        "q": rng.standard_normal((config.num_heads * 12, hidden), np.float32),
        "k": rng.standard_normal((config.num_kv_heads * 12, hidden), np.float32),
        "v": rng.standard_normal((config.num_kv_heads * 12, hidden), np.float32),
        "o": rng.standard_normal((hidden, config.num_heads * 12), np.float32),
    }
    fmt = SaqFormat.parse("8:1,4;stage=8;v_group=8", config.num_kv_heads * 12)
    attn = Attention(config, weights, torch.float32, 0, "saq", fmt)
    assert attn.rotation is None and not attn.rotate_v
    assert _saq_manifest(fmt, config)["rotation"] == "none"


# -- bad specs: a clear message naming the flag, exit status 2, nothing written --------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--kv-dtype", "saq", "--kv-saq", "8:1,3"], "--kv-saq '8:1,3': SAQ stair widths [8, 3]"),
        (
            ["--kv-dtype", "saq", "--kv-saq", "8,4"],
            "--kv-saq '8,4': SAQ stairs '8,4': every stair but the last",
        ),
        (["--kv-dtype", "saq", "--kv-saq", "8:1,2;stage=12"], "--kv-saq '8:1,2;stage=12': SAQ stage of 12"),
        (["--kv-dtype", "saq", "--kv-saq", "8:1,2;v_group=24"], "v_group 24 must divide the KV width 32"),
        (["--kv-dtype", "int8", "--kv-saq", "8:1,2"], "--kv-saq applies to --kv-dtype saq, not int8"),
    ],
)
def test_bad_kv_saq_specs_fail_clearly(tmp_path, capsys, argv, message):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    code = cli.main([str(path), "--out", str(tmp_path / "art"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "--kv-saq" in err, err
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")], "temporary export left behind"
