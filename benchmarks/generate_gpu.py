"""GPU decode benchmark: our torch backend against the same module with plain PyTorch SDPA attention.

All engines run the weights `TorchBackend` loads from the artifact (`--artifact`, the directory
`export-model` writes for the embedded SmolLM2-135M-Instruct), dequantized to fp16 on the GPU, so only
the attention and the step machinery differ:
  ours        TorchBackend, compute_dtype fp16: paged KV pool, Triton split-KV decode and varlen prefill,
              decode steps replayed from CUDA graphs (block tables padded to --max-seq-len)
  ours-eager  the same without CUDA graphs
  sdpa        the same module with each layer's attention written plainly: a contiguous
              [B, num_kv_heads, max_len, head_dim] cache per layer and
              torch.nn.functional.scaled_dot_product_attention (enable_gqa=True), eager, no custom kernel
Definitions, identical for every engine:
  prompt        --prompt-len random token ids per row (numpy seed 0), every row the same length
  prefill tok/s B * prompt_len / (start -> first token ids on the host)
  decode tok/s  B * (new_tokens - 1) / (first token ids -> last token ids); greedy: logits are copied to
                the host and argmax'ed there every step (as the engine does), EOS ignored
One warm-up generation per (engine, batch) (it captures the CUDA graphs), then --repeats timed ones;
medians and every sample go to the JSON (benchmarks/results/generate_gpu.json by default).

    python benchmarks/generate_gpu.py --artifact artifacts/smollm2-135m-instruct
    python benchmarks/generate_gpu.py --random      # SmolLM2-shaped random weights, no artifact needed
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporters.checkpoint import ModelConfig
from exporters.model import Llama
from runtime.artifact import Artifact, ModelSpec, load_artifact
from runtime.backends.onnxruntime import StepBatch
from runtime.backends.torch_cuda import TorchBackend, load_model
from runtime.config import RuntimeConfig
from runtime.kv_cache import KVCacheLayout

RESULTS = Path(__file__).resolve().parent / "results" / "generate_gpu.json"
ENGINES = ("ours", "ours-eager", "sdpa")
BLOCK_SIZE = 16
NOTE = (
    "Every step copies its inputs to the GPU and the logits [B, 1, V] back, and argmaxes on the host, in "
    "every engine. The eager rows are bound by launching each step's kernels from Python (dozens per "
    "layer), so at this context (256 tokens) CUDA graphs, not the attention kernel, make the difference; "
    "the SDPA baseline was not run with CUDA graphs."
)
SMOLLM2 = ModelConfig(
    "llama", 30, 576, 1536, 9, 3, 64, 49152, 1e5, 1e-5, 8192, True, name="random SmolLM2-135M"
)


# -- the baseline: the same module, attention over a dense cache with SDPA -------------------------


class DenseCacheAttention(nn.Module):
    """A layer's attention written plainly: K/V appended to a contiguous cache, then SDPA over it.

    All rows hold the same number of positions, `state["length"]`, which the generation loop advances.
    The paged-pool arguments of the model's forward are ignored.
    """

    def __init__(self, inner: nn.Module, state: dict, batch: int, max_len: int, dtype, device) -> None:
        super().__init__()
        self.inner, self.state = inner, state
        shape = (batch, inner.num_kv_heads, max_len, inner.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x, rope, k_cache, v_cache, kv):
        a = self.inner
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, -1, a.head_dim).transpose(1, 2) for t in a.project(x, rope))
        start = self.state["length"]
        if S > 1 and start > 0:
            raise ValueError("the dense baseline prefills from position 0 only")
        self.k[:B, :, start : start + S] = k
        self.v[:B, :, start : start + S] = v
        o = F.scaled_dot_product_attention(
            q, self.k[:B, :, : start + S], self.v[:B, :, : start + S],
            is_causal=S > 1, scale=a.head_dim**-0.5, enable_gqa=True,
        )  # fmt: skip
        return a.o(o.transpose(1, 2).reshape(B, S, -1)), k_cache, v_cache


class SdpaModel:
    """The module with DenseCacheAttention in every layer; `step` mirrors TorchBackend.run's in and out."""

    def __init__(self, model: Llama, batch: int, max_len: int) -> None:
        self.state = {"length": 0}
        device, dtype = model.rope_cos.device, model.rope_cos.dtype
        for layer in model.layers:
            inner = getattr(layer.attn, "inner", layer.attn)
            layer.attn = DenseCacheAttention(inner, self.state, batch, max_len, dtype, device)
        self.model, self.device = model, device
        self.dummy = torch.zeros(1, 1, dtype=torch.int64, device=device)
        self.caches = [None] * (2 * len(model.layers))

    def step(self, ids: np.ndarray, start: int) -> np.ndarray:
        B, S = ids.shape
        self.state["length"] = start
        positions = torch.arange(start, start + S, device=self.device).expand(B, S)
        with torch.no_grad():
            lens = self.dummy[0].int()
            logits, _ = self.model(
                torch.from_numpy(ids).to(self.device), positions, self.dummy, self.dummy.int(), lens, lens,
                torch.full((B, 1), S - 1, device=self.device), self.caches,
            )  # fmt: skip
        return logits.cpu().numpy()


# -- generation loops --------------------------------------------------------------------------------


def step_batch(ids: np.ndarray, start: int, tables: np.ndarray) -> StepBatch:
    """Every row at the same position `start`, S new tokens, logits of the last one."""
    B, S = ids.shape
    positions = np.broadcast_to(np.arange(start, start + S), (B, S))
    slots = np.take_along_axis(tables, positions // BLOCK_SIZE, 1).astype(np.int64) * BLOCK_SIZE
    return StepBatch(
        input_ids=ids, position_ids=np.ascontiguousarray(positions),
        slot_mapping=slots + positions % BLOCK_SIZE, block_table=tables,
        past_lens=np.full(B, start, np.int32), total_lens=np.full(B, start + S, np.int32),
        logit_positions=np.full((B, 1), S - 1, np.int64),
    )  # fmt: skip


def generate(step, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation; step(ids [B, S], start) -> logits."""
    B, prompt_len = prompts.shape
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = step(prompts, 0)[:, -1].argmax(-1)
    t1 = time.perf_counter()
    for i in range(new_tokens - 1):
        tokens = step(tokens[:, None].astype(np.int64), prompt_len + i)[:, -1].argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def make_engine(name: str, base: Llama, artifact: Artifact, batch: int, args) -> object:
    """A `step(ids, start) -> logits` callable for engine `name` at batch size `batch`."""
    model = copy.deepcopy(base)
    if name == "sdpa":
        return SdpaModel(model.cuda(), batch, args.prompt_len + args.new_tokens).step
    blocks_per_row = -(-(args.prompt_len + args.new_tokens) // BLOCK_SIZE)
    layout = KVCacheLayout(1 + batch * blocks_per_row, BLOCK_SIZE, artifact.kv_bytes_per_token)
    config = RuntimeConfig(
        backend="torch", device="cuda", compute_dtype="fp16", cuda_graphs=name == "ours",
        max_batch_size=batch, max_seq_len=args.max_seq_len,
    )  # fmt: skip
    backend = TorchBackend(artifact, config, layout, model=model)
    tables = 1 + np.arange(batch * blocks_per_row, dtype=np.int32).reshape(batch, blocks_per_row)
    return lambda ids, start: backend.run(step_batch(ids, start, tables))


def measure(name: str, base: Llama, artifact: Artifact, batch: int, args) -> dict:
    step = make_engine(name, base, artifact, batch, args)
    prompts = np.random.default_rng(0).integers(0, artifact.model.vocab_size, (batch, args.prompt_len))
    generate(step, prompts, args.new_tokens)  # warm-up: compiles kernels, captures graphs
    samples = [generate(step, prompts, args.new_tokens) for _ in range(args.repeats)]
    prefill = [batch * args.prompt_len / p for p, _ in samples]
    decode = [batch * (args.new_tokens - 1) / d for _, d in samples]
    result = dict(engine=name, batch=batch, decode_tok_s=statistics.median(decode))
    result |= dict(prefill_tok_s=statistics.median(prefill), decode_samples=decode, prefill_samples=prefill)
    decode_tok_s, prefill_tok_s = result["decode_tok_s"], result["prefill_tok_s"]
    print(f"{name:>10} B={batch:<3} decode {decode_tok_s:9.0f} tok/s   prefill {prefill_tok_s:9.0f} tok/s")
    del step
    torch.cuda.empty_cache()
    return result


# -- the weights -------------------------------------------------------------------------------------


def random_model(config: ModelConfig) -> tuple[Llama, Artifact]:
    """SmolLM2-shaped random weights (same speed as the real ones) and an artifact-like description."""
    rng = np.random.default_rng(0)
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = dict(q=(config.num_heads * d, h), k=(config.num_kv_heads * d, h), v=(config.num_kv_heads * d, h))
    shapes |= dict(o=(h, config.num_heads * d), gate=(f, h), up=(f, h), down=(h, f))
    weights = {
        "embed": rng.standard_normal((config.vocab_size, h), np.float32),
        "final_norm": np.ones(h, np.float32),
    }
    for i in range(config.num_layers):
        weights |= {
            f"layers.{i}.{n}": rng.standard_normal(s, np.float32) * s[1] ** -0.5 for n, s in shapes.items()
        }
        weights |= {
            f"layers.{i}.attn_norm": np.ones(h, np.float32),
            f"layers.{i}.mlp_norm": np.ones(h, np.float32),
        }
    weights["lm_head"] = weights["embed"]
    spec = ModelSpec(config.name, config.num_layers, config.num_heads, config.num_kv_heads, d,
                     config.vocab_size, config.max_position_embeddings, 0)  # fmt: skip
    artifact = Artifact(Path("(random weights)"), {}, spec, "fp16", "fp16")
    return Llama(config, weights, torch.float16).eval(), artifact


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(gpu=props.name, sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), host=platform.node(),
                platform=platform.platform())  # fmt: skip


def versions() -> dict:
    import onnxruntime
    import triton

    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, onnxruntime=onnxruntime.__version__)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="artifact directory (export-model's output)")
    source.add_argument("--random", action="store_true", help="SmolLM2-shaped random weights instead")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--max-seq-len", type=int, default=0, help="ours: block-table width of the graphs; 0 = context"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    command = ["python", "benchmarks/generate_gpu.py", *(sys.argv[1:] if argv is None else argv)]
    if not torch.cuda.is_available():
        print("generate_gpu: no CUDA device", file=sys.stderr)
        return 2
    if args.random:
        base, artifact = random_model(SMOLLM2)
    else:
        artifact = load_artifact(args.artifact)
        base = load_model(artifact, torch.float16)
    print(f"{torch.cuda.get_device_name(0)}, {artifact.model.name} ({artifact.path}), fp16, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")  # fmt: skip
    results = [
        measure(engine, base, artifact, int(batch), args)
        for batch in args.batches.split(",")
        for engine in args.engines.split(",")
    ]
    max_seq_len = args.max_seq_len or artifact.model.max_position_embeddings
    report = dict(
        benchmark="GPU decode tokens/s: TorchBackend (Triton attention, CUDA graphs) vs plain PyTorch SDPA",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(command),
        machine=machine(),
        versions=versions(),
        model=dict(name=artifact.model.name, source=str(artifact.path), weights="dequantized to fp16"),
        settings=dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                      block_size=BLOCK_SIZE, max_seq_len=max_seq_len),
        note=NOTE,
        results=results,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
