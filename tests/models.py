"""Small random checkpoints built at test time (the tokenizer is the embedded SmolLM2's)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from exporters.cli import embedded_model_path

TINY = dict(num_layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, context=256)


def _tokenizer_fields(reader: gguf.GGUFReader) -> dict:
    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    keys = [
        "tokens",
        "merges",
        "token_type",
        "model",
        "pre",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
    ]
    fields = {k: value(f"tokenizer.ggml.{k}") for k in keys}
    fields["chat_template"] = value("tokenizer.chat_template")
    return fields


_TOKENIZER_CACHE: dict = {}


def embedded_tokenizer_fields() -> dict:
    if not _TOKENIZER_CACHE:
        _TOKENIZER_CACHE.update(_tokenizer_fields(gguf.GGUFReader(str(embedded_model_path()))))
    return _TOKENIZER_CACHE


def random_weights(seed: int = 0, vocab: int = 49152) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights of the TINY Llama, shaped like numpy arrays [rows, cols]."""
    rng = np.random.default_rng(seed)
    h, f, d = TINY["hidden"], TINY["ffn"], TINY["head_dim"]
    shapes = {
        "attn_norm": (h,),
        "ffn_norm": (h,),
        "attn_q": (TINY["heads"] * d, h),
        "attn_k": (TINY["kv_heads"] * d, h),
        "attn_v": (TINY["kv_heads"] * d, h),
        "attn_output": (h, TINY["heads"] * d),
        "ffn_gate": (f, h),
        "ffn_up": (f, h),
        "ffn_down": (h, f),
    }
    weights = {
        "token_embd.weight": rng.standard_normal((vocab, h)).astype(np.float32) * 0.5,
        "output_norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
    }
    for i in range(TINY["num_layers"]):
        for name, shape in shapes.items():
            scale = 0.1 if len(shape) == 1 else shape[1] ** -0.5
            w = rng.standard_normal(shape) * scale + (1.0 if len(shape) == 1 else 0.0)
            weights[f"blk.{i}.{name}.weight"] = w.astype(np.float32)
    return weights


def write_tiny_gguf(
    path: Path,
    *,
    seed: int = 0,
    arch: str = "llama",
    matrix_type: QT | tuple[QT, ...] = QT.Q4_1,
    embed_type: QT = QT.Q8_0,
    drop: tuple[str, ...] = (),
) -> Path:
    """A 2-layer random Llama GGUF with the embedded model's tokenizer.

    `matrix_type` may be a tuple of types, given to the 14 layer matrices in turn.
    """
    types = matrix_type if isinstance(matrix_type, tuple) else (matrix_type,)
    matrix_index = 0
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-random-llama")
    writer.add_block_count(TINY["num_layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(TINY["head_dim"])
    tok = embedded_tokenizer_fields()
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_merges(tok["merges"])
    writer.add_token_types(tok["token_type"])
    writer.add_bos_token_id(tok["bos_token_id"])
    writer.add_eos_token_id(tok["eos_token_id"])
    writer.add_add_bos_token(bool(tok["add_bos_token"]))
    writer.add_chat_template(tok["chat_template"])
    for name, w in random_weights(seed).items():
        if name in drop:
            continue
        if w.ndim == 1:
            qtype = QT.F32
        elif name.startswith("token_embd"):
            qtype = embed_type
        else:
            qtype, matrix_index = types[matrix_index % len(types)], matrix_index + 1
        data = w if qtype == QT.F32 else gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype == QT.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_hf_dir(path: Path, *, seed: int = 0, architecture: str = "LlamaForCausalLM") -> Path:
    """The same tiny model as a Hugging Face directory (float32 safetensors, tokenizer.json)."""
    import torch
    from safetensors.torch import save_file

    from exporters.gguf_tokenizer import tokenizer_from_gguf

    path.mkdir(parents=True, exist_ok=True)
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for name, w in random_weights(seed).items():
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        else:
            _, i, part, _ = name.split(".")
            key = f"model.layers.{i}.{names[part]}.weight"
            if part in ("attn_q", "attn_k"):  # GGUF rows are permuted for interleaved RoPE: undo it
                heads = TINY["heads"] if part == "attn_q" else TINY["kv_heads"]
                w = w.reshape(heads, -1, 2, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": [architecture],
        "hidden_size": TINY["hidden"],
        "intermediate_size": TINY["ffn"],
        "num_attention_heads": TINY["heads"],
        "num_key_value_heads": TINY["kv_heads"],
        "num_hidden_layers": TINY["num_layers"],
        "vocab_size": 49152,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": TINY["context"],
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config))
    tokenizer_from_gguf(gguf.GGUFReader(str(embedded_model_path()))).save(str(path / "tokenizer.json"))
    chat_template = embedded_tokenizer_fields()["chat_template"]
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": chat_template, "eos_token": "<|im_end|>"})
    )
    return path


def write_unsupported_type_gguf(path: Path, qtype: QT = QT.Q8_1) -> Path:
    """The tiny model with blk.0.attn_q stored as raw bytes of a type gguf cannot dequantize."""
    base = write_tiny_gguf(path.with_suffix(".base.gguf"), matrix_type=QT.F32, embed_type=QT.F32)
    reader = gguf.GGUFReader(str(base))
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(
            field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None
        )
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name == "blk.0.attn_q.weight":
            rows, cols = data.shape
            raw = rng.integers(0, 256, (rows, cols // block_values * block_bytes), dtype=np.uint8)
            writer.add_tensor(tensor.name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    base.unlink()
    return path
