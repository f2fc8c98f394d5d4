"""PyTorch backend: the artifact's weights in the reference Llama module, our Triton attention on CUDA.

The GPU node's backend (DESIGN.md §3: the lent GPUs' ONNX Runtime has no CUDA provider). Same interface
as `OrtBackend`: `run(StepBatch) -> logits [B, L, V]` float32, `cache_arrays()`, `layout`,
`attention_kernel`. Three parts, top to bottom:

1. Loading. The artifact is verified by `load_artifact` like everywhere else; the module is
   `exporters.model.Llama` rebuilt from the manifest's dimensions and the ONNX initializers. The exporter
   renamed some of them (dense weights are constant-folded into transposed `val_*` tensors, equal
   zero-point tensors are shared), so a linear's tensors are found through the module path the torch
   exporter records on each node (`pkg.torch.onnx.name_scopes`). MatMulNBits blocks are dequantized once,
   w = (code - zero_point) * scale (+ the Q4_1 block minimum), in fp32, then cast to the compute dtype.
   The embedding table is what the graph's own embedding nodes compute for every token id (ONNX Runtime
   runs that subgraph once), so every embedding format loads the same way.
2. Attention. Each layer's FlashAttention node (contract: kernels/reference.py::paged_attention_ref) is
   run by a function over the device pool, which it updates in place, chosen by `attention_kernel`:
     - triton (auto on CUDA with fp16): `TritonAttention`, our kernels: split-KV decode over the paged pool
       for rows of up to 16 new tokens, FlashAttention-2 varlen prefill over each row's gathered keys;
     - volta: the same with the sm70 tiles of kernels/attention_volta.py (fp16);
     - npu: kernels/attention_npu.py (two-level tiling, tiling-mask; plain torch ops, any device);
     - offload: kernels/attention_offload.py: the pool's blocks beyond `kv_gpu_bytes` live in pinned host
       memory and are streamed per step (no CUDA graphs; no KV export/import);
     - torch (auto otherwise: fp32, or the CPU): `paged_attention_torch`, the spec vectorized (CI runs it).
   Quantized KV formats (int8 / int4, saq) have their own node functions, triton and torch only, in
   runtime/backends/torch_quant_kv.py; `kv_format_attention` picks one.
   `PagedAttention` swaps the function into each layer; projections and weights stay the module's own.
   With `tensor_parallel` > 1 (float KV only) the module is sharded by runtime/tensor_parallel.py and rank
   0 broadcasts each step to the other ranks before running it.
3. Decode graphs. On CUDA, a step of one new token per row replays a CUDA graph captured for its batch
   size padded to a power of two, inputs copied into static buffers, block tables padded to the widest a
   sequence can need (max_seq_len / block_size). Other steps (prefill, chunks, mixed) run eagerly. An
   SAQ graph attends and writes each row's token into its open stage; when the step's lengths (on the
   host) show rows completing a stage (1 step in `stage` per row), those stages close after the replay,
   re-quantized in one batch over all layers and rows (`SaqAttention.close_stages`).

The KV pool holds, per layer, the artifact's pool tensors (runtime.kv_cache.PoolTensor) on the device.
Float formats: one [num_blocks, block_size, num_kv_heads * head_dim] tensor for K and for V, in fp16 when
the artifact's KV format or the compute dtype is fp16 (the kernels read the pool in q's dtype), else fp32.
int8 / int4: K and V codes and their fp16 scales per token; saq: the bottom-stair records per block and
the per-sequence slots, uint8; these are stored exactly as the artifact's format. `cache_arrays()` shows
the pool to the engine's KV export/import as numpy-indexed views in the artifact's KV format.
"""

from __future__ import annotations

import ast
import logging
import os
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from exporters.checkpoint import ModelConfig
from exporters.model import Llama
from kernels.kv_formats import KV_QUANT_FORMATS, SAQ_FORMAT
from runtime.artifact import Artifact
from runtime.backends.onnxruntime import StepBatch
from runtime.config import RuntimeConfig
from runtime.errors import ArtifactError, ConfigError
from runtime.kv_cache import SCRATCH_BLOCK, KVCacheLayout

log = logging.getLogger(__name__)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUT_DTYPES = dict(
    input_ids=torch.int64,
    position_ids=torch.int64,
    slot_mapping=torch.int64,
    block_table=torch.int32,
    past_lens=torch.int32,
    total_lens=torch.int32,
    logit_positions=torch.int64,
    seq_slots=torch.int32,
)
POOL_DTYPES = {  # a pool tensor's numpy dtype (runtime.kv_cache.PoolTensor) -> the device tensor's
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
}
DECODE_KERNEL_MAX_TOKENS = 16  # kernels.attention_triton_decode.MAX_QUERY_TOKENS (that module imports triton)
OFFLOAD_TILE_TOKENS = 4096  # attention_kernel offload: tokens per staged host tile (two tiles of K and V)

# -- 1. loading: artifact -> Llama ------------------------------------------------------------------


def model_config(artifact: Artifact) -> ModelConfig:
    """The module's dimensions, from the manifest's model section."""
    m = artifact.manifest["model"]
    try:
        return ModelConfig(
            architecture=str(m["architecture"]),
            num_layers=int(m["num_layers"]),
            hidden_size=int(m["hidden_size"]),
            intermediate_size=int(m["intermediate_size"]),
            num_heads=int(m["num_heads"]),
            num_kv_heads=int(m["num_kv_heads"]),
            head_dim=int(m["head_dim"]),
            vocab_size=int(m["vocab_size"]),
            rope_theta=float(m["rope_theta"]),
            rms_norm_eps=float(m["rms_norm_eps"]),
            max_position_embeddings=int(m["max_position_embeddings"]),
            tie_word_embeddings=bool(m["tie_word_embeddings"]),
            sliding_window=int(m.get("sliding_window", 0)),
            name=str(m["name"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(
            f"{artifact.path}: manifest model section is incomplete ({e!r}); re-export"
        ) from e


def dequantize_nbits(packed, scales, zero_points, mins, *, N: int, K: int, bits: int, block_size: int):
    """com.microsoft::MatMulNBits blocks -> the dense weight [N, K] in float32.

    w = (code - zero_point) * scale, plus `mins` [blocks, N] (our Q4_1 correction, which adds its block's
    minimum to every weight of the block). packed [N, blocks, block_size * bits / 8] uint8, low bits first;
    scales [N * blocks]; zero_points packed the same way per row, or float [N * blocks], or None (the
    op's default 2**(bits - 1)).
    """
    blocks = -(-K // block_size)
    codes = _unpack(packed.reshape(N, -1), bits)[:, : blocks * block_size].reshape(N, blocks, block_size)
    if zero_points is None:
        zero = np.full((N, blocks), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        zero = _unpack(zero_points.reshape(N, -1), bits)[:, :blocks].astype(np.float32)
    else:
        zero = zero_points.reshape(N, blocks).astype(np.float32)
    w = (codes.astype(np.float32) - zero[..., None]) * scales.reshape(N, blocks, 1).astype(np.float32)
    if mins is not None:
        w += mins.astype(np.float32).T[..., None]
    return w.reshape(N, -1)[:, :K]


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    if bits != 4:
        raise ArtifactError(f"MatMulNBits with {bits}-bit weights is not supported (4 or 8)")
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def _name_scopes(node: onnx.NodeProto) -> list[str]:
    """The module path the torch exporter recorded for a node: ['', 'layers.0', ..., op name]."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(prop.value)
    return []


class GraphWeights:
    """An exported graph's initializers, found by the module whose nodes use them."""

    def __init__(self, proto: onnx.ModelProto, source: str) -> None:
        self.proto, self.source = proto, source
        self.initializers = {t.name: t for t in proto.graph.initializer}
        self.nodes: dict[str, list[onnx.NodeProto]] = {}  # module path -> its own nodes
        for node in proto.graph.node:
            scopes = _name_scopes(node)
            if len(scopes) >= 2:
                self.nodes.setdefault(scopes[-2], []).append(node)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def norm(self, path: str) -> np.ndarray:
        name = f"{path}.weight"
        if name not in self.initializers:
            norms = ("RMSNormalization", "SimplifiedLayerNormalization")
            rms = [n for n in self.nodes.get(path, []) if n.op_type in norms]
            if len(rms) != 1 or rms[0].input[1] not in self.initializers:
                raise ArtifactError(f"{self.source}: no weight for {path}; re-export")
            name = rms[0].input[1]
        return self.array(name).astype(np.float32)

    def linear(self, path: str) -> np.ndarray:
        """The weight [N, K] (float32) of the Linear module at `path`, dequantized if it is MatMulNBits."""
        nodes = self.nodes.get(path, [])
        nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
        matmuls = [n for n in nodes if n.op_type == "MatMul" and n.input[1] in self.initializers]
        if len(nbits) == 1 and len(matmuls) <= 1:
            node = nbits[0]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            has_zero = len(node.input) > 3 and node.input[3]
            return dequantize_nbits(
                self.array(node.input[1]),
                self.array(node.input[2]),
                self.array(node.input[3]) if has_zero else None,
                self.array(matmuls[0].input[1]) if matmuls else None,  # x's block sums @ mins (Q4_1)
                **{key: attrs[key] for key in ("N", "K", "bits", "block_size")},
            )
        if not nbits and len(matmuls) == 1:
            return self.array(matmuls[0].input[1]).T.astype(np.float32)  # exported as x @ W.T
        raise ArtifactError(
            f"{self.source}: cannot find the weight of {path} ({len(nbits)} MatMulNBits, {len(matmuls)} "
            "MatMul nodes); re-export with this exporter"
        )

    def fused(self, path: str, sizes: list[int]) -> list[np.ndarray]:
        """A FusedLinear's weights, one per projection: its one part split by rows, or its parts."""
        if f"{path}.parts.1" in self.nodes:
            return [self.linear(f"{path}.parts.{i}") for i in range(len(sizes))]
        return np.split(self.linear(f"{path}.parts.0"), np.cumsum(sizes)[:-1])

    def k_mean(self, layer: int) -> np.ndarray | None:
        """A quantized cache's calibrated K channel means of `layer` [W] float32 (the 12th input of the
        layer's FlashAttention node, whose K pool input is `k_cache.{layer}`); None for other formats."""
        nodes = [
            n
            for n in self.proto.graph.node
            if n.op_type == "FlashAttention" and n.input[3:4] == [f"k_cache.{layer}"]
        ]
        if len(nodes) != 1 or len(nodes[0].input) < 12:
            return None
        if nodes[0].input[11] not in self.initializers:
            raise ArtifactError(
                f"{self.source}: layer {layer}'s k_mean is not a constant of the graph; re-export"
            )
        return self.array(nodes[0].input[11]).astype(np.float32)

    def embedding_table(self, vocab_size: int) -> np.ndarray:
        """[V, hidden] float32: the graph's embedding nodes run by ONNX Runtime on ids 0..V-1."""
        import onnxruntime as ort

        first = self.nodes.get("layers.0.attn_norm", [])
        inside = {o for n in first for o in n.output}
        entering = {i for n in first for i in n.input if i and i not in inside and i not in self.initializers}
        if len(entering) != 1:
            raise ArtifactError(f"{self.source}: cannot find the embedding's output ({sorted(entering)})")
        subgraph = _slice(self.proto, entering.pop())
        session = ort.InferenceSession(subgraph.SerializeToString(), providers=["CPUExecutionProvider"])
        # one row of V tokens; the other inputs only lend the graph its symbolic sizes (B = 1, S = V)
        ids = np.arange(vocab_size, dtype=np.int64)[None]
        int32 = np.zeros(1, np.int32)
        rows = dict(input_ids=ids, position_ids=ids, slot_mapping=ids, logit_positions=ids[:, :1])
        rows |= dict(block_table=int32[None], past_lens=int32, total_lens=int32 + 1)
        feeds = {i.name: rows[i.name] for i in subgraph.graph.input}
        (table,) = session.run(None, feeds)
        return table[0].astype(np.float32)


def _slice(proto: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The nodes and initializers `output` depends on, as a model with the same inputs and opsets."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    chosen, stack = set(), [output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in chosen:
            chosen.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in proto.graph.node if id(n) in chosen]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(
        nodes,
        "embedding",
        [i for i in proto.graph.input if i.name in used],
        [onnx.helper.make_tensor_value_info(output, proto.graph.output[0].type.tensor_type.elem_type, None)],
        [t for t in proto.graph.initializer if t.name in used],
    )
    return onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)


def read_weights(artifact: Artifact, config: ModelConfig) -> dict[str, np.ndarray]:
    """The artifact's weights as dense float32 arrays under the canonical names `Llama` takes."""
    proto = onnx.load(str(artifact.model_file), load_external_data=True)
    graph = GraphWeights(proto, str(artifact.model_file))
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    weights = {
        "embed": graph.embedding_table(config.vocab_size),
        "final_norm": graph.norm("final_norm"),
        "lm_head": graph.linear("lm_head"),
    }
    for i in range(config.num_layers):
        p = f"layers.{i}."
        q, k, v = graph.fused(f"{p}attn.qkv", [q_rows, kv_rows, kv_rows])
        gate, up = graph.fused(f"{p}mlp.gate_up", [config.intermediate_size] * 2)
        weights |= {p + "attn_norm": graph.norm(f"{p}attn_norm"), p + "mlp_norm": graph.norm(f"{p}mlp_norm")}
        weights |= {p + "q": q, p + "k": k, p + "v": v, p + "o": graph.linear(f"{p}attn.o")}
        weights |= {p + "gate": gate, p + "up": up, p + "down": graph.linear(f"{p}mlp.down")}
        k_mean = graph.k_mean(i)
        if k_mean is not None:
            weights[p + "k_mean"] = k_mean
    return weights


def load_model(artifact: Artifact, dtype: torch.dtype) -> Llama:
    """The artifact's graph as the reference module (dense weights in `dtype`), on the CPU. A quantized
    or SAQ cache's module is built for its format (the same Hadamard rotations as the graph's), a
    quantized one's k_mean buffers filled from the graph."""
    config = model_config(artifact)
    weights = read_weights(artifact, config)
    kv_format = "" if artifact.kv_format in TORCH_DTYPES else artifact.kv_format
    saq = dict(kv_saq=artifact.saq.text()) if artifact.saq is not None else {}
    model = Llama(config, weights, dtype, kv_format=kv_format, **saq).eval()
    for i, layer in enumerate(model.layers):
        if kv_format in KV_QUANT_FORMATS:
            if f"layers.{i}.k_mean" not in weights:
                raise ArtifactError(f"{artifact.model_file}: no k_mean for layer {i} of a {kv_format} cache")
            layer.attn.k_mean.copy_(torch.from_numpy(weights[f"layers.{i}.k_mean"]))
    return model


# -- 2. attention: the FlashAttention node on the device pool ---------------------------------------


def paged_attention_torch(
    q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens,
    *, num_heads: int, num_kv_heads: int, scale: float, causal: bool = True, sliding_window: int = 0,
):  # fmt: skip
    """paged_attention_ref's semantics in fp32, vectorized: the pools are updated in place and every row
    reads all block_table.shape[1] * block_size key positions, masked (static shapes: graph-capturable)."""
    _, block_size, width = k_cache.shape
    slots = slot_mapping.reshape(-1)
    k_cache.view(-1, width).index_copy_(0, slots, k.reshape(-1, width).to(k_cache.dtype))
    v_cache.view(-1, width).index_copy_(0, slots, v.reshape(-1, width).to(v_cache.dtype))
    key_slots = paged_key_slots(block_table, block_size)
    out = attend_masked(
        q, k_cache.view(-1, width)[key_slots], v_cache.view(-1, width)[key_slots], past_lens, total_lens,
        num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, causal=causal,
        sliding_window=sliding_window,
    )  # fmt: skip
    return out, k_cache, v_cache


def paged_key_slots(block_table, block_size: int) -> torch.Tensor:
    """[B, T] pool rows of key positions 0 .. T - 1 (T = block_table.shape[1] * block_size) of each row."""
    key_pos = torch.arange(block_table.shape[1] * block_size, device=block_table.device)
    return block_table.long()[:, key_pos // block_size] * block_size + key_pos % block_size


def attend_masked(q, keys, values, past_lens, total_lens, *, num_heads, num_kv_heads, scale, causal,
                  sliding_window):  # fmt: skip
    """fp32 attention of q [B, S, Hq*D] over keys/values [B, T, Hkv*D] (key position = index), masked by
    each row's lengths, causality (bottom-right) and the window; rows that see no key output zeros."""
    B, S, _ = q.shape
    T, D = keys.shape[1], q.shape[-1] // num_heads
    keys, values = (x.float().view(B, T, num_kv_heads, D) for x in (keys, values))
    qf = q.float().view(B, S, num_kv_heads, num_heads // num_kv_heads, D)
    scores = torch.einsum("bshgd,bthd->bhgst", qf, keys) * scale
    key_pos = torch.arange(T, device=q.device)
    query_pos = past_lens.long()[:, None, None] + torch.arange(S, device=q.device)[None, :, None]  # [B, S, 1]
    visible = key_pos < total_lens.long()[:, None, None]  # [B, 1 or S, T]
    if causal:
        visible = visible & (key_pos <= query_pos)
    if sliding_window > 0:
        visible = visible & (query_pos - key_pos < sliding_window)
    probs = scores.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    out = torch.einsum("bhgst,bthd->bshgd", probs, values).reshape(B, S, num_heads * D)
    return out.to(q.dtype)


@dataclass(frozen=True)
class PrefillPlan:
    """Where a step's real query tokens and each row's keys are, for the packed varlen prefill."""

    query_rows: torch.Tensor  # [total_q] int64: b * S + s for each real query token
    key_slots: torch.Tensor  # [total_k] int64: pool slots of row b's keys 0 .. total_lens[b] - 1, by row
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int


def prefill_plan(block_table, past_lens, total_lens, seq_q: int, block_size: int) -> PrefillPlan:
    table, past, total = (x.cpu().numpy().astype(np.int64) for x in (block_table, past_lens, total_lens))
    new = total - past
    query_rows = np.concatenate([b * seq_q + np.arange(n) for b, n in enumerate(new)])
    positions = [np.arange(t) for t in total]
    key_slots = np.concatenate(
        [table[b, p // block_size] * block_size + p % block_size for b, p in enumerate(positions)]
    )
    device = block_table.device
    return PrefillPlan(
        query_rows=torch.from_numpy(query_rows).to(device),
        key_slots=torch.from_numpy(key_slots).to(device),
        cu_seqlens_q=torch.from_numpy(np.concatenate([[0], np.cumsum(new)]).astype(np.int32)).to(device),
        cu_seqlens_k=torch.from_numpy(np.concatenate([[0], np.cumsum(total)]).astype(np.int32)).to(device),
        max_seqlen_q=int(new.max()),
    )


class TritonAttention:
    """The FlashAttention node with our Triton kernels (CUDA, fp16 pool and activations), in place.

    Rows of up to 16 new tokens: `kernels.paged_attention` (write, then split-KV decode over the paged
    pool). Longer ones (prefill): write, gather each row's keys into a packed batch, FlashAttention-2
    varlen prefill (causal is bottom-right aligned, so a chunk after a past sees it), scatter back. The
    packing plan is made once per step on the host (prefill steps are never captured) for all layers.
    """

    def __init__(self, ops=None) -> None:
        """``ops``: a module with paged_attention, write_kv_cache and flash_attention_prefill (default
        `kernels`; `kernels.attention_volta` for the sm70 tiles)."""
        import kernels  # the Triton ops load on first use

        self._kernels = kernels if ops is None else ops
        self._last: tuple | None = None  # (block_table, past_lens, total_lens, PrefillPlan) of the last step

    def __call__(self, q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens, **attrs):
        B, S, _ = q.shape
        if S <= DECODE_KERNEL_MAX_TOKENS:
            inputs = (q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens)
            return self._kernels.paged_attention(*inputs, **attrs)
        self._kernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        plan = self._plan(block_table, past_lens, total_lens, S, k_cache.shape[1])
        D = q.shape[-1] // attrs["num_heads"]
        keys, values = (x.view(-1, attrs["num_kv_heads"], D)[plan.key_slots] for x in (k_cache, v_cache))
        return self._prefill(q, keys, values, plan, attrs), k_cache, v_cache

    def _prefill(self, q, keys, values, plan: PrefillPlan, attrs: dict) -> torch.Tensor:
        """o [B, S, Hq*D] of the real query rows over each row's packed keys and values [total_k, Hkv, D]."""
        B, S, _ = q.shape
        num_heads = attrs["num_heads"]
        D = q.shape[-1] // num_heads
        o = self._kernels.flash_attention_prefill(
            q.reshape(B * S, num_heads, D)[plan.query_rows], keys, values,
            causal=attrs["causal"], scale=attrs["scale"], sliding_window=attrs["sliding_window"],
            cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k, max_seqlen_q=plan.max_seqlen_q,
        )  # fmt: skip
        out = q.new_zeros(B * S, num_heads, D)
        out[plan.query_rows] = o
        return out.view(B, S, -1)

    def _plan(self, block_table, past_lens, total_lens, seq_q: int, block_size: int) -> PrefillPlan:
        key = (block_table, past_lens, total_lens)
        if self._last is None or any(a is not b for a, b in zip(self._last[:3], key)):
            self._last = (*key, prefill_plan(block_table, past_lens, total_lens, seq_q, block_size))
        return self._last[3]


class PagedAttention(nn.Module):
    """A layer's `Attention` with its attention node run by `attention` (the same contract: float pools
    paged_attention_ref's, quantized ones paged_attention_quant_ref's, SAQ paged_attention_saq_ref's)."""

    def __init__(self, inner: nn.Module, attention) -> None:
        super().__init__()
        self.inner = inner
        self.attention = attention

    def forward(self, x, rope, k_cache, v_cache, kv, scales=None):
        """(o, *the layer's pool) as `Attention.forward`; k_cache, v_cache are kv_pool, kv_slots for SAQ."""
        a = self.inner
        q, k, v = a.project(x, rope)
        attrs = dict(num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, scale=float(a.head_dim**-0.5),
                     causal=True, sliding_window=a.sliding_window)  # fmt: skip
        if a.kv_format == SAQ_FORMAT:
            inputs = (q, k, v, k_cache, v_cache, kv.block_table, kv.past_lens, kv.total_lens, kv.seq_slots)
            out, *pool = self.attention(*inputs, fmt=a.saq, **attrs)
        elif scales is not None:
            inputs = (q, k, v, k_cache, v_cache, kv.block_table, kv.slot_mapping, kv.past_lens, kv.total_lens)
            out, *pool = self.attention(*inputs, *scales, a.k_mean, kv_format=a.kv_format, **attrs)
        else:
            inputs = (q, k, v, k_cache, v_cache, kv.block_table, kv.slot_mapping, kv.past_lens, kv.total_lens)
            out, *pool = self.attention(*inputs, **attrs)
        return (a.output(out), *pool)  # output: the o projection, after rotating back an SAQ output


def use_attention(model: Llama, attention) -> Llama:
    """Run every layer's FlashAttention node with `attention` (or a list, one per layer) instead of the
    reference."""
    functions = attention if isinstance(attention, list) else [attention] * len(model.layers)
    for layer, function in zip(model.layers, functions):
        inner = layer.attn.inner if isinstance(layer.attn, PagedAttention) else layer.attn
        layer.attn = PagedAttention(inner, function)
    return model


def attention_kernel_for(
    config: RuntimeConfig, device: torch.device, dtype: torch.dtype, kv_format: str = "fp32"
) -> str:
    """The torch backend's attention kernel for this node (`RuntimeConfig.attention_kernel`); quantized
    and SAQ caches have triton and torch only, and no tensor parallelism."""
    kernel = config.attention_kernel
    if kv_format not in TORCH_DTYPES:
        if kernel in ("volta", "npu", "offload"):
            raise ConfigError(
                f"attention_kernel: {kernel} reads float KV pools only; a {kv_format} cache runs with "
                "triton, torch or auto"
            )
        if config.tensor_parallel > 1:
            raise ConfigError(
                f"tensor_parallel: {config.tensor_parallel} shards float KV pools only; serve a {kv_format} "
                "cache with tensor_parallel: 1, or re-export it with --kv-dtype fp16"
            )
    if kernel in ("auto", "native", "function"):  # the last two name onnxruntime's choices
        return "triton" if device.type == "cuda" and dtype == torch.float16 else "torch"
    if kernel in ("triton", "volta") and (device.type != "cuda" or dtype != torch.float16):
        raise ConfigError(f"attention_kernel: {kernel} needs device: cuda and compute_dtype: fp16")
    if kernel == "offload" and device.type == "cuda" and dtype != torch.float16:
        raise ConfigError("attention_kernel: offload on cuda needs compute_dtype: fp16 (its decode kernel)")
    return kernel


def kv_format_attention(kernel: str, kv_format: str, device: torch.device, head_dim: int):
    """The node function of a quantized or SAQ cache for `kernel` (triton or torch, see
    attention_kernel_for): int8 / int4 heads the Triton kernels do not take run the torch function."""
    from runtime.backends.torch_quant_kv import (
        SaqAttention,
        TritonQuantAttention,
        paged_attention_quant_torch,
    )

    if kv_format == SAQ_FORMAT:
        return SaqAttention(device, use_kernel=None if kernel == "triton" else False)
    if kernel == "triton":
        from kernels.attention_triton_quant import HEAD_DIMS

        if head_dim in HEAD_DIMS[kv_format]:
            return TritonQuantAttention()
        log.info("%s KV: the Triton kernels take head_dim %s, not %d: attention runs in torch",
                 kv_format, HEAD_DIMS[kv_format], head_dim)  # fmt: skip
    return paged_attention_quant_torch


def offload_attention(layout: KVCacheLayout, kv_gpu_bytes: int, num_layers: int, width: int, dtype, device):
    """(device blocks, one OffloadAttention per layer) for `kv_gpu_bytes` of device memory (0: 1/8 of
    the pool); the pool's other blocks are pinned host memory."""
    from kernels.attention_offload import HostKVStream, OffloadAttention, host_pool

    tile_blocks = max(1, OFFLOAD_TILE_TOKENS // layout.block_size)
    stream = HostKVStream(tile_blocks=tile_blocks, block_size=layout.block_size, width=width, dtype=dtype,
                          device=device)  # fmt: skip
    block_bytes = 2 * num_layers * layout.block_size * width * torch.finfo(dtype).bits // 8
    budget = kv_gpu_bytes or layout.num_blocks * block_bytes // 8
    gpu_blocks = min(layout.num_blocks, max(1, (budget - stream.staging_bytes) // block_bytes))
    host_blocks = max(1, layout.num_blocks - gpu_blocks)
    plans: dict = {}
    pools = [host_pool(host_blocks, layout.block_size, width, dtype) for _ in range(2 * num_layers)]
    return gpu_blocks, [OffloadAttention(k, v, stream, plans) for k, v in zip(pools[::2], pools[1::2])]


# -- 3. decode steps from CUDA graphs ---------------------------------------------------------------


class DecodeGraphs:
    """Decode steps replayed from CUDA graphs, one per padded batch size, captured on first use.

    A step fits when every row has one new token and one logit row, there are at most
    `batch_sizes[-1]` rows, and the block table is at most `max_blocks` wide. Its inputs go through
    pinned host buffers into static device buffers; padding rows and table columns point at the scratch
    block and padding rows see one key there (total_lens 1), so they compute finite values nobody reads.
    """

    PAD = dict(slot_mapping=SCRATCH_BLOCK, block_table=SCRATCH_BLOCK, total_lens=1)  # others pad with 0

    def __init__(
        self,
        model: Llama,
        pools: list[torch.Tensor],
        batch_sizes: tuple[int, ...],
        max_blocks: int,
        saq: tuple | None = None,
    ):
        """`saq`: (SaqAttention, SaqFormat) for an SAQ cache: its device-only step is captured (attention,
        then each row's token into its open stage; padding rows write the scratch slot 0); after a
        replay in which rows complete a stage, those stages close in one batch over layers and rows."""
        self.model, self.pools, self.batch_sizes, self.max_blocks = model, pools, batch_sizes, max_blocks
        self.saq = saq
        self.block_size = saq[1].stage if saq else pools[0].shape[1]
        n = batch_sizes[-1]
        shapes = dict(input_ids=(n, 1), position_ids=(n, 1), slot_mapping=(n, 1), block_table=(n, max_blocks))
        shapes |= dict(past_lens=(n,), total_lens=(n,), logit_positions=(n, 1))
        if saq:
            shapes["seq_slots"] = (n,)
        self.host = {k: torch.zeros(s, dtype=INPUT_DTYPES[k], pin_memory=True) for k, s in shapes.items()}
        self.static = {k: torch.zeros_like(t, device=pools[0].device) for k, t in self.host.items()}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle()

    def fits(self, batch: StepBatch) -> bool:
        rows, seq = batch.input_ids.shape
        return (
            seq == 1
            and batch.logit_positions.shape[1] == 1
            and rows <= self.batch_sizes[-1]
            and batch.block_table.shape[1] <= self.max_blocks
        )

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, 1, V] float32 on the device (valid until the next replay)."""
        rows = batch.input_ids.shape[0]
        size = next(s for s in self.batch_sizes if s >= rows)
        for name, host in self.host.items():
            value, array = getattr(batch, name), host.numpy()[:size]
            pad = self.PAD.get(name, 0) * (self.block_size if name == "slot_mapping" else 1)
            array.fill(pad)
            if value.ndim == 2:
                array[:rows, : value.shape[1]] = value
            else:
                array[:rows] = value
            self.static[name][:size].copy_(host[:size], non_blocking=True)
        graph, logits = self.graphs.get(size) or self._capture(size)
        graph.replay()
        if self.saq and closes_stage(batch, self.saq[1].stage):
            self.saq[0].close_stages(self.pools, batch, self.saq[1])
        return logits[:rows]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = {name: t[:size] for name, t in self.static.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        if self.saq:
            self.saq[0].in_graph = True
        try:
            with torch.cuda.stream(stream):  # warm-up: compiles the kernels; computes this very step once
                self.model(**inputs, caches=self.pools)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                logits, _ = self.model(**inputs, caches=self.pools)
        finally:
            if self.saq:
                self.saq[0].in_graph = False
        self.graphs[size] = (graph, logits)
        log.info("captured a CUDA graph for decode batches of %d", size)
        return graph, logits


def closing_rows(batch: StepBatch, stage: int) -> np.ndarray:
    """The rows whose new tokens complete an SAQ stage (after a graph replay: `close_stages`)."""
    return np.nonzero(batch.total_lens // stage > batch.past_lens // stage)[0]


def closes_stage(batch: StepBatch, stage: int) -> bool:
    """Whether a step completes an SAQ stage in some row."""
    return closing_rows(batch, stage).size > 0


# -- the backend -----------------------------------------------------------------------------------


class TorchBackend:
    """Runs StepBatches through the artifact's module on `config.device` over a KV pool of `layout`.

    `model`: a module already built for the artifact's dimensions (benchmarks of random weights); by
    default it is rebuilt from the artifact's own weights.
    """

    def __init__(
        self, artifact: Artifact, config: RuntimeConfig, layout: KVCacheLayout, *, model: Llama | None = None
    ) -> None:
        self.device = _device(config.device)
        self.dtype = TORCH_DTYPES[artifact.dtype if config.compute_dtype == "auto" else config.compute_dtype]
        self.layout = layout
        self.kv_format = artifact.kv_format
        self.attention_kernel = attention_kernel_for(config, self.device, self.dtype, self.kv_format)
        self.tensor_parallel = None
        model = load_model(artifact, self.dtype) if model is None else model
        attn = model.layers[0].attn
        built_for = getattr(attn, "inner", attn).kv_format or "fp"
        if built_for != ("fp" if self.kv_format in TORCH_DTYPES else self.kv_format):
            raise ValueError(
                f"the given module is built for {built_for} KV, the artifact has {self.kv_format}"
            )
        if config.tensor_parallel > 1:  # shard before moving: each rank holds only its part on the device
            from runtime.tensor_parallel import TensorParallel

            self.tensor_parallel = TensorParallel.current(config.tensor_parallel, config.allreduce_chunks)
            model = self.tensor_parallel.shard(model)
        spec = artifact.model
        first = model.layers[0].attn
        kv_width = getattr(first, "inner", first).num_kv_heads * spec.head_dim  # this rank's heads under TP
        self._pool_tensors = artifact.pool_tensors()  # one layer's, in graph order
        self._seq_slots = any(t.per == "slot" for t in self._pool_tensors)  # the step feeds seq_slots
        num_blocks = layout.num_blocks
        if self.kv_format not in TORCH_DTYPES:
            attention = kv_format_attention(self.attention_kernel, self.kv_format, self.device, spec.head_dim)
            self._pools = [
                torch.zeros(t.shape(layout), dtype=POOL_DTYPES[np.dtype(t.dtype)], device=self.device)
                for _ in range(spec.num_layers)
                for t in self._pool_tensors
            ]
        else:
            kv_dtype = (
                torch.float16
                if torch.float16 in (self.dtype, TORCH_DTYPES[self.kv_format])
                else torch.float32
            )
            num_blocks, attention = self._float_attention(config, layout, spec.num_layers, kv_width, kv_dtype)
            shape = (num_blocks, layout.block_size, kv_width)
            self._pools = [
                torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(2 * spec.num_layers)
            ]
        self.model = use_attention(model.to(self.device), attention)
        self._graphs = None
        graphable = self.attention_kernel in ("triton", "volta", "torch") and self.tensor_parallel is None
        saq = None
        if self.kv_format == SAQ_FORMAT:
            saq = (attention, artifact.saq)
            graphable = graphable and attention.graphable(artifact.saq, spec.head_dim)
        if config.cuda_graphs and self.device.type == "cuda" and graphable:
            max_seq_len = min(
                config.max_seq_len or spec.max_position_embeddings, spec.max_position_embeddings
            )
            sizes = tuple(2**i for i in range(max(config.max_batch_size - 1, 0).bit_length() + 1))
            max_blocks = -(-max_seq_len // layout.block_size)
            self._graphs = DecodeGraphs(self.model, self._pools, sizes, max_blocks, saq)
        log.info(
            "loaded %s on %s: %s compute, attention %s, CUDA graphs %s, KV %s: %d blocks x %d tokens, "
            "%d slots (%s), %d blocks on the device, tensor parallel %d (all-reduce in %d chunks)",
            artifact.path, self.device, self.dtype, self.attention_kernel, self._graphs is not None,
            artifact.kv_spec, layout.num_blocks, layout.block_size, layout.num_slots, self._pools[0].dtype,
            num_blocks, config.tensor_parallel, config.allreduce_chunks,
        )  # fmt: skip

    def _float_attention(self, config: RuntimeConfig, layout: KVCacheLayout, num_layers: int, kv_width: int,
                         kv_dtype):  # fmt: skip
        """(device blocks, the node function) of a float KV pool for this backend's attention kernel."""
        if self.attention_kernel == "offload":
            return offload_attention(layout, config.kv_gpu_bytes, num_layers, kv_width, kv_dtype, self.device)
        if self.attention_kernel in ("triton", "volta"):
            from kernels import attention_volta

            return layout.num_blocks, TritonAttention(
                attention_volta if self.attention_kernel == "volta" else None
            )
        if self.attention_kernel == "npu":
            from kernels.attention_npu import paged_attention_npu

            return layout.num_blocks, paged_attention_npu
        return layout.num_blocks, paged_attention_torch

    def run(self, batch: StepBatch) -> np.ndarray:
        """One forward step; returns logits [B, L, V] float32 and leaves the pool updated."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this thread's current card (see _device)
        if self.tensor_parallel is not None and self.tensor_parallel.rank == 0:
            self.tensor_parallel.send_step(batch)  # the other ranks run the same step with their shards
        with torch.no_grad():
            if self._graphs is not None and self._graphs.fits(batch):
                logits = self._graphs.run(batch)
            else:
                logits = self.forward(batch)
            return logits.cpu().numpy()

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """One eager step: logits [B, L, V] float32 on the device."""
        inputs = {
            name: torch.from_numpy(np.require(value, requirements="CW")).to(self.device, INPUT_DTYPES[name])
            for name, value in batch.feeds(seq_slots=self._seq_slots).items()
        }
        logits, _ = self.model(**inputs, caches=self._pools)
        return logits

    def cache_arrays(self) -> list[HostView]:
        """The pool (per layer, the artifact's pool tensors in graph order) as numpy-indexed views in the
        artifact's KV format, for KV export and import."""
        if self.attention_kernel == "offload" or self.tensor_parallel is not None:
            raise ConfigError(
                "KV export/import is not supported with attention_kernel: offload or tensor_parallel > 1; "
                "route requests without a prefill node"
            )
        tensors = self._pool_tensors * (len(self._pools) // len(self._pool_tensors))
        return [HostView(pool, np.dtype(t.dtype)) for pool, t in zip(self._pools, tensors)]

    def cache_tensors(self) -> list[torch.Tensor]:
        """The pool's device tensors themselves."""
        return self._pools


class HostView:
    """A device pool as the engine's KV export/import uses an array: `view.reshape(-1, width)[rows]`
    reads numpy (in the artifact's KV dtype), `...[rows] = array` writes, with numpy row indices."""

    def __init__(self, tensor: torch.Tensor, host_dtype) -> None:
        self.tensor, self.host_dtype = tensor, host_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def reshape(self, *shape: int) -> HostView:
        return HostView(self.tensor.reshape(*shape), self.host_dtype)

    def __getitem__(self, index) -> np.ndarray:
        return self.tensor[self._device_index(index)].cpu().numpy().astype(self.host_dtype, copy=False)

    def __setitem__(self, index, value) -> None:
        values = torch.as_tensor(np.asarray(value)).to(self.tensor.device, self.tensor.dtype)
        self.tensor[self._device_index(index)] = values

    def _device_index(self, index):
        return torch.as_tensor(index, device=self.tensor.device) if isinstance(index, np.ndarray) else index


def _device(name: str) -> torch.device:
    """The configured device; a bare `cuda` becomes this rank's card under torchrun (LOCAL_RANK), and that
    card becomes the calling thread's current device (CUDA's current device is per thread: a backend built
    or stepped on a worker thread would otherwise put every rank on card 0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA device; set device: cpu or auto")
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device
