"""Checkpoint -> artifact directory: choose the weight format, export ONNX, write the manifest.

    export_artifact(checkpoint, out_dir, options) writes, atomically:
        model.onnx            the serving graph (one FlashAttention node per layer + its function body;
                              SAQ: one FlashAttentionSaq node per layer, no body: it needs our kernels)
        model.onnx.data       weights as external data
        tokenizer.json        the tokenizer
        manifest.yaml         architecture, KV layout, op versions, opset, sha256 of every file

The export runs in a temporary sibling directory that is renamed into place at the end, so a
failed export leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from exporters.attention_function import flash_attention_function
from exporters.calibration import CALIBRATION_MODULES, CALIBRATION_TOKENS, calibrate_k_means, calibration_ids
from exporters.checkpoint import LAYER_TENSORS, QUANT_BLOCK, BlockQuant, CheckpointError
from exporters.model import (
    ATTENTION_DOMAIN,
    ATTENTION_OP,
    ATTENTION_OP_VERSION,
    SAQ_ATTENTION_OP,
    Llama,
    hadamard,
)
from kernels.kv_formats import KV_QUANT_FORMATS, SAQ_DEFAULT, SAQ_FORMAT, SaqFormat, group_size
from runtime.artifact import MODEL_FILE, WEIGHTS_FILE, write_manifest
from runtime.kv_cache import pool_tensors

OPSET = 23
WEIGHT_MODES = ("auto", "fp", "int8", "int4")
COMPUTE_MODES = {"fp32": 0, "int8": 4}  # MatMulNBits accuracy_level: 4 = int8 activations
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What `export-model` was asked for."""

    dtype: str = "fp32"  # activations and fp weights: fp32 or fp16
    kv_dtype: str = "auto"  # KV cache storage: fp32, fp16, int8, int4, saq, or auto (= dtype)
    kv_saq: str = SAQ_DEFAULT  # the SAQ staircase when kv_dtype is saq (kernels/kv_formats.SaqFormat.parse)
    weights: str = "auto"  # auto: keep the checkpoint's blocks or floats; fp; int8; int4
    compute: str = "int8"  # MatMulNBits compute: int8 (fast, activations quantized) or fp32 (exact)
    progress: bool = True

    @property
    def kv_format(self) -> str:
        return self.dtype if self.kv_dtype == "auto" else self.kv_dtype

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("dtype", self.dtype, tuple(DTYPES)),
            ("kv-dtype", self.kv_dtype, ("auto", *DTYPES, *KV_QUANT_FORMATS, SAQ_FORMAT)),
            ("weights", self.weights, WEIGHT_MODES),
            ("compute", self.compute, tuple(COMPUTE_MODES)),
        ):
            if value not in allowed:
                raise ValueError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
        if self.kv_dtype == SAQ_FORMAT:
            self.saq_format(width=0)  # the spec's syntax and stairs now; the width is checked at export

    def saq_format(self, width: int) -> SaqFormat:
        """The staircase for KV rows of `width` channels; a bad --kv-saq raises ValueError naming it.
        width 0 checks only what does not depend on the model."""
        try:
            return SaqFormat.parse(self.kv_saq, width)
        except ValueError as e:
            raise ValueError(f"--kv-saq {self.kv_saq!r}: {e}") from None


@dataclass
class WeightPlan:
    """The weights the model is built from, and what happened to each on the way."""

    tensors: dict = field(default_factory=dict)
    carried: dict[str, str] = field(default_factory=dict)  # name -> source block type kept as is
    requantized: dict[str, str] = field(default_factory=dict)  # name -> "Q8_0 -> fp32" etc.


def plan_weights(checkpoint, options: ExportOptions, progress: tqdm | None = None) -> WeightPlan:
    """Read every tensor and decide its format (see ExportOptions)."""
    config = checkpoint.config
    plan = WeightPlan()
    names = ["embed", "final_norm"] + [
        f"layers.{i}.{p}" for i in range(config.num_layers) for p in LAYER_TENSORS
    ]
    if not config.tie_word_embeddings:
        names.append("lm_head")
    for name in names:
        plan.tensors[name] = _read_weight(checkpoint, name, options, plan)
        if progress is not None:
            progress.update(1)
    if config.tie_word_embeddings:
        plan.tensors["lm_head"] = _tied_head(plan.tensors["embed"], options, plan)
    return plan


def _tied_head(embed, options: ExportOptions, plan: WeightPlan):
    """The output projection of a tied model: the embedding table itself, when MatMulNBits runs it well."""
    source = embed.kind if isinstance(embed, BlockQuant) else "float"
    if options.weights == "int4" and options.compute == "int8":
        table = embed.dequantize() if isinstance(embed, BlockQuant) else embed
        plan.requantized["lm_head"] = f"tied {source} table -> 4-bit blocks of {QUANT_BLOCK} for the head"
        return quantize_blocks(table, 4)
    if isinstance(embed, BlockQuant) and (
        embed.bits != 8 or embed.mins is not None or options.compute == "fp32"
    ):
        # MatMulNBits computes 8-bit weights fast only with int8 activations; keep the head exact
        plan.requantized["lm_head"] = f"tied {source} table dequantized to {options.dtype} for the head"
        return embed.dequantize()
    return embed


MATRICES = ("embed", "lm_head", "q", "k", "v", "o", "gate", "up", "down")
FLOAT_TYPES = ("F32", "F16", "BF16")


def _read_weight(checkpoint, name: str, options: ExportOptions, plan: WeightPlan):
    if name.rsplit(".", 1)[-1] not in MATRICES:
        return checkpoint.float_tensor(name)  # norms stay float
    if options.weights != "fp":
        blocks = checkpoint.quant_blocks(name)
        if blocks is not None and blocks.mins is not None and options.weights == "int4" and name != "embed":
            plan.requantized[name] = f"{blocks.kind} -> 4-bit blocks with integer zero points"
            return integer_zero_points(blocks)
        if blocks is not None and _runs_fast(blocks.bits, name, options):
            plan.carried[name] = blocks.kind
            return blocks
    source = checkpoint.tensor_type(name)
    w = checkpoint.float_tensor(name)
    bits = {"int8": 8, "int4": 4}.get(options.weights)
    if name == "embed" and bits:
        bits = 8  # a 4-bit embedding costs quality for little memory on small models
    if bits and _runs_fast(bits, name, options) and w.shape[1] % QUANT_BLOCK == 0:
        plan.requantized[name] = f"{source} -> {bits}-bit blocks of {QUANT_BLOCK}"
        return quantize_blocks(w, bits)
    if source not in FLOAT_TYPES:
        plan.requantized[name] = f"{source} dequantized to {options.dtype}"
    return w


def _runs_fast(bits: int, name: str, options: ExportOptions) -> bool:
    """MatMulNBits on CPU runs 8-bit weights fast only with int8 activations; gathers are always fine."""
    return name == "embed" or bits == 4 or options.compute == "int8"


def integer_zero_points(blocks: BlockQuant) -> BlockQuant:
    """Q4_1 (w = d*q + m) as MatMulNBits' native form w = d*(q - z), z = round(-m/d) per block.

    The block's 16 levels keep their spacing d; they move by m + d*z, at most d/2 when z is not
    clipped to [0, 15]. That is the cost of dropping the separate per-block minimum (and the extra
    nodes and bytes it needs) in `--weights int4`.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(blocks.scales != 0, np.rint(-blocks.mins / blocks.scales), 0)
    z = np.clip(z, 0, 2**blocks.bits - 1).astype(np.uint8)
    return BlockQuant("Q4_1", blocks.bits, blocks.codes, blocks.scales, z, None)


def quantize_blocks(w: np.ndarray, bits: int) -> BlockQuant:
    """Symmetric round-to-nearest blocks of 32 (Q8_0 / Q4_0 style)."""
    n, k = w.shape
    blocks = w.reshape(n, k // QUANT_BLOCK, QUANT_BLOCK).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(blocks).max(-1)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    zero_point = 2 ** (bits - 1)
    codes = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax) + zero_point
    kind = {8: "Q8_0", 4: "Q4_0"}[bits]
    return BlockQuant(kind, bits, codes.astype(np.uint8).reshape(n, k), scales, zero_point, None)


# ----------------------------------------------------------------------------------------------
# ONNX


def saq_pool(fmt: SaqFormat) -> list[tuple[str, str, int]]:
    """One layer's SAQ pool tensors, uint8 each: (name, leading dimension, bytes per row). The runtime's
    PoolTensor calls them per "block" and per "slot" (kernels/kv_formats.SaqFormat has the layout)."""
    return [("kv_pool", "num_blocks", fmt.block_bytes), ("kv_slots", "num_slots", fmt.slot_bytes)]


def example_inputs(model: Llama, kv_format: str):
    config = model.config
    B, S, max_blocks, num_blocks, block_size, num_slots = 2, 3, 2, 5, 16, 6
    Dim = torch.export.Dim
    if model.saq is not None:
        rows = {"num_blocks": (num_blocks, Dim("num_blocks")), "num_slots": (num_slots, Dim("num_slots"))}
        pool = saq_pool(model.saq) * config.num_layers
        caches = [torch.zeros(rows[dim][0], size, dtype=torch.uint8) for _, dim, size in pool]
        pool_dims = [{0: rows[dim][1]} for _, dim, _ in pool]
    else:
        pool = pool_tensors(kv_format, config.num_kv_heads * config.head_dim, config.head_dim)
        caches = [
            torch.from_numpy(np.zeros((num_blocks, block_size, t.width), t.dtype))
            for _ in range(config.num_layers)
            for t in pool
        ]
        pool_dims = [{0: Dim("num_blocks"), 1: Dim("block_size")}] * len(caches)
    args = (
        torch.zeros(B, S, dtype=torch.int64),
        torch.zeros(B, S, dtype=torch.int64),
        torch.zeros(B, S, dtype=torch.int64),
        torch.zeros(B, max_blocks, dtype=torch.int32),
        torch.zeros(B, dtype=torch.int32),
        torch.ones(B, dtype=torch.int32),
        torch.zeros(B, 1, dtype=torch.int64),
        caches,
    )
    batch, seq, blocks, logits = Dim("batch", max=65536), Dim("seq"), Dim("max_blocks"), Dim("num_logits")
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {0: batch, 1: blocks},
        {0: batch},
        {0: batch},
        {0: batch, 1: logits},
        pool_dims,
    )
    if model.saq is not None:  # each row's slot
        args, dynamic = (*args, torch.zeros(B, dtype=torch.int32)), (*dynamic, {0: batch})
    return args, dynamic


EXPORT_STAGES = ("tracing and translating to ONNX", "optimizing the graph", "writing files")


def export_onnx(model: Llama, path: Path, kv_format: str, stage=lambda name: None) -> None:
    """Export the serving graph to `path` (+ external data) with canonical input/output names.

    `stage(name)` is called as each of EXPORT_STAGES begins (for progress display).
    """
    args, dynamic = example_inputs(model, kv_format)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        stage(EXPORT_STAGES[0])
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=dynamic,
            optimize=False,
            verbose=False,
        )
        stage(EXPORT_STAGES[1])
        program.optimize()
    stage(EXPORT_STAGES[2])
    proto = program.model_proto
    config = model.config
    _rename_io(proto, cache_names(kv_format, config, model.saq))
    _use_native_rms_norm(proto)
    if model.saq is None:  # SAQ has no body: its artifact runs on our kernels only
        proto.functions.append(flash_attention_function(OPSET, kv_format, config.head_dim))
    _check_attention_nodes(proto, config.num_layers, SAQ_ATTENTION_OP if model.saq else ATTENTION_OP)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )


class _quiet_torch_logs:
    """The exporter logs warnings about optional packages (torchvision) that do not concern us."""

    def __enter__(self):
        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def cache_names(kv_format: str, config, saq: SaqFormat | None = None) -> tuple[list[str], list[str]]:
    """Graph names of every layer's pool tensors (runtime.kv_cache.pool_tensors, or `saq_pool`), inputs
    and outputs."""
    if saq is not None:
        pool = [name for name, _, _ in saq_pool(saq)]
    else:
        width = config.num_kv_heads * config.head_dim
        pool = [t.name for t in pool_tensors(kv_format, width, config.head_dim)]
    inputs = [f"{name}.{i}" for i in range(config.num_layers) for name in pool]
    return inputs, [f"{name}.out" for name in inputs]


def _rename_io(proto: onnx.ModelProto, names: tuple[list[str], list[str]]) -> None:
    """Inputs after the first 7 are the caches, then (SAQ) seq_slots; outputs: logits, the caches."""
    cache_in, cache_out = names
    inputs = proto.graph.input[7:]
    outputs = proto.graph.output
    renames = {old.name: new for old, new in zip(inputs, cache_in + ["seq_slots"])}
    renames[outputs[0].name] = "logits"
    renames.update({old.name: new for old, new in zip(outputs[1:], cache_out)})
    for value in list(inputs) + list(outputs):
        value.name = renames[value.name]
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _use_native_rms_norm(proto: onnx.ModelProto) -> None:
    """RMSNormalization-23 -> SimplifiedLayerNormalization, the same math (fp32 inside) with a native
    kernel in every ONNX Runtime build; ORT runs opset-23 RMSNormalization far slower (measured on this
    model: 7.6 -> 6.2 ms per decode step on 2 cores)."""
    for node in proto.graph.node:
        if node.op_type != "RMSNormalization":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        node.op_type = "SimplifiedLayerNormalization"
        del node.attribute[:]
        node.attribute.extend(
            [
                onnx.helper.make_attribute("axis", int(attrs.get("axis", -1))),
                onnx.helper.make_attribute("epsilon", float(attrs.get("epsilon", 1e-5))),
                onnx.helper.make_attribute("stash_type", 1),  # compute in fp32
            ]
        )


def _check_attention_nodes(proto: onnx.ModelProto, num_layers: int, op_type: str) -> None:
    found = [n for n in proto.graph.node if n.domain == ATTENTION_DOMAIN and n.op_type == op_type]
    if len(found) != num_layers:
        raise RuntimeError(f"export produced {len(found)} {op_type} nodes for {num_layers} layers")


# ----------------------------------------------------------------------------------------------
# The artifact


def export_artifact(
    checkpoint, out_dir: str | Path, options: ExportOptions, *, replace: bool = False
) -> Path:
    """Write the artifact for `checkpoint` to `out_dir`; an existing one is replaced only on success."""
    out_dir = Path(out_dir)
    if not replace and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it, pass --force or another --out")
    config = checkpoint.config
    dtype = DTYPES[options.dtype]
    if options.kv_format == SAQ_FORMAT:  # before anything is written: a bad --kv-saq fails here
        options.saq_format(config.num_kv_heads * config.head_dim)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    quiet = not options.progress
    try:
        tokenizer = checkpoint.tokenizer_spec()
        (tmp / "tokenizer.json").write_text(tokenizer.tokenizer_json)
        num_tensors = 2 + config.num_layers * len(LAYER_TENSORS) + (not config.tie_word_embeddings)
        with tqdm(total=num_tensors, desc="reading weights", unit="tensor", disable=quiet) as bar:
            plan = plan_weights(checkpoint, options, bar)
        kv_quantized = options.kv_format in KV_QUANT_FORMATS  # SAQ needs no calibration (no K means)
        model = Llama(
            config,
            plan.tensors,
            dtype,
            COMPUTE_MODES[options.compute],
            options.kv_format if kv_quantized or options.kv_format == SAQ_FORMAT else "",
            options.kv_saq,
        ).eval()
        if kv_quantized:
            tokens = min(CALIBRATION_TOKENS, config.max_position_embeddings)
            calibrate_k_means(model, calibration_ids(tokenizer.tokenizer_json, tokens))
        del plan.tensors
        with tqdm(total=len(EXPORT_STAGES), desc="exporting", unit="stage", disable=quiet) as bar:

            def stage(name: str) -> None:
                bar.n = EXPORT_STAGES.index(name)  # stages finished so far
                bar.set_postfix_str(name)  # also redraws the bar

            export_onnx(model, tmp / MODEL_FILE, options.kv_format, stage)
            del model
            write_manifest(tmp, _manifest(config, tokenizer, options, plan))
            bar.update(len(EXPORT_STAGES) - bar.n)
        _publish(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _publish(folder: Path) -> None:
    """Give the artifact the usual permissions (mkdtemp and the ONNX writer make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _kv_manifest(kv_format: str, config, saq: SaqFormat | None) -> dict:
    if saq is not None:
        return _saq_manifest(saq, config)
    entry = {
        "format": kv_format,
        "layout": "paged",
        "pool": [f"{t.name}: [num_blocks, block_size, {t.width}] {t.dtype}" for t in pool_tensors(
            kv_format, config.num_kv_heads * config.head_dim, config.head_dim)],
        "in_place": True,
    }  # fmt: skip
    if kv_format in KV_QUANT_FORMATS:
        entry["group"] = group_size(kv_format, config.head_dim)
        entry["spec"] = "kernels/kv_quant.py"
        entry["k_rotation"] = "hadamard" if hadamard(config.head_dim) is not None else "none"
        entry["k_mean_calibration"] = (
            f"{CALIBRATION_TOKENS} tokens of docstrings of {', '.join(CALIBRATION_MODULES)}"
        )
    return entry


def _saq_manifest(saq: SaqFormat, config) -> dict:
    rotated = hadamard(config.head_dim) is not None
    return {
        "format": SAQ_FORMAT,
        "saq": saq.text(),
        "stage": saq.stage,  # tokens per stage: the runtime's block_size
        "stairs": saq.stairs_text,
        "v_group": saq.v_group,
        "block_bytes": saq.block_bytes,
        "slot_bytes": saq.slot_bytes,
        "layout": "paged bottom stair + one slot per sequence",
        "pool": [f"{name}: [{dim}, {size}] uint8" for name, dim, size in saq_pool(saq)],
        "in_place": True,
        "rotation": "hadamard q,k,v" if rotated else "none",  # in the graph, around the node
        "spec": "kernels/kv_saq.py",
    }


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(config, tokenizer, options: ExportOptions, plan: WeightPlan) -> dict:
    carried = {kind: list(plan.carried.values()).count(kind) for kind in sorted(set(plan.carried.values()))}
    saq = (
        options.saq_format(config.num_kv_heads * config.head_dim) if options.kv_format == SAQ_FORMAT else None
    )
    if saq is not None:
        pool = [name for name, _, _ in saq_pool(saq)]
    else:
        width = config.num_kv_heads * config.head_dim
        pool = [t.name for t in pool_tensors(options.kv_format, width, config.head_dim)]
    return {
        "model": {
            "name": config.name,
            "architecture": config.architecture,
            "num_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "sliding_window": config.sliding_window,
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        "graph": {
            "file": MODEL_FILE,
            "opset": OPSET,
            "dtype": options.dtype,
            "attention_op": {
                "domain": ATTENTION_DOMAIN,
                "name": SAQ_ATTENTION_OP if saq else ATTENTION_OP,
                "version": ATTENTION_OP_VERSION,
            },
            "inputs": [
                "input_ids",
                "position_ids",
                "slot_mapping",
                "block_table",
                "past_lens",
                "total_lens",
                "logit_positions",
                *(f"{name}.{{layer}}" for name in pool),
                *(["seq_slots"] if saq else []),
            ],
            "outputs": ["logits", *(f"{name}.{{layer}}.out" for name in pool)],
        },
        "weights": {
            "mode": options.weights,
            "compute": options.compute,
            "carried_blocks": carried,  # GGUF block type -> tensors kept as they are
            "requantized": plan.requantized,
        },
        "kv_cache": _kv_manifest(options.kv_format, config, saq),
        "tokenizer": {
            "file": "tokenizer.json",
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_ids": list(tokenizer.eos_token_ids),
            "add_bos_token": tokenizer.add_bos_token,
            "chat_template": tokenizer.chat_template,
        },
    }


__all__ = ["ExportOptions", "export_artifact", "CheckpointError"]
