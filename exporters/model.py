"""The PyTorch definition of a Llama-family decoder: the reference and the source of the ONNX graph.

One module, two forwards:

- `forward_dense(input_ids) -> logits [B, S, V]`: the whole sequence at once with dense causal
  attention (`kernels.reference.attention_ref`), no cache. This is the fp32 reference the exported
  graph is tested against.
- `forward(...)`: the serving graph's signature. Rows of new tokens attend over a paged KV pool
  through one `fastattention::FlashAttention` op per layer (contract: `kernels/reference.py`;
  quantized pools: `kernels/kv_quant.py`), or `fastattention::FlashAttentionSaq` for the SAQ
  staircase (`kernels/kv_saq.py`); during ONNX export that op becomes a single custom-domain node,
  in eager mode it runs the reference. One graph serves prefill, decode and mixed batches.

Linear weights are dense, or kept as 32-value blocks (`BlockQuant`) that export to
`com.microsoft::MatMulNBits`: Q4_0 and Q8_0 map onto it exactly; Q4_1's per-block minimum m adds
`blocksum(x) @ m`, computed beside it, so no block is re-quantized.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporters.checkpoint import QUANT_BLOCK, BlockQuant, ModelConfig
from kernels.kv_formats import KV_QUANT_FORMATS, SAQ_DEFAULT, SAQ_FORMAT, SaqFormat
from kernels.kv_quant import paged_attention_quant_ref
from kernels.kv_saq import paged_attention_saq_ref
from kernels.reference import attention_ref, paged_attention_ref

ATTENTION_DOMAIN = "fastattention"
ATTENTION_OP = "FlashAttention"
ATTENTION_OP_VERSION = 1
SAQ_ATTENTION_OP = "FlashAttentionSaq"  # same domain and version; no ONNX function body (kernels only)
KV_FORMATS = {torch.float32: "fp32", torch.float16: "fp16"}


class RMSNorm(nn.Module):
    def __init__(self, weight: np.ndarray, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # normalize in fp32, scale in the model's dtype


class Linear(nn.Module):
    """y = x @ W.T for a dense W [N, K], or for blocks exported as MatMulNBits."""

    def __init__(self, weight: np.ndarray | BlockQuant, dtype: torch.dtype, accuracy_level: int) -> None:
        super().__init__()
        self.quantized = isinstance(weight, BlockQuant)
        self.accuracy_level = accuracy_level
        if not self.quantized:
            self.weight = nn.Parameter(torch.tensor(weight, dtype=dtype), requires_grad=False)
            return
        self.out_features, self.in_features = weight.codes.shape
        self.bits = weight.bits
        self.register_buffer("packed", torch.from_numpy(pack_codes(weight.codes, weight.bits)))
        self.register_buffer("scales", torch.from_numpy(weight.scales.reshape(-1)).to(dtype))
        zero = np.ascontiguousarray(weight.zero_points())
        self.register_buffer("zero_points", torch.from_numpy(pack_codes(zero, weight.bits).reshape(-1)))
        mins = None if weight.mins is None else torch.from_numpy(weight.mins.T.copy()).to(dtype)
        self.register_buffer("mins", mins)  # [K // 32, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight)
        if torch.onnx.is_in_onnx_export():
            y = torch.onnx.ops.symbolic(
                "com.microsoft::MatMulNBits",
                (x, self.packed, self.scales, self.zero_points),
                dict(
                    K=self.in_features,
                    N=self.out_features,
                    bits=self.bits,
                    block_size=QUANT_BLOCK,
                    accuracy_level=self.accuracy_level,
                ),
                dtype=x.dtype,
                shape=(*x.shape[:-1], self.out_features),
                version=1,
            )
        else:
            y = F.linear(x, self.dequantized_weight().to(x.dtype))
        if self.mins is not None:
            y = y + x.unflatten(-1, (-1, QUANT_BLOCK)).sum(-1) @ self.mins
        return y

    def dequantized_weight(self) -> torch.Tensor:
        """(code - zero_point) * scale, from the packed buffers; without the Q4_1 minimum."""
        codes = unpack_codes(self.packed, self.bits).float().view(self.out_features, -1, QUANT_BLOCK)
        blocks = codes.shape[1]
        zero = unpack_codes(self.zero_points.view(self.out_features, -1), self.bits)[:, :blocks].float()
        w = (codes - zero.unsqueeze(-1)) * self.scales.float().view(self.out_features, -1, 1)
        return w.view(self.out_features, self.in_features)


class Embedding(nn.Module):
    """Token embedding; blocks are gathered as codes and scaled (no dequantized table in memory)."""

    def __init__(self, weight: np.ndarray | BlockQuant, dtype: torch.dtype) -> None:
        super().__init__()
        self.quantized = isinstance(weight, BlockQuant)
        if not self.quantized:
            self.weight = nn.Parameter(torch.tensor(weight, dtype=dtype), requires_grad=False)
            return
        if not isinstance(weight.zero_point, int):
            raise ValueError("a block-quantized embedding needs one zero point for all blocks (as Q8_0 has)")
        self.dtype = dtype
        self.zero_point = weight.zero_point
        n, k = weight.codes.shape
        self.register_buffer(
            "codes", torch.from_numpy(weight.codes.reshape(n, k // QUANT_BLOCK, QUANT_BLOCK))
        )
        self.register_buffer("scales", torch.from_numpy(weight.scales.reshape(-1)).to(dtype))
        mins = None if weight.mins is None else torch.from_numpy(weight.mins).to(dtype)
        self.register_buffer("mins", mins)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.embedding(ids, self.weight)
        codes = self.codes[ids].to(self.dtype) - self.zero_point  # [B, S, K // 32, 32]
        x = codes * self.scales.view(self.codes.shape[0], -1)[ids].unsqueeze(-1)
        if self.mins is not None:
            x = x + self.mins[ids].unsqueeze(-1)
        return x.flatten(-2)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] -> MatMulNBits layout [N, K // 32, 32 * bits // 8], low nibble first."""
    n, k = codes.shape
    blocks = codes.reshape(n, -1, QUANT_BLOCK) if k % QUANT_BLOCK == 0 else codes.reshape(n, -1)
    if bits == 8:
        return np.ascontiguousarray(blocks.astype(np.uint8))
    flat = blocks.reshape(n, -1)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((n, 1), np.uint8)], axis=1)
    packed = (flat[:, 0::2] | (flat[:, 1::2] << 4)).astype(np.uint8)
    return packed.reshape(n, -1, QUANT_BLOCK // 2) if k % QUANT_BLOCK == 0 else packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed.reshape(packed.shape[0], -1)
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def rope_tables(config: ModelConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, head_dim // 2] for rotate-half RoPE, computed in float64."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / config.head_dim))
    angles = np.arange(config.max_position_embeddings, dtype=np.float64)[:, None] * inv_freq[None, :]
    return torch.from_numpy(np.cos(angles)).to(dtype), torch.from_numpy(np.sin(angles)).to(dtype)


class Rope:
    """cos/sin tables [max_positions, D/2] and this step's position_ids [B, S]."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor) -> None:
        self.cos, self.sin, self.position_ids = cos, sin, position_ids

    def __call__(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Rotate-half RoPE on x [B, S, num_heads * D]; one ONNX RotaryEmbedding-23 node when exported."""
        return torch.onnx.ops.rotary_embedding(x, self.cos, self.sin, self.position_ids, num_heads=num_heads)


def fuse_rows(weights: list) -> np.ndarray | BlockQuant | None:
    """Stack projections of one input into one weight, when they share a format; else None."""
    if all(isinstance(w, np.ndarray) for w in weights):
        return np.concatenate(weights, axis=0)
    if not all(isinstance(w, BlockQuant) for w in weights):
        return None
    first = weights[0]
    if any((w.bits, w.mins is None) != (first.bits, first.mins is None) for w in weights):
        return None
    zero_points = [w.zero_point for w in weights]
    shared = all(isinstance(z, int) for z in zero_points) and len(set(zero_points)) == 1
    return BlockQuant(
        first.kind,
        first.bits,
        np.concatenate([w.codes for w in weights]),
        np.concatenate([w.scales for w in weights]),
        first.zero_point if shared else np.concatenate([w.zero_points() for w in weights]),
        None if first.mins is None else np.concatenate([w.mins for w in weights]),
    )


class FusedLinear(nn.Module):
    """Several projections of one input: one matmul whose output is split, when formats allow."""

    def __init__(self, weights: list, dtype: torch.dtype, accuracy_level: int) -> None:
        super().__init__()
        self.sizes = [(w.codes if isinstance(w, BlockQuant) else w).shape[0] for w in weights]
        fused = fuse_rows(weights)
        parts = [fused] if fused is not None else weights
        self.parts = nn.ModuleList(Linear(w, dtype, accuracy_level) for w in parts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if len(self.parts) == 1:
            return list(self.parts[0](x).split(self.sizes, dim=-1))
        return [part(x) for part in self.parts]


def hadamard(n: int) -> torch.Tensor | None:
    """The orthonormal Sylvester-Hadamard matrix of size n (fp32), or None when n is not a power of two."""
    if n < 1 or n & (n - 1):
        return None
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


class PagedKV:
    """The per-step inputs that place new tokens in the paged pool (see kernels/reference.py);
    seq_slots [B] int32: each row's SAQ slot (kernels/kv_saq.py), None for other formats."""

    def __init__(self, block_table, slot_mapping, past_lens, total_lens, seq_slots=None) -> None:
        self.block_table = block_table
        self.slot_mapping = slot_mapping
        self.past_lens = past_lens
        self.total_lens = total_lens
        self.seq_slots = seq_slots


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict,
        dtype: torch.dtype,
        accuracy_level: int,
        kv_format: str,
        saq: SaqFormat | None = None,
    ) -> None:
        super().__init__()
        self.kv_format = kv_format  # quantized (kernels/kv_quant.py), "saq", or "" when the pool is float
        self.saq = saq  # the staircase's layout when kv_format is "saq"
        if kv_format in KV_QUANT_FORMATS:  # K's per-channel means, subtracted before quantizing (calibration)
            self.register_buffer("k_mean", torch.zeros(config.num_kv_heads * config.head_dim, dtype=dtype))
        if kv_format:
            # q and k rotated per head by an orthonormal Hadamard matrix (scores unchanged: q.k = qH.kH):
            # it spreads K's outlier channels over the head, so per-token scales fit every channel.
            # SAQ rotates v too (v' = vH, so o' = P v' = oH and o = o'H^T): its per-token groups of V
            # see no outlier channel either.
            rotation = hadamard(config.head_dim)
            self.register_buffer("rotation", None if rotation is None else rotation.to(dtype))
        self.rotate_v = kv_format == SAQ_FORMAT and getattr(self, "rotation", None) is not None
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.sliding_window = config.sliding_window
        self.qkv = FusedLinear([weights[n] for n in "qkv"], dtype, accuracy_level)
        self.o = Linear(weights["o"], dtype, accuracy_level)

    def _rotate(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x [B, S, H * D] times `rotation` [D, D], per head."""
        return torch.matmul(x.unflatten(-1, (-1, self.head_dim)), rotation).flatten(-2)

    def project(self, x, rope: Rope):
        """q [B, S, Hq*D], k and v [B, S, Hkv*D], RoPE applied (and, for a quantized or SAQ cache, the
        rotation of q and k; SAQ rotates v too: `output` rotates the attention output back)."""
        q, k, v = self.qkv(x)
        q, k = rope(q, self.num_heads), rope(k, self.num_kv_heads)
        if getattr(self, "rotation", None) is not None:
            q, k = self._rotate(q, self.rotation), self._rotate(k, self.rotation)
        if self.rotate_v:
            v = self._rotate(v, self.rotation)
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The o projection of the attention output [B, S, Hq*D], un-rotated first when v was rotated."""
        if self.rotate_v:
            out = self._rotate(out, self.rotation.T)
        return self.o(out)

    def forward_dense(self, x, rope: Rope) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in self.project(x, rope))
        out = attention_ref(q, k, v, sliding_window=self.sliding_window)
        return self.output(out.transpose(1, 2).flatten(2))

    def forward(self, x, rope: Rope, k_cache, v_cache, kv: PagedKV, scales=None):
        """Float pools: (o, k_cache, v_cache). Quantized pools (scales = (k_scale, v_scale)):
        (o, k_codes, v_codes, k_scale, v_scale). SAQ: k_cache and v_cache are the layer's kv_pool and
        kv_slots: (o, kv_pool, kv_slots)."""
        if self.kv_format == SAQ_FORMAT:
            return self._forward_saq(x, rope, k_cache, v_cache, kv)
        if scales is not None:
            return self._forward_quantized(x, rope, k_cache, v_cache, kv, scales)
        q, k, v = self.project(x, rope)
        inputs = (q, k, v, k_cache, v_cache, kv.block_table, kv.slot_mapping, kv.past_lens, kv.total_lens)
        out, pools = self._node(
            ATTENTION_OP,
            inputs,
            (k_cache, v_cache),
            lambda attrs: paged_attention_ref(*inputs, **attrs),
            kv_format=KV_FORMATS[k_cache.dtype],  # the pool's storage; may differ from q's type
        )
        return (self.o(out), *pools)

    def _forward_quantized(self, x, rope: Rope, k_codes, v_codes, kv: PagedKV, scales):
        q, k, v = self.project(x, rope)
        inputs = (q, k, v, k_codes, v_codes, kv.block_table, kv.slot_mapping, kv.past_lens, kv.total_lens)
        inputs += (*scales, self.k_mean)
        out, pools = self._node(
            ATTENTION_OP,
            inputs,
            (k_codes, v_codes, *scales),
            lambda attrs: paged_attention_quant_ref(*inputs, kv_format=self.kv_format, **attrs),
            kv_format=self.kv_format,
        )
        return (self.output(out), *pools)

    def _forward_saq(self, x, rope: Rope, kv_pool, kv_slots, kv: PagedKV):
        q, k, v = self.project(x, rope)
        inputs = (q, k, v, kv_pool, kv_slots, kv.block_table, kv.slot_mapping, kv.past_lens, kv.total_lens)
        inputs += (kv.seq_slots,)
        # slot_mapping is the node's input only so that every format's graph has the same inputs
        spec_inputs = (q, k, v, kv_pool, kv_slots, kv.block_table, kv.past_lens, kv.total_lens, kv.seq_slots)
        out, pools = self._node(
            SAQ_ATTENTION_OP,
            inputs,
            (kv_pool, kv_slots),
            lambda attrs: paged_attention_saq_ref(*spec_inputs, fmt=self.saq, **attrs),
            kv_format=SAQ_FORMAT,
            saq=self.saq.text(),
        )
        return (self.output(out), *pools)

    def _node(self, op: str, inputs: tuple, pools: tuple, reference, **format_attrs):
        """One attention node over `pools`: the custom op `op` while exporting (the common attributes plus
        `format_attrs`), else its spec, `reference(common attributes)`. Returns (o, updated pools)."""
        attrs = dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            scale=float(self.head_dim**-0.5),
            causal=1,
            sliding_window=self.sliding_window,
        )
        if not torch.onnx.is_in_onnx_export():
            out, *pools = reference({**attrs, "causal": True})
            return out, pools
        q = inputs[0]
        out, *pools = torch.onnx.ops.symbolic_multi_out(
            f"{ATTENTION_DOMAIN}::{op}",
            inputs,
            {**attrs, **format_attrs},
            dtypes=(q.dtype, *(t.dtype for t in pools)),
            shapes=(q.shape, *(t.shape for t in pools)),
            version=ATTENTION_OP_VERSION,
        )
        return out, pools


class MLP(nn.Module):
    def __init__(self, weights: dict, dtype: torch.dtype, accuracy_level: int) -> None:
        super().__init__()
        self.gate_up = FusedLinear([weights["gate"], weights["up"]], dtype, accuracy_level)
        self.down = Linear(weights["down"], dtype, accuracy_level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict,
        dtype: torch.dtype,
        accuracy_level: int,
        kv_format: str,
        saq: SaqFormat | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(weights["attn_norm"], config.rms_norm_eps, dtype)
        self.attn = Attention(config, weights, dtype, accuracy_level, kv_format, saq)
        self.mlp_norm = RMSNorm(weights["mlp_norm"], config.rms_norm_eps, dtype)
        self.mlp = MLP(weights, dtype, accuracy_level)

    def forward_dense(self, x, rope: Rope):
        x = x + self.attn.forward_dense(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x, rope: Rope, pool: list[torch.Tensor], kv: PagedKV):
        """pool: [k, v] (float), [k_codes, v_codes, k_scale, v_scale] or [kv_pool, kv_slots] (SAQ);
        returns (x, updated pool)."""
        if len(pool) == 2:
            h, *pool = self.attn(self.attn_norm(x), rope, pool[0], pool[1], kv)
        else:
            h, *pool = self.attn(self.attn_norm(x), rope, pool[0], pool[1], kv, scales=(pool[2], pool[3]))
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), pool


class Llama(nn.Module):
    """weights: canonical name -> float32 array or BlockQuant (see exporters/checkpoint.py).

    `weights["lm_head"]` is always present; a tied head is the same object as `weights["embed"]`.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict,
        dtype: torch.dtype = torch.float32,
        accuracy_level: int = 0,
        kv_format: str = "",
        kv_saq: str = SAQ_DEFAULT,
    ) -> None:
        """kv_format: a quantized KV format (kernels/kv_quant.py), "saq" (the staircase `kv_saq`, see
        kernels/kv_formats.SaqFormat.parse), or "" for float pools."""
        super().__init__()
        formats = (*KV_QUANT_FORMATS, SAQ_FORMAT)
        if kv_format and kv_format not in formats:
            raise ValueError(f"kv_format {kv_format!r} is not one of {', '.join(formats)}")
        self.config = config
        width = config.num_kv_heads * config.head_dim
        self.saq = SaqFormat.parse(kv_saq, width) if kv_format == SAQ_FORMAT else None
        # per layer: K, V (+ K scales, V scales when quantized); SAQ: the paged pool and the slots
        self.pool_tensors = 4 if kv_format in KV_QUANT_FORMATS else 2
        self.embed = Embedding(weights["embed"], dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i), dtype, accuracy_level, kv_format, self.saq)
            for i in range(config.num_layers)
        )
        self.final_norm = RMSNorm(weights["final_norm"], config.rms_norm_eps, dtype)
        self.lm_head = Linear(weights["lm_head"], dtype, accuracy_level)
        if weights["lm_head"] is weights["embed"] and self.lm_head.quantized and self.lm_head.bits == 8:
            # tied 8-bit table: the gather and the MatMulNBits read the same codes and scales
            self.lm_head.packed, self.lm_head.scales = self.embed.codes, self.embed.scales
        cos, sin = rope_tables(config, dtype)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    def _rope(self, position_ids: torch.Tensor) -> Rope:
        return Rope(self.rope_cos, self.rope_sin, position_ids)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reference: logits for every position of [B, S] ids, no cache."""
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        rope = self._rope(positions)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer.forward_dense(x, rope)
        return self.lm_head(self.final_norm(x)).float()

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        position_ids: torch.Tensor,  # [B, S] int64
        slot_mapping: torch.Tensor,  # [B, S] int64
        block_table: torch.Tensor,  # [B, max_blocks] int32
        past_lens: torch.Tensor,  # [B] int32
        total_lens: torch.Tensor,  # [B] int32
        logit_positions: torch.Tensor,  # [B, L] int64: which of the S rows produce logits
        caches: list[torch.Tensor],  # per layer: k_cache, v_cache (+ scales); SAQ: kv_pool, kv_slots
        seq_slots: torch.Tensor | None = None,  # [B] int32, SAQ only: each row's slot
    ):
        """Serving step: logits [B, L, V] (float32) and the updated caches, in input order."""
        kv = PagedKV(block_table, slot_mapping, past_lens, total_lens, seq_slots)
        rope = self._rope(position_ids)
        x = self.embed(input_ids)
        new_caches = []
        n = self.pool_tensors
        for i, layer in enumerate(self.layers):
            x, pool = layer(x, rope, caches[n * i : n * (i + 1)], kv)
            new_caches += pool
        index = logit_positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, index)
        return self.lm_head(self.final_norm(x)).float(), new_caches


def _layer_weights(weights: dict, i: int) -> dict:
    prefix = f"layers.{i}."
    return {name[len(prefix) :]: w for name, w in weights.items() if name.startswith(prefix)}
