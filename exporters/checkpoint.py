"""Checkpoint readers: a GGUF file or a Hugging Face directory -> one `Checkpoint`.

Both readers give the same view: a `ModelConfig`, the tokenizer (as tokenizer.json text plus
special ids and chat template), and weights addressed by our canonical names:

    embed, final_norm, lm_head (absent when tied to embed),
    layers.{i}.{attn_norm, q, k, v, o, mlp_norm, gate, up, down}

Linear weights are [out_features, in_features] like torch's `nn.Linear.weight`. GGUF stores the
q and k rows of Llama models permuted for its interleaved RoPE; the reader undoes that so both
sources share one model definition (rotate-half RoPE). GGUF Q4_0/Q4_1/Q8_0 tensors can also be
read as their original blocks (`quant_blocks`) so the exporter carries them without re-quantizing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
LAYER_TENSORS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
QUANT_BLOCK = 32  # values per block in every carried GGUF type


class CheckpointError(ArtifactError):
    """The checkpoint cannot be read: missing file or tensor, unsupported type or architecture."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and dimensions of a Llama-family decoder."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int = 0
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )


@dataclass(frozen=True)
class BlockQuant:
    """A weight kept as blocks of 32 unsigned codes: w = (code - zero_point) * scale + min."""

    kind: str  # gguf type name: Q4_0, Q4_1 or Q8_0
    bits: int
    codes: np.ndarray  # uint8 [N, K], values in [0, 2**bits)
    scales: np.ndarray  # float32 [N, K // 32]
    zero_point: int | np.ndarray  # one for all blocks, or uint8 [N, K // 32]
    mins: np.ndarray | None  # float32 [N, K // 32] for Q4_1, else None

    def zero_points(self) -> np.ndarray:
        """uint8 [N, K // 32]: each block's zero point."""
        return np.broadcast_to(np.asarray(self.zero_point, np.uint8), self.scales.shape)

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, k // QUANT_BLOCK, QUANT_BLOCK).astype(np.float32)
        blocks -= self.zero_points()[..., None]
        w = blocks * self.scales[..., None]
        if self.mins is not None:
            w += self.mins[..., None]
        return w.reshape(n, k)


@dataclass(frozen=True)
class TokenizerSpec:
    """What the artifact needs to rebuild the tokenizer."""

    tokenizer_json: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool


def open_checkpoint(path: str | Path) -> GGUFCheckpoint | HFCheckpoint:
    """A GGUF file or a Hugging Face directory; anything else is a clear error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass a .gguf file or a model directory")
    if path.is_dir():
        return HFCheckpoint(path)
    return GGUFCheckpoint(path)


# ----------------------------------------------------------------------------------------------
# GGUF


_GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "mlp_norm": "ffn_norm",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}
# type -> (bits, zero point, bytes per block of 32)
_CARRIED = {"Q4_0": (4, 8, 18), "Q4_1": (4, 0, 20), "Q8_0": (8, 128, 34)}


def _gguf_name(name: str) -> str:
    if name == "embed":
        return "token_embd.weight"
    if name == "final_norm":
        return "output_norm.weight"
    if name == "lm_head":
        return "output.weight"
    _, index, part = name.split(".")
    return f"blk.{index}.{_GGUF_NAMES[part]}.weight"


class GGUFCheckpoint:
    """A GGUF file read through the `gguf` package (memory-mapped, tensors decoded on demand)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e}); is it truncated?") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._read_config()

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            if default is None:
                raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' is missing")
            return default
        return field.contents()

    def _read_config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: architecture '{arch}' is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = int(self._field(f"{arch}.embedding_length"))
        heads = int(self._field(f"{arch}.attention.head_count"))
        embed = self._tensors.get("token_embd.weight")
        if embed is None:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        return ModelConfig(
            architecture="llama",
            num_layers=int(self._field(f"{arch}.block_count")),
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(self._field(f"{arch}.rope.dimension_count", hidden // heads)),
            vocab_size=int(embed.shape[1]),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(self._field(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
            sliding_window=int(self._field(f"{arch}.attention.sliding_window", 0) or 0),
            name=str(self._field("general.name", self.path.stem)),
        )

    def _raw(self, name: str):
        key = _gguf_name(name)
        tensor = self._tensors.get(key)
        if tensor is None:
            raise CheckpointError(f"{self.path}: tensor '{key}' ({name}) is missing")
        return tensor

    def tensor_type(self, name: str) -> str:
        return self._raw(name).tensor_type.name

    def has(self, name: str) -> bool:
        return _gguf_name(name) in self._tensors

    def float_tensor(self, name: str) -> np.ndarray:
        """The weight in float32, dequantized by the `gguf` package itself."""
        from gguf import quants

        tensor = self._raw(name)
        try:
            data = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"{self.path}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize; re-convert the model to F16, Q8_0 or Q4_K"
            ) from e
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return self._unpermute(name, np.asarray(data, dtype=np.float32).reshape(shape))

    def quant_blocks(self, name: str) -> BlockQuant | None:
        """The tensor's own blocks when its type is carried exactly (Q4_0, Q4_1, Q8_0), else None."""
        tensor = self._raw(name)
        kind = tensor.tensor_type.name
        if kind not in _CARRIED:
            return None
        bits, zero_point, block_bytes = _CARRIED[kind]
        n_rows = int(tensor.shape[1])
        raw = np.ascontiguousarray(tensor.data).reshape(n_rows, -1, block_bytes)
        scales = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        mins = None
        offset = 2
        if kind == "Q4_1":
            mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            offset = 4
        payload = raw[..., offset:]
        if bits == 4:  # low nibbles hold values 0..15 of the block, high nibbles 16..31
            codes = np.concatenate([payload & 0x0F, payload >> 4], axis=-1)
        else:
            codes = (payload.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        codes = codes.reshape(n_rows, -1)
        perm = self._row_permutation(name, n_rows)
        if perm is not None:
            codes, scales = codes[perm], scales[perm]
            mins = None if mins is None else mins[perm]
        return BlockQuant(kind, bits, codes, scales, zero_point, mins)

    def _row_permutation(self, name: str, n_rows: int) -> np.ndarray | None:
        part = name.rsplit(".", 1)[-1]
        if part not in ("q", "k"):
            return None
        heads = self.config.num_heads if part == "q" else self.config.num_kv_heads
        half = n_rows // heads // 2
        # GGUF row r of a head holds HF row: pairs (i, i + half) interleaved -> undo
        return np.arange(n_rows).reshape(heads, half, 2).transpose(0, 2, 1).reshape(-1)

    def _unpermute(self, name: str, w: np.ndarray) -> np.ndarray:
        perm = self._row_permutation(name, w.shape[0])
        return w if perm is None else w[perm]

    def tokenizer_spec(self) -> TokenizerSpec:
        from exporters.gguf_tokenizer import tokenizer_from_gguf, tokenizer_info_from_gguf

        info = tokenizer_info_from_gguf(self._reader)
        return TokenizerSpec(
            tokenizer_json=tokenizer_from_gguf(self._reader).to_str(),
            chat_template=info.chat_template,
            bos_token_id=info.bos_token_id,
            eos_token_ids=tuple(info.stop_token_ids),
            add_bos_token=info.add_bos_token,
        )


# ----------------------------------------------------------------------------------------------
# Hugging Face directory


_HF_NAMES = {
    "attn_norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def _hf_name(name: str) -> str:
    if name == "embed":
        return "model.embed_tokens.weight"
    if name == "final_norm":
        return "model.norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    _, index, part = name.split(".")
    return f"model.layers.{index}.{_HF_NAMES[part]}.weight"


class HFCheckpoint:
    """A directory with config.json, *.safetensors and tokenizer.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for required in ("config.json", "tokenizer.json"):
            if not (path / required).is_file():
                raise CheckpointError(f"{path}: {required} is missing; a model directory needs it")
        self._hf_config = json.loads((path / "config.json").read_text())
        self._files = sorted(path.glob("*.safetensors"))
        if not self._files:
            raise CheckpointError(f"{path}: no *.safetensors file; only safetensors weights are read")
        self._index = self._index_tensors()
        self.config = self._read_config()

    def _index_tensors(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = {}
        for file in self._files:
            try:
                with safe_open(str(file), framework="numpy") as f:
                    index.update(dict.fromkeys(f.keys(), file))
            except Exception as e:  # safetensors raises its own SafetensorError for truncated files
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        return index

    def _read_config(self) -> ModelConfig:
        c = self._hf_config
        archs = c.get("architectures") or []
        arch = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{self.path}: architectures {archs} not supported; supported: {', '.join(_HF_ARCHITECTURES)}"
            )
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        rope_scaling = c.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise CheckpointError(f"{self.path}: rope_scaling {rope_scaling} is not supported yet")
        return ModelConfig(
            architecture="llama",
            num_layers=int(c["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads", heads)),
            head_dim=int(c.get("head_dim") or hidden // heads),
            vocab_size=int(c["vocab_size"]),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False))
            or "lm_head.weight" not in self._index,
            sliding_window=int(c.get("sliding_window") or 0) if arch == "mistral" else 0,
            name=self.path.name,
        )

    def has(self, name: str) -> bool:
        return _hf_name(name) in self._index

    def tensor_type(self, name: str) -> str:
        from safetensors import safe_open

        key = _hf_name(name)
        if key not in self._index:
            raise CheckpointError(f"{self.path}: tensor '{key}' ({name}) is missing")
        with safe_open(str(self._index[key]), framework="numpy") as f:
            return f.get_slice(key).get_dtype()

    def float_tensor(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        key = _hf_name(name)
        file = self._index.get(key)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor '{key}' ({name}) is missing")
        with safe_open(str(file), framework="pt") as f:  # numpy has no bfloat16
            return f.get_tensor(key).float().numpy()

    def quant_blocks(self, name: str) -> BlockQuant | None:
        return None

    def tokenizer_spec(self) -> TokenizerSpec:
        tok_config = _read_json(self.path / "tokenizer_config.json")
        gen_config = _read_json(self.path / "generation_config.json")
        tokenizer_json = (self.path / "tokenizer.json").read_text()
        vocab = _added_token_ids(tokenizer_json)

        def token_id(value) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return vocab.get(value) if isinstance(value, str) else value

        eos = gen_config.get("eos_token_id", self._hf_config.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else [eos]
        if eos is None:
            eos_ids = [token_id(tok_config.get("eos_token"))]
        bos = self._hf_config.get("bos_token_id", token_id(tok_config.get("bos_token")))
        return TokenizerSpec(
            tokenizer_json=tokenizer_json,
            chat_template=tok_config.get("chat_template"),
            bos_token_id=bos,
            eos_token_ids=tuple(int(i) for i in eos_ids if i is not None),
            add_bos_token=bool(tok_config.get("add_bos_token", False)),
        )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _added_token_ids(tokenizer_json: str) -> dict[str, int]:
    data = json.loads(tokenizer_json)
    ids = dict(data.get("model", {}).get("vocab", {}) or {})
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return ids
